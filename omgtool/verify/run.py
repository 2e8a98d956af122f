"""`omgtool verify`: rebuild OMG-LLaVA from a merged (or exported) folder and prove it computes.

Checks, each with numbers and a pass/fail status:
  a. llm_forward   the LLM on a fixed internlm2_chat prompt gives finite logits of the right shape;
  b. merge         merged-model logits vs base + *unmerged* LoRA through PEFT's own LoRA layers
                   (the adapter's trained embeddings/head, LoRA scale alpha/r), judged against a
                   noise floor measured in the same run (fp32: the rounding of a correct merge to
                   the stored dtype, via PEFT's merge; bf16: bf16 vs fp32 logits of the reference);
  c. multimodal    image -> ConvNeXt trunk -> pixel shuffle -> + per-pixel query prior -> projector
                   -> [grid, separator, queries] spliced at <image> -> LLM, shapes and token counts
                   checked against the architecture inferred from the projector's shapes;
  d. seg           the LLM's last hidden state at [SEG] -> text2vision -> finite query vector.

Without the OMG-Seg panoptic head the object queries, their masks and the per-pixel prior
are synthesized (deterministically); the report says so.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omgtool.errors import InvalidArgument, MismatchError, UnreadableInput
from omgtool.formats.names import EXPORT_RECORD, MERGE_RECORD, PROJECTOR_FILE
from omgtool.kernels.device import resolve_device
from omgtool.verify.placement import GPU_BUDGET_RATIO, capped_placement, fp32_placement, free_memory, param_bytes, \
    peak_rss_bytes
from omgtool.progress import NULL_PROGRESS, Progress

TEXT_INPUT = "Please describe this picture and segment the main object."
MM_INPUT = "<image>\nPlease segment the main object in this image."
ANSWER = "Sure, it is [SEG]."


MIN_REL_TOL = {"fp32": 1e-4, "bf16": 1e-3}  # arithmetic floor when the measured floor is ~0
PREFIX_REL_TOL = {"fp32": 1e-4, "bf16": 2e-2}


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


# --- small helpers ----------------------------------------------------------------------------

def logit_stats(logits) -> dict[str, Any]:
    x = logits.float()
    return {"shape": list(x.shape), "finite": bool(x.isfinite().all()), "mean": float(x.mean()),
            "std": float(x.std()), "max_abs": float(x.abs().max())}


def compare_logits(test, ref) -> dict[str, float]:
    """max |d|, mean |d|, relative L2 ||d|| / ||ref||, top-1 agreement over all positions."""
    t, r = test.float().cpu(), ref.float().cpu()
    d = t - r
    return {"max_abs": float(d.abs().max()), "mean_abs": float(d.abs().mean()),
            "rel_l2": float(d.norm() / r.norm().clamp_min(1e-30)),
            "top1_agreement": float((t.argmax(-1) == r.argmax(-1)).float().mean()),
            "positions": int(t.shape[-2])}


def _free(*objs) -> None:
    import torch

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def _projector_prefixes() -> tuple[str, ...]:
    """Key prefixes of the OMG-LLaVA projector component (mappings/family_omg_llava.toml)."""
    from omgtool.arch.mapping import load_registry

    family = load_registry().family("omg-llava")
    return tuple(p for c in family.components if c.architecture == "omg_llava_projector" for p in c.prefixes)


def find_projector(opts: VerifyOptions, adapter_ckpt):
    """(checkpoint holding projector.* keys, where it came from) or (None, reason)."""
    from omgtool.formats import open_checkpoint

    if opts.projector is not None:
        return open_checkpoint(opts.projector), str(opts.projector)
    own = Path(opts.folder) / PROJECTOR_FILE
    if own.is_file():
        return open_checkpoint(own), str(own)
    if adapter_ckpt is not None and any(k.startswith(_projector_prefixes()) for k in adapter_ckpt.tensors):
        return adapter_ckpt, f"{adapter_ckpt.path} (the adapter checkpoint)"
    return None, f"no {PROJECTOR_FILE} in the folder, no --projector and no --adapter holding projector weights"


def find_tokenizer(folder: Path, base: Path | None):
    from omgtool.verify.models.chat import ChatTokenizer

    for cand in (folder, base):
        if cand is not None and (Path(cand) / "tokenizer.model").is_file():
            return ChatTokenizer(cand)
    raise UnreadableInput("no tokenizer.model in the folder (or the base)", folder)


def encode_prompt(tok, user_input: str, vocab: int, run: _Run) -> tuple[list[int], int | None]:
    """Ids of the chat prompt plus the answer with one [SEG]; ([ids], seg id)."""
    from omgtool.verify.models.chat import SEG_TOKEN, chat_prompt

    seg = tok.token_id(SEG_TOKEN)
    if seg is not None:
        return tok.encode(chat_prompt(user_input, ANSWER)), seg
    before, after = ANSWER.split(SEG_TOKEN)
    ids = tok.encode(chat_prompt(user_input, before))
    if vocab > len(tok):
        seg = len(tok)  # OMG-LLaVA adds [SEG] first, right after the tokenizer's own vocab
        note = (f"the tokenizer has no {SEG_TOKEN}; assumed id {seg} (first row after the tokenizer's "
                f"{len(tok)} tokens, where OMG-LLaVA adds it)")
        if note not in run.notes:
            run.notes.append(note)
        return ids + [seg] + tok.encode(after, add_bos=False), seg
    return ids + tok.encode(after, add_bos=False), None


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
    from omgtool.formats.dtypes import torch_dtype
    from omgtool.arch.infer import analyze
    from omgtool.verify.models.llm import detect_layout, load_llm

    opts = run.opts
    device = placement.device
    folder = opts.folder
    adapter_ckpt = open_checkpoint(opts.adapter) if opts.adapter is not None else None
    merged = open_checkpoint(folder)
    layout = detect_layout(folder, merged)
    numel = sum(t.numel for t in merged.tensors.values())
    stored = max(_dtype_counts(merged).items(), key=lambda kv: kv[1])[0]
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
        "dtypes": {"compute": str(dtype).removeprefix("torch."), "merged_llm": _dtype_counts(merged),
                   "adapter": _dtype_counts(adapter_ckpt) if adapter_ckpt is not None else None},
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
    placement_for_merged = merged_place
    vocab = info.vocab_size

    # (a) text forward
    ids, seg_id = encode_prompt(tok, TEXT_INPUT, vocab, run)
    report["checks"]["llm_forward"], merged_logits = _check_llm_forward(run, model, placement_for_merged, ids,
                                                                        vocab, tok)

    # (c) + (d) multimodal and [SEG]
    proj_ckpt, proj_source = find_projector(opts, adapter_ckpt)
    if proj_ckpt is not None:
        report["dtypes"]["projector"] = _dtype_counts(proj_ckpt)
    if proj_ckpt is None:
        report["checks"]["multimodal"] = {"status": "skipped", "reason": proj_source}
        report["checks"]["seg"] = {"status": "skipped", "reason": proj_source}
    else:
        mm, seg = _check_multimodal(run, model, placement_for_merged, tok, proj_ckpt, proj_source, info, dtype,
                                    report)
        report["checks"]["multimodal"] = mm
        report["checks"]["seg"] = seg
    _free(model)
    del model
    _free()

    # (b) merge vs base + unmerged LoRA
    if adapter_ckpt is None:
        report["checks"]["merge"] = {"status": "skipped", "reason": "no --adapter given"}
    elif merged_logits is None:
        report["checks"]["merge"] = {"status": "fail", "reason": "the merged model gave no logits"}
    else:
        nf4 = None
        if opts.reference == "nf4":
            from omgtool.verify.qlora import nf4_reference

            nf4 = nf4_reference(folder, base_path, adapter_analysis)
            report["qlora_reference"] = nf4.as_dict()
        ref_place = capped_placement(run, placement, (numel + lora_numel) * dtype.itemsize)
        judged_view = nf4.base_view() if nf4 is not None and nf4.merge_mode == "nf4-dequant" else None
        report["checks"]["merge"] = _check_merge(
            run, merged_logits, ids, base_path, base_source, adapter_ckpt, adapter_analysis, dtype, precision,
            ref_place, torch_dtype(stored) if stored in ("BF16", "F16", "F32") else torch.bfloat16,
            base_view=judged_view)
        if nf4 is not None and judged_view is None:
            report["checks"]["training_forward"] = _check_training_forward(
                run, merged_logits, ids, base_path, adapter_ckpt, adapter_analysis, dtype, ref_place, nf4)
    return report


def _dtype_counts(ckpt) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.dtype for t in ckpt.tensors.values()))


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _forward(model, placement, *, input_ids=None, inputs_embeds=None, hidden: bool = False):
    import torch

    from omgtool.verify.models.llm import input_device

    dev = input_device(model, placement)
    kwargs: dict[str, Any] = {"use_cache": False}
    if input_ids is not None:
        kwargs["input_ids"] = torch.as_tensor([input_ids], device=dev)
    else:
        kwargs["inputs_embeds"] = inputs_embeds.to(dev)
    if hidden:
        kwargs["output_hidden_states"] = True
    return model(**kwargs)


def _check_llm_forward(run: _Run, model, placement, ids, vocab, tok):
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        return {"status": "fail", "reason": f"token ids {sorted(set(bad))[:5]} fall outside the embedding "
                f"table ({vocab} rows)"}, None
    run.say("check a: text forward")
    with run.timed("forward_text"):
        logits = _forward(model, placement, input_ids=ids).logits.float().cpu()
    stats = logit_stats(logits)
    shape_ok = stats["shape"] == [1, len(ids), vocab]
    last = int(logits[0, -1].argmax())
    status = "pass" if stats["finite"] and shape_ok else "fail"
    out = {"status": status, "prompt": "internlm2_chat: " + TEXT_INPUT + " / " + ANSWER,
           "tokens": len(ids), "vocab": vocab, "logits": stats, "shape_ok": shape_ok,
           "last_top1": {"id": last, "piece": _piece(tok, last)}}
    if not stats["finite"]:
        out["reason"] = "non-finite logits"
    elif not shape_ok:
        out["reason"] = f"logits shape {stats['shape']} != [1, {len(ids)}, {vocab}]"
    return out, logits


def _piece(tok, idx: int) -> str:
    for text, i in tok.added.items():
        if i == idx:
            return text
    return tok.sp.id_to_piece(idx) if idx < tok.sp.get_piece_size() else f"<row {idx}>"


def synthesize_queries(num_queries: int, query_in: int, h: int, w: int, seed: int):
    """Object queries, their masks and the per-pixel prior, as OMG-Seg's panoptic_postprocess forms
    them, from synthetic (seeded) query features, class scores and mask logits.

    Returns (query_pos_feat [1, Q, query_in], pixel_prior [1, h*w, query_in], attn_mask [1, Q, h*w]).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    query_pos_feat = torch.randn(num_queries, query_in, generator=g)
    scores = torch.rand(num_queries, generator=g)
    mask_logits = torch.randn(num_queries, h, w, generator=g) * 2.0
    prob = (scores.view(-1, 1, 1) * 0.5 + 0.5) * mask_logits.sigmoid()  # smooth_ratio 0.5
    mask_ids = prob.argmax(0)  # [h, w]
    pixel_prior = prob.softmax(dim=0).permute(1, 2, 0) @ query_pos_feat  # [h, w, query_in]
    attn_mask = (mask_ids.unsqueeze(0) != torch.arange(num_queries).view(-1, 1, 1)).flatten(1)  # [Q, hw]
    return query_pos_feat.unsqueeze(0), pixel_prior.reshape(1, h * w, query_in), attn_mask.unsqueeze(0)


