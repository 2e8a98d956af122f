"""merge-lora: stream a checkpoint's LoRA (and its trained full tensors) into a base model folder.

Library use, without the CLI::

    from omgtool.ops.merge import plan_merge, run_merge
    plan = plan_merge("omg_llava_7b_finetune_8gpus.pth", "internlm2-chat-7b")
    print(plan.describe())            # what --dry-run prints; nothing is written
    report = run_merge(plan, "merged/")

Generic over families through `mappings/`: the components whose `merge_target` is "model"
(the family's `llm`) name their weights with the base model's own key names
(`KeyMatch.weight`); LoRA pairs come from `omgtool.arch.infer.find_lora_pairs`, alpha from
`omgtool.arch.infer.resolve_alpha`. For each base weight, in the base's own order:

- merged:   W' = W + (alpha/r) B @ A, in float32 (no TF32), rounded once to the output dtype
- replaced: a full tensor of the checkpoint takes the base tensor's place (trained in full);
- resized:  ... with a different row count (vocab-sized tensors only: embeddings, head); a
            LoRA on it (OMG-LLaVA's `output`) is merged into the checkpoint's tensor;
- copied:   bit-exact, or converted when --dtype changes the dtype.

Tensors of other components go to the file their mapping names (`projector.safetensors`),
keys no mapping explains to `extras.safetensors`, both under their original names and dtypes.

The plan is complete before anything is written: every mismatch (hidden size, layer count,
A/B rank, a LoRA target the base lacks) raises MismatchError (exit 2) naming the tensor.
Writing streams one tensor at a time (mmap reads, released after each tensor; row-chunked
merges written block by block), shard by shard, inside an atomic output folder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omgtool import __version__
from omgtool.errors import CheckFailed, InvalidArgument, MismatchError, UnreadableInput
from omgtool.sizes import format_size, size_on_disk

MODEL = "model"
EXTRAS_FILE = "extras.safetensors"
RECORD = "omgtool-merge.json"
README = "README.md"
BASE_README = "README.base.md"  # the base's own README.md, carried under this name
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}  # float32 bytes per merged row block
# Weight files of a base folder that are never carried (the merged weights replace them).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                   "*.pth", "*.pt", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "consolidated*")
SKIPPED_DIRS = (".cache", ".git", ".huggingface")

Progress = Callable[[str, int], None]  # (tensor name, bytes written)


def _noop(name: str, nbytes: int) -> None:
    pass


# --- the plan ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSource:
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    transposed: bool = False  # PEFT embedding LoRA: delta = (B @ A).T


@dataclass(frozen=True)
class MergeItem:
    """One output tensor: where its values come from and what happens to them."""

    name: str  # output name (the base's key, or the checkpoint's key in a side file)
    action: str  # merged | replaced | resized | copied | converted | carried
    shape: tuple[int, ...]
    dtype: str  # output dtype (canonical: BF16, F32, ...)
    file: str  # MODEL, or a side file name
    source: str  # "base" or "checkpoint": where the tensor (before any LoRA) is read
    key: str  # the key read from `source`
    lora: LoraSource | None = None
    base_shape: tuple[int, ...] | None = None  # for resized: the base's shape

    @property
    def nbytes(self) -> int:
        from omgtool.formats.dtypes import ITEMSIZE

        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass
class MergePlan:
    checkpoint: Path
    base: Any  # omgtool.formats.resolve.ResolvedBase
    family: str
    stage: str | None
    items: list[MergeItem]  # model tensors in the base's order, then side-file tensors
    config: dict[str, Any]  # the output config.json
    tokens: Any  # omgtool.formats.tokenizer_files.TokenPlan
    carried: list[Path]  # base files copied as they are
    alpha: float | None
    alpha_source: str
    out_dtype: str | None  # None: each base tensor's own dtype
    main_dtype: str
    max_shard_bytes: int
    device: str
    vocab: dict[str, int | None]
    notes: list[str] = field(default_factory=list)
    _ckpt: Any = field(default=None, repr=False)
    _base: Any = field(default=None, repr=False)

    # summaries
    def model_items(self) -> list[MergeItem]:
        return [i for i in self.items if i.file == MODEL]

    def side_files(self) -> dict[str, list[MergeItem]]:
        out: dict[str, list[MergeItem]] = {}
        for i in self.items:
            if i.file != MODEL:
                out.setdefault(i.file, []).append(i)
        return out

    def counts(self) -> dict[str, int]:
        c = Counter(i.action for i in self.model_items())
        out = {k: c.get(k, 0) for k in ("merged", "replaced", "resized", "added", "copied", "converted")}
        out["lora_merged"] = sum(1 for i in self.model_items() if i.lora is not None)
        for name, items in self.side_files().items():
            out[name] = len(items)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def carried_bytes(self) -> int:
        return sum(size_on_disk(p) for p in self.carried)

    def lora_summary(self) -> dict[str, Any] | None:
        pairs = [i.lora for i in self.items if i.file == MODEL and i.lora is not None]
        if not pairs:
            return None
        ranks = Counter(p.rank for p in pairs)
        scales = Counter(p.scale for p in pairs)
        return {"alpha": self.alpha, "alpha_source": self.alpha_source, "rank": ranks.most_common(1)[0][0],
                "ranks": dict(ranks) if len(ranks) > 1 else None, "scale": scales.most_common(1)[0][0],
                "scales": {str(k): v for k, v in scales.items()} if len(scales) > 1 else None,
                "num_pairs": len(pairs)}

    def as_dict(self) -> dict[str, Any]:
        by_action: dict[str, list[str]] = {}
        for i in self.model_items():
            by_action.setdefault(i.action, []).append(i.name)
        return {
            "checkpoint": str(self.checkpoint), "base": self.base.as_dict(), "family": self.family,
            "stage": self.stage, "lora": self.lora_summary(), "dtype": self.main_dtype,
            "dtype_source": "--dtype" if self.out_dtype else "the base's dtype", "device": self.device,
            "vocab": self.vocab, "counts": self.counts(), "tensors": by_action,
            "resized": {i.name: {"from": list(i.base_shape or ()), "to": list(i.shape)}
                        for i in self.model_items() if i.action == "resized"},
            "side_files": {f: [i.name for i in items] for f, items in self.side_files().items()},
            "tokens": self.tokens.as_dict(), "carried": [p.name for p in self.carried],
            "bytes": self.total_bytes, "max_shard_bytes": self.max_shard_bytes, "notes": self.notes,
        }

    def describe(self) -> str:
        """The plan in words: what --dry-run prints."""
        lines = [f"merge {self.checkpoint} (family {self.family}, stage {self.stage or '?'})",
                 f"into base {self.base.path} (--base {self.base.requested}: {self.base.how})"]
        lora = self.lora_summary()
        if lora:
            ranks = f"rank {lora['rank']}" + (f" (ranks {lora['ranks']})" if lora["ranks"] else "")
            lines.append(f"LoRA: {lora['num_pairs']} pairs, {ranks}, alpha {self.alpha:g} from "
                         f"{self.alpha_source}; scale {lora['scale']:g}")
        else:
            lines.append("LoRA: none (full-tensor replacement only)")
        dt = f"{self.main_dtype} ({'--dtype' if self.out_dtype else 'the base dtype'})"
        lines.append(f"output: {len(self.model_items())} model tensors, {format_size(self.total_bytes)} in all, dtype {dt}, "
                     f"shards of at most {format_size(self.max_shard_bytes)}, matmuls on {self.device}")
        if self.vocab.get("output") != self.vocab.get("base"):
            lines.append(f"vocab: {self.vocab.get('base')} -> {self.vocab.get('output')} rows "
                         "(config.json vocab_size updated)")
        for action in ("merged", "resized", "replaced", "added", "converted", "copied"):
            items = [i for i in self.model_items() if i.action == action]
            if not items:
                continue
            if action == "resized":
                names = [f"{i.name} ({i.base_shape[0]} -> {i.shape[0]} rows"
                         + (", + its LoRA" if i.lora else "") + ")" for i in items]
            elif action == "replaced":
                names = [i.name + (" (+ its LoRA)" if i.lora else "") for i in items]
            else:
                names = compress_names([i.name for i in items])
            lines.append(f"  {action:<9} {len(items):>4}: " + ", ".join(names))
        for fname, items in self.side_files().items():
            lines.append(f"  {fname}: {len(items)} tensors under their original names: "
                         + ", ".join(compress_names([i.name for i in items])))
        if self.tokens.tokens:
            lines.append("tokens: " + ", ".join(f"{t.content} {t.id}" + ("" if t.embedded else " (no embedding row)")
                                               for t in self.tokens.tokens))
        if self.carried:
            lines.append("carried from the base: " + ", ".join(p.name for p in self.carried))
        lines += [f"note: {n}" for n in self.notes + self.tokens.notes]
        return "\n".join(lines)

    def close(self) -> None:
        for ck in (self._ckpt, self._base):
            if ck is not None:
                ck.close()


_LAYER = re.compile(r"\.(\d+)\.")


def compress_names(names: list[str]) -> list[str]:
    """`model.layers.{0-31}.attention.wqkv.weight` for names differing only in the layer index."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for n in names:
        m = _LAYER.search(n)
        key = n if m is None else n[:m.start()] + ".{}." + n[m.end():]
        if key not in groups:
            groups[key] = []
            order.append(key)
        if m is not None:
            groups[key].append(int(m.group(1)))
    out = []
    for key in order:
        layers = groups[key]
        if not layers:
            out.append(key)
        elif len(layers) == 1:
            out.append(key.replace("{}", str(layers[0])))
        else:
            out.append(key.replace("{}", "{" + _ranges(sorted(layers)) + "}"))
    return out


