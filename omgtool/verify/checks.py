"""The verify checks: one result type (CheckResult) and the registry (CHECKS, in report order).

Each check is a function `(CheckContext) -> CheckResult | None` registered with `@check(name)`;
`omgtool.verify.run._verify` loads the merged LLM, builds the CheckContext and runs them in order
(None: the check does not apply to this run and is left out of the report). A check may leave
state on the context for a later one (the text forward's logits for `merge`, the multimodal
forward for `seg`, the NF4 reference for `training_forward`).

  a. llm_forward       the LLM on a fixed internlm2_chat prompt gives finite logits of the right shape;
  c. multimodal        image -> ConvNeXt trunk -> pixel shuffle -> + per-pixel query prior -> projector
                       -> [grid, separator, queries] spliced at <image> -> LLM;
  d. seg               the LLM's last hidden state at [SEG] -> text2vision -> finite query vector;
  b. merge             merged-model logits vs base + *unmerged* LoRA through PEFT's own LoRA layers,
                       judged against a noise floor measured in the same run;
  training_forward     (information, --reference nf4 with a standard merge) merged vs the QLoRA
                       training forward.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from omgtool.formats.names import PROJECTOR_FILE
from omgtool.verify.placement import capped_placement, fp32_placement, param_bytes

TEXT_INPUT = "Please describe this picture and segment the main object."
MM_INPUT = "<image>\nPlease segment the main object in this image."
ANSWER = "Sure, it is [SEG]."

MIN_REL_TOL = {"fp32": 1e-4, "bf16": 1e-3}  # arithmetic floor when the measured floor is ~0
PREFIX_REL_TOL = {"fp32": 1e-4, "bf16": 2e-2}

Status = Literal["pass", "fail", "skipped", "info"]


@dataclass
class CheckResult:
    """One check's outcome: its status, its numbers (report keys besides status and reason) and why."""

    name: str
    status: Status
    numbers: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, **self.numbers}
        if self.reason is not None:
            out["reason"] = self.reason
        return out

    @classmethod
    def judged(cls, name: str, numbers: dict[str, Any], checks: dict[str, bool]) -> CheckResult:
        """pass when every named sub-check holds, else fail naming the ones that did not."""
        failed = [k for k, ok in checks.items() if not ok]
        return cls(name, "fail" if failed else "pass", numbers, "failed: " + ", ".join(failed) if failed else None)


@dataclass
class CheckContext:
    """What the checks share: the run, the loaded merged LLM and what earlier checks left."""

    run: Any  # omgtool.verify.run's run state (opts, timed, say, notes, synthesized)
    placement: Any  # the run's placement; the references derive theirs from it
    model: Any  # the merged LLM, None once released
    model_placement: Any
    info: Any  # the merged LLM's LlmInfo
    tok: Any
    dtype: Any  # the compute dtype
    precision: str  # fp32 | bf16
    stored: str  # the merged folder's most common stored dtype
    numel: int
    lora_numel: int
    adapter_ckpt: Any
    adapter_analysis: Any
    base_path: Path | None
    base_source: str | None
    report: dict[str, Any]
    ids: list[int] = field(default_factory=list)  # the text prompt's ids
    merged_logits: Any = None
    seg: dict[str, Any] = field(default_factory=dict)  # the multimodal forward for the seg check
    nf4: Any = None  # omgtool.verify.qlora.Nf4Reference with --reference nf4
    judged_view: Any = None
    ref_place: Any = None

    def release_model(self) -> None:
        if self.model is not None:
            self.model = None
            release()


CHECKS: dict[str, Callable[[CheckContext], CheckResult | None]] = {}


def check(name: str):
    """Register a check under `name`; the report lists checks in registration order."""
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


# --- helpers ----------------------------------------------------------------------------------

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


def release(*objs) -> None:
    """Drop the references given, collect and empty the CUDA cache."""
    import torch

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dtype_counts(ckpt) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.dtype for t in ckpt.tensors.values()))


def forward(model, placement, *, input_ids=None, inputs_embeds=None, hidden: bool = False):
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


def logits_of(model, placement, ids):
    """The model's fp32 CPU logits for one prompt of token ids."""
    return forward(model, placement, input_ids=ids).logits.float().cpu()


def encode_prompt(tok, user_input: str, vocab: int, run) -> tuple[list[int], int | None]:
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


def _projector_prefixes() -> tuple[str, ...]:
    """Key prefixes of the OMG-LLaVA projector component (mappings/family_omg_llava.toml)."""
    from omgtool.arch.mapping import load_registry

    family = load_registry().family("omg-llava")
    return tuple(p for c in family.components if c.architecture == "omg_llava_projector" for p in c.prefixes)


def find_projector(opts, adapter_ckpt):
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


