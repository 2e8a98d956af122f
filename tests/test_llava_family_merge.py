"""merge-lora for the second family: a LLaVA-1.5 LoRA run into a Vicuna-like Llama base (with
non_lora_trainables applied), and a generic PEFT adapter (ColLlavaI) into its base.

Oracles, independent of omgtool:
* PEFT: `PeftModel.from_pretrained(base, run).merge_and_unload()` on transformers' own
  LlamaForCausalLM / the seed's ColLlavaI built from transformers modules;
* LLaVA's `load_pretrained_model` for the LoRA case, restated: LlavaLlamaForCausalLM is the
  Llama model plus `model.mm_projector`; `non_lora_trainables` keys lose `base_model.`, then
  `model.` when they start with `model.model.`; `load_state_dict(strict=False)` before the
  LoRA is loaded and merged.
"""

from __future__ import annotations

import filecmp
import json
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
RUN = L15 / "llava-v1.5-tiny-lora"
VICUNA = L15 / "vicuna-tiny"
GEN_LORA = PA / "colllavai-tiny-lora"
GEN_BASE = PA / "colllavai-tiny-base"
runner = CliRunner()


def merge(tmp_path: Path, ckpt: Path, base: Path, *args: str, name: str = "merged", code: int = 0):
    out = tmp_path / name
    result = runner.invoke(app, ["merge-lora", str(ckpt), "--base", str(base), "--out", str(out), *args])
    assert result.exit_code == code, result.output
    return out, result


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {k: ckpt.read(k).clone() for k in ckpt.tensors}


# --- oracles ---------------------------------------------------------------------------------

def llava_loader_rule(non_lora: dict) -> dict:
    """LLaVA load_pretrained_model: strip `base_model.`, then `model.` if keys start `model.model.`."""
    non_lora = {(k[11:] if k.startswith("base_model.") else k): v for k, v in non_lora.items()}
    if any(k.startswith("model.model.") for k in non_lora):
        non_lora = {(k[6:] if k.startswith("model.") else k): v for k, v in non_lora.items()}
    return non_lora


