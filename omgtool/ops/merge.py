"""merge-lora: stream a checkpoint's LoRA (and its trained full tensors) into a base model folder.

Library use, without the CLI::

    from omgtool.ops.merge import plan_merge, run_merge
    plan = plan_merge("omg_llava_7b_finetune_8gpus.pth", "internlm2-chat-7b")
    print(plan.describe())            # what --dry-run prints; nothing is written, no torch imported
    report = run_merge(plan, "merged/")

Generic over families through `mappings/`: the components whose `merge_target` is "model"
(the family's `llm`) name their weights with the base model's own key names
(`KeyMatch.weight`); LoRA pairs come from `omgtool.arch.infer.find_lora_pairs`, alpha from
`omgtool.arch.infer.resolve_alpha`, the scale from `omgtool.kernels.lora`. For each base
weight, in the base's own order:

- merged:   W' = W + scale * B @ A, in float32 (no TF32), rounded once to the output dtype
- replaced: a full tensor of the checkpoint takes the base tensor's place (trained in full),
            possibly with more rows (vocab-sized tensors only: embeddings, head; the plan says
            "trained, 92544 → 92548 rows"); a LoRA on it (OMG-LLaVA's `output`) is merged into
            the checkpoint's tensor;
- copied:   bit-exact, or converted when --dtype changes the dtype.

Tensors of other components go to the file their mapping names (`projector.safetensors`),
keys no mapping explains to `extras.safetensors`, both under their original names and dtypes.

The plan (an `omgtool.plan.model.Plan`) is complete before anything is written: every
mismatch (hidden size, layer count, A/B rank, a LoRA target the base lacks) raises
MismatchError (exit 2) naming the tensor. `omgtool.plan.execute.execute` writes it.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omgtool.errors import InvalidArgument, MismatchError, UnreadableInput
from omgtool.formats.names import BASE_README, CONFIG, EXTRAS_FILE, MERGE_RECORD, README
from omgtool.plan.model import Artifact, Input, Plan, PlannedTensor, Source, TensorFile, main_dtype
from omgtool.progress import NULL_PROGRESS, Progress
from omgtool.sizes import format_size, size_on_disk

MODEL = "model"
RECORD = MERGE_RECORD
ACTIONS = ("merged", "replaced", "added", "converted", "copied")
# Weight files of a base folder that are never carried (the merged weights replace them).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                   "*.pth", "*.pt", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "consolidated*")
SKIPPED_DIRS = (".cache", ".git", ".huggingface")
NUMERICS = ("W' = W + scale * B @ A (scale = alpha/r, alpha/sqrt(r) for rsLoRA) in float32 (TF32 off), rounded "
            "once to the output dtype; untouched base tensors copied bit-exactly")


@dataclass(frozen=True)
class LoraSource:
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    transposed: bool = False  # embedding / fan_in_fan_out LoRA: delta = (B @ A).T


@dataclass
class _Planning:
    """What the planning steps share."""

    checkpoint: Path
    ckpt: Any
    analysis: Any
    fam: Any
    registry: Any
    out_dtype: str | None
    user_alpha: float | None
    notes: list[str]
    checks: list[str] = field(default_factory=list)
    resolved: Any = None  # omgtool.formats.resolve.ResolvedBase
    base_ckpt: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    model_comps: set[str] = field(default_factory=set)
    comp_specs: dict[str, list] = field(default_factory=dict)
    qlora: Any = None  # omgtool.arch.qlora.QloraPlan: --base-weights and the 4-bit settings, or None

    def spec_of(self, name: str):
        return next((w for specs in self.comp_specs.values() for rx, w in specs if rx.match(name)), None)

    def out_name(self, m) -> str:
        """A checkpoint match's name in the base (its component's base_prefix + the weight)."""
        return self.component(m.component).base_prefix + m.weight

    def component(self, name: str):
        return next(c for c in self.fam.components if c.name == name)

    @property
    def model_matches(self) -> list:
        return [m for m in self.analysis.matches.values() if m.component in self.model_comps]


def _dim_name(spec, i: int) -> str:
    return spec.dims[i] if spec is not None and i < len(spec.dims) and spec.dims[i] != "_" else f"dim {i}"


def plan_merge(checkpoint: str | Path, base: str | Path | None = None, *, alpha: float | None = None,
               dtype: str | None = None, family: str | None = None, max_shard_size: str | int = "5GB",
               device: str | None = "auto", cwd: Path | None = None, base_weights: str = "original",
               bnb: dict[str, Any] | None = None, quant_stats: bool = True) -> Plan:
    """Everything the merge will do, checked; reads metadata only (no tensor data, no torch).

    base_weights: "original" (the standard merge) or "nf4-dequant" (the LoRA is added to each
    quantized weight's bitsandbytes 4-bit round trip; settings from the family's [qlora], `bnb`
    overrides them); quant_stats: measure the round trip's error also with "original"."""
    from omgtool.formats.dtypes import parse_user_dtype
    from omgtool.kernels.device import check_device
    from omgtool.sizes import parse_size

    s = _open_checkpoint(Path(checkpoint), family, alpha, parse_user_dtype(dtype) if dtype else None)
    _open_base(s, base, cwd)
    _refuse_stray_lora(s)
    _check_layer_counts(s)
    full, added = _full_tensors(s)
    resized = _resized_rows(s, full, added)
    alpha_value, alpha_source, loras = _lora_sources(s, full)
    tensors = _model_tensors(s, full, added, resized, loras)
    tensors = _plan_qlora(s, tensors, base_weights, bnb, quant_stats)
    vocab_rows, base_vocab, out_vocab = _vocab(s, tensors)
    side = _side_tensors(s, full)
    tokens = _tokens(s, full, vocab_rows, out_vocab)
    config = _out_config(s, tensors, out_vocab, base_vocab)
    carried = _carried(s, tokens, side)
    if not loras and not full:
        s.notes.append("the checkpoint changes nothing in the base model (no LoRA on it, no full tensors)")
    vocab = {"base": base_vocab, "output": out_vocab,
             "tokenizer": (tokens.base.size + len(tokens.tokens)) if tokens.base.size is not None else None}
    return _assemble(s, tensors + side, config, tokens, carried, alpha_value, alpha_source, vocab,
                     parse_size(max_shard_size), check_device(device))