def _piece(tok, idx: int) -> str:
    for text, i in tok.added.items():
        if i == idx:
            return text
    return tok.sp.id_to_piece(idx) if idx < tok.sp.get_piece_size() else f"<row {idx}>"


# --- the checks, in report order --------------------------------------------------------------

@check("llm_forward")
def check_llm_forward(ctx: CheckContext) -> CheckResult:
    run, vocab, tok = ctx.run, ctx.info.vocab_size, ctx.tok
    ctx.ids, _ = encode_prompt(tok, TEXT_INPUT, vocab, run)
    ids = ctx.ids
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        return CheckResult("llm_forward", "fail", reason=f"token ids {sorted(set(bad))[:5]} fall outside the "
                           f"embedding table ({vocab} rows)")
    run.say("check a: text forward")
    with run.timed("forward_text"):
        logits = logits_of(ctx.model, ctx.model_placement, ids)
    ctx.merged_logits = logits
    stats = logit_stats(logits)
    shape_ok = stats["shape"] == [1, len(ids), vocab]
    last = int(logits[0, -1].argmax())
    status = "pass" if stats["finite"] and shape_ok else "fail"
    numbers = {"prompt": "internlm2_chat: " + TEXT_INPUT + " / " + ANSWER, "tokens": len(ids), "vocab": vocab,
               "logits": stats, "shape_ok": shape_ok, "last_top1": {"id": last, "piece": _piece(tok, last)}}
    reason = None
    if not stats["finite"]:
        reason = "non-finite logits"
    elif not shape_ok:
        reason = f"logits shape {stats['shape']} != [1, {len(ids)}, {vocab}]"
    return CheckResult("llm_forward", status, numbers, reason)


@check("multimodal")
def check_multimodal(ctx: CheckContext) -> CheckResult:
    """Leaves the multimodal forward in ctx.seg for the seg check (or ctx.seg["skip"], why it cannot run)."""
    import torch

    from omgtool.arch.infer import analyze
    from omgtool.verify.models.chat import IMAGE_TOKEN_INDEX
    from omgtool.verify.models.preprocess import load_image, preprocess, test_image
    from omgtool.verify.models.projector import load_projector, load_text2vision
    from omgtool.verify.models.vision import STRIDE, build_tower, load_vision_weights
    from omgtool.verify.models.visual import splice_image, visual_tokens

    run, info, dtype, tok = ctx.run, ctx.info, ctx.dtype, ctx.tok
    opts = run.opts
    proj_ckpt, proj_source = find_projector(opts, ctx.adapter_ckpt)
    if proj_ckpt is None:
        ctx.seg = {"skip": proj_source}
        return CheckResult("multimodal", "skipped", reason=proj_source)
    ctx.report["dtypes"]["projector"] = dtype_counts(proj_ckpt)
    device = ctx.model_placement.device
    analysis = analyze(proj_ckpt)
    arch = analysis.architecture.get("projector")
    t2v_arch = analysis.architecture.get("text2vision")
    if not arch:
        reason = f"{proj_source} holds no OMG-LLaVA projector weights"
        ctx.seg = {"skip": reason}
        return CheckResult("multimodal", "skipped", reason=reason)
    C, ratio, size = arch["clip_channels"], arch["pixel_shuffle_ratio"], arch["image_size"]
    hidden, query_in = arch["hidden_size"], arch["query_in_channels"]
    if None in (C, ratio, size, hidden, query_in) or size % (STRIDE * ratio):
        reason = (f"the projector's shapes in {proj_source} do not give the CLIP channels / query width "
                  f"({ {k: arch.get(k) for k in ('clip_channels', 'query_in_channels', 'hidden_size')} })")
        ctx.seg = {"skip": reason}
        return CheckResult("multimodal", "fail", {"inferred": arch}, reason)
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
    del tower, projector
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
    if pos is None or any(not 0 <= i < info.vocab_size for i in ids if i != IMAGE_TOKEN_INDEX):
        mm["checks"] = checks
        ctx.seg = {"skip": "multimodal prompt failed"}
        return CheckResult("multimodal", "fail", mm, "the prompt's ids do not fit the embedding table")
    model, placement = ctx.model, ctx.model_placement
    emb = model.get_input_embeddings()
    text_ids = torch.as_tensor([i for i in ids if i != IMAGE_TOKEN_INDEX], device=emb.weight.device
                               if emb.weight.device.type != "meta" else "cpu")
    embeds = splice_image(emb(text_ids), visual, pos)
    mm["sequence"] = {"text_tokens": len(ids) - 1, "visual_tokens": int(visual.shape[0]),
                      "total": int(embeds.shape[1])}
    checks["sequence_length"] = embeds.shape[1] == len(ids) - 1 + expected_tokens
    run.say("check c: multimodal LLM forward")
    with run.timed("forward_multimodal"):
        out = forward(model, placement, inputs_embeds=embeds, hidden=True)
    logits = out.logits.float().cpu()
    mm["logits"] = logit_stats(logits)
    checks["logits_finite"] = mm["logits"]["finite"]
    checks["logits_shape"] = mm["logits"]["shape"] == [1, int(embeds.shape[1]), info.vocab_size]
    # the text before <image> cannot see the image: its logits must equal a text-only forward
    prefix = logits_of(model, placement, ids[:pos])
    cmp = compare_logits(logits[:, :pos], prefix)
    tol = PREFIX_REL_TOL["fp32" if dtype.itemsize == 4 else "bf16"]
    mm["prefix_consistency"] = {**cmp, "tolerance_rel_l2": tol}
    checks["prefix_consistency"] = cmp["rel_l2"] <= tol
    mm["checks"] = checks
    ctx.seg = {"t2v": t2v, "t2v_arch": t2v_arch, "proj_source": proj_source, "ids": ids, "seg_id": seg_id,
               "pos": pos, "expected_tokens": expected_tokens, "out": out}
    return CheckResult.judged("multimodal", mm, checks)


