"""`omgtool verify` on the tiny fixtures, through the CLI (typer's CliRunner).

Merged folders are built in tests/verify_helpers.py with plain torch (independent of
omgtool's merge); the Llama export goes through `omgtool export` (its own tests judge it
against the InternLM2 oracle) and, for the negative case, through a hand-made contiguous
q/k/v split. Verify's own numbers are then checked: every check passes on a correct merge,
and a wrong alpha or a wrong row grouping fails with exit 1.
"""

from __future__ import annotations

import torch

from tests.verify_helpers import FT, TINY_BASE, build_merged, folders, good_run, verify  # noqa: F401 (fixtures)


def test_every_check_passes_on_a_correct_merge(good_run):
    r = good_run
    assert r["passed"] and r["failed"] == []
    assert {k: c["status"] for k, c in r["checks"].items()} == {
        "llm_forward": "pass", "multimodal": "pass", "seg": "pass", "merge": "pass"}
    assert r["layout"] == "internlm2" and r["device"].startswith("cpu")
    assert r["precision"] == {"compute": "fp32", "why": "fp32: the fp32 reference fits", "stored": "BF16"}
    a = r["checks"]["llm_forward"]
    assert a["logits"]["finite"] and a["logits"]["shape"] == [1, a["tokens"], 324]
    # (b) merged == base + unmerged LoRA up to the bf16 rounding of a correct merge
    b = r["checks"]["merge"]
    assert b["reference"]["alpha"] == 256 and b["reference"]["scale"] == 32 and b["reference"]["lora_pairs"] == 11
    assert b["base"] == str(TINY_BASE) and b["base_from"].endswith("omgtool-merge.json")
    assert b["delta"]["rel_l2"] <= b["tolerance_rel_l2"] and b["delta"]["top1_agreement"] == 1.0
    assert 0 < b["floor"]["rel_l2"] < 0.01
    assert b["vs_peft_merge"]["max_abs"] < 1e-3  # our rounding == PEFT's merge rounded once
    assert b["lora_effect"]["rel_l2"] > 10 * b["tolerance_rel_l2"]  # the check can see the LoRA
    assert "warning" not in b
    # (c) shapes and token counts from the inferred architecture
    c = r["checks"]["multimodal"]
    assert c["inferred"]["clip_channels"] == 32 and c["inferred"]["grid_tokens"] == 256
    assert c["trunk_last_stage"] == [1, 32, 32, 32] and c["pixel_shuffled"] == [1, 128, 16, 16]
    v = c["visual_tokens"]
    assert v["grid"] == 256 and 0 < v["queries"] <= 256 and v["total"] == 256 + 1 + v["queries"]
    assert c["sequence"]["total"] == c["sequence"]["text_tokens"] + v["total"]
    assert c["prefix_consistency"]["rel_l2"] <= c["prefix_consistency"]["tolerance_rel_l2"]
    assert c["vision"]["random_init"] and c["vision"]["reduced_width"]
    # (d) [SEG] -> text2vision: one finite 32-d vector
    d = r["checks"]["seg"]
    assert d["seg_id"] == 320 and d["vector_shape"] == [1, 32] and d["checks"]["finite"]
    assert any("panoptic head" in s for s in r["synthesized"])
    assert any("random init" in s for s in r["synthesized"])
    for key in ("load_llm", "forward_text", "forward_vision", "forward_multimodal", "forward_seg",
                "load_reference", "forward_reference", "floor", "total"):
        assert r["timings_s"][key] >= 0
    assert r["memory"]["peak_cpu_rss_bytes"] > 100e6 and r["memory"]["peak_gpu_allocated_bytes"] is None