# --- planning steps -----------------------------------------------------------------------

def _open_checkpoint(checkpoint: Path, family: str | None, alpha: float | None, out_dtype: str | None) -> _Planning:
    """The checkpoint, its family and analysis; DoRA and half LoRA pairs refused."""
    from omgtool.arch.infer import adapter_settings, analyze
    from omgtool.arch.mapping import load_registry
    from omgtool.formats import open_checkpoint

    registry = load_registry()
    ckpt = open_checkpoint(checkpoint)
    analysis = analyze(ckpt, registry, family=family, alpha=alpha)
    fam = analysis.family
    if fam is None:
        raise InvalidArgument(f"{checkpoint}: no family mapping explains this checkpoint's keys; pass --family "
                              f"(one of {', '.join(sorted(registry.families))})")
    dora = [m.key for m in analysis.matches.values() if m.role == "dora_magnitude"]
    if dora or adapter_settings(ckpt).use_dora:
        raise InvalidArgument(f"{checkpoint}: DoRA ({dora[0] if dora else 'adapter_config use_dora'}) is not a "
                              "plain LoRA; its merge needs the magnitude vectors and is refused")
    paired = {k for p in analysis.lora_pairs for k in (p.a_key, p.b_key)}
    lone = [m.key for m in analysis.matches.values() if m.role in ("lora_A", "lora_B") and m.key not in paired]
    if lone:  # half a LoRA cannot be merged
        raise MismatchError(f"{checkpoint}: LoRA factor without its partner: {lone[0]}"
                            + (f" and {len(lone) - 1} more" if len(lone) > 1 else ""))
    notes = [n for n in analysis.notes if not n.startswith("LoRA factor without its partner")]
    s = _Planning(checkpoint, ckpt, analysis, fam, registry, out_dtype, alpha, notes)
    s.model_comps = {c.name for c in fam.components if c.merge_target == MODEL}
    if not s.model_comps:
        raise InvalidArgument(f"family {fam.name}: no component merges into the model (merge_into = \"model\")")
    return s


def _open_base(s: _Planning, base: str | Path | None, cwd: Path | None) -> None:
    """Resolve --base (or the adapter's base_model_name_or_path) to a full model folder."""
    from omgtool.arch.mapping import Template
    from omgtool.formats import open_checkpoint
    from omgtool.formats.resolve import resolve_base

    adapter_cfg = s.ckpt.metadata.get("adapter_config")
    if base is None:
        base = adapter_cfg.get("base_model_name_or_path") if isinstance(adapter_cfg, dict) else None
        if not base:
            raise InvalidArgument("--base is required (the base model folder or name, e.g. internlm2-chat-7b)")
    s.resolved = resolve_base(base, s.checkpoint, cwd=cwd)
    s.base_ckpt = open_checkpoint(s.resolved.path)
    if not s.base_ckpt.format.startswith("hf-folder"):
        raise InvalidArgument(f"{s.resolved.path}: --base must be a full model folder (config.json + "
                              f"model weights), not {s.base_ckpt.format}")
    config = s.base_ckpt.metadata.get("config")
    if not isinstance(config, dict):
        raise UnreadableInput("base folder has no config.json", s.resolved.path)
    s.config = config
    # base keys -> the architecture's weight spec (which dims mean what); a component's
    # weights carry its base_prefix in the base's key names
    for c in s.fam.components:
        if c.name in s.model_comps:
            s.comp_specs[c.name] = [(Template(c.base_prefix + w.name), w)
                                    for w in s.registry.architecture(c.architecture).weights]


