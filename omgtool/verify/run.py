"""`omgtool verify`: rebuild OMG-LLaVA from a merged (or exported) folder and prove it computes.

run_verify checks the options, sets up logging, memory accounting and the placement; _verify
opens the folder, picks the compute precision, loads the merged LLM and runs the checks of
omgtool.verify.checks (CHECKS, in report order), each giving one CheckResult.

Without the OMG-Seg panoptic head the object queries, their masks and the per-pixel prior
are synthesized (deterministically); the report says so.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omgtool.errors import InvalidArgument, MismatchError, UnreadableInput
from omgtool.formats.names import EXPORT_RECORD, MERGE_RECORD
from omgtool.kernels.device import resolve_device
from omgtool.verify.checks import CHECKS, CheckContext, dtype_counts
from omgtool.verify.models.visual import splice_image, visual_tokens  # noqa: F401 (tests import them here)
from omgtool.verify.placement import GPU_BUDGET_RATIO, capped_placement, free_memory, peak_rss_bytes
from omgtool.progress import NULL_PROGRESS, Progress


@dataclass
class VerifyOptions:
    folder: Path
    adapter: Path | None = None
    base: Path | None = None
    alpha: float | None = None
    image: Path | None = None
    vision_weights: Path | None = None
    projector: Path | None = None
    device: str = "auto"
    device_map: str | None = None  # None or "auto"
    max_memory: dict | None = None
    offload_folder: Path | None = None
    precision: str = "auto"  # auto | fp32 | bf16
    num_queries: int = 300
    tolerance_factor: float = 3.0
    reference: str = "default"  # default | nf4 (omgtool.verify.qlora: the QLoRA training forward)
    seed: int = 0
    progress: Progress = NULL_PROGRESS  # notes: one line per step


@dataclass
class _Run:
    opts: VerifyOptions
    timings: dict[str, float] = field(default_factory=dict)
    gpu_budget: int | None = None  # bytes; None on the CPU
    transient: int = 0  # largest temporary a PEFT merge allocates (B @ A and its scaled copy)
    notes: list[str] = field(default_factory=list)
    synthesized: list[str] = field(default_factory=list)

    def say(self, msg: str) -> None:
        self.opts.progress.note(msg)

    @contextmanager
    def timed(self, name: str):
        import torch

        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.timings[name] = round(time.perf_counter() - start, 4)


# --- where things are -----------------------------------------------------------------------

def resolve_base(folder: Path, base: Path | None) -> tuple[Path, str]:
    """--base, else the base recorded in the folder's omgtool-merge.json (fields read tolerantly); for a
    Llama export, the merge record it carried or the one of the folder it was exported from."""
    if base is not None:
        if not Path(base).exists():
            raise UnreadableInput("no such base folder", base)
        return Path(base), "--base"
    roots = [folder]
    export = _read_record(folder / EXPORT_RECORD, folder)
    if isinstance(export.get("source"), str):
        roots.append(Path(export["source"]))
    record_dir = next((r for r in roots if (r / MERGE_RECORD).is_file()), None)
    if record_dir is None:
        raise InvalidArgument(f"{folder} has no {MERGE_RECORD} recording its base; pass --base")
    data = _read_record(record_dir / MERGE_RECORD, folder)
    candidates = []
    for path in (("base",), ("inputs", "base"), ("base_folder",), ("base_path",), ("inputs", "base_folder")):
        node: Any = data
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node = node.get("path") or node.get("folder") or node.get("resolved")
        if isinstance(node, str) and node:
            candidates.append(node)
    if not candidates:
        raise InvalidArgument(f"{MERGE_RECORD} records no base folder; pass --base")
    tried = []
    for cand in candidates:
        for root in (None, *roots, *(r.parent for r in roots)):
            p = Path(cand) if root is None else root / cand
            tried.append(str(p))
            if p.is_dir():
                return p, str(record_dir / MERGE_RECORD)
    raise InvalidArgument(f"the base recorded in {MERGE_RECORD} ({candidates[0]}) was not found "
                          f"(looked at {', '.join(dict.fromkeys(tried))}); pass --base")


def _read_record(path: Path, folder: Path) -> dict:
    from omgtool.formats.jsonfile import read_json_object

    return read_json_object(path, missing_ok=True)


def find_tokenizer(folder: Path, base: Path | None):
    from omgtool.verify.models.chat import ChatTokenizer

    for cand in (folder, base):
        if cand is not None and (Path(cand) / "tokenizer.model").is_file():
            return ChatTokenizer(cand)
    raise UnreadableInput("no tokenizer.model in the folder (or the base)", folder)


# --- the run ----------------------------------------------------------------------------------

def run_verify(opts: VerifyOptions) -> dict[str, Any]:
    import warnings

    import torch

    from omgtool.kernels.lora import exact_matmul

    opts.folder = Path(opts.folder)
    if not opts.folder.is_dir():
        raise UnreadableInput("not a model folder", opts.folder)
    if opts.precision not in ("auto", "fp32", "bf16"):
        raise InvalidArgument(f"--precision {opts.precision!r}: use auto, fp32 or bf16")
    if opts.device_map not in (None, "auto"):
        raise InvalidArgument(f"--device-map {opts.device_map!r}: only 'auto' is supported")
    if opts.num_queries < 1:
        raise InvalidArgument("--queries must be at least 1")
    if not opts.tolerance_factor > 0:
        raise InvalidArgument("--tolerance must be positive")
    from omgtool.verify.qlora import REFERENCES

    if opts.reference not in REFERENCES:
        raise InvalidArgument(f"--reference {opts.reference!r}: use {' or '.join(REFERENCES)}")
    device = resolve_device(opts.device)
    gpus = [k for k in (opts.max_memory or {}) if isinstance(k, int)]
    if opts.device_map is not None and gpus and not device.startswith("cuda"):
        raise InvalidArgument(f"--max-memory gives GPU {gpus[0]} a budget, but verify runs on {device} here (no "
                              "CUDA GPU); give only cpu=SIZE (the rest is offloaded to disk) or drop --device-map")
    if opts.image is not None:  # before any model loads
        from omgtool.verify.models.preprocess import load_image

        load_image(opts.image)
    run = _Run(opts)
    from omgtool.verify.models.llm import Placement

    placement = Placement(device=device, device_map=opts.device_map, max_memory=opts.max_memory,
                          offload_folder=str(opts.offload_folder) if opts.offload_folder else None)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our stderr carries only our own progress lines
    import logging

    bnb_log = logging.getLogger("bitsandbytes")  # where installed, peft imports it and it warns on CPU
    bnb_level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    if device.startswith("cuda"):
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad(), exact_matmul():
            warnings.simplefilter("ignore")
            report = _verify(run, placement)
    finally:
        placement.cleanup()
        hf_logging.set_verbosity(verbosity)
        bnb_log.setLevel(bnb_level)
        if bars:
            hf_logging.enable_progress_bar()
    report["timings_s"] = {**run.timings, "total": round(time.perf_counter() - start, 4)}
    mem: dict[str, Any] = {"peak_cpu_rss_bytes": peak_rss_bytes()}
    if device.startswith("cuda"):
        dev = torch.device(device)
        mem["peak_gpu_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        mem["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved(dev))
        if torch.cuda.device_count() > 1:
            mem["peak_gpu_allocated_bytes_per_device"] = {
                str(i): int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}
        bf16 = report["llm"].get("bf16_weight_bytes")
        if bf16:
            mem["peak_gpu_over_bf16_weights"] = round(mem["peak_gpu_allocated_bytes"] / bf16, 3)
    else:
        mem["peak_gpu_allocated_bytes"] = None
    report["memory"] = mem
    report["notes"] = run.notes
    report["synthesized"] = run.synthesized
    failed = [name for name, c in report["checks"].items() if c["status"] == "fail"]
    report["failed"] = failed
    report["passed"] = not failed
    return report


def _table_rows(ckpt, analysis) -> set[int]:
    """Row counts of the embedding and output tables, from metadata (no tensor is read)."""
    return {ckpt.tensors[k].shape[0] for group, keys in analysis.groups.items()
            if group.rsplit(".", 1)[-1] in ("embeddings", "lm_head") for k in keys if ckpt.tensors[k].shape}


def _check_vocab_fits(folder: Path, merged, adapter_path, adapter_ckpt, adapter_analysis) -> None:
    """Fail fast, before any model loads, when the adapter's vocab cannot fit the merged folder."""
    from omgtool.arch.infer import analyze

    theirs = _table_rows(adapter_ckpt, adapter_analysis)
    if not theirs:
        return
    ours = _table_rows(merged, analyze(merged))
    if ours and ours != theirs:
        raise MismatchError(f"--adapter {adapter_path} has {'/'.join(map(str, sorted(theirs)))} vocab rows "
                            f"(embeddings, output), the folder {folder} has {'/'.join(map(str, sorted(ours)))}: "
                            "they do not fit together (was the folder merged from another checkpoint?)")