def _ranges(values: list[int]) -> str:
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def resolve_device(device: str | None) -> str:
    import torch

    dev = (device or "auto").strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidArgument(f"--device {device}: CUDA is not available on this machine")
        try:
            torch.device(dev)
        except RuntimeError as exc:
            raise InvalidArgument(f"--device {device}: {exc}") from None
        return dev
    if dev != "cpu":
        raise InvalidArgument(f"--device must be auto, cpu or cuda[:N], not {device!r}")
    return dev


def _alpha_for(module_path: str, alpha: float, cfg: dict | None, user: bool) -> float:
    """PEFT's per-module alpha_pattern (keys matched as `(.*\\.)?KEY$`), unless --alpha was given."""
    if user or not isinstance(cfg, dict):
        return alpha
    from omgtool.formats.bounded_regex import bounded_match  # linear time: keys are user input

    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if bounded_match(rf"(.*\.)?{key}$", module_path):
            return float(value)
    return alpha


def plan_merge(checkpoint: str | Path, base: str | Path | None = None, *, alpha: float | None = None,
               dtype: str | None = None, family: str | None = None, max_shard_size: str | int = "5GB",
               device: str | None = "auto", cwd: Path | None = None) -> MergePlan:
    """Everything the merge will do, checked; reads metadata only (no tensor data)."""
    from omgtool.formats import open_checkpoint
    from omgtool.formats.dtypes import HF_CONFIG_NAMES, parse_user_dtype
    from omgtool.sizes import parse_size
    from omgtool.arch.infer import adapter_config, analyze, lora_scaling, resolve_alpha
    from omgtool.arch.mapping import load_registry, template_regex
    from omgtool.formats.resolve import resolve_base
    from omgtool.formats.tokenizer_files import plan_tokens

    checkpoint = Path(checkpoint)
    out_dtype = parse_user_dtype(dtype) if dtype else None
    max_shard = parse_size(max_shard_size)
    registry = load_registry()
    ckpt = open_checkpoint(checkpoint)
    analysis = analyze(ckpt, registry, family=family, alpha=alpha)
    fam = analysis.family
    if fam is None:
        raise InvalidArgument(f"{checkpoint}: no family mapping explains this checkpoint's keys; pass --family "
                              f"(one of {', '.join(sorted(registry.families))})")
    dora = [m.key for m in analysis.matches.values() if m.role == "dora_magnitude"]
    adapter_cfg = adapter_config(ckpt)  # None unless its values have usable types
    if dora or (isinstance(adapter_cfg, dict) and adapter_cfg.get("use_dora")):
        raise InvalidArgument(f"{checkpoint}: DoRA ({dora[0] if dora else 'adapter_config use_dora'}) is not a "
                              "plain LoRA; its merge needs the magnitude vectors and is refused")
    notes = [n for n in analysis.notes if not n.startswith("LoRA factor without its partner")]

    model_comps = {c.name for c in fam.components if c.merge_target == MODEL}
    if not model_comps:
        raise InvalidArgument(f"family {fam.name}: no component merges into the model (merge_into = \"model\")")
    comp_file = {c.name: c.merge_target for c in fam.components}

    # Unpaired LoRA halves are an error, not a note: half a LoRA cannot be merged.
    paired = {k for p in analysis.lora_pairs for k in (p.a_key, p.b_key)}
    lone = [m.key for m in analysis.matches.values() if m.role in ("lora_A", "lora_B") and m.key not in paired]
    if lone:
        raise MismatchError(f"{checkpoint}: LoRA factor without its partner: {lone[0]}"
                            + (f" and {len(lone) - 1} more" if len(lone) > 1 else ""))

    # The base.
    if base is None:
        named = adapter_cfg.get("base_model_name_or_path") if isinstance(adapter_cfg, dict) else None
        if not named:
            raise InvalidArgument("--base is required (the base model folder or name, e.g. internlm2-chat-7b)")
        base = named
    resolved = resolve_base(base, checkpoint, cwd=cwd)
    base_ckpt = open_checkpoint(resolved.path)
    if not base_ckpt.format.startswith("hf-folder"):
        raise InvalidArgument(f"{resolved.path}: --base must be a full model folder (config.json + "
                              f"model weights), not {base_ckpt.format}")
    config = base_ckpt.metadata.get("config")
    if not isinstance(config, dict):
        raise UnreadableInput("base folder has no config.json", resolved.path)

    # Base keys -> the architecture's weight spec (which dims mean what).
    # (a component's weights carry its base_prefix in the base's key names: out_name)
    specs = []
    comp_specs: dict[str, list] = {}
    for c in fam.components:
        if c.name in model_comps:
            comp_specs[c.name] = [(template_regex(c.base_prefix + w.name), w)
                                  for w in registry.architecture(c.architecture).weights]
            specs += comp_specs[c.name]

    def spec_of(name: str):
        return next((w for rx, w in specs if rx.match(name)), None)

    comp_prefix = {c.name: c.base_prefix for c in fam.components}

    def out_name(m) -> str:
        return comp_prefix[m.component] + m.weight

    model_matches = [m for m in analysis.matches.values() if m.component in model_comps]

    # LoRA factors on modules no mapping explains cannot be merged: refuse rather than carry them.
    from omgtool.arch.mapping import split_peft

    stray = [k for k in analysis.unexplained if split_peft(k)[1] in ("lora_A", "lora_B") or ".lora_" in k]
    if stray:
        raise MismatchError(f"{checkpoint}: LoRA factors on modules no mapping of family {fam.name} explains: "
                            f"{stray[0]}" + (f" and {len(stray) - 1} more" if len(stray) > 1 else "")
                            + " (see docs/families.md, Adding a checkpoint family)")

    # Layer count: each component's layers must be the base's (where config.json names its count).
    for c in fam.components:
        arch_key = registry.architecture(c.architecture).layer_count_key
        layered = [m for m in model_matches if m.component == c.name and m.layer is not None]
        if layered and arch_key and arch_key in config:
            top = max(layered, key=lambda m: m.layer)
            base_layers = int(config[arch_key])
            if top.layer + 1 != base_layers:
                raise MismatchError(f"layer count: the checkpoint has layers 0..{top.layer} ({top.key}) but the "
                                    f"base has {base_layers} (config.json {arch_key}): the base does not match "
                                    "the checkpoint")

    # Full tensors of the model component(s): they replace the base's, or, for a component the
    # base lacks entirely and the mapping marks added_to_base, are added to the model.
    in_base = {name: any(rx.match(k) for k in base_ckpt.tensors for rx, _ in comp_specs[name])
               for name in model_comps}
    addable = {c.name for c in fam.components if c.added_to_base and not in_base.get(c.name, True)}
    full: dict[str, str] = {}
    added: list[str] = []
    for m in model_matches:
        if m.role != "weight":
            continue
        name = out_name(m)
        if name in full:
            raise MismatchError(f"{checkpoint}: {full[name]} and {m.key} both give {name}")
        if name not in base_ckpt.tensors:
            if m.component not in addable:
                raise MismatchError(f"{m.key}: the base {resolved.path} has no {name} for it to replace")
            added.append(name)
        full[name] = m.key

    def dim_name(spec, i: int) -> str:
        return spec.dims[i] if spec is not None and i < len(spec.dims) and spec.dims[i] != "_" else f"dim {i}"

    resized_shapes: dict[str, tuple[int, ...]] = {}
    for weight, key in full.items():
        if weight in added:
            continue
        got, want = ckpt.tensors[key].shape, base_ckpt.tensors[weight].shape
        spec = spec_of(weight)
        if len(got) != len(want):
            raise MismatchError(f"{key} is {list(got)} but the base's {weight} is {list(want)}")
        for i in range(1, len(got)):
            if got[i] != want[i]:
                raise MismatchError(f"{key} has {dim_name(spec, i)} {got[i]} but the base's {weight} has "
                                    f"{want[i]} ({list(want)}): the base does not match the checkpoint")
        if got and got[0] != want[0]:
            if spec is None or dim_name(spec, 0) != "vocab_size":
                raise MismatchError(f"{key} has {got[0]} rows but the base's {weight} has {want[0]}; only "
                                    "vocab-sized tensors (embeddings, head) may be resized")
            resized_shapes[weight] = tuple(got)

    # LoRA pairs on the model: alpha, rank, and the shape they update.
    alpha_value, alpha_source = resolve_alpha(fam, ckpt, alpha)
    model_pairs = [p for p in analysis.lora_pairs if p.component in model_comps]
    if model_pairs and alpha_value is None:
        raise InvalidArgument(f"{checkpoint}: LoRA alpha is {alpha_source}")
    loras: dict[str, LoraSource] = {}
    for p in model_pairs:
        a, b = ckpt.tensors[p.a_key], ckpt.tensors[p.b_key]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise MismatchError(f"{p.a_key}: LoRA factors must be 2-D, got A {list(a.shape)} and B {list(b.shape)}")
        transposed = ".lora_embedding_" in p.a_key
        if a.shape[0] != b.shape[1]:
            raise MismatchError(f"LoRA rank mismatch: {p.a_key} has rank {a.shape[0]} ({list(a.shape)}) but "
                                f"{p.b_key} has {b.shape[1]} ({list(b.shape)})")
        rank = int(a.shape[0])
        name = comp_prefix[p.component] + p.weight  # the base's key
        if name in full:
            target = ckpt.tensors[full[name]].shape
        elif name in base_ckpt.tensors:
            target = base_ckpt.tensors[name].shape
        else:
            raise MismatchError(f"LoRA target {name} ({p.a_key}) has no weight in the base {resolved.path}")
        delta = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if tuple(target) != delta:
            spec = spec_of(name)
            where = p.a_key if (delta[1] != target[1]) else p.b_key
            dim = 1 if delta[1] != target[1] else 0
            raise MismatchError(f"{where}: the LoRA update is {list(delta)} but {name} is {list(target)} "
                                f"({dim_name(spec, dim)} {delta[dim]} vs {target[dim]}): the base does not "
                                "match the checkpoint")
        a_here = _alpha_for(name.removesuffix(".weight"), alpha_value, adapter_cfg, alpha is not None)
        loras[name] = LoraSource(p.a_key, p.b_key, rank, a_here, lora_scaling(a_here, rank, ckpt), transposed)

    # The model tensors, in the base's order.
    items: list[MergeItem] = []
    for name, info in base_ckpt.tensors.items():
        dt = out_dtype or info.dtype
        lora = loras.get(name)
        if name in full:
            key = full[name]
            shape = tuple(ckpt.tensors[key].shape)
            action = "resized" if name in resized_shapes else "replaced"
            items.append(MergeItem(name, action, shape, dt, MODEL, "checkpoint", key, lora, tuple(info.shape)))
        elif lora is not None:
            items.append(MergeItem(name, "merged", tuple(info.shape), dt, MODEL, "base", name, lora))
        else:
            action = "copied" if dt == info.dtype else "converted"
            items.append(MergeItem(name, action, tuple(info.shape), dt, MODEL, "base", name))
    for name in added:  # components the base lacks (added_to_base), after the base's tensors
        key = full[name]
        info = ckpt.tensors[key]
        items.append(MergeItem(name, "added", tuple(info.shape), out_dtype or info.dtype, MODEL, "checkpoint", key,
                               loras.get(name)))
    if added:
        comps = sorted({analysis.matches[full[n]].component for n in added})
        notes.append(f"the base has no {', '.join(comps)}: {len(added)} tensors of the checkpoint are added to the "
                     "merged model under their names")

    # Vocab-sized tensors must agree after the resize.
    vocab_rows = {i.name: i.shape[0] for i in items if (s := spec_of(i.name)) is not None and s.dims
                  and s.dims[0] == "vocab_size" and i.shape}
    if len(set(vocab_rows.values())) > 1:
        shown = ", ".join(f"{n} {r} rows" for n, r in vocab_rows.items())
        raise MismatchError(f"vocab-sized tensors disagree after the merge ({shown}): the checkpoint resizes "
                            "some but not all of them")
    base_vocab = next((base_ckpt.tensors[n].shape[0] for n in vocab_rows), config.get("vocab_size"))
    out_vocab = next(iter(vocab_rows.values()), config.get("vocab_size"))

    # Everything else of the checkpoint: other components' files, then extras.
    side: list[MergeItem] = []
    used = set(full.values()) | {k for p in model_pairs for k in (p.a_key, p.b_key)}
    for key, info in ckpt.tensors.items():
        if key in used:
            continue
        m = analysis.matches.get(key)
        if m is not None and m.component in model_comps:
            continue  # cannot happen: every model match is a full tensor or a LoRA half
        fname = comp_file[m.component] if m is not None else EXTRAS_FILE
        if fname == MODEL:
            fname = EXTRAS_FILE
        side.append(MergeItem(key, "carried", tuple(info.shape), info.dtype, fname, "checkpoint", key))
    other_lora = sorted({p.component for p in analysis.lora_pairs if p.component not in model_comps})
    if other_lora:
        notes.append(f"LoRA factors on {', '.join(other_lora)} are not merged (no base weights for them here): "
                     "carried as factors under their original names")
    if any(i.file == EXTRAS_FILE for i in side):
        n = sum(1 for i in side if i.file == EXTRAS_FILE)
        notes.append(f"{n} tensors no mapping explains are carried in {EXTRAS_FILE} under their original names")

    # Tokens: ids V.. for the family's added tokens, checked against the output's rows.
    emb_key = next((full.get(n, n) for n, _ in vocab_rows.items()
                    if (s := spec_of(n)) is not None and s.group == "embeddings"), "the embedding table")
    emb_rows = next((vocab_rows[n] for n in vocab_rows if (s := spec_of(n)) is not None and s.group == "embeddings"),
                    out_vocab)
    tokens = plan_tokens(fam.tokens, resolved.path, emb_rows, emb_key)

    # config.json: vocab_size from the rows, dtype when --dtype changes it; all else kept.
    main_dtype = _main_dtype(items) or (out_dtype or "F32")
    out_config = dict(config)
    if fam.merge_config == "checkpoint":
        own = ckpt.metadata.get("config")
        if isinstance(own, dict):
            out_config = dict(own)
            notes.append(f"config.json is the checkpoint folder's own (family {fam.name}: merge_config = checkpoint)")
        else:
            notes.append(f"config.json is the base's: the checkpoint has no config.json beside it (family "
                         f"{fam.name} would use the checkpoint's)")
    if out_vocab is not None and "vocab_size" in out_config and out_config["vocab_size"] != out_vocab:
        notes.append(f"config.json vocab_size {out_config['vocab_size']} -> {out_vocab} (the embedding rows)")
        out_config["vocab_size"] = out_vocab
    elif out_vocab is not None and "vocab_size" not in out_config and out_vocab != base_vocab:
        notes.append(f"config.json has no top-level vocab_size to update: the embedding rows are {out_vocab}")
    if out_dtype:
        hf = HF_CONFIG_NAMES.get(out_dtype)
        for key in ("torch_dtype", "dtype"):
            if key in out_config and out_config[key] != hf:
                notes.append(f"config.json {key} {out_config[key]} -> {hf} (--dtype)")
                out_config[key] = hf
        converted = sum(1 for i in items if i.action == "converted")
        if converted:
            notes.append(f"--dtype {hf}: {converted} base tensors the checkpoint does not touch are converted, "
                         "not copied bit-exactly")

    # Files of the base carried as they are.
    weight_files = {Path(f).name for f in base_ckpt.files}
    rewritten = {"config.json", RECORD, *tokens.files}
    produced = {EXTRAS_FILE, *(i.file for i in side)}
    carried, skipped = [], []
    for entry in sorted(resolved.path.iterdir()):
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
        notes.append(f"weight files of the base not used for the merge are not carried: {', '.join(skipped)}")
    if (resolved.path / README).is_file():
        notes.append(f"the base's {README} is carried as {BASE_README}")

    plan = MergePlan(
        checkpoint=checkpoint, base=resolved, family=fam.name, stage=analysis.stage, items=items + side,
        config=out_config, tokens=tokens, carried=carried, alpha=alpha_value,
        alpha_source=alpha_source, out_dtype=out_dtype, main_dtype=main_dtype, max_shard_bytes=max_shard,
        device=resolve_device(device), vocab={"base": base_vocab, "output": out_vocab,
                                              "tokenizer": (tokens.base.size + len(tokens.tokens))
                                              if tokens.base.size is not None else None},
        notes=notes, _ckpt=ckpt, _base=base_ckpt)
    if not model_pairs and not full:
        plan.notes.append("the checkpoint changes nothing in the base model (no LoRA on it, no full tensors)")
    return plan