def _refuse_stray_lora(s: _Planning) -> None:
    """LoRA factors on modules no mapping explains cannot be merged: refuse rather than carry them."""
    from omgtool.arch.mapping import split_peft

    stray = [k for k in s.analysis.unexplained if split_peft(k)[1] in ("lora_A", "lora_B") or ".lora_" in k]
    if stray:
        raise MismatchError(f"{s.checkpoint}: LoRA factors on modules no mapping of family {s.fam.name} explains: "
                            f"{stray[0]}" + (f" and {len(stray) - 1} more" if len(stray) > 1 else "")
                            + " (see docs/families.md, Adding a checkpoint family)")


def _check_layer_counts(s: _Planning) -> None:
    """Each component's layers must be the base's (where config.json names its count)."""
    for c in s.fam.components:
        arch_key = s.registry.architecture(c.architecture).layer_count_key
        layered = [m for m in s.model_matches if m.component == c.name and m.layer is not None]
        if layered and arch_key and arch_key in s.config:
            top = max(layered, key=lambda m: m.layer)
            base_layers = int(s.config[arch_key])
            if top.layer + 1 != base_layers:
                raise MismatchError(f"layer count: the checkpoint has layers 0..{top.layer} ({top.key}) but the "
                                    f"base has {base_layers} (config.json {arch_key}): the base does not match "
                                    "the checkpoint")
            s.checks.append(f"{c.name}: {base_layers} layers, as the base's config.json {arch_key}")


def _full_tensors(s: _Planning) -> tuple[dict[str, str], list[str]]:
    """({base name: checkpoint key} of full tensors, names the base lacks and gets added).

    Full tensors of the model component(s) replace the base's, or, for a component the base
    lacks entirely and the mapping marks added_to_base, are added to the model."""
    in_base = {name: any(rx.match(k) for k in s.base_ckpt.tensors for rx, _ in s.comp_specs[name])
               for name in s.model_comps}
    addable = {c.name for c in s.fam.components if c.added_to_base and not in_base.get(c.name, True)}
    full: dict[str, str] = {}
    added: list[str] = []
    for m in s.model_matches:
        if m.role != "weight":
            continue
        name = s.out_name(m)
        if name in full:
            raise MismatchError(f"{s.checkpoint}: {full[name]} and {m.key} both give {name}")
        if name not in s.base_ckpt.tensors:
            if m.component not in addable:
                raise MismatchError(f"{m.key}: the base {s.resolved.path} has no {name} for it to replace")
            added.append(name)
        full[name] = m.key
    return full, added


def _resized_rows(s: _Planning, full: dict[str, str], added: list[str]) -> set[str]:
    """Full tensors whose shape differs from the base's: only the rows of vocab-sized ones may."""
    resized = set()
    for weight, key in full.items():
        if weight in added:
            continue
        got, want = s.ckpt.tensors[key].shape, s.base_ckpt.tensors[weight].shape
        spec = s.spec_of(weight)
        if len(got) != len(want):
            raise MismatchError(f"{key} is {list(got)} but the base's {weight} is {list(want)}")
        for i in range(1, len(got)):
            if got[i] != want[i]:
                raise MismatchError(f"{key} has {_dim_name(spec, i)} {got[i]} but the base's {weight} has "
                                    f"{want[i]} ({list(want)}): the base does not match the checkpoint")
        if got and got[0] != want[0]:
            if spec is None or _dim_name(spec, 0) != "vocab_size":
                raise MismatchError(f"{key} has {got[0]} rows but the base's {weight} has {want[0]}; only "
                                    "vocab-sized tensors (embeddings, head) may be resized")
            resized.add(weight)
    return resized