def visual_tokens(tower, projector, pixels, ratio: int, num_queries: int, query_in: int, seed: int,
                  timed=None) -> dict[str, Any]:
    """image -> trunk last stage -> pixel shuffle -> grid ++ per-pixel prior -> projector.

    Returns the intermediates and `visual` [grid + 1 + valid queries, hidden] for one image.
    """
    import contextlib

    import torch

    from omgtool.verify.models.pixel_shuffle import grid_tokens, pixel_shuffle
    from omgtool.verify.models.vision import trunk_last_stage

    timed = timed or (lambda name: contextlib.nullcontext())
    with timed("forward_vision"):
        feat = trunk_last_stage(tower, pixels)
    shuffled = pixel_shuffle(feat, ratio)
    grid = grid_tokens(shuffled)
    queries, prior, attn_mask = synthesize_queries(num_queries, query_in, shuffled.shape[-2], shuffled.shape[-1],
                                                   seed)
    clip_feature = torch.cat([grid, prior.to(grid.device, grid.dtype)], dim=-1)
    with timed("forward_projector"):
        visual = projector(clip_feature, queries.to(grid.device, grid.dtype), attn_mask.to(grid.device))[0]
    return {"feat": feat, "shuffled": shuffled, "grid": grid, "queries": queries, "prior": prior,
            "attn_mask": attn_mask, "clip_feature": clip_feature, "visual": visual,
            "valid_queries": int((attn_mask.sum(-1) < attn_mask.shape[-1]).sum())}


