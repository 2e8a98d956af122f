"""Value types of the JSON side files omgtool acts on (adapter_config.json, config.json).

`check_adapter_config` / `check_model_config` return the reason a value is unusable, or
None: a list where a number belongs, NaN or a boolean as a count, a 300-million layer
count. Readers raise it as exit 2 when they read the file; analysis code that meets a
config embedded in a pickle's metadata treats an unusable one as absent.
"""

from __future__ import annotations

import math
from typing import Any

MAX_COUNT = 1 << 24  # layers, heads, widths, ranks: generous, and far below what a loop can't do
MAX_VOCAB = 1 << 28
MAX_PATTERNS = 10_000


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) and abs(v) < 1 << 63) or (isinstance(v, float) and math.isfinite(v))


def _count(v: Any, cap: int = MAX_COUNT) -> bool:
    return _is_int(v) and 0 <= v <= cap


def _str_list(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _pattern_map(v: Any, value_ok) -> bool:
    return (isinstance(v, dict) and len(v) <= MAX_PATTERNS
            and all(isinstance(k, str) and value_ok(x) for k, x in v.items()))


ADAPTER_FIELDS = {
    "r": ("a positive integer", lambda v: _count(v) and v > 0),
    "lora_alpha": ("a finite number", _is_number),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "target_modules": ("a string or a list of strings", _str_list),
    "modules_to_save": ("a list of strings", _str_list),
    "rank_pattern": ("an object of positive integers", lambda v: _pattern_map(v, lambda x: _count(x) and x > 0)),
    "alpha_pattern": ("an object of finite numbers", lambda v: _pattern_map(v, _is_number)),
    "base_model_name_or_path": ("a string", lambda v: isinstance(v, str)),
    "peft_type": ("a string", lambda v: isinstance(v, str)),
    "bias": ("a string", lambda v: isinstance(v, str)),
}

MODEL_COUNTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "mm_hidden_size",
                "num_layers", "n_layer", "n_head", "n_embd", "image_size", "patch_size")
MODEL_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "initializer_range")
NESTED_CONFIGS = ("text_config", "vision_config", "llm_config")


def check_adapter_config(cfg: dict) -> str | None:
    for key, (want, ok) in ADAPTER_FIELDS.items():
        if cfg.get(key) is not None and not ok(cfg[key]):
            return f"adapter_config.json: {key} must be {want}, got {_shown(cfg[key])}"
    return None


def check_model_config(cfg: dict, where: str = "config.json") -> str | None:
    for key in MODEL_COUNTS:
        if cfg.get(key) is not None and not _count(cfg[key]):
            return f"{where}: {key} must be an integer between 0 and {MAX_COUNT}, got {_shown(cfg[key])}"
    if cfg.get("vocab_size") is not None and not _count(cfg["vocab_size"], MAX_VOCAB):
        return f"{where}: vocab_size must be an integer between 0 and {MAX_VOCAB}, got {_shown(cfg['vocab_size'])}"
    for key in MODEL_NUMBERS:
        if cfg.get(key) is not None and not _is_number(cfg[key]):
            return f"{where}: {key} must be a finite number, got {_shown(cfg[key])}"
    for key in NESTED_CONFIGS:
        inner = cfg.get(key)
        if inner is not None:
            if not isinstance(inner, dict):
                return f"{where}: {key} must be an object, got {_shown(inner)}"
            problem = check_model_config(inner, f"{where} {key}")
            if problem:
                return problem
    return None


def usable_adapter_config(value: Any) -> dict | None:
    """`value` if it is an adapter config whose values have the right types, else None."""
    return value if isinstance(value, dict) and check_adapter_config(value) is None else None


def _shown(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return f"a {'list' if isinstance(v, list) else 'object'} of {len(v)}"
    if _is_int(v) and v.bit_length() > 64:
        return f"an integer of {v.bit_length()} bits"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