def _lora_sources(s: _Planning, full: dict[str, str]) -> tuple[float | None, str, dict[str, LoraSource]]:
    """alpha (and its source), and per base weight its LoRA pair: rank, alpha, scale, checked
    against the shape it updates. What a LoRA means is omgtool.kernels.lora's."""
    from omgtool.arch.infer import adapter_settings, resolve_alpha
    from omgtool.kernels.lora import delta_shape, is_transposed, module_scale

    alpha_value, alpha_source = resolve_alpha(s.fam, s.ckpt, s.user_alpha)
    pairs = [p for p in s.analysis.lora_pairs if p.component in s.model_comps]
    if pairs and alpha_value is None:
        raise InvalidArgument(f"{s.checkpoint}: LoRA alpha is {alpha_source}")
    settings = adapter_settings(s.ckpt)
    loras: dict[str, LoraSource] = {}
    for p in pairs:
        a, b = s.ckpt.tensors[p.a_key], s.ckpt.tensors[p.b_key]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise MismatchError(f"{p.a_key}: LoRA factors must be 2-D, got A {list(a.shape)} and B {list(b.shape)}")
        if a.shape[0] != b.shape[1]:
            raise MismatchError(f"LoRA rank mismatch: {p.a_key} has rank {a.shape[0]} ({list(a.shape)}) but "
                                f"{p.b_key} has {b.shape[1]} ({list(b.shape)})")
        transposed = is_transposed(p.a_key, settings)
        rank = int(a.shape[0])
        name = s.component(p.component).base_prefix + p.weight  # the base's key
        if name in full:
            target = s.ckpt.tensors[full[name]].shape
        elif name in s.base_ckpt.tensors:
            target = s.base_ckpt.tensors[name].shape
        else:
            raise MismatchError(f"LoRA target {name} ({p.a_key}) has no weight in the base {s.resolved.path}")
        delta = delta_shape(a.shape, b.shape, transposed)
        if tuple(target) != delta:
            spec = s.spec_of(name)
            dim = 1 if delta[1] != target[1] else 0
            where = p.a_key if dim == 1 else p.b_key
            raise MismatchError(f"{where}: the LoRA update is {list(delta)} but {name} is {list(target)} "
                                f"({_dim_name(spec, dim)} {delta[dim]} vs {target[dim]}): the base does not "
                                "match the checkpoint")
        a_here, scale = module_scale(name.removesuffix(".weight"), alpha_value, rank, settings,
                                     s.user_alpha is not None)
        loras[name] = LoraSource(p.a_key, p.b_key, rank, a_here, scale, transposed)
    if loras:
        s.checks.append(f"{len(loras)} LoRA pairs: ranks agree between A and B, every update has its target's shape")
    return alpha_value, alpha_source, loras


def _tensor(name: str, shape, dtype: str, action: str, source: Source, lora: LoraSource | None,
            detail: str = "") -> PlannedTensor:
    if lora is None:
        return PlannedTensor(name, tuple(shape), dtype, (source,), "copy", action=action, detail=detail)
    params = {"scale": lora.scale, "transposed": lora.transposed, "rank": lora.rank, "alpha": lora.alpha}
    return PlannedTensor(name, tuple(shape), dtype,
                         (source, Source("checkpoint", lora.a_key), Source("checkpoint", lora.b_key)),
                         "lora_merge", params=params, action=action, detail=detail)


def _model_tensors(s: _Planning, full, added, resized, loras) -> list[PlannedTensor]:
    """The model tensors, in the base's order, then those the base lacks."""
    out: list[PlannedTensor] = []
    for name, info in s.base_ckpt.tensors.items():
        dt = s.out_dtype or info.dtype
        lora = loras.get(name)
        if name in full:
            key = full[name]
            shape = tuple(s.ckpt.tensors[key].shape)
            detail = "trained" + (f", {info.shape[0]} \u2192 {shape[0]} rows" if name in resized else "") \
                + (", + its LoRA" if lora else "")
            out.append(_tensor(name, shape, dt, "replaced", Source("checkpoint", key), lora, detail))
        elif lora is not None:
            out.append(_tensor(name, info.shape, dt, "merged", Source("base", name), lora))
        else:
            out.append(_tensor(name, info.shape, dt, "copied" if dt == info.dtype else "converted",
                               Source("base", name), None))
    for name in added:  # components the base lacks (added_to_base), after the base's tensors
        key = full[name]
        info = s.ckpt.tensors[key]
        out.append(_tensor(name, info.shape, s.out_dtype or info.dtype, "added", Source("checkpoint", key),
                           loras.get(name)))
    if added:
        comps = sorted({s.analysis.matches[full[n]].component for n in added})
        s.notes.append(f"the base has no {', '.join(comps)}: {len(added)} tensors of the checkpoint are added to "
                       "the merged model under their names")
    return out