def splice_image(text_emb, visual, pos: int):
    """Text embeddings [T, H] with the visual tokens [N, H] inserted at `pos` -> [1, T + N, H]."""
    import torch

    visual = visual.to(text_emb.device, text_emb.dtype)
    return torch.cat([text_emb[:pos], visual, text_emb[pos:]], dim=0).unsqueeze(0)


def _check_multimodal(run: _Run, model, placement, tok, proj_ckpt, proj_source, info, dtype, report):
    import torch

    from omgtool.arch.infer import analyze
    from omgtool.verify.models.chat import IMAGE_TOKEN_INDEX
    from omgtool.verify.models.preprocess import load_image, preprocess, test_image
    from omgtool.verify.models.projector import load_projector, load_text2vision
    from omgtool.verify.models.vision import STRIDE, build_tower, load_vision_weights

    opts = run.opts
    device = placement.device
    analysis = analyze(proj_ckpt)
    arch = analysis.architecture.get("projector")
    t2v_arch = analysis.architecture.get("text2vision")
    if not arch:
        reason = f"{proj_source} holds no OMG-LLaVA projector weights"
        return {"status": "skipped", "reason": reason}, {"status": "skipped", "reason": reason}
    C, ratio, size = arch["clip_channels"], arch["pixel_shuffle_ratio"], arch["image_size"]
    hidden, query_in = arch["hidden_size"], arch["query_in_channels"]
    if None in (C, ratio, size, hidden, query_in) or size % (STRIDE * ratio):
        reason = (f"the projector's shapes in {proj_source} do not give the CLIP channels / query width "
                  f"({ {k: arch.get(k) for k in ('clip_channels', 'query_in_channels', 'hidden_size')} })")
        return {"status": "fail", "reason": reason, "inferred": arch}, {"status": "skipped", "reason": reason}
    checks: dict[str, bool] = {}
    mm: dict[str, Any] = {"projector_source": proj_source, "inferred": {
        k: arch[k] for k in ("clip_channels", "pixel_shuffle_ratio", "shuffled_channels", "query_in_channels",
                             "feat_in_channels", "hidden_size", "grid_tokens", "image_size")}}

    run.say("check c: vision trunk, pixel shuffle, projector")
    with run.timed("load_vision"):
        tower, vinfo = build_tower(C, device=device, dtype=dtype)
        if opts.vision_weights is not None:
            vinfo = load_vision_weights(tower, vinfo, opts.vision_weights)
        projector = load_projector(proj_ckpt, dtype=dtype, device=device)
        t2v = load_text2vision(proj_ckpt, dtype=dtype, device=device) if t2v_arch else None
    if vinfo.random_init:
        run.synthesized.append("vision trunk: random init (no --vision-weights)")
    if vinfo.reduced_width:
        run.synthesized.append(f"vision trunk: reduced-width ConvNeXt for {C} CLIP channels (the real trunk has 1536)")
    mm["vision"] = vinfo.as_dict()
    img = load_image(opts.image) if opts.image is not None else test_image()
    mm["image"] = str(opts.image) if opts.image is not None else f"generated test image {img.size[0]}x{img.size[1]}"
    pixels = preprocess(img, size=size).to(device=device, dtype=dtype)
    h, w = size // STRIDE, size // STRIDE
    gh, gw = h // ratio, w // ratio
    parts = visual_tokens(tower, projector, pixels, ratio, opts.num_queries, query_in, opts.seed, timed=run.timed)
    feat, shuffled, grid, visual = parts["feat"], parts["shuffled"], parts["grid"], parts["visual"]
    mm["trunk_last_stage"] = list(feat.shape)
    checks["trunk_shape"] = list(feat.shape) == [1, C, h, w]
    mm["pixel_shuffled"] = list(shuffled.shape)
    checks["shuffle_shape"] = list(shuffled.shape) == [1, arch["shuffled_channels"], gh, gw]
    checks["grid_tokens"] = grid.shape[1] == arch["grid_tokens"]
    run.synthesized.append(f"object queries: {opts.num_queries} synthesized query features++positions "
                           f"({query_in}-d), masks and per-pixel prior (no OMG-Seg panoptic head)")
    checks["feat_in"] = parts["clip_feature"].shape[-1] == arch["feat_in_channels"]
    valid = parts["valid_queries"]
    expected_tokens = arch["grid_tokens"] + 1 + valid
    mm["visual_tokens"] = {"grid": int(grid.shape[1]), "separator": 1, "queries": valid,
                           "total": int(visual.shape[0]), "expected": expected_tokens}
    checks["visual_tokens"] = list(visual.shape) == [expected_tokens, info.hidden_size]
    checks["hidden_matches_llm"] = hidden == info.hidden_size
    checks["visual_finite"] = bool(visual.isfinite().all())

    ids, seg_id = encode_prompt(tok, MM_INPUT, info.vocab_size, run)
    pos = ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in ids else None
    seg_report: dict[str, Any]
    if pos is None or any(not 0 <= i < info.vocab_size for i in ids if i != IMAGE_TOKEN_INDEX):
        mm.update(status="fail", reason="the prompt's ids do not fit the embedding table", checks=checks)
        return mm, {"status": "skipped", "reason": "multimodal prompt failed"}
    emb = model.get_input_embeddings()
    text_ids = torch.as_tensor([i for i in ids if i != IMAGE_TOKEN_INDEX], device=emb.weight.device
                               if emb.weight.device.type != "meta" else "cpu")
    embeds = splice_image(emb(text_ids), visual, pos)
    mm["sequence"] = {"text_tokens": len(ids) - 1, "visual_tokens": int(visual.shape[0]),
                      "total": int(embeds.shape[1])}
    checks["sequence_length"] = embeds.shape[1] == len(ids) - 1 + expected_tokens
    run.say("check c: multimodal LLM forward")
    with run.timed("forward_multimodal"):
        out = _forward(model, placement, inputs_embeds=embeds, hidden=True)
    logits = out.logits.float().cpu()
    mm["logits"] = logit_stats(logits)
    checks["logits_finite"] = mm["logits"]["finite"]
    checks["logits_shape"] = mm["logits"]["shape"] == [1, int(embeds.shape[1]), info.vocab_size]
    # the text before <image> cannot see the image: its logits must equal a text-only forward
    prefix = _forward(model, placement, input_ids=ids[:pos]).logits.float().cpu()
    cmp = compare_logits(logits[:, :pos], prefix)
    tol = PREFIX_REL_TOL["fp32" if dtype.itemsize == 4 else "bf16"]
    mm["prefix_consistency"] = {**cmp, "tolerance_rel_l2": tol}
    checks["prefix_consistency"] = cmp["rel_l2"] <= tol
    failed = [k for k, ok in checks.items() if not ok]
    mm["checks"] = checks
    mm["status"] = "fail" if failed else "pass"
    if failed:
        mm["reason"] = "failed: " + ", ".join(failed)

    # (d) [SEG] -> text2vision
    if t2v is None:
        seg_report = {"status": "skipped", "reason": f"{proj_source} holds no projector_text2vision weights"}
    elif seg_id is None:
        seg_report = {"status": "fail", "reason": "no [SEG] token: the tokenizer lacks it and the vocab has no "
                      "row after the tokenizer's tokens"}
    else:
        run.say("check d: [SEG] -> text2vision")
        seg_text_positions = [i for i, t in enumerate(ids) if t == seg_id and i > pos]
        positions = [p - 1 + expected_tokens for p in seg_text_positions]  # after splicing
        hs = out.hidden_states[-1][0, positions]
        with run.timed("forward_seg"):
            vec = t2v(hs.to(device, dtype)).float().cpu()
        want = t2v_arch.get("out_features")
        seg_checks = {"seg_found": bool(positions), "in_features": t2v_arch.get("in_features") == info.hidden_size,
                      "out_features": list(vec.shape) == [len(positions), want], "finite": bool(vec.isfinite().all())}
        seg_report = {"seg_id": seg_id, "positions": positions, "hidden_from": "last hidden state "
                      "(output_hidden_states[-1])", "vector_shape": list(vec.shape), "expected_dim": want,
                      "vector_norm": [round(float(v.norm()), 6) for v in vec], "checks": seg_checks}
        failed = [k for k, ok in seg_checks.items() if not ok]
        seg_report["status"] = "fail" if failed else "pass"
        if failed:
            seg_report["reason"] = "failed: " + ", ".join(failed)
    del tower, projector, t2v, out
    _free()
    return mm, seg_report