def _verify(run: _Run, placement) -> dict[str, Any]:
    import torch

    from omgtool.formats import open_checkpoint
    from omgtool.arch.infer import analyze
    from omgtool.verify.models.llm import detect_layout, load_llm

    opts = run.opts
    device = placement.device
    folder = opts.folder
    adapter_ckpt = open_checkpoint(opts.adapter) if opts.adapter is not None else None
    merged = open_checkpoint(folder)
    layout = detect_layout(folder, merged)
    numel = sum(t.numel for t in merged.tensors.values())
    stored = max(dtype_counts(merged).items(), key=lambda kv: kv[1])[0]
    lora_numel = 0
    adapter_analysis = None
    if adapter_ckpt is not None:
        adapter_analysis = analyze(adapter_ckpt, alpha=opts.alpha)
        lora_numel = sum(adapter_ckpt.tensors[k].numel for p in adapter_analysis.lora_pairs
                         for k in (p.a_key, p.b_key))
        run.transient = max((adapter_ckpt.tensors[p.b_key].shape[0] * adapter_ckpt.tensors[p.a_key].shape[1] * 8
                             for p in adapter_analysis.lora_pairs), default=0)
        _check_vocab_fits(folder, merged, opts.adapter, adapter_ckpt, adapter_analysis)
    fp32_need = int((numel + lora_numel) * 4 * 1.1) + run.transient
    on_gpu = device.startswith("cuda")
    if on_gpu:
        run.gpu_budget = int(GPU_BUDGET_RATIO * 2 * numel)
    if opts.precision == "auto":
        room = free_memory(device) + (int(free_memory("cpu") * 0.8) if on_gpu else 0)
        fits = opts.device_map is not None or fp32_need <= room
        precision = "fp32" if fits else "bf16"
        why = ("fp32: the fp32 reference fits" + (" (GPU, with accelerate CPU offload beyond the budget)"
                                                  if on_gpu else "") if fits else
               f"bf16: the fp32 reference (~{fp32_need / 1e9:.1f} GB) does not fit the free memory of {device}")
    else:
        precision, why = opts.precision, "--precision"
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    report: dict[str, Any] = {
        "folder": str(folder), "layout": layout, "device": _device_name(device),
        "placement": placement.describe(),
        "precision": {"compute": precision, "why": why, "stored": stored},
        "dtypes": {"compute": str(dtype).removeprefix("torch."), "merged_llm": dtype_counts(merged),
                   "adapter": dtype_counts(adapter_ckpt) if adapter_ckpt is not None else None},
        "checks": {},
    }

    base_path, base_source = (None, None)
    if adapter_ckpt is not None:
        base_path, base_source = resolve_base(folder, opts.base)
    elif opts.base is not None:
        base_path, base_source = Path(opts.base), "--base"
    tok = find_tokenizer(folder, base_path)

    run.say(f"loading the LLM from {folder} ({layout}, {precision})")
    merged_place = capped_placement(run, placement, numel * dtype.itemsize)
    with run.timed("load_llm"):
        model, info = load_llm(folder, dtype, merged_place)
    report["llm"] = {**info.as_dict(), "bf16_weight_bytes": 2 * numel, "params": numel,
                     "placement": merged_place.describe()}
    if run.gpu_budget:
        report["gpu_budget_bytes"] = run.gpu_budget
    ctx = CheckContext(run=run, placement=placement, model=model, model_placement=merged_place, info=info, tok=tok,
                       dtype=dtype, precision=precision, stored=stored, numel=numel, lora_numel=lora_numel,
                       adapter_ckpt=adapter_ckpt, adapter_analysis=adapter_analysis, base_path=base_path,
                       base_source=base_source, report=report)
    del model
    for check in CHECKS.values():
        result = check(ctx)
        if result is not None:
            report["checks"][result.name] = result.as_dict()
    ctx.release_model()
    return report


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