def _plan_qlora(s: _Planning, tensors: list[PlannedTensor], base_weights: str, bnb: dict[str, Any] | None,
                quant_stats: bool) -> list[PlannedTensor]:
    """QLoRA (omgtool.arch.qlora): each weight training held in 4-bit gets a weight step
    (params["base_transform"], omgtool.kernels.transforms.WEIGHT_TRANSFORMS): its round trip
    with --base-weights nf4-dequant (a quantized weight without a LoRA is then `converted`),
    the round trip measured only with original (unless --no-quant-stats)."""
    from omgtool.arch.qlora import plan_qlora

    if base_weights == "original" and not quant_stats:
        return tensors
    comp = s.fam.qlora.component if s.fam.qlora else None
    prefix = next((c.base_prefix for c in s.fam.components if c.name == comp), "")
    model = [t for t in tensors if t.file == MODEL]
    q = plan_qlora(s.fam, s.analysis.stage, base_weights, bnb, [t.name for t in model if len(t.shape) == 2],
                   prefix, {t.name for t in model if t.sources[0].input != "base"})
    if q is None:
        return tensors
    s.qlora = q
    quantized = set(q.quantized)
    step = {"base_transform": "nf4_roundtrip" if q.rounds_base else "nf4_measure",
            "nf4": q.settings.as_params()}
    out, lone = [], 0
    for t in tensors:
        if t.name not in quantized or t.kernel not in ("copy", "lora_merge"):
            out.append(t)
            continue
        action = t.action
        if t.kernel == "copy" and q.rounds_base:
            lone += 1
            action = "converted"
        out.append(dataclasses.replace(t, params={**t.params, **step}, action=action))
    if lone:
        s.notes.append(f"--base-weights nf4-dequant: {lone} quantized weights without a LoRA are written as their "
                       "4-bit round trip (converted)")
    return out


def _vocab(s: _Planning, tensors: list[PlannedTensor]):
    """Vocab-sized tensors must agree after the resize: ({name: rows}, base vocab, output vocab)."""
    vocab_rows = {t.name: t.shape[0] for t in tensors if (spec := s.spec_of(t.name)) is not None and spec.dims
                  and spec.dims[0] == "vocab_size" and t.shape}
    if len(set(vocab_rows.values())) > 1:
        shown = ", ".join(f"{n} {r} rows" for n, r in vocab_rows.items())
        raise MismatchError(f"vocab-sized tensors disagree after the merge ({shown}): the checkpoint resizes "
                            "some but not all of them")
    base_vocab = next((s.base_ckpt.tensors[n].shape[0] for n in vocab_rows if n in s.base_ckpt.tensors),
                      s.config.get("vocab_size"))
    out_vocab = next(iter(vocab_rows.values()), s.config.get("vocab_size"))
    return vocab_rows, base_vocab, out_vocab


def _side_tensors(s: _Planning, full: dict[str, str]) -> list[PlannedTensor]:
    """Everything else of the checkpoint: other components' files, then extras."""
    used = set(full.values()) | {k for p in s.analysis.lora_pairs if p.component in s.model_comps
                                 for k in (p.a_key, p.b_key)}
    side = []
    for key, info in s.ckpt.tensors.items():
        if key in used:
            continue
        m = s.analysis.matches.get(key)
        if m is not None and m.component in s.model_comps:
            continue  # cannot happen: every model match is a full tensor or a LoRA half
        fname = s.component(m.component).merge_target if m is not None else EXTRAS_FILE
        if fname == MODEL:
            fname = EXTRAS_FILE
        side.append(PlannedTensor(key, tuple(info.shape), info.dtype, (Source("checkpoint", key),), "copy",
                                  file=fname.removesuffix(".safetensors"), action="carried"))
    other_lora = sorted({p.component for p in s.analysis.lora_pairs if p.component not in s.model_comps})
    if other_lora:
        s.notes.append(f"LoRA factors on {', '.join(other_lora)} are not merged (no base weights for them here): "
                       "carried as factors under their original names")
    extras = sum(1 for t in side if t.file == EXTRAS_FILE.removesuffix(".safetensors"))
    if extras:
        s.notes.append(f"{extras} tensors no mapping explains are carried in {EXTRAS_FILE} under their original names")
    return side


def _tokens(s: _Planning, full: dict[str, str], vocab_rows: dict[str, int], out_vocab):
    """Ids V.. for the family's added tokens, checked against the output's embedding rows."""
    from omgtool.formats.tokenizer_files import plan_tokens

    embeddings = [n for n in vocab_rows if (spec := s.spec_of(n)) is not None and spec.group == "embeddings"]
    emb_key = full.get(embeddings[0], embeddings[0]) if embeddings else "the embedding table"
    emb_rows = vocab_rows[embeddings[0]] if embeddings else out_vocab
    return plan_tokens(s.fam.tokens, s.resolved.path, emb_rows, emb_key)