@check("seg")
def check_seg(ctx: CheckContext) -> CheckResult:
    state, ctx.seg = ctx.seg, {}
    if "skip" in state:
        return CheckResult("seg", "skipped", reason=state["skip"])
    t2v, t2v_arch, seg_id = state["t2v"], state["t2v_arch"], state["seg_id"]
    if t2v is None:
        result = CheckResult("seg", "skipped", reason=f"{state['proj_source']} holds no projector_text2vision "
                             "weights")
    elif seg_id is None:
        result = CheckResult("seg", "fail", reason="no [SEG] token: the tokenizer lacks it and the vocab has no "
                             "row after the tokenizer's tokens")
    else:
        run, info = ctx.run, ctx.info
        run.say("check d: [SEG] -> text2vision")
        pos, expected_tokens = state["pos"], state["expected_tokens"]
        seg_text_positions = [i for i, t in enumerate(state["ids"]) if t == seg_id and i > pos]
        positions = [p - 1 + expected_tokens for p in seg_text_positions]  # after splicing
        hs = state["out"].hidden_states[-1][0, positions]
        with run.timed("forward_seg"):
            vec = t2v(hs.to(ctx.model_placement.device, ctx.dtype)).float().cpu()
        want = t2v_arch.get("out_features")
        seg_checks = {"seg_found": bool(positions), "in_features": t2v_arch.get("in_features") == info.hidden_size,
                      "out_features": list(vec.shape) == [len(positions), want], "finite": bool(vec.isfinite().all())}
        numbers = {"seg_id": seg_id, "positions": positions, "hidden_from": "last hidden state "
                   "(output_hidden_states[-1])", "vector_shape": list(vec.shape), "expected_dim": want,
                   "vector_norm": [round(float(v.norm()), 6) for v in vec], "checks": seg_checks}
        result = CheckResult.judged("seg", numbers, seg_checks)
    del state, t2v
    release()
    return result


@check("merge")
def check_merge(ctx: CheckContext) -> CheckResult:
    """Merged logits vs base + unmerged LoRA (PEFT); with --reference nf4 leaves the NF4 reference in ctx."""
    import torch

    from omgtool.formats.dtypes import torch_dtype

    ctx.release_model()
    if ctx.adapter_ckpt is None:
        return CheckResult("merge", "skipped", reason="no --adapter given")
    if ctx.merged_logits is None:
        return CheckResult("merge", "fail", reason="the merged model gave no logits")
    run, stored = ctx.run, ctx.stored
    if run.opts.reference == "nf4":
        from omgtool.verify.qlora import nf4_reference

        ctx.nf4 = nf4_reference(run.opts.folder, ctx.base_path, ctx.adapter_analysis)
        ctx.report["qlora_reference"] = ctx.nf4.as_dict()
    ctx.ref_place = capped_placement(run, ctx.placement, (ctx.numel + ctx.lora_numel) * ctx.dtype.itemsize)
    ctx.judged_view = ctx.nf4.base_view() if ctx.nf4 is not None and ctx.nf4.merge_mode == "nf4-dequant" else None
    stored_dtype = torch_dtype(stored) if stored in ("BF16", "F16", "F32") else torch.bfloat16
    return _judge_merge(ctx, stored_dtype)