def _check_merge(run: _Run, merged_logits, ids, base_path, base_source, adapter_ckpt, analysis, dtype,
                 precision, placement, stored_dtype, base_view=None):
    import torch

    from omgtool.verify.models.reference import build_reference

    opts = run.opts
    if not analysis.lora_pairs:
        run.notes.append("the adapter has no LoRA pairs: the merge check compares against the base with the "
                         "adapter's full weights only")
    run.say(f"check b: building base + unmerged LoRA (PEFT) from {base_path}")
    with run.timed("load_reference"):
        ref_model, rinfo, _ = build_reference(base_path, adapter_ckpt, analysis, dtype, placement, alpha=opts.alpha,
                                              base_view=base_view)
    out: dict[str, Any] = {"base": str(base_path), "base_from": base_source, "reference": rinfo.as_dict(),
                           "compute_dtype": precision, "reference_placement": placement.describe(),
                           "reference_base": "NF4 round trip (the training forward)" if base_view else "original"}
    if rinfo.vocab_size != merged_logits.shape[-1]:
        _free(ref_model)
        out.update(status="fail", reason=f"vocab differs: merged {merged_logits.shape[-1]}, "
                   f"base + adapter {rinfo.vocab_size}")
        return out
    with run.timed("forward_reference"):
        ref = _forward(ref_model, placement, input_ids=ids).logits.float().cpu()
    lora_on = bool(analysis.lora_pairs)
    if lora_on:
        with run.timed("forward_reference_without_lora"), ref_model.disable_adapter():
            base_only = _forward(ref_model, placement, input_ids=ids).logits.float().cpu()
        out["lora_effect"] = compare_logits(base_only, ref)
    delta = compare_logits(merged_logits, ref)
    out["delta"] = delta

    if precision == "fp32":
        floor_kind = (f"rounding floor: PEFT's own merge of the same reference, rounded once to the stored "
                      f"{str(stored_dtype).removeprefix('torch.')}, vs unmerged (fp32)")
        with run.timed("floor"):
            floor_logits = _peft_merged_rounded(ref_model, placement, ids, stored_dtype) if lora_on else None
        if floor_logits is None:
            floor = {"rel_l2": 0.0, "max_abs": 0.0, "mean_abs": 0.0, "top1_agreement": 1.0}
        else:
            floor = compare_logits(floor_logits, ref)
            out["vs_peft_merge"] = compare_logits(merged_logits, floor_logits)
        _free(ref_model)
        del ref_model
    else:
        floor_kind = "noise floor: the same reference in bf16 vs fp32"
        _free(ref_model)
        del ref_model
        _free()
        fp32_place = fp32_placement(run, placement, 2 * param_bytes(analysis, adapter_ckpt, base_path))
        with run.timed("floor"):
            ref32_model, _, _ = build_reference(base_path, adapter_ckpt, analysis, torch.float32, fp32_place,
                                                alpha=opts.alpha, base_view=base_view)
            ref32 = _forward(ref32_model, fp32_place, input_ids=ids).logits.float().cpu()
        _free(ref32_model)
        del ref32_model
        floor = compare_logits(ref, ref32)
        out["floor_placement"] = fp32_place.describe()
    _free()
    tol = max(opts.tolerance_factor * floor["rel_l2"], MIN_REL_TOL[precision])
    out["floor"] = {**floor, "kind": floor_kind}
    out["tolerance_rel_l2"] = tol
    out["rule"] = f"pass when delta rel_l2 <= max({opts.tolerance_factor:g} x floor rel_l2, {MIN_REL_TOL[precision]:g})"
    ok = delta["rel_l2"] <= tol and all(math.isfinite(v) for v in delta.values())
    out["status"] = "pass" if ok else "fail"
    if not ok:
        out["reason"] = (f"merged logits differ from base + unmerged LoRA by rel L2 {delta['rel_l2']:.4g} "
                         f"(tolerance {tol:.4g}; floor {floor['rel_l2']:.4g}; top-1 agreement "
                         f"{delta['top1_agreement']:.1%})")
    effect = out.get("lora_effect", {}).get("rel_l2")
    if ok and effect is not None and effect < 2 * tol:
        out["warning"] = (f"weak check: the LoRA moves logits by rel L2 {effect:.3g}, less than twice the "
                          f"tolerance {tol:.3g}; a wrong alpha could pass")
    return out