def _out_config(s: _Planning, tensors: list[PlannedTensor], out_vocab, base_vocab) -> dict[str, Any]:
    """config.json: vocab_size from the rows, dtype when --dtype changes it; all else kept."""
    from omgtool.formats.dtypes import HF_CONFIG_NAMES

    out_config = dict(s.config)
    if s.fam.merge_config == "checkpoint":
        own = s.ckpt.metadata.get("config")
        if isinstance(own, dict):
            out_config = dict(own)
            s.notes.append(f"config.json is the checkpoint folder's own (family {s.fam.name}: merge_config = "
                           "checkpoint)")
        else:
            s.notes.append(f"config.json is the base's: the checkpoint has no config.json beside it (family "
                           f"{s.fam.name} would use the checkpoint's)")
    if out_vocab is not None and "vocab_size" in out_config and out_config["vocab_size"] != out_vocab:
        s.notes.append(f"config.json vocab_size {out_config['vocab_size']} -> {out_vocab} (the embedding rows)")
        out_config["vocab_size"] = out_vocab
    elif out_vocab is not None and "vocab_size" not in out_config and out_vocab != base_vocab:
        s.notes.append(f"config.json has no top-level vocab_size to update: the embedding rows are {out_vocab}")
    if s.out_dtype:
        hf = HF_CONFIG_NAMES.get(s.out_dtype)
        for key in ("torch_dtype", "dtype"):
            if key in out_config and out_config[key] != hf:
                s.notes.append(f"config.json {key} {out_config[key]} -> {hf} (--dtype)")
                out_config[key] = hf
        converted = sum(1 for t in tensors if t.action == "converted")
        if converted:
            s.notes.append(f"--dtype {hf}: {converted} base tensors the checkpoint does not touch are converted, "
                           "not copied bit-exactly")
    return out_config


def _carried(s: _Planning, tokens, side: list[PlannedTensor]) -> list[Path]:
    """Files of the base carried as they are (not its weights, not what the merge rewrites)."""
    weight_files = {Path(f).name for f in s.base_ckpt.files}
    rewritten = {CONFIG, RECORD, *tokens.files}
    produced = {EXTRAS_FILE, *(t.file + ".safetensors" for t in side)}
    carried, skipped = [], []
    for entry in sorted(s.resolved.path.iterdir()):
        name = entry.name
        if name in rewritten:
            continue
        if name in weight_files or any(entry.match(p) for p in WEIGHT_PATTERNS) or name in produced:
            if name not in weight_files and entry.is_file() and not name.endswith(".index.json"):
                skipped.append(name)
            continue
        if entry.is_dir() and name in SKIPPED_DIRS:
            continue
        carried.append(entry)
    if skipped:
        s.notes.append(f"weight files of the base not used for the merge are not carried: {', '.join(skipped)}")
    if (s.resolved.path / README).is_file():
        s.notes.append(f"the base's {README} is carried as {BASE_README}")
    return carried


# --- the plan -------------------------------------------------------------------------------

def lora_summary(tensors: list[PlannedTensor], alpha, alpha_source) -> dict[str, Any] | None:
    pairs = [t.params for t in tensors if t.kernel == "lora_merge"]
    if not pairs:
        return None
    ranks = Counter(p["rank"] for p in pairs)
    scales = Counter(p["scale"] for p in pairs)
    return {"alpha": alpha, "alpha_source": alpha_source, "rank": ranks.most_common(1)[0][0],
            "ranks": dict(ranks) if len(ranks) > 1 else None, "scale": scales.most_common(1)[0][0],
            "scales": {str(k): v for k, v in scales.items()} if len(scales) > 1 else None,
            "num_pairs": len(pairs)}


def _facts(s: _Planning, tensors, tokens, carried, alpha, alpha_source, vocab, max_shard, device) -> dict[str, Any]:
    model = [t for t in tensors if t.file == MODEL]
    side: dict[str, list[str]] = {}
    for t in tensors:
        if t.file != MODEL:
            side.setdefault(t.file + ".safetensors", []).append(t.name)
    counts = Counter(t.action for t in model)
    by_action: dict[str, list[str]] = {}
    for t in model:
        by_action.setdefault(t.action, []).append(t.name)
    return {
        "checkpoint": str(s.checkpoint), "base": s.resolved.as_dict(), "family": s.fam.name,
        "stage": s.analysis.stage, "lora": lora_summary(model, alpha, alpha_source), "alpha": alpha,
        "alpha_source": alpha_source, "dtype": main_dtype(model) or (s.out_dtype or "F32"),
        "dtype_source": "--dtype" if s.out_dtype else "the base's dtype", "device": device, "vocab": vocab,
        "counts": {**{k: counts.get(k, 0) for k in ACTIONS},
                   "lora_merged": sum(1 for t in model if t.kernel == "lora_merge"),
                   **{f: len(names) for f, names in side.items()}},
        "tensors": by_action,
        "resized": {t.name: {"from": list(s.base_ckpt.tensors[t.name].shape), "to": list(t.shape)}
                    for t in model if t.action == "replaced" and t.name in s.base_ckpt.tensors
                    and tuple(s.base_ckpt.tensors[t.name].shape[:1]) != tuple(t.shape[:1])},
        "side_files": side, "tokens": tokens.as_dict(), "carried": [p.name for p in carried],
        "max_shard_bytes": max_shard, "qlora": s.qlora.as_dict() if s.qlora is not None else None,
    }


