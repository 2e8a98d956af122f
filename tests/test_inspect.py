"""`omgtool inspect` on the shipped fixtures: the inferred architecture equals what the
generator says it built (fixtures/tiny/spec.json), every key lands in a group, stats and
update strengths match plain-torch computations."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fixtures import generate as gen
from omgtool.cli import app

from tests.paths import SPEC, TINY as FIXTURES
runner = CliRunner()


def inspect_json(*args) -> dict:
    result = runner.invoke(app, ["inspect", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", ["omg_llava_tiny_pretrain.pth", "omg_llava_tiny_finetune.pth"])
def test_architecture_matches_generator(name):
    built = SPEC["checkpoints"][name]
    expected = built["architecture"]
    report = inspect_json(FIXTURES / name)
    arch = report["architecture"]
    assert report["num_tensors"] == built["num_tensors"]
    assert arch["family"] == "omg-llava"
    assert arch["stage"] == built["stage"]
    llm = arch["llm"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        assert llm[key] == expected[key], key
    assert "128" in llm["head_dim_source"]
    proj = arch["projector"]
    assert proj["clip_channels"] == SPEC["clip_channels"]
    assert proj["pixel_shuffle_ratio"] == SPEC["pixel_shuffle_ratio"]
    assert proj["query_channels"] == SPEC["query_channels"]
    assert proj["shuffled_channels"] == SPEC["derived"]["clip_in"]
    assert proj["feat_in_channels"] == SPEC["derived"]["feat_in"]
    assert proj["hidden_size"] == SPEC["hidden_size"]
    assert arch["text2vision"] == {"architecture": "omg_llava_text2vision", "in_features": SPEC["hidden_size"],
                                   "out_features": SPEC["text2vision_dim"]}
    if expected["lora"] is None:
        assert arch["lora"] is None
    else:
        lora = arch["lora"]
        assert lora["rank"] == expected["lora"]["rank"]
        assert lora["alpha"] == expected["lora"]["alpha"]
        assert lora["scale"] == expected["lora"]["scale"]
        assert "mapping default" in lora["alpha_source"]
        assert lora["num_pairs"] == expected["lora"]["num_modules"]
        assert lora["targets"] == sorted(t.split(".")[-1] for t in expected["lora"]["targets"])


def test_groups_cover_every_key():
    report = inspect_json(FIXTURES / "omg_llava_tiny_finetune.pth")
    assert sum(report["groups"].values()) == report["num_tensors"]
    assert report["groups"] == {"llm.embeddings": 1, "llm.lm_head": 1, "llm.lora": 22, "projector": 11,
                                "text2vision": 4}
    assert report["unexplained"] == []
    assert report["safety"]["verdict"] == "safe"
    assert report["dtypes"] == {"BF16": 2, "F32": 37}
    sd = torch.load(FIXTURES / "omg_llava_tiny_finetune.pth", weights_only=True)
    assert [t["name"] for t in report["tensors"]] == list(sd)
    assert report["num_params"] == sum(t.numel() for t in sd.values())
    assert report["total_bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    for t in report["tensors"]:
        assert t["shape"] == list(sd[t["name"]].shape)


def test_unexplained_keys_listed_never_dropped(tmp_path):
    spec = gen.Spec.tiny()
    path = gen.write_checkpoint(gen.finetune_state_dict(spec, extra_keys=3), tmp_path / "x.pth", "zip")
    report = inspect_json(path)
    assert report["unexplained"] == gen.extra_key_names(3)
    assert report["groups"]["unexplained"] == 3
    assert report["architecture"]["stage"] == "finetune"
    result = runner.invoke(app, ["inspect", str(path)])
    assert "unexplained keys (3)" in result.stdout


@pytest.mark.parametrize("container", ["legacy", "module", "state_dict", "safetensors", "deepspeed"])
def test_family_through_containers(tmp_path, container):
    sd = torch.load(FIXTURES / "omg_llava_tiny_pretrain.pth", weights_only=True)
    suffix = ".safetensors" if container == "safetensors" else ".pth"
    path = gen.write_checkpoint(sd, tmp_path / f"p{suffix}", container)
    arch = inspect_json(path)["architecture"]
    assert (arch["family"], arch["stage"]) == ("omg-llava", "pretrain")


def test_base_folder_is_internlm2():
    report = inspect_json(FIXTURES / "internlm2-chat-tiny")
    arch = report["architecture"]
    assert arch["family"] == "internlm2"
    llm = arch["llm"]
    assert (llm["vocab_size"], llm["num_layers"], llm["num_key_value_heads"]) == (SPEC["vocab_size"], 2, 2)
    assert report["unexplained"] == []
    assert report["safety"]["verdict"] == "not-a-pickle"


def test_alpha_override_is_reported():
    lora = inspect_json(FIXTURES / "omg_llava_tiny_finetune.pth", "--alpha", "16")["architecture"]["lora"]
    assert lora["alpha"] == 16 and lora["scale"] == 2.0 and lora["alpha_source"] == "user (--alpha)"


def test_filter_lists_matching_tensors_only():
    report = inspect_json(FIXTURES / "omg_llava_tiny_finetune.pth", "--filter", "*.lora_B.*")
    assert len(report["tensors"]) == 11
    assert all(".lora_B." in t["name"] for t in report["tensors"])
    assert report["num_tensors"] == 39


def test_stats_and_update_strength():
    path = FIXTURES / "omg_llava_tiny_finetune.pth"
    report = inspect_json(path, "--stats")
    sd = torch.load(path, weights_only=True)
    for name, s in report["stats"].items():
        t = sd[name].double()
        assert s["min"] == pytest.approx(t.min().item())
        assert s["max"] == pytest.approx(t.max().item())
        assert s["mean"] == pytest.approx(t.mean().item(), abs=1e-9)
        assert s["std"] == pytest.approx(t.std(unbiased=False).item(), rel=1e-6)
        assert s["zeros"] == int((t == 0).sum()) and s["nan"] == 0 and s["inf"] == 0
    rows = report["update_strength"]
    assert len(rows) == 11
    scale = 256 / 8
    for row in rows:
        prefix = "llm.base_model.model."
        stem = prefix + row["weight"].removesuffix(".weight")
        a, b = sd[stem + ".lora_A.default.weight"], sd[stem + ".lora_B.default.weight"]
        dense = torch.linalg.matrix_norm(scale * (b.double() @ a.double())).item()
        assert row["delta_fro"] == pytest.approx(dense, rel=1e-9)
    human = runner.invoke(app, ["inspect", str(path), "--stats"])
    assert human.exit_code == 0 and "LoRA update strength" in human.stdout


def test_stats_counts_nan_inf_zero(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"x": torch.tensor([0.0, float("nan"), float("inf"), 2.0, 0.0])}, path)
    s = inspect_json(path, "--stats")["stats"]["x"]
    assert (s["nan"], s["inf"], s["zeros"], s["min"], s["max"]) == (1, 1, 2, 0.0, 2.0)


def test_manifest_written_with_hash(tmp_path):
    import hashlib

    path = FIXTURES / "omg_llava_tiny_pretrain.pth"
    out = tmp_path / "m.json"
    inspect_json(path, "--manifest", out, "--hash")
    manifest = json.loads(out.read_text())
    assert manifest["format_version"] == 1
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    sd = torch.load(path, weights_only=True)
    assert [(t["name"], t["shape"]) for t in manifest["tensors"]] == [(k, list(v.shape)) for k, v in sd.items()]


def test_human_output_mentions_the_essentials():
    result = runner.invoke(app, ["inspect", str(FIXTURES / "omg_llava_tiny_finetune.pth")])
    assert result.exit_code == 0
    out = result.stdout
    for needle in ("torch-zip", "omg-llava", "finetune", "llm.lora", "projector", "safe", "alpha"):
        assert needle in out, needle


def test_help_and_version():
    result = runner.invoke(app, ["inspect", "--help"])
    assert result.exit_code == 0 and "--json" in result.stdout and "--stats" in result.stdout
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("omgtool ")