def llava_oracle(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    spec = fx.LLAVA15
    model = LlamaForCausalLM.from_pretrained(VICUNA, dtype=dtype)
    model.model.mm_projector = torch.nn.Sequential(
        torch.nn.Linear(spec.mm_hidden_size, spec.hidden_size), torch.nn.GELU(),
        torch.nn.Linear(spec.hidden_size, spec.hidden_size)).to(dtype)
    non_lora = llava_loader_rule(torch.load(RUN / "non_lora_trainables.bin", weights_only=True))
    result = model.load_state_dict(non_lora, strict=False)
    assert not result.unexpected_keys
    merged = PeftModel.from_pretrained(model, RUN).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def colllavai_oracle(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    from tests.test_llava_family import colllavai

    merged = PeftModel.from_pretrained(colllavai(dtype), GEN_LORA).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the last place of `a`'s dtype at b's magnitude."""
    eps = torch.finfo(a.dtype).eps
    scale = torch.maximum(b.float().abs(), torch.tensor(torch.finfo(a.dtype).tiny))
    return (a.float() - b.float()).abs() / (scale * eps)


# --- LLaVA-1.5 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llava_merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llava")
    out, result = merge(tmp, RUN, VICUNA)
    return out, read_folder(out), result


def test_llava_merge_matches_peft_and_llava_loader(llava_merged):
    """fp32 oracle rounded once to the base dtype = omgtool's single rounding."""
    out, got, _ = llava_merged
    want = llava_oracle(torch.float32)
    assert set(got) == set(want)  # the LlavaLlamaForCausalLM state dict, projector included
    lora_targets = {f"{m}.weight" for m, _, _ in fx._llava_lora_modules(fx.LLAVA15)}
    base = read_folder(VICUNA)
    for name, t in got.items():
        w = want[name]
        if name.startswith("model.mm_projector."):
            assert t.dtype == torch.bfloat16  # the trained tensor keeps its dtype
            assert torch.equal(t.float(), w), name
            continue
        assert t.dtype == base[name].dtype == torch.float16
        if name in lora_targets:
            assert not torch.equal(t, base[name]), name  # the LoRA changed it
            # fp32 sums in a different order may flip one rounding: at most 1 ulp, rarely
            d = ulps(t, w.to(t.dtype))
            assert float(d.max()) <= 1.0, name
            assert float((t != w.to(t.dtype)).float().mean()) < 0.01, name
        else:
            assert torch.equal(t, base[name]), name  # copied bit-exactly


def test_llava_merge_close_to_peft_in_half_precision(llava_merged):
    """PEFT of LLaVA's time kept the adapter in the model's dtype (fp16 here: autocast off), so its
    merge rounds the delta to fp16, then the sum. omgtool (one rounding from float32) stays within
    that double rounding: |omg - peft| <= eps_fp16 * (|W| + |delta W|) elementwise. With today's
    default (adapter upcast to float32) PEFT's CPU merge equals omgtool's bit for bit."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _, got, _ = llava_merged
    base, exact = read_folder(VICUNA), llava_oracle(torch.float32)
    model = LlamaForCausalLM.from_pretrained(VICUNA, dtype=torch.float16)
    old = PeftModel.from_pretrained(model, RUN, autocast_adapter_dtype=False).merge_and_unload().state_dict()
    eps, tiny = torch.finfo(torch.float16).eps, torch.finfo(torch.float16).tiny
    for name, w in base.items():
        bound = eps * (w.float().abs() + (exact[name] - w.float()).abs()) + tiny
        assert bool(((got[name].float() - old[name].float()).abs() <= bound).all()), name
    model = LlamaForCausalLM.from_pretrained(VICUNA, dtype=torch.float16)
    new = PeftModel.from_pretrained(model, RUN).merge_and_unload().state_dict()
    for name in base:
        assert torch.equal(got[name], new[name]), name


def test_llava_merge_folder_is_complete(llava_merged):
    out, _, _ = llava_merged
    cfg = json.loads((out / "config.json").read_text())
    run_cfg = json.loads((RUN / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["architectures"] == ["LlavaLlamaForCausalLM"]
    for key in ("mm_projector_type", "mm_hidden_size", "mm_vision_tower", "hidden_size", "vocab_size"):
        assert cfg[key] == run_cfg[key], key
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert filecmp.cmp(out / name, VICUNA / name, shallow=False), name
    assert not list(out.glob("extras*")) and not list(out.glob("projector*"))
    record = json.loads((out / "omgtool-merge.json").read_text())
    assert record["family"] == "llava-1.5" and record["stage"] == "finetune"
    assert record["alpha"] == fx.LLAVA15.lora_alpha
    assert "adapter_config.json" in record["alpha_source"]
    report = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert (report["architecture"]["family"], report["architecture"]["stage"]) == ("llava-1.5", "model")
    assert report["unexplained"] == []


def test_llava_merged_llm_runs_in_transformers(llava_merged):
    """The merged folder's LLM loads in transformers and computes the same logits as PEFT's merge."""
    from transformers import LlamaForCausalLM

    out, got, _ = llava_merged
    ids = torch.tensor([[1, 17, 42, 99, 5, 250]])
    model = LlamaForCausalLM.from_pretrained(VICUNA, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in got.items() if not k.startswith("model.mm_projector.")})
    oracle = llava_oracle(torch.float32)
    ref = LlamaForCausalLM.from_pretrained(VICUNA, dtype=torch.float32)
    ref.load_state_dict({k: v for k, v in oracle.items() if not k.startswith("model.mm_projector.")})
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=2e-2, rtol=0)
    base = LlamaForCausalLM.from_pretrained(VICUNA, dtype=torch.float32)
    with torch.no_grad():
        c = base(ids).logits
    assert (a - c).abs().max() > 10 * (a - b).abs().max()  # the LoRA is visible, the error is not


def test_diff_base_against_llava_merge(llava_merged):
    out, _, _ = llava_merged
    result = runner.invoke(app, ["diff", str(VICUNA), str(out), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    changed = {row["a"] for row in report["value_changed"]}
    assert changed == {f"{m}.weight" for m, _, _ in fx._llava_lora_modules(fx.LLAVA15)}
    assert {row["name"] for row in report["only_in_b"]} == {n for n, _, _ in fx.projector_layout(fx.LLAVA15)}
    assert report["only_in_a"] == []


def test_llava_merge_into_wrong_base_is_refused(tmp_path):
    out, result = merge(tmp_path, RUN, GEN_BASE, code=2)
    assert not out.exists()
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


# --- generic PEFT adapter -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def generic_merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generic")
    out, result = merge(tmp, GEN_LORA, GEN_BASE)
    return out, read_folder(out), result


def test_generic_merge_matches_peft(generic_merged):
    out, got, _ = generic_merged
    want = colllavai_oracle(torch.float32)
    assert set(got) == set(want)
    base = read_folder(GEN_BASE)
    adapter = open_checkpoint(GEN_LORA)
    targets = {f"{m}.weight" for m, _, _ in fx._adapter_lora_modules(fx.ADAPTER)}
    saved = {f"{m}.{p}" for m in fx.ADAPTER.modules_to_save for p in ("weight", "bias")}
    for name, t in got.items():
        assert t.dtype == base[name].dtype == torch.bfloat16, name
        w = want[name].to(t.dtype)
        if name in saved:
            assert torch.equal(t, adapter.read("base_model.model." + name)), name  # modules_to_save copy
            assert torch.equal(t, w), name
        elif name in targets:
            assert not torch.equal(t, base[name]), name
            assert float(ulps(t, w).max()) <= 1.0, name
        else:
            assert torch.equal(t, base[name]), name


def test_generic_merge_close_to_peft_in_bf16(generic_merged):
    """PEFT on the bf16 model (fp32 adapter, as saved): within bf16 rounding of |W| + |delta W|."""
    _, got, _ = generic_merged
    base, exact, want = read_folder(GEN_BASE), colllavai_oracle(torch.float32), colllavai_oracle(torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    for name, w in base.items():
        bound = eps * (w.float().abs() + (exact[name] - w.float()).abs()) + torch.finfo(torch.bfloat16).tiny
        assert bool(((got[name].float() - want[name].float()).abs() <= bound).all()), name


def test_generic_merge_folder(generic_merged):
    out, _, _ = generic_merged
    assert json.loads((out / "config.json").read_text()) == json.loads((GEN_BASE / "config.json").read_text())
    record = json.loads((out / "omgtool-merge.json").read_text())
    assert record["family"] == "peft-adapter"
    assert record["lora"]["num_pairs"] == len(fx._adapter_lora_modules(fx.ADAPTER))
    report = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert report["architecture"]["family"] == "llava-interleave" and report["unexplained"] == []


def test_generic_merge_rslora_scale_follows_peft(tmp_path):
    from peft import PeftModel

    from tests.test_llava_family import colllavai

    run = tmp_path / "rs"
    shutil.copytree(GEN_LORA, run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    out, _ = merge(tmp_path, run, GEN_BASE)
    got = read_folder(out)
    want = PeftModel.from_pretrained(colllavai(torch.float32), run).merge_and_unload().state_dict()
    name = "custom_text_proj.weight"
    assert float(ulps(got[name], want[name].to(torch.bfloat16)).max()) <= 1.0


def test_generic_merge_refuses_dora(tmp_path):
    run = tmp_path / "dora"
    shutil.copytree(GEN_LORA, run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    out, result = merge(tmp_path, run, GEN_BASE, code=2)
    assert "DoRA" in result.stderr and not out.exists()


def test_llava_run_with_unfrozen_vision_tower(tmp_path):
    """non_lora_trainables holding the CLIP tower (unfreeze_mm_vision_tower): every tensor lands
    at the name LLaVA's loader rule gives it, values unchanged."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=28, patch_size=14)).state_dict()
    non_lora = torch.load(run / "non_lora_trainables.bin", weights_only=True)
    non_lora.update({f"base_model.model.model.vision_tower.vision_tower.vision_model.{k}": v.to(torch.bfloat16)
                     for k, v in clip.items()})
    torch.save(non_lora, run / "non_lora_trainables.bin")
    out, _ = merge(tmp_path, run, VICUNA)
    got = read_folder(out)
    for name, t in llava_loader_rule(non_lora).items():
        assert torch.equal(got[name], t), name
    assert len(got) == len(read_folder(VICUNA)) + len(non_lora)


def test_unexplained_lora_factors_are_refused(tmp_path):
    """A LoRA on a module no mapping names would be dropped from the merge: refused instead."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "stray"
    shutil.copytree(GEN_LORA, run)
    sd = load_file(str(run / "adapter_model.safetensors"))
    sd["base_model.model.score_head.lora_A.weight"] = torch.zeros(4, 128)
    sd["base_model.model.score_head.lora_B.weight"] = torch.zeros(8, 4)
    save_file(sd, str(run / "adapter_model.safetensors"))
    out, result = merge(tmp_path, run, GEN_BASE, code=2)
    assert "score_head.lora_A.weight" in result.stderr and "no mapping" in result.stderr
    assert not out.exists()
    # lora_bias=True adds lora_B.bias, which no mapping names: refused, not silently dropped
    sd = load_file(str(GEN_LORA / "adapter_model.safetensors"))
    sd["base_model.model.custom_text_proj.lora_B.bias"] = torch.zeros(fx.ADAPTER.embedding_dim)
    save_file(sd, str(run / "adapter_model.safetensors"))
    out, result = merge(tmp_path, run, GEN_BASE, name="bias", code=2)
    assert "custom_text_proj.lora_B.bias" in result.stderr and not out.exists()


def test_llava_stage1_projector_onto_base(tmp_path):
    """LLaVA's `model_base` + mm_projector.bin path: the base unchanged plus the projector."""
    pre = L15 / "llava-v1.5-tiny-pretrain"
    out, _ = merge(tmp_path, pre, VICUNA)
    got, base = read_folder(out), read_folder(VICUNA)
    projector = torch.load(pre / "mm_projector.bin", weights_only=True)
    assert set(got) == set(base) | set(projector)
    for name, t in base.items():
        assert torch.equal(got[name], t), name
    for name, t in projector.items():
        assert torch.equal(got[name], t), name
    assert json.loads((out / "config.json").read_text()) == json.loads((pre / "config.json").read_text())


def test_generic_merge_alpha_pattern_follows_peft(tmp_path):
    from peft import PeftModel

    from tests.test_llava_family import colllavai

    run = tmp_path / "ap"
    shutil.copytree(GEN_LORA, run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"custom_text_proj": 4, "linear_1": 64}
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    out, _ = merge(tmp_path, run, GEN_BASE)
    got = read_folder(out)
    want = PeftModel.from_pretrained(colllavai(torch.float32), run).merge_and_unload().state_dict()
    for name in ("custom_text_proj.weight", "multi_modal_projector.linear_1.weight",
                 "multi_modal_projector.linear_2.weight", "language_model.model.layers.1.self_attn.q_proj.weight"):
        assert float(ulps(got[name], want[name].to(torch.bfloat16)).max()) <= 1.0, name
    default = read_folder(merge(tmp_path, GEN_LORA, GEN_BASE, name="default")[0])
    assert not torch.equal(got["custom_text_proj.weight"], default["custom_text_proj.weight"])


def test_llava_base_found_from_adapter_config(tmp_path):
    """No --base: adapter_config.json names lmsys/vicuna-7b-v1.5; a folder of that name beside the run is used."""
    shutil.copytree(RUN, tmp_path / "llava-v1.5-tiny-lora")
    shutil.copytree(VICUNA, tmp_path / "vicuna-7b-v1.5")
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge-lora", str(tmp_path / "llava-v1.5-tiny-lora"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "omgtool-merge.json").read_text())
    assert Path(record["base"]["path"]).name == "vicuna-7b-v1.5"
    assert record["base"]["requested"] == "lmsys/vicuna-7b-v1.5"
