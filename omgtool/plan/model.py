"""What a command will write, fixed before anything is written: the plan.

Every writing command (merge-lora, export --to llama|peft|safetensors) builds one `Plan`:
its inputs (opened checkpoints, metadata only), every output tensor as a `PlannedTensor`
(name, shape, dtype, the source tensors it is computed from, the kernel and transform that
compute it), the safetensors files they go to, the other files of the output (config,
tokenizer, carried files) as `Artifact`s, and the checks already passed. Building a plan
reads headers only and imports no torch, so `--dry-run` costs what `inspect` costs;
`omgtool.plan.execute.execute(plan)` does the writing.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from omgtool.formats.dtypes import ITEMSIZE

UNSHARDED = 1 << 62


class Source(NamedTuple):
    input: str  # a Plan.inputs name ("checkpoint", "base", "src")
    key: str  # the tensor read from that input


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor.

    kernel (omgtool.plan.kernels): "copy" (sources[0], cast to dtype if it differs),
    "lora_merge" (sources = weight, A, B: W + scale * B@A, params scale/transposed/rank/alpha),
    "transform" (piece params["index"] of TRANSFORMS[transform] applied to sources[0], with an
    optional LoRA folded in first when sources has A and B).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # canonical (F32, BF16, ...)
    sources: tuple[Source, ...] = ()
    kernel: str = "copy"
    transform: str = "identity"
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    file: str = "model"  # the TensorFile stem it is written to
    action: str = "copied"  # the word describe() uses: merged, replaced, copied, converted, ...
    detail: str = ""  # more words after the name in describe()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "file": self.file,
                "action": self.action, "kernel": self.kernel, "transform": self.transform,
                "sources": [f"{s.input}:{s.key}" for s in self.sources]}


@dataclass
class TensorFile:
    """One safetensors output: `<stem>.safetensors`, or shards + index past max_shard_bytes."""

    stem: str
    max_shard_bytes: int = UNSHARDED
    index: bool = True
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})


@dataclass
class Input:
    name: str
    path: Path
    checkpoint: Any  # omgtool.formats.base.Checkpoint (metadata only until read)
    hash: bool = True  # sha256 of its files in the provenance record

    def files(self) -> list[Path]:
        return [Path(f) for f in self.checkpoint.files] or [self.path]

    def label(self, f: Path) -> str:
        try:
            return str(f.relative_to(self.path)) if f != self.path else f.name
        except ValueError:
            return f.name


@dataclass
class Artifact:
    """A file (or folder) of the output that is not a planned tensor; `write(folder, run)`
    writes it and may return a value kept as run.results[name]. `early` artifacts start in a
    worker thread before the tensors stream (CPU work that overlaps the copy)."""

    name: str
    what: str
    write: Callable[[Path, Any], Any]
    nbytes: int = 0
    early: bool = False


@dataclass
class Plan:
    command: str  # "merge-lora", "export llama", ...
    inputs: dict[str, Input]
    tensors: list[PlannedTensor]
    files: dict[str, TensorFile]  # stem -> file, written in this order
    artifacts: list[Artifact] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # what was checked while planning
    notes: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)  # describe()'s first lines
    facts: dict[str, Any] = field(default_factory=dict)  # command-specific summary (as_dict)
    record: str | None = None  # provenance record file name in the output folder
    single_file: bool = False  # the output is one .safetensors file, not a folder
    device: str = "cpu"  # where kernels run (--device; resolved when executing)
    forbidden_parents: dict[str, Path] = field(default_factory=dict)  # "base folder": path --out may not be in
    report: Callable[[Any], dict[str, Any]] | None = None  # run -> the record (execute adds hashes)
    main_file: str = "model"
    actions: tuple[str, ...] = ()  # describe()'s order of actions (default: first seen)
    context: dict[str, Any] = field(default_factory=dict)  # command-specific objects (not in as_dict)

    def tensors_of(self, stem: str) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.file == stem]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def artifact_bytes(self) -> int:
        return sum(a.nbytes for a in self.artifacts)

    def count(self, stem: str | None = None) -> Counter:
        return Counter(t.action for t in self.tensors if stem is None or t.file == stem)

    def as_dict(self) -> dict[str, Any]:
        return {"command": self.command,
                "inputs": {n: str(i.path) for n, i in self.inputs.items()},
                **self.facts,
                "files": {f.stem: len(self.tensors_of(f.stem)) for f in self.files.values()
                          if self.tensors_of(f.stem)},
                "artifacts": [a.name for a in self.artifacts],
                "bytes": self.total_bytes, "checks": self.checks, "notes": self.notes,
                "planned": [t.as_dict() for t in self.tensors]}

    def describe(self) -> str:
        """The plan in words: what --dry-run prints."""
        lines = list(self.headline)
        main = self.tensors_of(self.main_file)
        order = self.actions or tuple(dict.fromkeys(t.action for t in main))
        for action in order:
            items = [t for t in main if t.action == action]
            if not items:
                continue
            if any(t.detail for t in items):
                names = [t.name + (f" ({t.detail})" if t.detail else "") for t in items]
            else:
                names = compress_names([t.name for t in items])
            lines.append(f"  {action:<9} {len(items):>4}: " + ", ".join(names))
        for f in self.files.values():
            if f.stem == self.main_file:
                continue
            items = self.tensors_of(f.stem)
            if items:
                lines.append(f"  {f.stem}.safetensors: {len(items)} tensors: "
                             + ", ".join(compress_names([t.name for t in items])))
        others = [a for a in self.artifacts if a.what]
        if others:
            lines.append("also written: " + "; ".join(f"{a.name} ({a.what})" for a in others))
        lines += [f"checked: {c}" for c in self.checks]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def close(self) -> None:
        for i in self.inputs.values():
            i.checkpoint.close()


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


def main_dtype(tensors: list[PlannedTensor]) -> str | None:
    """The dtype holding the most bytes."""
    by_bytes: Counter = Counter()
    for t in tensors:
        by_bytes[t.dtype] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else None
