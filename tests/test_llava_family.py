"""Second family: LLaVA-1.5 (stage-1 mm_projector.bin, stage-2 LoRA run folder) and generic PEFT
adapters (the ColLlavaI model of shared/seeds/001).

Oracles: torch's own loader for the files, PEFT's own `save_pretrained` for the adapter file
layout, transformers' own modules for the base key layouts, PEFT's LoRA layers for the
scaling, and LLaVA's `load_pretrained_model` prefix rule (restated here) for
non_lora_trainables. The expected family/stage/dims come from fixtures/tiny/*/spec.json,
written by the generator, never from omgtool.
"""

from __future__ import annotations

import filecmp
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fixtures import llava as fx
from omgtool.cli import app
from omgtool.formats import open_checkpoint

TINY = Path(__file__).resolve().parent.parent / "fixtures" / "tiny"
L15 = TINY / "llava15"
PA = TINY / "peft_adapter"
L15_SPEC = json.loads((L15 / "spec.json").read_text())
PA_SPEC = json.loads((PA / "spec.json").read_text())
runner = CliRunner()

FIXTURES = [(L15 / name, exp) for name, exp in L15_SPEC["fixtures"].items()] + \
           [(PA / name, exp) for name, exp in PA_SPEC["fixtures"].items()]


def inspect_json(path, *args) -> dict:
    result = runner.invoke(app, ["inspect", str(path), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def torch_load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def safetensors_load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- fixtures ------------------------------------------------------------------------------

def test_fixtures_regenerate_byte_identical(tmp_path):
    fx.build_all(tmp_path)
    for sub in ("llava15", "peft_adapter"):
        committed = sorted(p.relative_to(TINY / sub) for p in (TINY / sub).rglob("*") if p.is_file())
        fresh = sorted(p.relative_to(tmp_path / sub) for p in (tmp_path / sub).rglob("*") if p.is_file())
        assert committed == fresh
        for rel in committed:
            assert filecmp.cmp(TINY / sub / rel, tmp_path / sub / rel, shallow=False), rel
    total = sum(p.stat().st_size for sub in ("llava15", "peft_adapter") for p in (TINY / sub).rglob("*")
                if p.is_file())
    assert total < 4 * 2**20


def _llama_from_fixture(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((L15 / "vicuna-tiny" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype",
                                                        "transformers_version")}
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)


def test_llama_base_has_transformers_layout():
    model = _llama_from_fixture()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ckpt = open_checkpoint(L15 / "vicuna-tiny")
    assert {k: t.shape for k, t in ckpt.tensors.items()} == expected
    assert {t.dtype for t in ckpt.tensors.values()} == {"F16"}


def _with_mm_projector(model, spec=fx.LLAVA15):
    """LlavaLlamaForCausalLM's parameter names: the mlp2x_gelu projector sits at model.mm_projector."""
    model.model.mm_projector = torch.nn.Sequential(torch.nn.Linear(spec.mm_hidden_size, spec.hidden_size),
                                                   torch.nn.GELU(),
                                                   torch.nn.Linear(spec.hidden_size, spec.hidden_size))
    return model


def test_llava_run_files_have_peft_and_llava_layout(tmp_path):
    """adapter_model.bin = what PEFT saves for this LoraConfig; non_lora_trainables.bin = the
    PEFT model's non-LoRA trainable parameter names (LLaVA's get_peft_state_non_lora_maybe_zero_3)."""
    from peft import LoraConfig, get_peft_model

    spec = fx.LLAVA15
    run = L15 / "llava-v1.5-tiny-lora"
    cfg = json.loads((run / "adapter_config.json").read_text())
    model = _with_mm_projector(_llama_from_fixture())
    stage1_names = {n for n, _ in model.named_parameters() if "mm_projector" in n}
    peft_model = get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                                  target_modules=cfg["target_modules"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    ours = torch_load(run / "adapter_model.bin")
    peft_saved = torch_load(tmp_path / "adapter_model.bin")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in peft_saved.items()}
    projector_params = {n for n, _ in peft_model.named_parameters() if "mm_projector" in n}
    assert set(torch_load(run / "non_lora_trainables.bin")) == projector_params
    stage1 = torch_load(L15 / "llava-v1.5-tiny-pretrain" / "mm_projector.bin")
    assert set(stage1) == stage1_names
    assert {v.dtype for v in stage1.values()} == {torch.bfloat16}
    # LoRA strength as the generator promises: ||scale B@A|| ~ 10% of ||W||
    base = open_checkpoint(L15 / "vicuna-tiny")
    w = base.read("model.layers.0.self_attn.q_proj.weight").float()
    a = ours["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float()
    b = ours["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].float()
    ratio = float((spec.lora_scale * b @ a).norm() / w.norm())
    assert 0.05 < ratio < 0.2


class ColLlavaI(torch.nn.Module):
    """The seed's ColLlavaI built from transformers' own modules (module names as in the seed)."""

    def __init__(self, cfg: dict):
        from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig, SiglipVisionModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        super().__init__()
        vc = SiglipVisionConfig(**{k: v for k, v in cfg["vision_config"].items() if k != "model_type"})
        tc = Qwen2Config(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"})
        self.vision_tower = torch.nn.Module()
        self.vision_tower.vision_model = SiglipVisionModel(vc)  # 4.x names: vision_tower.vision_model.*
        self.multi_modal_projector = LlavaMultiModalProjector(
            LlavaConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(),
                        projector_hidden_act=cfg["projector_hidden_act"]))
        self.language_model = __import__("transformers").Qwen2ForCausalLM(tc)
        self.custom_text_proj = torch.nn.Linear(tc.hidden_size, cfg["embedding_dim"])
        self.image_proj = torch.nn.Linear(tc.hidden_size, cfg["embedding_dim"])


def colllavai(dtype=torch.float32) -> ColLlavaI:
    cfg = json.loads((PA / "colllavai-tiny-base" / "config.json").read_text())
    model = ColLlavaI(cfg)
    model.load_state_dict(safetensors_load(PA / "colllavai-tiny-base" / "model.safetensors"), strict=True)
    return model.to(dtype)


def test_generic_adapter_has_peft_layout(tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = json.loads((PA / "colllavai-tiny-lora" / "adapter_config.json").read_text())
    model = colllavai()  # strict load: the base's names are the modules' names
    lora = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                      modules_to_save=cfg["modules_to_save"])
    get_peft_model(model, lora).save_pretrained(tmp_path)
    ours = safetensors_load(PA / "colllavai-tiny-lora" / "adapter_model.safetensors")
    peft_saved = safetensors_load(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in peft_saved.items()}


# --- reader --------------------------------------------------------------------------------

def test_run_folder_presents_adapter_and_non_lora_trainables():
    run = L15 / "llava-v1.5-tiny-lora"
    ckpt = open_checkpoint(run)
    adapter, extra = torch_load(run / "adapter_model.bin"), torch_load(run / "non_lora_trainables.bin")
    assert set(ckpt.tensors) == set(adapter) | set(extra)  # names kept as they are
    assert [p.name for p in ckpt.files] == ["adapter_model.bin", "non_lora_trainables.bin"]
    assert ckpt.metadata["adapter_config"]["r"] == fx.LLAVA15.lora_rank
    assert ckpt.metadata["config"]["mm_projector_type"] == "mlp2x_gelu"
    assert ckpt.safety.verdict == "safe"
    for name, t in [*adapter.items(), *extra.items()]:
        assert torch.equal(ckpt.read(name), t), name


def test_companion_clash_is_unreadable(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(L15 / "llava-v1.5-tiny-lora", run)
    adapter = torch_load(run / "adapter_model.bin")
    name = next(iter(adapter))
    torch.save({name: adapter[name]}, run / "non_lora_trainables.bin")
    result = runner.invoke(app, ["inspect", str(run)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "non_lora_trainables.bin holds tensors the adapter also holds" \
        in result.stderr


# --- inspect: family, stage, architecture --------------------------------------------------

@pytest.mark.parametrize("path,expected", FIXTURES, ids=[str(p.relative_to(TINY)) for p, _ in FIXTURES])
def test_inspect_names_family_and_stage(path, expected):
    report = inspect_json(path)
    arch = report["architecture"]
    assert (arch["family"], arch["stage"]) == (expected["family"], expected["stage"])
    assert report["num_tensors"] == expected["num_tensors"]
    assert report["unexplained"] == []
    if "llm" in expected:
        if expected["llm"] is None:
            assert arch["llm"] is None
        else:
            for key, value in expected["llm"].items():
                assert arch["llm"][key] == value, key
    if "projector" in expected:
        for key, value in expected["projector"].items():
            assert arch["projector"][key] == value, key
    lora = expected.get("lora")
    if lora is None:
        assert arch.get("lora") is None
    else:
        got = arch["lora"]
        assert (got["rank"], got["alpha"], got["scale"], got["num_pairs"]) == \
            (lora["rank"], lora["alpha"], lora["scale"], lora["num_pairs"])
        assert got["targets"] == lora["targets"]
        assert got["alpha_source"].startswith("checkpoint (adapter_config.json")
        if "modules_to_save" in lora:
            assert got["adapter_config"]["modules_to_save"] == lora["modules_to_save"]


def test_inspect_generic_adapter_components():
    arch = inspect_json(PA / "colllavai-tiny-lora")["architecture"]
    spec = fx.ADAPTER
    assert arch["lora"]["components"] == ["heads", "language_model", "projector"]
    assert arch["projector"]["widths"] == [spec.vision_hidden_size, spec.hidden_size, spec.hidden_size]
    assert arch["heads"]["embedding_dim"] == spec.embedding_dim
    assert arch["language_model"]["num_layers"] == spec.num_layers
    base = inspect_json(PA / "colllavai-tiny-base")["architecture"]
    assert base["llm"]["architecture"] == "qwen2"
    for key, value in (("num_layers", spec.num_layers), ("vocab_size", spec.vocab_size),
                       ("hidden_size", spec.hidden_size), ("num_attention_heads", spec.num_attention_heads),
                       ("num_key_value_heads", spec.num_key_value_heads), ("head_dim", spec.head_dim)):
        assert base["llm"][key] == value, key
    assert base["vision_tower"]["num_layers"] == spec.vision_layers
    assert base["vision_tower"]["vision_hidden_size"] == spec.vision_hidden_size


def test_inspect_groups_cover_keys_by_component():
    report = inspect_json(L15 / "llava-v1.5-tiny-lora")
    assert report["groups"] == {"llm.lora": 2 * L15_SPEC["fixtures"]["llava-v1.5-tiny-lora"]["lora"]["num_pairs"],
                                "projector": 4}


def test_full_llava_model_is_stage_model(tmp_path):
    """A complete LlavaLlamaForCausalLM state dict (base + projector, as LLaVA saves it)."""
    from safetensors.torch import save_file

    sd = dict(fx.llama_base_state_dict())
    sd.update(fx.mm_projector_state_dict())
    save_file(sd, str(tmp_path / "model.safetensors"))
    arch = inspect_json(tmp_path)["architecture"]
    assert (arch["family"], arch["stage"]) == ("llava-1.5", "model")
    assert arch["llm"]["num_layers"] == fx.LLAVA15.num_layers


def test_vision_towers_use_transformers_names(tmp_path):
    """Every key of transformers' CLIP / SigLIP vision models (4.x `vision_model.` names, as files
    on the hub have them) is explained, under LLaVA-1.5's and LLaVA-Interleave's prefixes."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                 image_size=28, patch_size=14)
    clip = CLIPVisionModel(CLIPVisionConfig(**small)).state_dict()
    sd = {f"model.vision_tower.vision_tower.vision_model.{k}": v.contiguous() for k, v in clip.items()}
    sd.update(fx.mm_projector_state_dict())
    save_file(sd, str(tmp_path / "clip.safetensors"))
    report = inspect_json(tmp_path / "clip.safetensors")
    assert report["unexplained"] == []
    assert report["architecture"]["family"] == "llava-1.5"
    tower = report["architecture"]["vision_tower"]
    assert (tower["num_layers"], tower["vision_hidden_size"], tower["vision_intermediate_size"]) == (3, 32, 48)

    siglip = SiglipVisionModel(SiglipVisionConfig(**small, vision_use_head=True)).state_dict()
    sd = {f"vision_tower.vision_model.{k}": v.contiguous() for k, v in siglip.items()}
    sd.update({k: v for k, v in fx.colllavai_base_state_dict().items() if k.startswith("multi_modal_projector.")})
    save_file(sd, str(tmp_path / "siglip.safetensors"))
    report = inspect_json(tmp_path / "siglip.safetensors")
    assert report["unexplained"] == []
    assert report["architecture"]["family"] == "llava-interleave"
    assert report["architecture"]["vision_tower"]["num_layers"] == 3


def test_generic_family_needs_adapter_config(tmp_path):
    """A bare adapter file (no adapter_config.json) is not claimed by the generic family; a LLaVA
    run without non_lora_trainables.bin is a generic adapter; LLaVA-1.5 without a config says
    where alpha would come from."""
    shutil.copy(PA / "colllavai-tiny-lora" / "adapter_model.safetensors", tmp_path / "bare.safetensors")
    assert inspect_json(tmp_path / "bare.safetensors")["architecture"]["family"] != "peft-adapter"

    run = tmp_path / "run"
    shutil.copytree(L15 / "llava-v1.5-tiny-lora", run)
    (run / "non_lora_trainables.bin").unlink()
    arch = inspect_json(run)["architecture"]
    assert (arch["family"], arch["stage"]) == ("peft-adapter", "adapter")
    assert arch["llm"]["num_layers"] == fx.LLAVA15.num_layers

    sd = {**torch_load(L15 / "llava-v1.5-tiny-lora" / "adapter_model.bin"),
          **torch_load(L15 / "llava-v1.5-tiny-lora" / "non_lora_trainables.bin")}
    torch.save(sd, tmp_path / "merged_state.bin")
    arch = inspect_json(tmp_path / "merged_state.bin")["architecture"]
    assert (arch["family"], arch["stage"]) == ("llava-1.5", "finetune")
    assert arch["lora"]["alpha"] is None and "no adapter_config.json" in arch["lora"]["alpha_source"]
    arch = inspect_json(tmp_path / "merged_state.bin", "--alpha", "8")["architecture"]
    assert arch["lora"]["scale"] == 8 / fx.LLAVA15.lora_rank


def test_rslora_scaling_matches_peft(tmp_path):
    """use_rslora: scale = alpha / sqrt(r), read back from PEFT's own LoRA layer."""
    from peft import PeftModel

    run = tmp_path / "rs"
    shutil.copytree(PA / "colllavai-tiny-lora", run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    peft_model = PeftModel.from_pretrained(colllavai(), run)
    peft_scale = peft_model.base_model.model.custom_text_proj.scaling["default"]
    lora = inspect_json(run)["architecture"]["lora"]
    assert lora["scale"] == pytest.approx(peft_scale)
    assert lora["scale"] == pytest.approx(cfg["lora_alpha"] / math.sqrt(cfg["r"]))


def test_adapter_config_notes(tmp_path):
    run = tmp_path / "odd"
    shutil.copytree(PA / "colllavai-tiny-lora", run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg.update(r=16, alpha_pattern={"custom_text_proj": 4}, use_dora=True)
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    notes = " | ".join(inspect_json(run)["notes"])
    assert "r=16 but the LoRA factors have rank 4" in notes
    assert "alpha_pattern" in notes and "use_dora" in notes


def test_human_output_names_family(tmp_path):
    result = runner.invoke(app, ["inspect", str(L15 / "llava-v1.5-tiny-lora")])
    assert result.exit_code == 0
    assert "family llava-1.5 · stage finetune" in result.stdout


# --- diff ----------------------------------------------------------------------------------

def test_diff_stage1_projector_against_lora_run():
    """Projector keys pair through the PEFT prefix (`model.mm_projector.0.weight` =
    `base_model.model.model.mm_projector.0.weight`), value deltas equal torch's."""
    a = L15 / "llava-v1.5-tiny-pretrain" / "mm_projector.bin"
    b = L15 / "llava-v1.5-tiny-lora"
    result = runner.invoke(app, ["diff", str(a), str(b), "--json"])
    assert result.exit_code == 1, result.output  # differences found
    report = json.loads(result.stdout)
    assert (report["a"]["stage"], report["b"]["stage"]) == ("pretrain", "finetune")
    stage1, stage2 = torch_load(a), torch_load(b / "non_lora_trainables.bin")
    changed = {row["a"]: row for row in report["value_changed"]}
    assert set(changed) == set(stage1)
    for name, row in changed.items():
        ta, tb = stage1[name].double(), stage2["base_model.model." + name].double()
        assert row["b"] == "base_model.model." + name
        assert row["rel_l2"] == pytest.approx(float((ta - tb).norm() / ta.norm()), rel=1e-6)
        assert row["max_abs"] == pytest.approx(float((ta - tb).abs().max()), rel=1e-6)
    adapter = torch_load(b / "adapter_model.bin")
    assert {row["name"] for row in report["only_in_b"]} == set(adapter)
    assert report["only_in_a"] == []


def test_diff_fixture_against_itself_is_clean():
    for path in (L15 / "llava-v1.5-tiny-lora", PA / "colllavai-tiny-lora"):
        result = runner.invoke(app, ["diff", str(path), str(path)])
        assert result.exit_code == 0, result.output


# --- export --to safetensors (the families table says it works for these families) ----------

@pytest.mark.parametrize("src", [L15 / "llava-v1.5-tiny-lora", L15 / "llava-v1.5-tiny-pretrain" / "mm_projector.bin"])
def test_export_safetensors_carries_every_tensor(tmp_path, src):
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["export", str(src), "--to", "safetensors", "--out", str(out)])
    assert result.exit_code == 0, result.output
    files = [src] if src.is_file() else [src / "adapter_model.bin", src / "non_lora_trainables.bin"]
    expected = {k: v for f in files for k, v in torch_load(f).items()}
    got = safetensors_load(out)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
