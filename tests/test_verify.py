"""`omgtool verify` on the tiny fixtures, through the CLI (typer's CliRunner).

Merged folders are built in tests/verify_helpers.py with plain torch (independent of
omgtool's merge); the Llama export goes through `omgtool export` (its own tests judge it
against the InternLM2 oracle) and, for the negative case, through a hand-made contiguous
q/k/v split. Verify's own numbers are then checked: every check passes on a correct merge,
and a wrong alpha or a wrong row grouping fails with exit 1.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from omgtool.cli import app
from tests.verify_helpers import TINY_BASE, TINY_FINETUNE, TINY_PRETRAIN, build_merged

runner = CliRunner()
FT = str(TINY_FINETUNE)


def verify(*args, json_out: bool = True):
    argv = ["verify", *map(str, args)] + (["--json"] if json_out else [])
    result = runner.invoke(app, argv)
    report = json.loads(result.stdout) if json_out and result.stdout.strip() else None
    return result, report


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return {
        "merged": build_merged(root / "merged"),
        "wrong_alpha": build_merged(root / "wrong_alpha", alpha=128.0),
        "contiguous": build_merged(root / "contiguous", layout="llama", grouping="contiguous"),
        "root": root,
    }


@pytest.fixture(scope="module")
def good_run(folders):
    result, report = verify(folders["merged"], "--adapter", FT)
    assert result.exit_code == 0, result.output
    return report


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


def test_llama_export_through_omgtool_export(folders, good_run):
    from omgtool.export import export_llama

    out = folders["root"] / "export"
    export_llama(folders["merged"], out)
    result, report = verify(out, "--adapter", FT)
    assert result.exit_code == 0, result.output
    assert report["layout"] == "llama" and report["llm"]["built_with"].startswith("transformers")
    assert report["checks"]["merge"]["base"] == str(TINY_BASE)
    # same weights, other layout: the same logits as the InternLM2 folder
    for key in ("max_abs", "rel_l2"):
        assert report["checks"]["merge"]["delta"][key] == pytest.approx(
            good_run["checks"]["merge"]["delta"][key], rel=1e-3, abs=1e-6)


def test_bf16_judged_against_the_measured_noise_floor(folders):
    result, report = verify(folders["merged"], "--adapter", FT, "--precision", "bf16")
    assert result.exit_code == 0, result.output
    b = report["checks"]["merge"]
    assert report["precision"]["compute"] == "bf16" and "bf16 vs fp32" in b["floor"]["kind"]
    assert b["floor"]["rel_l2"] > 1e-3  # bf16 arithmetic noise is real
    assert b["delta"]["rel_l2"] <= b["tolerance_rel_l2"] == pytest.approx(3 * b["floor"]["rel_l2"])
    result, report = verify(folders["wrong_alpha"], "--adapter", FT, "--precision", "bf16")
    assert result.exit_code == 1 and report["checks"]["merge"]["status"] == "fail"


def test_device_map_split_on_cpu_matches_unsplit(folders, good_run, tmp_path):
    result, report = verify(folders["merged"], "--adapter", FT, "--device-map", "auto",
                            "--max-memory", "cpu=8MB", "--offload-folder", tmp_path / "off")
    assert result.exit_code == 0, result.output
    assert set(report["llm"]["device_map"].values()) == {"cpu", "disk"}
    assert report["checks"]["merge"]["reference_placement"].startswith("device_map=auto")
    for check in ("merge",):
        assert report["checks"][check]["delta"] == good_run["checks"][check]["delta"]
    assert report["checks"]["llm_forward"]["logits"] == good_run["checks"]["llm_forward"]["logits"]
    assert list((tmp_path / "off").iterdir()) == []  # offload folders removed


def test_pretrain_merge_and_human_output(folders, tmp_path):
    merged = build_merged(tmp_path / "pretrain", ckpt_path=TINY_PRETRAIN)
    result, report = verify(merged, "--adapter", TINY_PRETRAIN)
    assert result.exit_code == 0, result.output
    b = report["checks"]["merge"]
    assert b["reference"]["lora_pairs"] == 0 and b["delta"]["max_abs"] == 0.0  # only tables replaced
    result, _ = verify(folders["merged"], json_out=False)
    assert result.exit_code == 0
    assert "merge" in result.stdout and "skipped" in result.stdout and "no --adapter given" in result.stdout
    assert "all checks passed" in result.stdout


def test_image_vision_weights_and_missing_seg_token(folders, tmp_path):
    from omgtool.models.preprocess import test_image
    from omgtool.models.vision import build_tower

    test_image(300, 500).save(tmp_path / "img.png")
    tower, _ = build_tower(32)
    save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()},
              str(tmp_path / "clip.safetensors"))
    merged = build_merged(tmp_path / "m", added_tokens=False)
    result, report = verify(merged, "--image", tmp_path / "img.png", "--vision-weights",
                            tmp_path / "clip.safetensors", "--queries", 20)
    assert result.exit_code == 0, result.output
    c = report["checks"]["multimodal"]
    assert c["image"].endswith("img.png") and not c["vision"]["random_init"] and c["vision"]["layout"] == "open_clip"
    assert c["visual_tokens"]["queries"] <= 20
    assert report["checks"]["seg"]["seg_id"] == 320 and any("assumed id 320" in n for n in report["notes"])


def test_bad_inputs(folders, tmp_path):
    result, _ = verify(tmp_path / "nope", "--adapter", FT)
    assert result.exit_code == 2 and result.stderr.startswith("error:")
    bare = build_merged(tmp_path / "bare", record_base=False)
    result, _ = verify(bare, "--adapter", FT)
    assert result.exit_code == 2 and "pass --base" in result.stderr
    for args in (("--max-memory", "lots"), ("--precision", "fp8"), ("--device", "tpu"), ("--device-map", "balanced")):
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


def test_multimodal_path_against_an_independent_oracle(folders):
    """image -> trunk -> shuffle (spec oracle) -> prior concat -> projector (functional oracle) -> splice
    -> the plain-torch InternLM2 forward with inputs_embeds equals verify's LlamaForCausalLM path."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from omgtool.formats import open_checkpoint
    from omgtool.models.llm import Placement, load_llm
    from omgtool.models.preprocess import preprocess, test_image
    from omgtool.models.projector import load_projector
    from omgtool.models.vision import build_tower, trunk_last_stage
    from omgtool.verify import splice_image, visual_tokens
    from tests.reference_internlm2 import internlm2_forward
    from tests.test_models import shuffle_oracle

    merged = folders["merged"]
    proj_file = merged / "projector.safetensors"
    tower, _ = build_tower(32)
    projector = load_projector(open_checkpoint(proj_file))
    pixels = preprocess(test_image())
    with torch.no_grad():
        parts = visual_tokens(tower, projector, pixels, 2, 300, 32, seed=0)
        p = {k.removeprefix("projector.model."): v.float() for k, v in load_file(str(proj_file)).items()}
        mlp = lambda x, n: F.linear(F.gelu(F.linear(x, p[f"{n}.0.weight"], p[f"{n}.0.bias"])),  # noqa: E731
                                    p[f"{n}.2.weight"], p[f"{n}.2.bias"])
        grid = shuffle_oracle(trunk_last_stage(tower, pixels), 2).flatten(2).transpose(1, 2)[0]  # [256, 128]
        prior, queries, mask = parts["prior"][0], parts["queries"][0], parts["attn_mask"][0]
        keep = [q for q in range(mask.shape[0]) if not bool(mask[q].all())]
        want_visual = torch.cat([mlp(torch.cat([grid, prior], -1), "model_feat"), p["seperate_embed.weight"],
                                 mlp(F.linear(queries[keep], p["query_proj.weight"], p["query_proj.bias"]),
                                     "model")])
        torch.testing.assert_close(parts["visual"], want_visual, rtol=1e-4, atol=1e-5)
        model, _ = load_llm(merged, torch.float32, Placement("cpu"))
        ids = [1, 319, 164, 283, 283, 177, 20, 318]
        embeds = splice_image(model.get_input_embeddings()(torch.tensor(ids)), parts["visual"], 4)
        got = model(inputs_embeds=embeds).logits
        weights = {k: v for k, v in load_file(str(merged / "model.safetensors")).items()}
        cfg = json.loads((merged / "config.json").read_text())
        want = internlm2_forward(weights, cfg, None, inputs_embeds=embeds)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        assert embeds.shape[1] == len(ids) + 257 + len(keep)
