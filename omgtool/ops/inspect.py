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
STATS_CHUNK = 1 << 24  # elements per chunk for --stats


def build_report(path: Path, *, alpha: float | None = None, family: str | None = None,
                 name_filter: str | None = None, allow_globals=None,
                 refuse_unsafe: bool | None = None) -> tuple[dict[str, Any], Any, Any]:
    """(report, checkpoint, analysis). Raises UnsafeInput (unless refuse_unsafe=False: then
    the report lists the tensors from the opcode walk) / UnreadableInput."""
    from omgtool.formats import open_checkpoint
    from omgtool.arch.infer import analyze
    from omgtool.arch.mapping import group_descriptions, load_registry

    ckpt = open_checkpoint(path, allow_globals=allow_globals, refuse_unsafe=refuse_unsafe)
    registry = load_registry()
    analysis = analyze(ckpt, registry, family=family, alpha=alpha)
    descriptions = group_descriptions(analysis.family, registry) if analysis.family else {}
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
        "dtypes": dict(Counter(t.dtype for t in ckpt.tensors.values())),
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


def tensor_stats(ckpt, names: list[str], progress: Progress = NULL_PROGRESS) -> dict[str, dict[str, Any]]:
    """min/max/mean/std and NaN/Inf/zero counts, one tensor and one chunk at a time
    (progress: one task, bytes advanced after each tensor)."""
    import torch

    progress.task("stats", total=sum(ckpt.tensors[n].nbytes for n in names))
    out: dict[str, dict[str, Any]] = {}
    if True:
        for name in names:
            t = ckpt.read(name).reshape(-1)
            n = t.numel()
            acc = {"min": float("inf"), "max": float("-inf"), "sum": 0.0, "sumsq": 0.0,
                   "nan": 0, "inf": 0, "zeros": 0, "finite": 0}
            for start in range(0, n, STATS_CHUNK):
                chunk = t[start:start + STATS_CHUNK].to(torch.float64)
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
                         "nan": acc["nan"], "inf": acc["inf"], "zeros": acc["zeros"], "numel": n}
            progress.advance(ckpt.tensors[name].nbytes)
            del t
    return out


def update_strength(ckpt, analysis) -> list[dict[str, Any]]:
    """||scale B@A||_F per LoRA pair (scale as PEFT computes it: rsLoRA, alpha_pattern), via
    r x r Gram matrices (B@A never formed)."""
    from omgtool.kernels.lora import AdapterSettings, delta_norm, module_scale

    lora = analysis.architecture.get("lora") or {}
    alpha = lora.get("alpha")
    user_alpha = str(lora.get("alpha_source", "")).startswith("user")
    settings = AdapterSettings.of(ckpt)
    rows = []
    for pair in analysis.lora_pairs:
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
