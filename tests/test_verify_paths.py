"""`omgtool verify` on the tiny fixtures, the other paths: a Llama export through `omgtool export`,
merge-lora's own output, bf16 against the measured noise floor, a device-map split, the pretrain
merge and the human output, --image / --vision-weights / a tokenizer without [SEG], and the
multimodal path against an independent oracle. (Split from test_verify.py to keep each file short.)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from omgtool.cli import app
from tests.verify_helpers import (FT, TINY_BASE, TINY_PRETRAIN, build_merged, folders,  # noqa: F401 (fixtures)
                                  good_run, runner, verify)


def test_llama_export_through_omgtool_export(folders, good_run):
    from omgtool.ops.export import export_llama

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


def test_merge_lora_output_verifies(folders, good_run, tmp_path):
    """omgtool merge-lora's own output (its omgtool-merge.json names the base): every check passes,
    with the same logits as the plain-torch merge."""
    out = tmp_path / "ml"
    result = runner.invoke(app, ["merge-lora", FT, "--base", str(TINY_BASE), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    result, report = verify(out, "--adapter", FT)
    assert result.exit_code == 0, result.output
    assert report["checks"]["merge"]["base_from"] == str(out / "omgtool-merge.json")
    assert report["checks"]["merge"]["delta"] == good_run["checks"]["merge"]["delta"]
    assert report["checks"]["seg"]["seg_id"] == 320 and report["notes"] == []  # [SEG] from its tokenizer


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
    from omgtool.verify.models.preprocess import test_image
    from omgtool.verify.models.vision import build_tower

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


def test_multimodal_path_against_an_independent_oracle(folders):
    """image -> trunk -> shuffle (spec oracle) -> prior concat -> projector (functional oracle) -> splice
    -> the plain-torch InternLM2 forward with inputs_embeds equals verify's LlamaForCausalLM path."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from omgtool.formats import open_checkpoint
    from omgtool.verify.models.llm import Placement, load_llm
    from omgtool.verify.models.preprocess import preprocess, test_image
    from omgtool.verify.models.projector import load_projector
    from omgtool.verify.models.vision import build_tower, trunk_last_stage
    from omgtool.verify.run import splice_image, visual_tokens
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