def _headline(s: _Planning, facts: dict[str, Any], total: int) -> list[str]:
    lines = [f"merge {s.checkpoint} (family {s.fam.name}, stage {s.analysis.stage or '?'})",
             f"into base {s.resolved.path} (--base {s.resolved.requested}: {s.resolved.how})"]
    lora = facts["lora"]
    if lora:
        ranks = f"rank {lora['rank']}" + (f" (ranks {lora['ranks']})" if lora["ranks"] else "")
        lines.append(f"LoRA: {lora['num_pairs']} pairs, {ranks}, alpha {facts['alpha']:g} from "
                     f"{facts['alpha_source']}; scale {lora['scale']:g}")
    else:
        lines.append("LoRA: none (full-tensor replacement only)")
    dt = f"{facts['dtype']} ({'--dtype' if s.out_dtype else 'the base dtype'})"
    model = sum(facts["counts"][a] for a in ACTIONS)
    lines.append(f"output: {model} model tensors, {format_size(total)} in all, dtype {dt}, "
                 f"shards of at most {format_size(facts['max_shard_bytes'])}, matmuls on {facts['device']}"
                 + (" (cuda when available, else cpu)" if facts["device"] == "auto" else ""))
    vocab = facts["vocab"]
    if vocab.get("output") != vocab.get("base"):
        lines.append(f"vocab: {vocab.get('base')} -> {vocab.get('output')} rows (config.json vocab_size updated)")
    if s.qlora is not None:
        lines += s.qlora.describe_lines(facts["dtype"])
    return lines


def _assemble(s: _Planning, tensors, config, tokens, carried, alpha, alpha_source, vocab, max_shard,
              device) -> Plan:
    from omgtool.formats.tokenizer_files import write_tokenizer_files
    from omgtool.formats.writer import write_json

    facts = _facts(s, tensors, tokens, carried, alpha, alpha_source, vocab, max_shard, device)
    files = {MODEL: TensorFile(MODEL, max_shard)}
    for t in tensors:
        if t.file not in files:
            files[t.file] = TensorFile(t.file, index=False)

    def copy_carried(folder: Path, run) -> None:
        for entry in carried:
            dst = folder / (BASE_README if entry.name == README else entry.name)
            if entry.is_dir():
                shutil.copytree(entry, dst)
            else:
                shutil.copyfile(entry, dst)

    artifacts = [
        Artifact(CONFIG, f"vocab_size {config.get('vocab_size')}", lambda folder, run: write_json(folder / CONFIG,
                                                                                                   config), 4096),
        Artifact("tokenizer", _tokens_words(tokens), lambda folder, run: write_tokenizer_files(tokens, folder)),
    ]
    if carried:
        artifacts.append(Artifact("carried", "from the base: " + ", ".join(p.name for p in carried), copy_carried,
                                  sum(size_on_disk(p) for p in carried)))
    plan = Plan("merge-lora", {"checkpoint": Input("checkpoint", s.checkpoint, s.ckpt),
                               "base": Input("base", s.resolved.path, s.base_ckpt)},
                tensors, files, artifacts, checks=s.checks, notes=s.notes + tokens.notes,
                headline=_headline(s, facts, sum(t.nbytes for t in tensors)), facts=facts, record=RECORD,
                device=device, forbidden_parents={"base folder": s.resolved.path}, actions=ACTIONS,
                context={"config": config, "tokens": tokens, "qlora": s.qlora})
    plan.artifacts.append(Artifact(README, "what this folder is", lambda folder, run: (folder / README).write_text(
        _readme(plan, _report(plan, run)), encoding="utf-8")))
    plan.report = lambda run: _report(plan, run)
    return plan


def _tokens_words(tokens) -> str:
    if not tokens.tokens:
        return "the base's"
    return "tokens: " + ", ".join(f"{t.content} {t.id}" + ("" if t.embedded else " (no embedding row)")
                                  for t in tokens.tokens)


# --- execution ------------------------------------------------------------------------------

def run_merge(plan: Plan, out: str | Path, *, force: bool = False, progress: Progress = NULL_PROGRESS,
              hash_base: bool = True) -> dict[str, Any]:
    """Write the merged model folder `out` as planned. Returns the report (also written to
    out/omgtool-merge.json). Nothing appears at `out` unless everything succeeded."""
    from omgtool.plan.execute import execute

    plan.inputs["base"].hash = hash_base
    return execute(plan, out, force=force, progress=progress)


