"""`omgtool export`: Llama layout, PEFT adapter, safetensors.

Oracles are independent of omgtool: tests/reference_internlm2.py (a plain-torch InternLM2
forward, with unmerged LoRA paths), transformers' own LlamaForCausalLM, PEFT's own
PeftModel / get_peft_model_state_dict, SentencePiece's own encoder, torch.load.
The merged model the adapter is judged against is built here in plain torch.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (its logger binds to the real stderr before CliRunner swaps it)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.ckpt_builders import data_pkl, tensor_entry, write_torch_zip
from tests.reference_internlm2 import internlm2_forward
from tests.cli_helpers import (folder_weights as _folder_weights,
                                ok as _ok, one_line_error as _one_line_error, run as _run)

from tests.paths import BASE, FINETUNE, PRETRAIN, SPEC
P = "llm.base_model.model."
SCALE = SPEC["lora_alpha"] / SPEC["lora_rank"]  # 32 on the tiny files (mapping default alpha 256)
NEW_TOKENS = {"[SEG]": 320, "<p>": 321, "</p>": 322, "<region>": 323, "<mark>": 324}

def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))


def _load_llama(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                       output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


def _finetune_lora(sd) -> dict[str, tuple]:
    """{InternLM2 weight name: (A, B, scale)} from the finetune state dict."""
    out = {}
    for k in sd:
        if k.endswith(".lora_A.default.weight"):
            name = k[len(P):].replace(".lora_A.default.weight", ".weight")
            out[name] = (sd[k], sd[k.replace("lora_A", "lora_B")], SCALE)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The shared exports: base -> llama, a plain-torch merged model -> llama, finetune -> peft."""
    tmp = tmp_path_factory.mktemp("export")
    base_cfg = json.loads((BASE / "config.json").read_text())
    base_w = _folder_weights(BASE)
    sd = torch.load(FINETUNE, weights_only=True)
    lora = _finetune_lora(sd)

    # The merged model, in plain torch and float32: W + scale * B @ A; the checkpoint's trained
    # embeddings and output (with the output's LoRA) replace the base's.
    merged = {k: v.float() for k, v in base_w.items()}
    merged["model.tok_embeddings.weight"] = sd[P + "model.tok_embeddings.weight"].float()
    merged["output.weight"] = sd[P + "output.base_layer.weight"].float()
    for name, (a, b, s) in lora.items():
        merged[name] = merged[name] + s * (b.double() @ a.double()).float()
    mdir = tmp / "merged-internlm2"
    mdir.mkdir()
    names = list(merged)
    save_file({k: merged[k].contiguous() for k in names[:9]}, str(mdir / "model-00001-of-00002.safetensors"),
              metadata={"format": "pt"})
    save_file({k: merged[k].contiguous() for k in names[9:]}, str(mdir / "model-00002-of-00002.safetensors"),
              metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= 9)}-of-00002.safetensors"
                                            for i, k in enumerate(names)}}
    (mdir / "model.safetensors.index.json").write_text(json.dumps(index))
    (mdir / "config.json").write_text(json.dumps({**base_cfg, "vocab_size": 324, "torch_dtype": "float32"}))
    for f in ("tokenizer.model", "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(BASE / f, mdir / f)
    tok_cfg = json.loads((BASE / "tokenizer_config.json").read_text())
    for content, i in NEW_TOKENS.items():
        tok_cfg["added_tokens_decoder"][str(i)] = {"content": content, "lstrip": False, "normalized": False,
                                                   "rstrip": False, "single_word": False, "special": True}
    (mdir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    save_file({k: v.contiguous() for k, v in sd.items()
               if k.startswith("projector")}, str(mdir / "projector.safetensors"))
    save_file({"mask_decoder.layers.0.weight": torch.randn(16, 16)}, str(mdir / "extras.safetensors"))
    (mdir / "omgtool-merge.json").write_text(json.dumps({"note": "provenance"}))
    (mdir / "modeling_internlm2.py").write_text("raise SystemExit('remote code must not be carried')\n")

    _ok("export", BASE, "--to", "llama", "--out", tmp / "base-llama")
    _ok("export", mdir, "--to", "llama", "--out", tmp / "merged-llama", "--max-shard-size", "2MB")
    _ok("export", FINETUNE, "--to", "peft", "--base-llama", tmp / "base-llama", "--out", tmp / "adapter32",
        "--dtype", "fp32")
    _ok("export", FINETUNE, "--to", "peft", "--base-llama", tmp / "base-llama", "--out", tmp / "adapter")
    return {"tmp": tmp, "base_cfg": base_cfg, "base_w": base_w, "sd": sd, "lora": lora, "merged": merged,
            "merged_dir": mdir}


# --- --to llama ----------------------------------------------------------------------------

def test_llama_export_loads_without_remote_code_and_matches_reference(work):
    out = work["tmp"] / "base-llama"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert "auto_map" not in cfg and cfg["tie_word_embeddings"] is False
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (320, 512, 384, 2, 4, 2, 128)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["max_position_embeddings"] == 32768
    assert cfg["dtype"] == "bfloat16"
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    assert rope["rope_type"] == "dynamic" and rope["factor"] == 2.0
    assert float(rope.get("rope_theta", cfg.get("rope_theta"))) == 1e6
    # dtype kept: the base is bf16, so is every exported tensor
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.metadata()["format"] == "pt"
    assert not list(out.glob("*.py"))

    model = _load_llama(out)
    ids = _ids(320)
    with torch.no_grad():
        got = model(ids).logits
    want = internlm2_forward(work["base_w"], work["base_cfg"], ids)
    assert want.std() > 0.5
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_wrong_qkv_split_fails_the_logits_check(work, tmp_path, monkeypatch):
    """Contiguous q/k/v rows (the classic mistake) load fine but give wrong logits."""
    from omgtool.ops import export
    from omgtool.kernels import transforms

    def contiguous(t, *, num_heads, num_kv_heads, head_dim, **_):
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        return [t[:q], t[q:q + kv], t[q + kv:]]

    monkeypatch.setitem(transforms.TRANSFORMS, "split_grouped_qkv", contiguous)
    export.export_llama(BASE, tmp_path / "wrong", check_tokenizer=False)
    model = _load_llama(tmp_path / "wrong")
    ids = _ids(320)
    with torch.no_grad():
        got = model(ids).logits
    want = internlm2_forward(work["base_w"], work["base_cfg"], ids)
    assert not torch.allclose(got, want, atol=2e-4, rtol=1e-4)
    assert (got - want).abs().max() > 0.1


def test_merged_llama_export_sharded_carries_files_and_tokens(work):
    out = work["tmp"] / "merged-llama"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    # carried unchanged, outside the index; remote code dropped
    src = work["merged_dir"]
    for name in ("projector.safetensors", "extras.safetensors", "omgtool-merge.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert set(index["weight_map"]) == {k for s in shards for k in load_file(str(out / s))}
    assert not any(k.startswith("projector") for k in index["weight_map"])
    assert not (out / "modeling_internlm2.py").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 324 and cfg["dtype"] == "float32"

    model = _load_llama(out)
    ids = _ids(324, seed=1)
    with torch.no_grad():
        got = model(ids).logits
    want = internlm2_forward(work["merged"], work["base_cfg"], ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_tokenizer_keeps_ids_and_matches_sentencepiece(work):
    import sentencepiece
    from transformers import AutoTokenizer

    out = work["tmp"] / "merged-llama"
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in cfg and "InternLM2" not in json.dumps(cfg)
    assert (out / "tokenizer.model").read_bytes() == (BASE / "tokenizer.model").read_bytes()
    tok = AutoTokenizer.from_pretrained(str(out))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(BASE / "tokenizer.model"))
    for content, i in {**SPEC["derived"]["special_token_ids"], **NEW_TOKENS}.items():
        assert tok.convert_tokens_to_ids(content) == i, content
        if i >= 3:
            assert tok.encode(content, add_special_tokens=False) == [i], content
    assert len(tok) == 325  # <mark> (324) is a token without an embedding row, as in OMG-LLaVA
    texts = ["<|im_start|>user\nPlease segment the red car near the tree.<|im_end|>\n<|im_start|>assistant\n",
             "There are 3 dogs  in   the image.", " two\n\nlines\t", "caf\u00e9 \u6771\u4eac"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert tok("hi").input_ids[0] == 1  # add_bos_token kept
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 318]


def test_byte_fallback_tokenizer_gives_sentencepiece_ids(tmp_path):
    """A SentencePiece model with byte fallback (as Llama's) is written for
    PreTrainedTokenizerFast (tokenizer.json as written, in transformers 4 and 5) and gives
    SentencePiece's ids, unknown characters included."""
    import io

    import sentencepiece
    from transformers import AutoTokenizer

    from fixtures.generate import tokenizer_corpus
    from omgtool.ops.tokenizer_export import write_llama_tokenizer

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=buf, model_type="bpe", vocab_size=400,
        character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"400": {"content": "[SEG]", "special": True}}}))
    report = write_llama_tokenizer(src, dst)
    assert report["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(str(dst))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    for text in ["<|im_start|>user\nhello there<|im_end|>", "caf\u00e9 \u6771\u4eac \U0001F600", "a  b\n\tc"]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert tok.encode("[SEG]", add_special_tokens=False) == [400]


# --- --to peft -----------------------------------------------------------------------------

def _peft_model(work, adapter: Path):
    from peft import PeftModel

    base = _load_llama(work["tmp"] / "base-llama")
    base.resize_token_embeddings(324)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Found missing adapter keys" is a UserWarning
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = PeftModel.from_pretrained(base, str(adapter))
    return model.eval()


def test_peft_adapter_loads_exactly_and_matches_merged_export(work):
    adapter = work["tmp"] / "adapter32"
    model = _peft_model(work, adapter)
    written = load_file(str(adapter / "adapter_model.safetensors"))
    # Every adapter parameter PEFT created holds the written value, and every written tensor
    # has such a parameter: nothing missing, nothing unexpected.
    loaded = {}
    for name, value in model.state_dict().items():
        for marker in (".lora_A.default.", ".lora_B.default."):
            if marker in name:
                loaded[name.replace(".default.", ".")] = value
        if ".modules_to_save.default." in name:
            loaded[name.replace(".modules_to_save.default.", ".")] = value
    assert set(loaded) == set(written)
    for k, v in written.items():
        assert torch.equal(loaded[k], v), k
    result = model.load_adapter(str(adapter), adapter_name="again")
    assert not result.unexpected_keys and not result.missing_keys

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 256
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"}
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head"}
    assert Path(cfg["base_model_name_or_path"]) == (work["tmp"] / "base-llama").resolve()
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lora_alpha"] == "256" and "mapping default" in meta["lora_alpha_source"]

    ids = _ids(324, seed=2)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        merged = _load_llama(work["tmp"] / "merged-llama")(ids).logits
    torch.testing.assert_close(got, merged, atol=2e-4, rtol=1e-4)
    # and against the independent InternLM2 forward with unmerged LoRA paths
    ref_w = dict(work["base_w"])
    ref_w["model.tok_embeddings.weight"] = work["sd"][P + "model.tok_embeddings.weight"]
    ref_w["output.weight"] = work["sd"][P + "output.base_layer.weight"]
    want = internlm2_forward(ref_w, work["base_cfg"], ids, lora=work["lora"])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # the LoRA matters at this scale, so the comparison can fail
    assert (want - internlm2_forward(ref_w, work["base_cfg"], ids)).abs().max() > 0.1


def test_peft_adapter_tensors(work):
    """Default dtypes kept; A shared, B rows grouped per kv head; output LoRA folded into lm_head
    and kept in float32."""
    sd = work["sd"]
    adapter = work["tmp"] / "adapter"
    w = load_file(str(adapter / "adapter_model.safetensors"))
    heads, kv, hd = 4, 2, 128
    g = heads // kv
    for layer in range(2):
        a = sd[f"{P}model.layers.{layer}.attention.wqkv.lora_A.default.weight"]
        b = sd[f"{P}model.layers.{layer}.attention.wqkv.lora_B.default.weight"].view(kv, g + 2, hd, -1)
        want = {"q_proj": b[:, :g].reshape(heads * hd, -1), "k_proj": b[:, g].reshape(kv * hd, -1),
                "v_proj": b[:, g + 1].reshape(kv * hd, -1)}
        for proj, b_rows in want.items():
            pre = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            assert torch.equal(w[f"{pre}.lora_A.weight"], a)
            assert torch.equal(w[f"{pre}.lora_B.weight"], b_rows)
            assert w[f"{pre}.lora_B.weight"].dtype == torch.float32
        for src, dst in (("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
                         ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj")):
            for f in ("A", "B"):
                assert torch.equal(w[f"base_model.model.model.layers.{layer}.{dst}.lora_{f}.weight"],
                                   sd[f"{P}model.layers.{layer}.{src}.lora_{f}.default.weight"])
    emb = w["base_model.model.model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, sd[P + "model.tok_embeddings.weight"])
    out_w = sd[P + "output.base_layer.weight"]
    a, b = sd[P + "output.lora_A.default.weight"], sd[P + "output.lora_B.default.weight"]
    folded = out_w.double() + SCALE * (b.double() @ a.double())
    head = w["base_model.model.lm_head.weight"]
    assert head.dtype == torch.float32
    assert (head.double() - folded).abs().max() <= 1e-6 * folded.abs().max()
    assert (head != out_w).float().mean() > 0.5  # the LoRA really was folded in
    assert not any("output" in k or "lora_" in k and "lm_head" in k for k in w)
    # the projector is carried next to the adapter, unchanged
    proj = load_file(str(adapter / "projector.safetensors"))
    assert set(proj) == {k for k in sd if k.startswith("projector")}
    assert all(torch.equal(proj[k], sd[k]) for k in proj)


def test_peft_prints_resize_instruction(work, tmp_path):
    result = _ok("export", FINETUNE, "--to", "peft", "--base-llama", work["tmp"] / "base-llama",
                 "--out", tmp_path / "ad")
    assert "resize_token_embeddings(324)" in result.stdout
    assert "PeftModel.from_pretrained" in result.stdout
    result = _ok("export", FINETUNE, "--to", "peft", "--base-llama", work["tmp"] / "base-llama",
                 "--out", tmp_path / "ad2", "--alpha", "16", "--json")
    report = json.loads(result.stdout)
    assert report["lora_alpha"] == 16 and report["lora_alpha_source"] == "user (--alpha)"
    assert report["resize_token_embeddings"] == 324
    assert json.loads((tmp_path / "ad2" / "adapter_config.json").read_text())["lora_alpha"] == 16


# --- --to safetensors ----------------------------------------------------------------------

def _assert_identical(path: Path, source: dict):
    got = load_file(str(path))
    assert list(got) == list(source)  # names, in the source's order
    for name, want in source.items():
        t = got[name]
        assert t.dtype == want.dtype and t.shape == want.shape, name
        assert torch.equal(t.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), name


def test_safetensors_export_is_byte_identical(work, tmp_path):
    out = tmp_path / "ft.safetensors"
    _ok("export", FINETUNE, "--to", "safetensors", "--out", out)
    _assert_identical(out, torch.load(FINETUNE, weights_only=True))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["source"] == FINETUNE.name
    assert meta["source_sha256"] == hashlib.sha256(FINETUNE.read_bytes()).hexdigest()


def test_safetensors_export_noncontiguous_views_and_shards(tmp_path):
    base = torch.arange(6 * 8, dtype=torch.float16).view(6, 8)
    sd = collections.OrderedDict(
        whole=base, transposed=base.t(), strided=base[1:, ::3], flag=torch.tensor([True, False, True]),
        big=torch.randn(300, 300, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        ints=torch.arange(10, dtype=torch.int64))
    src = tmp_path / "views.pt"
    torch.save(sd, src)
    out = tmp_path / "folder"
    _ok("export", src, "--to", "safetensors", "--out", out, "--max-shard-size", "100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(load_file(str(out / shard)))
    want = torch.load(src, weights_only=True)
    assert set(merged) == set(want)
    for name, t in want.items():
        assert merged[name].dtype == t.dtype and merged[name].shape == t.shape
        assert torch.equal(merged[name], t), name


def test_safetensors_export_of_a_folder_records_every_file(tmp_path):
    out = tmp_path / "base.safetensors"
    _ok("export", BASE, "--to", "safetensors", "--out", out)
    assert load_file(str(out)).keys() == _folder_weights(BASE).keys()
    with safe_open(str(out), "pt") as f:
        files = json.loads(f.metadata()["source_files"])
    assert files == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in sorted(BASE.glob("model-*.safetensors"))}


def test_unsafe_input_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {tmp_path / 'ran'}",)

    sd = collections.OrderedDict(w=tensor_entry("0", torch.FloatStorage, 4, (4,)), x=Payload())
    evil = write_torch_zip(tmp_path / "evil.pth", data_pkl(sd, protocol=3), {"0": bytes(16)})
    out = tmp_path / "evil.safetensors"
    _one_line_error(_run("export", evil, "--to", "safetensors", "--out", out), 3, "unsafe", "system")
    assert not out.exists() and not (tmp_path / "ran").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.pth"]
    _one_line_error(_run("export", evil, "--to", "peft", "--base-llama", BASE, "--out", tmp_path / "a"), 3)


# --- bad input, plan check -----------------------------------------------------------------

def test_bad_inputs_exit_2_with_one_line(work, tmp_path):
    base_llama = work["tmp"] / "base-llama"
    _one_line_error(_run("export", BASE, "--to", "gguf", "--out", tmp_path / "x"), 2, "--to")
    _one_line_error(_run("export", FINETUNE, "--to", "peft", "--out", tmp_path / "x"), 2, "--base-llama")
    _one_line_error(_run("export", FINETUNE, "--to", "llama", "--out", tmp_path / "x"), 2, "InternLM2")
    _one_line_error(_run("export", tmp_path / "missing", "--to", "safetensors", "--out", tmp_path / "x.st"), 2)
    _one_line_error(_run("export", PRETRAIN, "--to", "peft", "--base-llama", base_llama, "--out", tmp_path / "x"),
                    2, "no LoRA")
    _one_line_error(_run("export", FINETUNE, "--to", "peft", "--base-llama", BASE, "--out", tmp_path / "x"),
                    2, "llama")
    _one_line_error(_run("export", base_llama, "--to", "llama", "--out", tmp_path / "x"), 2, "llama")
    _one_line_error(_run("export", BASE, "--to", "llama", "--out", BASE / "llama"), 2, "inside the source")
    assert not (BASE / "llama").exists()
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(FINETUNE.read_bytes()[:200_000])
    _one_line_error(_run("export", truncated, "--to", "safetensors", "--out", tmp_path / "t.safetensors"), 2)
    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    for f in BASE.glob("model*"):
        shutil.copyfile(f, noconfig / f.name)
    _one_line_error(_run("export", noconfig, "--to", "llama", "--out", tmp_path / "x"), 2, "config.json")
    # an existing output is refused and left alone without --force
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep").write_text("mine")
    _one_line_error(_run("export", BASE, "--to", "llama", "--out", existing), 2, "--force")
    assert [p.name for p in existing.iterdir()] == ["keep"]
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    # --force replaces only a folder omgtool wrote (or an empty one): this one is the user's
    _one_line_error(_run("export", BASE, "--to", "llama", "--out", existing, "--force"), 2,
                    "omgtool did not write", "keep")
    assert [p.name for p in existing.iterdir()] == ["keep"]
    (existing / "omgtool-export.json").write_text("{}")
    _ok("export", BASE, "--to", "llama", "--out", existing, "--force")
    assert not (existing / "keep").exists() and (existing / "config.json").is_file()


def test_header_mismatch_after_write_exits_1_and_publishes_nothing(tmp_path, monkeypatch):
    """The written headers are re-read: a shard whose header disagrees with the plan fails."""
    import dataclasses

    from omgtool.formats import writer

    real = writer._header_bytes

    def corrupt(tensors, metadata):
        tensors = [dataclasses.replace(t, dtype="F16") if t.name.endswith("q_proj.weight") else t
                   for t in tensors]
        return real(tensors, metadata)

    monkeypatch.setattr(writer, "_header_bytes", corrupt)
    result = _run("export", BASE, "--to", "llama", "--out", tmp_path / "out")
    _one_line_error(result, 1, "does not match its plan", "q_proj")
    assert list(tmp_path.iterdir()) == []


def test_json_report(work, tmp_path):
    result = _ok("export", BASE, "--to", "llama", "--out", tmp_path / "o", "--json", "--dtype", "fp32")
    report = json.loads(result.stdout)
    assert report["kind"] == "llama" and report["num_tensors"] == 21 and report["dtype"] == "float32"
    assert report["tokenizer"]["check"].startswith("identical")
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    prov = json.loads((tmp_path / "o" / "omgtool-export.json").read_text())
    assert prov["conversion"] == "internlm2-to-llama"


def test_output_folder_has_ordinary_permissions(work):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for name in ("base-llama", "adapter"):
        assert stat.S_IMODE((work["tmp"] / name).stat().st_mode) == 0o777 & ~mask


def test_safetensors_export_of_a_wrapped_state_dict_notes_non_tensor_entries(tmp_path):
    sd = collections.OrderedDict(a=torch.arange(4, dtype=torch.float32), b=torch.ones(2, 2, dtype=torch.float16))
    src = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd, "epoch": 3, "cfg": {"lr": 0.1}}, src)
    result = _ok("export", src, "--to", "safetensors", "--out", tmp_path / "w.safetensors", "--json")
    report = json.loads(result.stdout)
    assert report["container"] == "state_dict"
    assert report["notes"] == ["non-tensor entries not written: epoch, cfg"]
    _assert_identical(tmp_path / "w.safetensors", sd)


def test_merge_lora_output_exports_and_agrees_with_the_adapter(work, tmp_path):
    """merge-lora's own output (bf16) -> llama: exact against the reference forward on its
    weights; the default-dtype adapter's saved embeddings are bit-identical to it (its float32
    lm_head once rounded to bf16),
    and unmerged logits differ only by the bf16 rounding of the merged weights."""
    from omgtool.ops.merge import plan_merge, run_merge

    merged = tmp_path / "merged"
    run_merge(plan_merge(FINETUNE, BASE), merged)
    _ok("export", merged, "--to", "llama", "--out", tmp_path / "merged-llama")
    out = tmp_path / "merged-llama"
    assert (out / "projector.safetensors").read_bytes() == (merged / "projector.safetensors").read_bytes()
    model = _load_llama(out)
    ids = _ids(324, seed=3)
    with torch.no_grad():
        got = model(ids).logits
    want = internlm2_forward(_folder_weights(merged), json.loads((merged / "config.json").read_text()), ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)

    adapter = load_file(str(work["tmp"] / "adapter" / "adapter_model.safetensors"))
    exported = _folder_weights(out)
    # the adapter keeps the folded lm_head in float32; merge-lora rounds the same sum once to bf16
    assert adapter["base_model.model.lm_head.weight"].dtype == torch.float32
    assert torch.equal(adapter["base_model.model.lm_head.weight"].to(torch.bfloat16), exported["lm_head.weight"])
    assert torch.equal(adapter["base_model.model.model.embed_tokens.weight"], exported["model.embed_tokens.weight"])
    with torch.no_grad():
        unmerged = _peft_model(work, work["tmp"] / "adapter")(input_ids=ids).logits
    diff = (unmerged - got).abs().max()
    assert diff < 0.05, diff  # bf16 rounding of W + scale*B@A in the merged model
