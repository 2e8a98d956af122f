"""A family added as data only: mappings/family_qwen2.toml (+ the existing arch_qwen2.toml),
the fixture generator fixtures/qwen2.py and this test. inspect, diff and merge-lora work on
it with no code change; the merge is checked against PEFT's own merge_and_unload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures import qwen2 as Q
from tests.cli_helpers import ok, one_line_error, run
from tests.paths import TINY

ROOT = TINY / "qwen2"
BASE = ROOT / "qwen2-tiny"
STATE = ROOT / "qwen2-tiny-lora-state.pt"
SPEC = json.loads((ROOT / "spec.json").read_text())


def test_committed_fixture_is_what_the_generator_writes(tmp_path):
    assert Q.build(tmp_path) == SPEC
    for name, want in load_file(str(BASE / "model.safetensors")).items():
        assert torch.equal(want, Q.base_state_dict()[name]), name
    state = torch.load(STATE, weights_only=True)
    fresh = Q.lora_state_dict()
    assert list(state) == list(fresh) and all(torch.equal(state[k], fresh[k]) for k in state)


@pytest.mark.parametrize("name", list(SPEC["fixtures"]))
def test_inspect_names_family_stage_and_dims(name):
    want = SPEC["fixtures"][name]
    report = json.loads(ok("inspect", ROOT / name, "--json").stdout)
    arch = report["architecture"]
    assert (arch["family"], arch["stage"]) == (want["family"], want["stage"])
    assert report["unexplained"] == [] and report["notes"] == []
    s = SPEC["spec"]
    llm = arch["llm"]
    assert (llm["num_layers"], llm["hidden_size"], llm["vocab_size"], llm["num_key_value_heads"]) == \
        (s["num_layers"], s["hidden_size"], s["vocab_size"], s["num_key_value_heads"])
    assert len(report["tensors"]) == want["num_tensors"]
    if want["stage"] == "finetune":
        assert arch["lora"]["num_pairs"] == want["lora_pairs"] and arch["lora"]["rank"] == s["lora_rank"]
        assert arch["lora"]["alpha"] is None and "pass --alpha" in arch["lora"]["alpha_source"]


def test_diff_pairs_the_frozen_base_through_the_peft_wrapper():
    result = run("diff", BASE, STATE, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["summary"]["identical"] == SPEC["fixtures"]["qwen2-tiny"]["num_tensors"]
    only_b = report["only_in_b"]
    assert len(only_b) == 2 * SPEC["fixtures"]["qwen2-tiny-lora-state.pt"]["lora_pairs"]
    assert all(".lora_" in t["name"] and t["group"] == "llm.lora" for t in only_b)
    assert report["summary"]["renamed"] == report["summary"]["identical"]  # base_layer names, same bytes


def _peft_merged(alpha: float) -> dict[str, torch.Tensor]:
    """The independent oracle: transformers' Qwen2 + PEFT's LoRA layers, merge_and_unload, fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)
    targets = sorted({m.rsplit(".", 1)[-1] for m in Q.TARGETS})
    peft_model = get_peft_model(model, LoraConfig(r=SPEC["spec"]["lora_rank"], lora_alpha=alpha,
                                                  target_modules=targets, lora_dropout=0.0))
    state = {k: v.float() for k, v in torch.load(STATE, weights_only=True).items()}
    missing, unexpected = peft_model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}


def test_merge_lora_matches_peft_merge_and_unload(tmp_path):
    one_line_error(run("merge-lora", STATE, "--base", BASE, "--out", tmp_path / "x"), 2, "pass --alpha")
    alpha = SPEC["spec"]["lora_alpha"]
    report = json.loads(ok("merge-lora", STATE, "--base", BASE, "--alpha", alpha, "--out", tmp_path / "m",
                           "--json").stdout)
    assert report["family"] == "qwen2" and report["lora"]["scale"] == alpha / SPEC["spec"]["lora_rank"]
    assert report["lora"]["num_pairs"] == SPEC["fixtures"]["qwen2-tiny-lora-state.pt"]["lora_pairs"]
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = _peft_merged(alpha)
    base = load_file(str(BASE / "model.safetensors"))
    assert set(merged) == set(base)
    for name, t in merged.items():
        assert t.dtype == base[name].dtype
        # rounded once from fp32 to bf16: within one bf16 step of PEFT's fp32 merge
        torch.testing.assert_close(t.float(), want[name], rtol=2 ** -7, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (want[q] - base[q].float()).abs().max() > 0.05  # the LoRA visibly changes it
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert type(out).__name__ == "Qwen2ForCausalLM"