def _check_training_forward(run: _Run, merged_logits, ids, base_path, adapter_ckpt, analysis, dtype, placement, nf4):
    """Information for a standard merge: merged vs the QLoRA training forward, and the LoRA's effect there."""
    from omgtool.verify.models.reference import build_reference
    from omgtool.verify.qlora import training_forward_info

    run.say("training forward: NF4 round-trip base + unmerged LoRA (PEFT)")
    with run.timed("load_reference_nf4"):
        ref_model, _, _ = build_reference(base_path, adapter_ckpt, analysis, dtype, placement, alpha=run.opts.alpha,
                                          base_view=nf4.base_view())
    with run.timed("forward_reference_nf4"):
        ref = _forward(ref_model, placement, input_ids=ids).logits.float().cpu()
        with ref_model.disable_adapter():
            base_only = _forward(ref_model, placement, input_ids=ids).logits.float().cpu()
    _free(ref_model)
    del ref_model
    return training_forward_info(merged_logits, ref, base_only, compare_logits)


def _peft_merged_rounded(ref_model, placement, ids, stored_dtype):
    """Logits after PEFT's own merge of every LoRA layer (what merge_adapter does, offloaded layers
    included), each merged weight then rounded once to the stored dtype."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import onload_layer

    for module in ref_model.modules():
        if isinstance(module, LoraLayer):
            with onload_layer(module):
                module.merge()
                w = module.get_base_layer().weight.data
                for start in range(0, w.shape[0], 8192):  # in place, one row chunk at a time
                    w[start:start + 8192].copy_(w[start:start + 8192].to(stored_dtype))
    return _forward(ref_model, placement, input_ids=ids).logits.float().cpu()