def _main_dtype(items: list[MergeItem]) -> str | None:
    by_bytes: Counter = Counter()
    for i in items:
        if i.file == MODEL:
            by_bytes[i.dtype] += i.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else None


# --- execution ---------------------------------------------------------------------------

class _Hasher:
    """sha256 of files on a background daemon thread (hashlib releases the GIL), so inputs are
    hashed while the merge computes and each output shard while the next one is written.
    Cancelled at once on failure or Ctrl-C."""

    BLOCK = 16 << 20

    def __init__(self):
        import queue

        self.queue: "queue.Queue[tuple[str, Path] | None]" = queue.Queue()
        self.results: dict[str, dict[str, Any]] = {}
        self.submitted: set[str] = set()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="omgtool-hash", daemon=True)
        self.thread.start()

    def submit(self, label: str, path: Path) -> None:
        self.submitted.add(label)
        self.queue.put((label, Path(path)))

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None or self.stop.is_set():
                return
            label, path = job
            try:
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    while block := fh.read(self.BLOCK):
                        if self.stop.is_set():
                            return
                        h.update(block)
                self.results[label] = {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
            except BaseException as exc:  # reported by finish()
                self.error = exc
                return

    def finish(self) -> dict[str, dict[str, Any]]:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.results

    def cancel(self) -> None:
        self.stop.set()
        self.queue.put(None)


def _chunk_rows(shape: tuple[int, ...], device: str) -> int:
    cols = math.prod(shape[1:]) or 1
    return max(1, CHUNK_BYTES["cuda" if device.startswith("cuda") else "cpu"] // (4 * cols))


def _blocks(item: MergeItem, ckpt, base, device: str):
    """The output tensor as row blocks of its dtype: W + scale * B @ A through
    omgtool.kernels.lora.merge_lora per block, or the source rows (converted if --dtype says so).

    Every block re-reads its views and the previous mappings are dropped (Checkpoint.close),
    so the pages of a 92548-row table are released as the merge moves down it: resident
    memory holds about two blocks of the source, never the whole table."""
    from omgtool.formats.dtypes import torch_dtype
    from omgtool.kernels.lora import merge_lora

    source = ckpt if item.source == "checkpoint" else base
    n = item.shape[0]
    rows = _chunk_rows(item.shape, device if item.lora is not None else "cpu")
    out_dt = torch_dtype(item.dtype)
    lo = item.lora
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        w = source.read(item.key)[start:stop]
        if lo is None:
            block = w if w.dtype == out_dt else w.to(out_dt)
        else:
            a, b = ckpt.read(lo.a_key), ckpt.read(lo.b_key)
            if lo.transposed:  # embedding LoRA: delta = (B @ A).T = A.T @ B.T
                a, b = b.T, a.T
            block = merge_lora(w, a, b[start:stop], lo.scale, out_dtype=out_dt, chunk_rows=rows, device=device)
            del a, b
        del w
        ckpt.close()
        base.close()
        yield block
        del block


def run_merge(plan: MergePlan, out: str | Path, *, force: bool = False, progress: Progress = _noop,
              hash_base: bool = True) -> dict[str, Any]:
    """Write the merged model folder `out` as planned. Returns the report (also written to
    out/omgtool-merge.json). Nothing appears at `out` unless everything succeeded."""
    from omgtool.formats.writer import PlannedTensor, ShardedSafetensorsWriter, atomic_output_dir, \
        check_free_space, verify_written
    from omgtool.formats.dtypes import torch_dtype
    from omgtool.kernels.lora import delta_norm
    from omgtool.formats.tokenizer_files import write_tokenizer_files

    out = Path(out)
    if out.exists() and not force:
        raise InvalidArgument(f"{out} already exists (use --force to replace it)")
    if out.resolve() == plan.base.path.resolve() or plan.base.path.resolve() in out.resolve().parents:
        raise InvalidArgument(f"--out {out} is inside the base folder {plan.base.path}")
    check_free_space(out if out.exists() else out.parent, plan.total_bytes + plan.carried_bytes + (16 << 20))
    ckpt, base = plan._ckpt, plan._base
    started = datetime.datetime.now(datetime.timezone.utc)

    hasher = _Hasher()
    ckpt_files = [Path(f) for f in ckpt.files] or [plan.checkpoint]
    for f in ckpt_files:
        hasher.submit(f"checkpoint:{_rel(f, plan.checkpoint)}", f)
    base_files = [Path(f) for f in base.files]
    if hash_base:
        for f in base_files:
            hasher.submit(f"base:{f.name}", f)

    deltas: dict[str, dict[str, Any]] = {}
    written_files: list[str] = []
    try:
        with atomic_output_dir(out, force=force) as tmp:
            # model shards
            model = plan.model_items()
            mplan = [PlannedTensor(i.name, i.shape, i.dtype) for i in model]
            writer = ShardedSafetensorsWriter(tmp, mplan, plan.max_shard_bytes, stem="model",
                                              metadata={"format": "pt"})
            first_of_shard = {shard[0].name: n for n, shard in enumerate(writer.shards) if shard and n > 0}
            try:
                for item in model:
                    if item.lora is not None:  # the update's strength, before the big buffers exist
                        lo = item.lora
                        a, b = ckpt.read(lo.a_key), ckpt.read(lo.b_key)
                        if plan.device != "cpu":
                            a, b = a.to(plan.device), b.to(plan.device)
                        deltas[item.name] = {"rank": lo.rank, "alpha": lo.alpha, "scale": lo.scale,
                                             "frobenius_norm": delta_norm(a, b, lo.scale),
                                             "lora_A": lo.a_key, "lora_B": lo.b_key}
                        del a, b
                        ckpt.close()
                    if not item.shape:  # a 0-d tensor: no rows to stream
                        source = ckpt if item.source == "checkpoint" else base
                        writer.write(item.name, source.read(item.key).to(torch_dtype(item.dtype)))
                    else:
                        writer.write_rows(item.name, _blocks(item, ckpt, base, plan.device))
                    ckpt.close()  # drop the mmaps: pages read so far stop counting as ours
                    base.close()
                    if item.name in first_of_shard:  # the previous shard is closed: hash it now
                        hasher.submit(f"out:{writer.files[first_of_shard[item.name] - 1]}",
                                      tmp / writer.files[first_of_shard[item.name] - 1])
                    progress(item.name, item.nbytes)
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            hasher.submit(f"out:{writer.files[-1]}", tmp / writer.files[-1])
            _check_written(tmp, files, mplan, verify_written)
            written_files += files

            # side files: other components and extras, one file each
            for fname, items in plan.side_files().items():
                splan = [PlannedTensor(i.name, i.shape, i.dtype) for i in items]
                stem = fname.removesuffix(".safetensors")
                w = ShardedSafetensorsWriter(tmp, splan, 1 << 62, stem=stem, metadata={"format": "pt"}, index=False)
                try:
                    for i in items:
                        t = ckpt.read(i.key)
                        if t.dim() == 0:
                            w.write(i.name, t)
                        else:
                            w.write_rows(i.name, [t])
                        del t
                        progress(i.name, i.nbytes)
                    sfiles = w.close()
                except BaseException:
                    w.abort()
                    raise
                ckpt.close()
                _check_written(tmp, sfiles, splan, verify_written)
                written_files += sfiles
                for f in sfiles:
                    hasher.submit(f"out:{f}", tmp / f)

            # config, tokenizer, carried files, README
            _write_json(tmp / "config.json", plan.config)
            token_files = write_tokenizer_files(plan.tokens, tmp)
            for entry in plan.carried:
                dst = tmp / (BASE_README if entry.name == README else entry.name)
                if entry.is_dir():
                    shutil.copytree(entry, dst)
                else:
                    shutil.copyfile(entry, dst)
            report = _report(plan, out, started, deltas, written_files, token_files, hash_base)
            (tmp / README).write_text(_readme(plan, report), encoding="utf-8")
            for p in sorted(tmp.rglob("*")):
                rel = str(p.relative_to(tmp))
                if p.is_file() and f"out:{rel}" not in hasher.submitted:
                    hasher.submit(f"out:{rel}", p)
            results = hasher.finish()
            report["checkpoint"]["files"] = {k.split(":", 1)[1]: v for k, v in results.items()
                                             if k.startswith("checkpoint:")}
            if hash_base:
                report["base"]["files"] = {k.split(":", 1)[1]: v for k, v in results.items()
                                           if k.startswith("base:")}
            report["outputs"] = dict(sorted((k.split(":", 1)[1], v) for k, v in results.items()
                                            if k.startswith("out:")))
            finished = datetime.datetime.now(datetime.timezone.utc)
            report["finished"] = finished.isoformat(timespec="seconds")
            report["wall_s"] = round((finished - started).total_seconds(), 3)
            _write_json(tmp / RECORD, report)
    except BaseException:
        hasher.cancel()
        raise
    finally:
        plan.close()
    return report


def _rel(f: Path, root: Path) -> str:
    try:
        return str(f.relative_to(root)) if f != root else f.name
    except ValueError:
        return f.name


def _check_written(folder: Path, files: list[str], plan, verify_written) -> None:
    problems = verify_written(folder, files, plan)
    if problems:
        shown = "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckFailed(f"written output does not match its plan: {shown}")


def _report(plan: MergePlan, out: Path, started, deltas, files, token_files, hash_base: bool) -> dict[str, Any]:
    d = plan.as_dict()
    base_info = plan.base.as_dict()
    base_info["path"] = str(plan.base.path.resolve())
    if not hash_base:
        base_info["files"] = {Path(f).name: {"bytes": Path(f).stat().st_size, "sha256": None}
                              for f in plan._base.files}
        base_info["hash"] = "not hashed (--no-hash-base): shard sizes recorded instead"
    return {
        "tool": "omgtool", "version": __version__, "command": "merge-lora",
        "started": started.isoformat(timespec="seconds"), "out": str(out),
        "checkpoint": {"path": str(plan.checkpoint.resolve())}, "base": base_info,
        "family": plan.family, "stage": plan.stage,
        "alpha": plan.alpha, "alpha_source": plan.alpha_source, "lora": d["lora"],
        "dtype": d["dtype"], "dtype_source": d["dtype_source"], "device": plan.device,
        "numerics": "W' = W + (alpha/r) * B @ A in float32 (TF32 off), rounded once to the output dtype; "
                    "untouched base tensors copied bit-exactly" + (" (converted: --dtype)" if plan.out_dtype else ""),
        "vocab": plan.vocab, "counts": d["counts"], "tensors": d["tensors"], "resized": d["resized"],
        "side_files": d["side_files"], "deltas": deltas, "tokens": d["tokens"], "token_files": token_files,
        "carried": d["carried"], "files": files, "notes": plan.notes + plan.tokens.notes,
    }


def _readme(plan: MergePlan, report: dict[str, Any]) -> str:
    from omgtool.formats.tokenizer_files import readme_section

    lora = report["lora"]
    lines = [f"# {plan.base.path.name} + {plan.checkpoint.name} (merged by omgtool merge-lora)", "",
             f"This folder is the base model `{plan.base.requested}` with the language-model part of "
             f"`{plan.checkpoint.name}` (family {plan.family}, stage {plan.stage or '?'}) merged in. It has the "
             "base's layout and key names, so the base's own code loads it"
             + (" (`trust_remote_code=True`)" if "auto_map" in plan.config else "") + ".", ""]
    c = report["counts"]
    lines.append(f"- {c['merged']} weights merged (W + alpha/r B@A), {c['resized']} resized and {c['replaced']} "
                 f"replaced by the checkpoint's trained tensors, {c['copied']} copied unchanged"
                 + (f", {c['converted']} converted to {report['dtype']}" if c["converted"] else "") + ".")
    if c.get("added"):
        lines.append(f"- {c['added']} tensors the base lacks (e.g. a multimodal projector) added from the checkpoint "
                     "under their names.")
    if lora:
        lines.append(f"- LoRA: rank {lora['rank']}, alpha {plan.alpha:g} ({plan.alpha_source}), scale "
                     f"{lora['scale']:g}; computed in float32 and rounded once to {report['dtype']}.")
    if plan.vocab.get("output") != plan.vocab.get("base"):
        lines.append(f"- Vocabulary resized from {plan.vocab['base']} to {plan.vocab['output']} rows; "
                     "`config.json` `vocab_size` follows the rows.")
    for fname, names in report["side_files"].items():
        what = "tensors no mapping explains" if fname == EXTRAS_FILE else "the non-LLM parts (projectors)"
        lines.append(f"- `{fname}`: {len(names)} tensors, {what}, under their original checkpoint names.")
    lines += ["- `omgtool-merge.json`: tool version, inputs and their sha256, alpha and its source, per-target "
              "Frobenius norm of each LoRA delta, output checksums.", ""]
    section = readme_section(plan.tokens)
    if section:
        lines += [section]
    if (plan.base.path / README).is_file():
        lines += [f"The base model's own README is kept as `{BASE_README}`.", ""]
    return "\n".join(lines)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