def test_wrong_alpha_fails_with_exit_1(folders, good_run):
    result, report = verify(folders["wrong_alpha"], "--adapter", FT)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: verify failed (merge: merged logits differ")
    b = report["checks"]["merge"]
    assert b["status"] == "fail" and b["delta"]["rel_l2"] > 5 * b["tolerance_rel_l2"]
    assert report["failed"] == ["merge"]
    # the same folder verified with the alpha it was merged with passes: the check tracks alpha
    result, report = verify(folders["wrong_alpha"], "--adapter", FT, "--alpha", 128)
    assert result.exit_code == 0 and report["checks"]["merge"]["reference"]["alpha_source"] == "user (--alpha)"


def test_wrong_row_grouping_fails(folders):
    """A Llama export that cut wqkv into contiguous q/k/v blocks instead of per kv group."""
    result, report = verify(folders["contiguous"], "--adapter", FT)
    assert result.exit_code == 1
    assert report["checks"]["merge"]["status"] == "fail"
    assert report["checks"]["merge"]["delta"]["top1_agreement"] < 0.8
    assert report["checks"]["llm_forward"]["status"] == "pass"  # finite logits alone prove nothing


def test_bad_inputs(folders, tmp_path):
    result, _ = verify(tmp_path / "nope", "--adapter", FT)
    assert result.exit_code == 2 and result.stderr.startswith("error:")
    bare = build_merged(tmp_path / "bare", record_base=False)
    result, _ = verify(bare, "--adapter", FT)
    assert result.exit_code == 2 and "pass --base" in result.stderr
    for args in (("--max-memory", "lots"), ("--precision", "fp8"), ("--device", "tpu"), ("--device-map", "balanced"),
                 ("--tolerance", "0"), ("--queries", "0")):
        result, _ = verify(folders["merged"], *args)
        assert result.exit_code == 2, args
        assert len(result.stderr.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        result, _ = verify(folders["merged"], "--device", "cuda")
        assert result.exit_code == 2 and "CUDA is not available" in result.stderr


def test_unsafe_adapter_is_refused(folders, tmp_path):
    import os

    from tests.ckpt_builders import data_pkl, write_torch_zip

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    bad = write_torch_zip(tmp_path / "evil.pth", data_pkl({"x": Evil()}), {})
    result, _ = verify(folders["merged"], "--adapter", bad)
    assert result.exit_code == 3 and "unsafe pickle" in result.stderr




def test_without_projector_the_visual_checks_are_skipped(tmp_path):
    merged = build_merged(tmp_path / "noproj", projector=False)
    result, report = verify(merged)
    assert result.exit_code == 0, result.output
    assert {k: c["status"] for k, c in report["checks"].items()} == {
        "llm_forward": "pass", "multimodal": "skipped", "seg": "skipped", "merge": "skipped"}
    assert "projector.safetensors" in report["checks"]["multimodal"]["reason"]


def test_gpu_budget_decides_placement(monkeypatch):
    """The 7B numbers on an 80 GB GPU: the merged model in fp32 (31 GB) fits under 2.4x the bf16
    weights; the fp32 reference (+5 GB of r=512 LoRA, + PEFT's merge temporary) is placed by
    accelerate with the GPU capped at the budget. The CPU is never capped."""
    from pathlib import Path

    import omgtool.verify.placement as P
    import omgtool.verify.run as V
    from omgtool.verify.models.llm import Placement

    run = V._Run(V.VerifyOptions(folder=Path(".")))
    llm_params, lora_params = 7_740_000_000, 1_260_000_000
    run.gpu_budget = int(P.GPU_BUDGET_RATIO * 2 * llm_params)
    run.transient = 92548 * 4096 * 8
    monkeypatch.setattr(P, "free_memory", lambda d: (80 << 30) if d.startswith("cuda") else (100 << 30))
    gpu = Placement("cuda:0")
    assert P.capped_placement(run, gpu, 4 * llm_params) is gpu
    ref = P.capped_placement(run, gpu, 4 * (llm_params + lora_params))
    assert ref.device_map == "auto"
    assert ref.max_memory[0] == run.gpu_budget - run.transient - P.GPU_MARGIN
    assert ref.max_memory[0] + run.transient + P.GPU_MARGIN <= 2.5 * 2 * llm_params
    assert P.capped_placement(run, Placement("cpu"), 10 ** 13).device_map is None