def _judge_merge(ctx: CheckContext, stored_dtype) -> CheckResult:
    import torch

    from omgtool.verify.models.reference import build_reference

    run, opts = ctx.run, ctx.run.opts
    analysis, adapter_ckpt, base_path = ctx.adapter_analysis, ctx.adapter_ckpt, ctx.base_path
    merged_logits, ids, dtype, precision = ctx.merged_logits, ctx.ids, ctx.dtype, ctx.precision
    placement, base_view = ctx.ref_place, ctx.judged_view
    if not analysis.lora_pairs:
        run.notes.append("the adapter has no LoRA pairs: the merge check compares against the base with the "
                         "adapter's full weights only")
    run.say(f"check b: building base + unmerged LoRA (PEFT) from {base_path}")
    with run.timed("load_reference"):
        ref_model, rinfo, _ = build_reference(base_path, adapter_ckpt, analysis, dtype, placement, alpha=opts.alpha,
                                              base_view=base_view)
    out: dict[str, Any] = {"base": str(base_path), "base_from": ctx.base_source, "reference": rinfo.as_dict(),
                           "compute_dtype": precision, "reference_placement": placement.describe(),
                           "reference_base": "NF4 round trip (the training forward)" if base_view else "original"}
    if rinfo.vocab_size != merged_logits.shape[-1]:
        release(ref_model)
        return CheckResult("merge", "fail", out, f"vocab differs: merged {merged_logits.shape[-1]}, "
                           f"base + adapter {rinfo.vocab_size}")
    with run.timed("forward_reference"):
        ref = logits_of(ref_model, placement, ids)
    lora_on = bool(analysis.lora_pairs)
    if lora_on:
        with run.timed("forward_reference_without_lora"), ref_model.disable_adapter():
            base_only = logits_of(ref_model, placement, ids)
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
        release(ref_model)
        del ref_model
    else:
        floor_kind = "noise floor: the same reference in bf16 vs fp32"
        release(ref_model)
        del ref_model
        release()
        fp32_place = fp32_placement(run, placement, 2 * param_bytes(analysis, adapter_ckpt, base_path))
        with run.timed("floor"):
            ref32_model, _, _ = build_reference(base_path, adapter_ckpt, analysis, torch.float32, fp32_place,
                                                alpha=opts.alpha, base_view=base_view)
            ref32 = logits_of(ref32_model, fp32_place, ids)
        release(ref32_model)
        del ref32_model
        floor = compare_logits(ref, ref32)
        out["floor_placement"] = fp32_place.describe()
    release()
    tol = max(opts.tolerance_factor * floor["rel_l2"], MIN_REL_TOL[precision])
    out["floor"] = {**floor, "kind": floor_kind}
    out["tolerance_rel_l2"] = tol
    out["rule"] = f"pass when delta rel_l2 <= max({opts.tolerance_factor:g} x floor rel_l2, {MIN_REL_TOL[precision]:g})"
    ok = delta["rel_l2"] <= tol and all(math.isfinite(v) for v in delta.values())
    if not ok:
        return CheckResult("merge", "fail", out, f"merged logits differ from base + unmerged LoRA by rel L2 "
                           f"{delta['rel_l2']:.4g} (tolerance {tol:.4g}; floor {floor['rel_l2']:.4g}; top-1 "
                           f"agreement {delta['top1_agreement']:.1%})")
    effect = out.get("lora_effect", {}).get("rel_l2")
    if effect is not None and effect < 2 * tol:
        out["warning"] = (f"weak check: the LoRA moves logits by rel L2 {effect:.3g}, less than twice the "
                          f"tolerance {tol:.3g}; a wrong alpha could pass")
    return CheckResult("merge", "pass", out)


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
    return logits_of(ref_model, placement, ids)


@check("training_forward")
def check_training_forward(ctx: CheckContext) -> CheckResult | None:
    """Information for a standard merge under --reference nf4: merged vs the QLoRA training forward, and
    the LoRA's effect there. Not run otherwise (None)."""
    if ctx.nf4 is None or ctx.judged_view is not None:
        return None
    from omgtool.verify.models.reference import build_reference
    from omgtool.verify.qlora import training_forward_info

    run, placement, ids = ctx.run, ctx.ref_place, ctx.ids
    run.say("training forward: NF4 round-trip base + unmerged LoRA (PEFT)")
    with run.timed("load_reference_nf4"):
        ref_model, _, _ = build_reference(ctx.base_path, ctx.adapter_ckpt, ctx.adapter_analysis, ctx.dtype,
                                          placement, alpha=run.opts.alpha, base_view=ctx.nf4.base_view())
    with run.timed("forward_reference_nf4"):
        ref = logits_of(ref_model, placement, ids)
        with ref_model.disable_adapter():
            base_only = logits_of(ref_model, placement, ids)
    release(ref_model)
    del ref_model
    info = training_forward_info(ctx.merged_logits, ref, base_only, compare_logits)
    return CheckResult("training_forward", info.pop("status"), info)
