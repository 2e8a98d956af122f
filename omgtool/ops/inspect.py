"""Library side of `omgtool inspect`: the report (metadata alone: no pickle runs, no data
read), per-tensor statistics, LoRA update strength and manifests. No rendering here.

Only `tensor_stats` and `update_strength` read tensor data, one tensor at a time.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from pathlib import Path
from typing import Any

from omgtool.progress import NULL_PROGRESS, Progress

MANIFEST_VERSION = 1
STATS_CHUNK = 1 << 20  # elements per block for --stats (8 MiB as float64)
# A view may repeat its storage (stride 0 is collapsed exactly); past this many elements read
# per stored element (overlapping strides) its statistics are skipped, not computed for hours.
MAX_VIEW_REPEAT = 4


def build_report(path: Path, *, alpha: float | None = None, family: str | None = None,
                 name_filter: str | None = None, allow_globals=None,
                 refuse_unsafe: bool | None = None) -> tuple[dict[str, Any], Any, Any]:
    """(report, checkpoint, analysis). Raises UnsafeInput (unless refuse_unsafe=False: then
    the report lists the tensors from the opcode walk) / UnreadableInput."""
    from omgtool.formats import open_checkpoint
    from omgtool.arch.infer import analyze
    from omgtool.arch.mapping import group_descriptions, load_registry
    from omgtool.formats.containers import GROUP_DESCRIPTIONS

    ckpt = open_checkpoint(path, allow_globals=allow_globals, refuse_unsafe=refuse_unsafe)
    registry = load_registry()
    analysis = analyze(ckpt, registry, family=family, alpha=alpha)
    descriptions = dict(GROUP_DESCRIPTIONS)
    descriptions.update(group_descriptions(analysis.family, registry) if analysis.family else {})
    selected = [t for t in ckpt.tensors.values()
                if name_filter is None or fnmatch.fnmatchcase(t.name, name_filter)]
    groups = {}
    for group, keys in analysis.groups.items():
        infos = [ckpt.tensors[k] for k in keys]
        groups[group] = {"count": len(keys), "params": sum(i.numel for i in infos),
                         "bytes": sum(i.nbytes for i in infos),
                         "description": descriptions.get(group, "")}
    report = {
        "path": str(path),
        "format": ckpt.format,
        "container": ckpt.container,
        "num_tensors": len(ckpt.tensors),
        "num_params": ckpt.num_params,
        "total_bytes": ckpt.total_bytes,
        "dtypes": dict(Counter(t.dtype or "unchecked" for t in ckpt.tensors.values())),  # manifests: null
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes,
                     "group": analysis.matches[t.name].group if t.name in analysis.matches else "unexplained",
                     "location": t.location} for t in selected],
        "architecture": analysis.architecture,
        "stage_reason": analysis.stage_reason,
        "groups": {g: v["count"] for g, v in groups.items()},
        "group_details": groups,
        "unexplained": analysis.unexplained,
        "notes": analysis.notes,
        "safety": ckpt.safety.as_dict(),
        "metadata": ckpt.metadata,
    }
    if name_filter is not None:
        report["filter"] = name_filter
    return report, ckpt, analysis


def _blocks(t, block: int):
    """`t`'s elements in blocks of at most `block`, never materialising a non-contiguous view
    whole (reshape(-1) of a strided view copies it)."""
    if t.is_contiguous():
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), block):
            yield flat[start:start + block]
        return
    if t.dim() == 0 or t.numel() <= block:
        yield t.reshape(-1)
        return
    inner = max(1, t[0].numel())
    rows = max(1, block // inner)
    for start in range(0, t.shape[0], rows):
        part = t[start:start + rows]
        if part.numel() <= block or part.shape[0] > 1:
            yield part.reshape(-1)
        else:
            yield from _blocks(part[0], block)


def _collapse_broadcast(t):
    """(view without its stride-0 dimensions, how many times each element repeats): the
    statistics of the two are the same, counts scale by the repeat."""
    repeat = 1
    for dim in range(t.dim()):
        if t.stride(dim) == 0 and t.shape[dim] > 1:
            repeat *= t.shape[dim]
            t = t.narrow(dim, 0, 1)
    return t, repeat


def tensor_stats(ckpt, names: list[str], progress: Progress = NULL_PROGRESS) -> dict[str, dict[str, Any]]:
    """min/max/mean/std and NaN/Inf/zero counts, one tensor and one block at a time
    (progress: one task, bytes advanced after each tensor)."""
    import torch

    progress.task("stats", total=sum(ckpt.tensors[n].nbytes for n in names))
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        info = ckpt.tensors[name]
        t, repeat = _collapse_broadcast(ckpt.read(name))
        n = t.numel() * repeat
        if t.numel() > MAX_VIEW_REPEAT * max(info.storage_numel, 1):
            out[name] = {"min": None, "max": None, "mean": None, "std": None, "nan": None, "inf": None,
                         "zeros": None, "numel": n,
                         "skipped": f"view reads {t.numel()} elements from a storage of "
                                    f"{info.storage_numel} (overlapping strides)"}
            progress.advance(info.nbytes)
            continue
        acc = {"min": float("inf"), "max": float("-inf"), "sum": 0.0, "sumsq": 0.0,
               "nan": 0, "inf": 0, "zeros": 0, "finite": 0}
        for block in _blocks(t, STATS_CHUNK):
            chunk = block.to(torch.float64)
            finite = torch.isfinite(chunk)
            acc["nan"] += int(torch.isnan(chunk).sum())
            acc["inf"] += int(torch.isinf(chunk).sum())
            acc["zeros"] += int((chunk == 0).sum())
            vals = chunk[finite]
            if vals.numel():
                acc["finite"] += vals.numel()
                acc["min"] = min(acc["min"], float(vals.min()))
                acc["max"] = max(acc["max"], float(vals.max()))
                acc["sum"] += float(vals.sum())
                acc["sumsq"] += float((vals * vals).sum())
            del chunk, finite, vals
        k = acc["finite"]
        mean = acc["sum"] / k if k else None
        var = max(acc["sumsq"] / k - mean * mean, 0.0) if k else None
        out[name] = {"min": acc["min"] if k else None, "max": acc["max"] if k else None,
                     "mean": mean, "std": var ** 0.5 if var is not None else None,
                     "nan": acc["nan"] * repeat, "inf": acc["inf"] * repeat,
                     "zeros": acc["zeros"] * repeat, "numel": n}
        progress.advance(info.nbytes)
        del t
    return out


def update_strength(ckpt, analysis) -> list[dict[str, Any]]:
    """||scale B@A||_F per LoRA pair (scale as PEFT computes it: rsLoRA, alpha_pattern), via
    r x r Gram matrices (B@A never formed)."""
    from omgtool.arch.infer import adapter_settings
    from omgtool.kernels.lora import delta_norm, module_scale

    lora = analysis.architecture.get("lora") or {}
    alpha = lora.get("alpha")
    user_alpha = str(lora.get("alpha_source", "")).startswith("user")
    settings = adapter_settings(ckpt)
    rows = []
    for pair in analysis.lora_pairs:
        infos = (ckpt.tensors[pair.a_key], ckpt.tensors[pair.b_key])
        if any(len(i.shape) != 2 or i.numel > max(i.storage_numel, 1) for i in infos) \
                or infos[0].shape[0] == 0 or infos[0].shape[0] != infos[1].shape[1]:
            continue  # not a pair of [r, in] / [out, r] matrices over their own storage
        a, b = ckpt.read(pair.a_key), ckpt.read(pair.b_key)
        rank = a.shape[0]
        if alpha is not None:
            _, scale = module_scale(pair.weight.removesuffix(".weight"), alpha, rank, settings, user_alpha)
        else:
            scale = 1.0
        rows.append({"component": pair.component, "layer": pair.layer, "module": pair.module,
                     "weight": pair.weight, "rank": rank, "scale": scale,
                     "delta_fro": delta_norm(a, b, scale)})
    return rows


def write_manifest(report: dict[str, Any], out: Path, sha256: dict[str, str] | None) -> None:
    """The shape manifest; with `sha256` ({file name: digest}, one per file) also the hashes:
    `sha256_files`, and `sha256` itself when the checkpoint is one file."""
    from omgtool.formats.writer import write_json

    manifest = {"format_version": MANIFEST_VERSION, "source": Path(report["path"]).name,
                "family": report["architecture"].get("family"),
                "stage": report["architecture"].get("stage"),
                "tensors": [{"name": t["name"], "shape": t["shape"], "dtype": t["dtype"]}
                            for t in report["tensors"]]}
    if sha256:
        if len(sha256) == 1:
            manifest["sha256"] = next(iter(sha256.values()))
        manifest["sha256_files"] = dict(sha256)
        manifest["sha256_of"] = "each file's bytes, one sha256 per file"
    tmp = out.with_name(out.name + ".tmp")
    write_json(tmp, manifest)
    tmp.replace(out)