def _report(plan: Plan, run) -> dict[str, Any]:
    from omgtool.ops.qlora import qlora_numerics, qlora_report
    from omgtool.plan.execute import provenance

    f = plan.facts
    base_info = dict(f["base"])
    base_info["path"] = str(Path(base_info["path"]).resolve())
    base_input = plan.inputs["base"]
    if not base_input.hash:
        base_info["files"] = {Path(p).name: {"bytes": Path(p).stat().st_size, "sha256": None}
                              for p in base_input.checkpoint.files}
        base_info["hash"] = "not hashed (--no-hash-base): shard sizes recorded instead"
    qlora = plan.context.get("qlora")
    report = {
        **provenance("merge-lora"), "started": run.started.isoformat(timespec="seconds"), "out": str(run.out),
        "checkpoint": {"path": str(Path(f["checkpoint"]).resolve())}, "base": base_info,
        "family": f["family"], "stage": f["stage"], "alpha": f["alpha"], "alpha_source": f["alpha_source"],
        "lora": f["lora"], "dtype": f["dtype"], "dtype_source": f["dtype_source"], "device": run.device,
        "numerics": NUMERICS + (" (converted: --dtype)" if f["dtype_source"] == "--dtype" else ""),
        "vocab": f["vocab"], "counts": f["counts"], "tensors": f["tensors"], "resized": f["resized"],
        "side_files": f["side_files"], "deltas": run.records.get("deltas", {}), "tokens": f["tokens"],
        "token_files": run.results.get("tokenizer"), "carried": f["carried"], "files": run.files,
        "notes": plan.notes,
    }
    if qlora is not None:  # which base weights the LoRA went into, and the 4-bit round trip's error
        report["qlora"] = qlora_report(qlora, run.records.get("qlora", {}), report["deltas"])
        report["numerics"] += qlora_numerics(qlora)
    return report


def _readme(plan: Plan, report: dict[str, Any]) -> str:
    from omgtool.formats.tokenizer_files import readme_section

    f = plan.facts
    ckpt_name, base_path = Path(f["checkpoint"]).name, Path(f["base"]["path"])
    lora = report["lora"]
    lines = [f"# {base_path.name} + {ckpt_name} (merged by omgtool merge-lora)", "",
             f"This folder is the base model `{f['base'].get('requested')}` with the language-model part of "
             f"`{ckpt_name}` (family {f['family']}, stage {f['stage'] or '?'}) merged in. It has the "
             "base's layout and key names, so the base's own code loads it"
             + (" (`trust_remote_code=True`)" if "auto_map" in plan.context["config"] else "") + ".", ""]
    c = report["counts"]
    lines.append(f"- {c['merged']} weights merged (W + scale B@A), {c['replaced']} "
                 f"replaced by the checkpoint's trained tensors (with the added tokens' rows where the row count "
                 f"differs), {c['copied']} copied unchanged"
                 + (f", {c['converted']} converted to {report['dtype']}" if c["converted"] else "") + ".")
    if c.get("added"):
        lines.append(f"- {c['added']} tensors the base lacks (e.g. a multimodal projector) added from the checkpoint "
                     "under their names.")
    if lora:
        lines.append(f"- LoRA: rank {lora['rank']}, alpha {f['alpha']:g} ({f['alpha_source']}), scale "
                     f"{lora['scale']:g}; computed in float32 and rounded once to {report['dtype']}.")
    if report.get("qlora"):  # omgtool.ops.qlora: which base weights the LoRA was added to
        lines.append(f"- Base weights: {report['qlora']['base_weights']} (see `qlora` in {RECORD} and "
                     "omgtool's docs/qlora.md).")
    if f["vocab"].get("output") != f["vocab"].get("base"):
        lines.append(f"- Vocabulary resized from {f['vocab']['base']} to {f['vocab']['output']} rows; "
                     "`config.json` `vocab_size` follows the rows.")
    for fname, names in report["side_files"].items():
        what = "tensors no mapping explains" if fname == EXTRAS_FILE else "the non-LLM parts (projectors)"
        lines.append(f"- `{fname}`: {len(names)} tensors, {what}, under their original checkpoint names.")
    lines += [f"- `{RECORD}`: tool version, inputs and their sha256, alpha and its source, per-target "
              "Frobenius norm of each LoRA delta, output checksums.", ""]
    section = readme_section(plan.context["tokens"])
    if section:
        lines += [section]
    if (base_path / README).is_file():
        lines += [f"The base model's own README is kept as `{BASE_README}`.", ""]
    return "\n".join(lines)
