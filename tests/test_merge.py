"""`omgtool merge-lora` on the tiny fixtures.

Oracles are independent of omgtool: the merged weights are judged against the formula written
out here in plain torch (float64 product, rounded once); the merged model's logits (through
tests/reference_internlm2.py) against base + *unmerged* LoRA computed by PEFT's own LoRA layers
(get_peft_model on a module holding nn.Linear layers with InternLM2's names) and against PEFT's
merge_and_unload; checkpoints are read with torch.load, outputs with safetensors, the tokenizer
with SentencePiece, hashes with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (its logger binds to the real stderr before CliRunner swaps it)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.reference_internlm2 import _rms_norm, _rotate_half, internlm2_forward
from tests.cli_helpers import (folder_weights as _weights,
                                ok as _ok, one_line_error as _one_line_error, run as _run)

from tests.paths import BASE, FINETUNE, PRETRAIN, SPEC
V = SPEC["vocab_size"]  # 320
ROWS = SPEC["ckpt_vocab_size"]  # 324
P = "llm.base_model.model."
ALPHA = 256.0  # the mapping default; tiny r = 8, so scale 32
NEW = ["[SEG]", "<p>", "</p>", "<region>", "<mark>"]
TARGETS = ["wqkv", "wo", "w1", "w2", "w3", "output"]

def _lora(sd) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{InternLM2 weight name: (A, B)} from a finetune state dict."""
    out = {}
    for k in sd:
        if k.endswith(".lora_A.default.weight"):
            out[k[len(P):].replace(".lora_A.default.weight", ".weight")] = (sd[k], sd[k.replace("lora_A", "lora_B")])
    return out


def _reference_merge(base: dict, sd: dict, alpha: float, dtype=None, bounds: dict | None = None):
    """The formula, written out: the checkpoint's full tensors replace the base's; then
    W' = round(W + (alpha / r) * B @ A) with the product in float64. `bounds` receives, per merged
    weight, |W| + |delta|: float32 arithmetic may be off by a few 2^-24 of that (cancellation)."""
    out = dict(base)
    for k, t in sd.items():
        if k.startswith("llm.") and ".lora_" not in k:
            name = k[len(P):] if k.startswith(P) else k[len("llm."):]
            out[name.replace(".base_layer.", ".")] = t
    for name, (a, b) in _lora(sd).items():
        w = out[name]
        delta = (alpha / a.shape[0]) * (b.double() @ a.double())
        out[name] = (w.double() + delta).to(dtype or base[name].dtype)
        if bounds is not None:
            bounds[name] = w.double().abs() + (alpha / a.shape[0]) * (b.double().abs() @ a.double().abs())
    return out


def _within_one_rounding(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> bool:
    """|got - ref| <= one bf16 ulp of ref + the float32 arithmetic error of the sum."""
    return bool(((got.double() - ref.double()).abs() <= _ulp_bf16(ref.double()) + 2.0 ** -20 * bound).all())


def _ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    e = torch.floor(torch.log2(x.abs().float().clamp_min(2.0 ** -126)))
    return torch.pow(2.0, e - 7)


def _same_folder_files(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir())


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(seed))


# --- PEFT oracle ---------------------------------------------------------------------------

def _peft_model(weights: dict, sd: dict, alpha: float):
    """A module tree with nn.Linear / nn.Embedding under InternLM2's names, wrapped by PEFT's own
    get_peft_model, the checkpoint's A/B loaded into PEFT's LoRA layers."""
    from peft import LoraConfig, get_peft_model

    root = torch.nn.Module()

    def put(path: str, module: torch.nn.Module) -> None:
        *parents, leaf = path.split(".")
        node = root
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, torch.nn.Module())
            node = getattr(node, p)
        node.add_module(leaf, module)

    for name, w in weights.items():
        path = name.removesuffix(".weight")
        if w.dim() == 2 and name != "model.tok_embeddings.weight":
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.float().clone()
            put(path, lin)
        elif name == "model.tok_embeddings.weight":
            emb = torch.nn.Embedding(*w.shape)
            emb.weight.data = w.float().clone()
            put(path, emb)
        else:
            put(path, _Param(w.float().clone()))
    r = next(iter(_lora(sd).values()))[0].shape[0]
    model = get_peft_model(root, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS))
    state = {k[len("llm."):]: v.float() for k, v in sd.items() if ".lora_" in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if ".lora_" in m], missing
    return model.eval()


class _Param(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = torch.nn.Parameter(w)


def _peft_forward(model, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2's forward (as in tests/reference_internlm2.py) calling PEFT's LoRA layers, unmerged."""
    m = model.base_model.model
    heads, kv, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    hd, g, eps = hidden // heads, heads // kv, config["rms_norm_eps"]
    x = m.model.tok_embeddings(ids)
    bsz, seq, _ = x.shape
    inv = 1.0 / (config["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    emb = torch.cat([torch.outer(torch.arange(seq, dtype=torch.float32), inv)] * 2, dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    for layer in m.model.layers.children():
        h = _rms_norm(x, layer.attention_norm.weight, eps)
        qkv = layer.attention.wqkv(h).view(bsz, seq, kv, g + 2, hd)
        q = qkv[:, :, :, :g].reshape(bsz, seq, heads, hd).transpose(1, 2)
        k, v = qkv[:, :, :, -2].transpose(1, 2), qkv[:, :, :, -1].transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        att = ((q @ k.transpose(-1, -2)) / hd ** 0.5 + mask).softmax(-1)
        x = x + layer.attention.wo((att @ v).transpose(1, 2).reshape(bsz, seq, hidden))
        h = _rms_norm(x, layer.ffn_norm.weight, eps)
        x = x + layer.feed_forward.w2(torch.nn.functional.silu(layer.feed_forward.w1(h)) * layer.feed_forward.w3(h))
    return m.output(_rms_norm(x, m.model.norm.weight, eps))


# --- shared outputs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    _ok("merge-lora", FINETUNE, "--base", BASE, "--out", tmp / "ft", "--max-shard-size", "2MB")
    _ok("merge-lora", FINETUNE, "--base", BASE, "--out", tmp / "ft32", "--dtype", "fp32")
    _ok("merge-lora", PRETRAIN, "--base", BASE, "--out", tmp / "pre")
    with torch.no_grad():
        return {"tmp": tmp, "base": _weights(BASE), "config": json.loads((BASE / "config.json").read_text()),
                "ft": torch.load(FINETUNE, weights_only=True), "pre": torch.load(PRETRAIN, weights_only=True)}


def test_merged_tensors_equal_independent_fp32_reference(work):
    got = _weights(work["tmp"] / "ft")
    bounds: dict = {}
    ref = _reference_merge(work["base"], work["ft"], ALPHA, bounds=bounds)
    assert set(got) == set(work["base"])  # same key names as the base
    merged = set(_lora(work["ft"]))
    assert len(merged) == 11
    exact = total = 0
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape and g.dtype == torch.bfloat16, name
        if name in merged:  # fp32 merge, rounded once: at most one bf16 ulp from the exact value
            assert _within_one_rounding(g, r, bounds[name]), name
            exact += int((g.view(torch.int16) == r.view(torch.int16)).sum())
            total += g.numel()
        else:
            assert torch.equal(g.view(torch.int16), r.view(torch.int16)), name
    assert exact / total > 0.999
    # the resized tables: the checkpoint's rows; output = its base_layer + its own LoRA delta
    assert got["model.tok_embeddings.weight"].shape[0] == ROWS
    assert torch.equal(got["model.tok_embeddings.weight"], work["ft"][P + "model.tok_embeddings.weight"])
    plain = work["ft"][P + "output.base_layer.weight"]
    assert not torch.equal(got["output.weight"], plain)
    # fp32 output: the same merge without the final rounding, to float32 precision
    got32 = _weights(work["tmp"] / "ft32")
    ref32 = _reference_merge(work["base"], work["ft"], ALPHA, torch.float32)
    for name in merged:
        torch.testing.assert_close(got32[name], ref32[name], rtol=2e-6, atol=2e-6)


def test_untouched_tensors_bit_identical_and_dtype_conversion_stated(work):
    got, base = _weights(work["tmp"] / "ft"), work["base"]
    untouched = [n for n in base if "norm" in n]
    assert len(untouched) == 5
    for name in untouched:
        assert torch.equal(got[name].view(torch.int16), base[name].view(torch.int16)), name
    got32 = _weights(work["tmp"] / "ft32")
    for name in untouched:
        assert got32[name].dtype == torch.float32 and torch.equal(got32[name], base[name].float())
    record = json.loads((work["tmp"] / "ft32" / "omgtool-merge.json").read_text())
    assert record["counts"]["converted"] == 5 and record["dtype_source"] == "--dtype"
    assert any("converted, not copied bit-exactly" in n for n in record["notes"])
    assert json.loads((work["tmp"] / "ft32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_logits_equal_base_plus_unmerged_lora_through_peft(work):
    config, sd = work["config"], work["ft"]
    # the base with the checkpoint's trained full tensors, in float32: what PEFT wraps
    start = dict(work["base"])
    start["model.tok_embeddings.weight"] = sd[P + "model.tok_embeddings.weight"]
    start["output.weight"] = sd[P + "output.base_layer.weight"]
    peft_model = _peft_model(start, sd, ALPHA)
    cfg = {**config, "vocab_size": ROWS}
    ids = _ids(ROWS)
    with torch.no_grad():
        want = _peft_forward(peft_model, cfg, ids)  # base + unmerged LoRA, PEFT's layers
        got32 = internlm2_forward(_weights(work["tmp"] / "ft32"), cfg, ids)
        got16 = internlm2_forward(_weights(work["tmp"] / "ft"), cfg, ids)
        plain = internlm2_forward(start, cfg, ids)  # no LoRA at all
        wrong = _weights(work["tmp"] / "ft32")
        # PEFT's own merge, for the weights
        merged = peft_model.merge_and_unload()
        peft_w = {n + ".weight": mod.weight for n, mod in merged.named_modules()
                  if isinstance(mod, torch.nn.Linear)}
    assert len(peft_w) == 11
    g32 = _weights(work["tmp"] / "ft32")
    for name, w in peft_w.items():
        torch.testing.assert_close(g32[name], w, rtol=1e-5, atol=1e-5)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    lora_effect = rel(plain, want)
    assert lora_effect > 0.05  # the LoRA matters on these fixtures (scale 32)
    assert rel(got32, want) < 1e-5  # fp32 merge: the same model
    # bf16 merge: only the rounding of the weights; measured floor = PEFT's merged weights rounded
    floor_w = {**start, **{n: w.to(torch.bfloat16) for n, w in peft_w.items()}}
    floor_w = {n: (t.to(torch.bfloat16) if t.is_floating_point() else t) for n, t in floor_w.items()}
    with torch.no_grad():
        floor = rel(internlm2_forward(floor_w, cfg, ids), want)
    assert rel(got16, want) <= 1.5 * floor + 1e-6
    assert (got16.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    # negative control: alpha 4 (scale 0.5, the recipe's scale at r=512) is caught
    for name, (a, b) in _lora(sd).items():
        wrong[name] = start[name].float() + (4.0 / a.shape[0]) * (b @ a)
    with torch.no_grad():
        assert rel(internlm2_forward(wrong, cfg, ids), want) > 100 * rel(got32, want) + 0.01


def test_pretrain_merge_replaces_tables_only(work):
    out = work["tmp"] / "pre"
    got, base, sd = _weights(out), work["base"], work["pre"]
    assert torch.equal(got["model.tok_embeddings.weight"], sd["llm.model.tok_embeddings.weight"])
    assert torch.equal(got["output.weight"], sd["llm.output.weight"])
    for name, t in base.items():
        if name not in ("model.tok_embeddings.weight", "output.weight"):
            assert torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name
    record = json.loads((out / "omgtool-merge.json").read_text())
    assert record["stage"] == "pretrain" and record["lora"] is None and record["deltas"] == {}
    assert record["counts"]["replaced"] == 2 and record["counts"]["merged"] == 0
    assert set(record["resized"]) == {"model.tok_embeddings.weight", "output.weight"}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == ROWS
    with safe_open(str(out / "projector.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == {k for k in sd if k.startswith("projector")} and len(keys) == 15
        for k in keys:
            assert torch.equal(f.get_tensor(k), sd[k])
    logits = internlm2_forward(got, {**work["config"], "vocab_size": ROWS}, _ids(ROWS))
    want = internlm2_forward({**base, "model.tok_embeddings.weight": sd["llm.model.tok_embeddings.weight"],
                              "output.weight": sd["llm.output.weight"]}, work["config"], _ids(ROWS))
    assert torch.equal(logits, want)


def test_output_folder_layout_shards_config_and_carried_files(work):
    out = work["tmp"] / "ft"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(work["base"])
    for s in shards:  # at most 2 MB of tensors per shard, unless one tensor alone is larger
        with safe_open(str(out / s), "pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * 2 for k in keys)
        assert size <= 2_000_000 or len(keys) == 1, (s, size, keys)
    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.metadata().get("format") == "pt"
    cfg, base_cfg = json.loads((out / "config.json").read_text()), work["config"]
    assert cfg == {**base_cfg, "vocab_size": ROWS}
    for name in ("generation_config.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (BASE / name).read_bytes()
    assert not (out / "extras.safetensors").exists()
    assert not list(out.glob(".*"))


def test_provenance_record_hashes_alpha_norms(work):
    out = work["tmp"] / "ft"
    record = json.loads((out / "omgtool-merge.json").read_text())
    from omgtool import __version__

    assert record["version"] == __version__ and record["command"] == "merge-lora"
    assert record["alpha"] == ALPHA and "mapping default" in record["alpha_source"]
    assert record["lora"]["rank"] == 8 and record["lora"]["scale"] == 32.0
    sha = hashlib.sha256(FINETUNE.read_bytes()).hexdigest()
    assert record["checkpoint"]["files"][FINETUNE.name]["sha256"] == sha
    for name, entry in record["base"]["files"].items():
        assert entry["sha256"] == hashlib.sha256((BASE / name).read_bytes()).hexdigest()
    assert record["base"]["path"] == str(BASE.resolve())
    files = sorted(p.name for p in out.iterdir() if p.name != "omgtool-merge.json")
    assert sorted(record["outputs"]) == files
    for name, entry in record["outputs"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
        assert entry["bytes"] == (out / name).stat().st_size
    lora = _lora(work["ft"])
    assert set(record["deltas"]) == set(lora)
    for name, (a, b) in lora.items():
        want = float(torch.linalg.norm(32.0 * (b.double() @ a.double())))
        assert record["deltas"][name]["frobenius_norm"] == pytest.approx(want, rel=1e-9)
    readme = (out / "README.md").read_text()
    assert "<mark>" in readme and f"| `<mark>` | {ROWS} |" in readme and "never embedded" in readme


def test_tokenizer_ids_for_added_tokens(work):
    import sentencepiece

    out = work["tmp"] / "ft"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == V
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    base_cfg = json.loads((BASE / "tokenizer_config.json").read_text())
    decoder = cfg["added_tokens_decoder"]
    for i, tok in enumerate(NEW):
        entry = decoder[str(V + i)]
        assert entry["content"] == tok and entry["special"] is True
    assert {k: v for k, v in decoder.items() if int(k) < V} == base_cfg["added_tokens_decoder"]
    assert cfg["tokenizer_class"] == base_cfg["tokenizer_class"] and cfg["auto_map"] == base_cfg["auto_map"]
    assert cfg["additional_special_tokens"] == base_cfg["additional_special_tokens"] + NEW
    smap = json.loads((out / "special_tokens_map.json").read_text())
    assert smap["additional_special_tokens"][-5:] == NEW
    assert json.loads((out / "added_tokens.json").read_text()) == {t: V + i for i, t in enumerate(NEW)}
    # the full vocabulary: SentencePiece's pieces at 0..V-1, then the added tokens; <mark> past the rows
    vocab = [sp.id_to_piece(i) for i in range(V)] + [decoder[str(i)]["content"] for i in range(V, V + 5)]
    assert vocab.index("[SEG]") == V and vocab.index("<mark>") == ROWS == V + 4
    assert _weights(out)["model.tok_embeddings.weight"].shape[0] == ROWS  # <mark> has no row


def test_tokens_load_through_a_transformers_tokenizer(work, tmp_path):
    """The written added tokens, read by transformers (via a Llama export of the merged folder)."""
    from transformers import AutoTokenizer

    _ok("export", work["tmp"] / "pre", "--to", "llama", "--out", tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    for i, t in enumerate(NEW):
        assert tok.convert_tokens_to_ids(t) == V + i
        assert tok.encode(f"a {t} b", add_special_tokens=False).count(V + i) == 1


def test_partial_lora_and_base_found_by_name(work, tmp_path, monkeypatch):
    sd = {k: v for k, v in work["ft"].items() if ".lora_" not in k or ".attention.wqkv." in k}
    ckpt = tmp_path / "ckpts" / "partial.pth"
    ckpt.parent.mkdir()
    torch.save(sd, ckpt)
    shutil.copytree(BASE, tmp_path / "internlm2-chat-tiny")
    monkeypatch.chdir(tmp_path)
    result = _ok("merge-lora", ckpt, "--base", "internlm/internlm2-chat-tiny", "--out", tmp_path / "o", "--json")
    report = json.loads(result.stdout)
    assert report["base"]["resolved_by"] == "current directory"
    assert report["counts"]["merged"] == 2 and report["counts"]["copied"] == 13
    bounds: dict = {}
    got, ref = _weights(tmp_path / "o"), _reference_merge(work["base"], sd, ALPHA, bounds=bounds)
    for name, t in work["base"].items():
        if ".wqkv." in name:
            assert _within_one_rounding(got[name], ref[name], bounds[name]), name
            assert not torch.equal(got[name], t)
        elif name not in ("model.tok_embeddings.weight", "output.weight"):
            assert torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name
    assert torch.equal(got["output.weight"], sd[P + "output.base_layer.weight"])  # no LoRA on output now


def test_base_resolution_order_and_hf_cache(tmp_path, monkeypatch):
    from omgtool.formats.resolve import resolve_base

    cache = tmp_path / "hub"
    snap = cache / "models--internlm--internlm2-chat-tiny" / "snapshots" / ("a" * 40)
    snap.parent.mkdir(parents=True)
    shutil.copytree(BASE, snap)
    (cache / "models--internlm--internlm2-chat-tiny" / "refs").mkdir()
    (cache / "models--internlm--internlm2-chat-tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "cwd"
    empty.mkdir()
    for name in ("internlm/internlm2-chat-tiny", "internlm2-chat-tiny"):
        got = resolve_base(name, tmp_path / "elsewhere" / "x.pth", cwd=empty)
        assert got.path == snap and got.how == "HuggingFace cache"
        assert got.repo_id == "internlm/internlm2-chat-tiny" and got.revision == "a" * 40
    # a folder beside the checkpoint comes before the cache
    beside = tmp_path / "ck"
    shutil.copytree(BASE, beside / "internlm2-chat-tiny")
    got = resolve_base("internlm2-chat-tiny", beside / "x.pth", cwd=empty)
    assert got.path == beside / "internlm2-chat-tiny" and got.how == "beside the checkpoint"
    # through the CLI: the cache hit is recorded
    monkeypatch.chdir(empty)
    lone = tmp_path / "elsewhere" / PRETRAIN.name  # no base folder beside it
    lone.parent.mkdir()
    shutil.copyfile(PRETRAIN, lone)
    report = json.loads(_ok("merge-lora", lone, "--base", "internlm/internlm2-chat-tiny", "--out",
                            tmp_path / "o", "--json", "--no-hash-base").stdout)
    assert report["base"]["resolved_by"] == "HuggingFace cache" and report["base"]["path"] == str(snap.resolve())
    assert all(v["sha256"] is None for v in report["base"]["files"].values())
    # not found: one line listing every place looked
    result = _run("merge-lora", PRETRAIN, "--base", "internlm/internlm2-chat-7b", "--out", tmp_path / "o2")
    _one_line_error(result, 2, str(empty / "internlm" / "internlm2-chat-7b"),
                    str(PRETRAIN.parent / "internlm2-chat-7b"), str(cache / "models--internlm--internlm2-chat-7b"))
    assert not (tmp_path / "o2").exists()


def test_dry_run_writes_nothing(tmp_path):
    result = _ok("merge-lora", FINETUNE, "--base", BASE, "--out", tmp_path / "o", "--dry-run")
    text = result.stdout
    for needle in ("merged", "replaced", "copied", "model.tok_embeddings.weight (trained, 320 \u2192 324 rows)",
                   "output.weight (trained, 320 \u2192 324 rows, + its LoRA)", "alpha 256",
                   "<mark> 324 (no embedding row)"):
        assert needle in " ".join(text.split()), needle
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []
    plan = json.loads(_ok("merge-lora", FINETUNE, "--base", BASE, "--dry-run", "--json").stdout)
    assert plan["counts"]["merged"] == 10 and plan["counts"]["replaced"] == 2 and plan["counts"]["copied"] == 5
    assert plan["counts"]["projector.safetensors"] == 15 and plan["lora"]["scale"] == 32.0
    assert sorted(plan["tensors"]["replaced"]) == ["model.tok_embeddings.weight", "output.weight"]
    assert sorted(plan["resized"]) == ["model.tok_embeddings.weight", "output.weight"]


# --- bad inputs: exit 2, one line naming the tensor, nothing written ---------------------------

def _variant_base(tmp: Path, **changes) -> Path:
    from fixtures.generate import TINY as TINY_SPEC, write_base_folder

    return write_base_folder(TINY_SPEC.replace(**changes), tmp / "base-variant", num_shards=1)


def _assert_nothing_written(parent: Path, name: str = "o"):
    assert not (parent / name).exists()
    assert not list(parent.glob(f".{name}.*"))


@pytest.mark.parametrize("case", ["hidden", "layers", "rank", "no-base-weight", "lone-factor", "vocab",
                                  "exists", "base-is-file", "bad-size"])
def test_bad_inputs_exit_2_one_line_nothing_written(work, tmp_path, case):
    ckpt, base, extra = FINETUNE, BASE, []
    if case == "hidden":
        base = _variant_base(tmp_path, hidden_size=256, head_dim=64)
        needles = ["hidden_size 512", "llm.base_model.model.model.tok_embeddings.weight"]
    elif case == "layers":
        base = _variant_base(tmp_path, num_layers=3)
        needles = ["layer count", "num_hidden_layers", "model.layers.1."]
    elif case == "rank":
        sd = dict(work["ft"])
        key = P + "model.layers.1.feed_forward.w3.lora_A.default.weight"
        sd[key] = sd[key][:4].clone()
        ckpt = tmp_path / "rank.pth"
        torch.save(sd, ckpt)
        needles = ["rank mismatch", key, key.replace("lora_A", "lora_B")]
    elif case == "no-base-weight":
        base = tmp_path / "base-missing"
        shutil.copytree(BASE, base)
        index = json.loads((base / "model.safetensors.index.json").read_text())
        gone = "model.layers.1.feed_forward.w2.weight"
        shard = index["weight_map"].pop(gone)
        tensors = load_file(str(base / shard))
        del tensors[gone]
        save_file(tensors, str(base / shard), metadata={"format": "pt"})
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
        needles = [f"LoRA target {gone}", "has no weight in the base"]
    elif case == "lone-factor":
        sd = dict(work["ft"])
        key = P + "model.layers.0.attention.wo.lora_B.default.weight"
        del sd[key]
        ckpt = tmp_path / "lone.pth"
        torch.save(sd, ckpt)
        needles = ["without its partner", key.replace("lora_B", "lora_A")]
    elif case == "vocab":
        base = _variant_base(tmp_path, vocab_size=300, ckpt_vocab_size=304)
        needles = [f"{P}model.tok_embeddings.weight has {ROWS} rows", "300 tokens"]
    elif case == "exists":
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "keep.txt").write_text("mine")
        needles = ["already exists", "--force"]
    elif case == "base-is-file":
        base = PRETRAIN
        needles = ["is a file", "--base needs a model folder"]
    else:
        extra = ["--max-shard-size", "5 parsecs"]
        needles = ["cannot read size", "5GB"]
    result = _run("merge-lora", ckpt, "--base", base, "--out", tmp_path / "o", *extra)
    _one_line_error(result, 2, *needles)
    if case == "exists":
        assert (tmp_path / "o" / "keep.txt").read_text() == "mine" and len(list((tmp_path / "o").iterdir())) == 1
        assert not list(tmp_path.glob(".o.*"))
    else:
        _assert_nothing_written(tmp_path)


def test_interrupted_or_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from omgtool.formats.writer import ShardedSafetensorsWriter

    real = ShardedSafetensorsWriter.write_rows
    calls = {"n": 0}

    def flaky(self, name, blocks):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, name, blocks)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write_rows", flaky)
    result = _run("merge-lora", FINETUNE, "--base", BASE, "--out", tmp_path / "o", "--max-shard-size", "1MB")
    assert result.exit_code == 130 and calls["n"] == 6
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: interrupted"] and result.stderr.strip().endswith("error: interrupted")
    assert "alpha 256" in result.stderr  # the header says which alpha, from where, before any work
    _assert_nothing_written(tmp_path)
    assert list(tmp_path.iterdir()) == []

    # a failure after every tensor was written (writing the README): still nothing, and --force keeps the old
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("previous")
    (tmp_path / "o" / "omgtool-merge.json").write_text("{}")  # an earlier omgtool output: --force may replace it
    monkeypatch.setattr(ShardedSafetensorsWriter, "write_rows", real)
    import omgtool.ops.merge as merge_mod

    def boom(plan, report):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge_mod, "_readme", boom)
    result = _run("merge-lora", FINETUNE, "--base", BASE, "--out", tmp_path / "o", "--force")
    assert result.exit_code == 4 and "disk full" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["old.txt", "omgtool-merge.json"]


def test_carries_every_non_weight_file_of_the_base(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    (base / "modeling_internlm2.py").write_text("# remote code\n")
    (base / "tokenization_internlm2.py").write_text("# remote tokenizer code\n")
    (base / "README.md").write_text("# model card\n")
    (base / "pytorch_model.bin").write_bytes(b"not used")  # a second copy of the weights: not carried
    out = tmp_path / "o"
    report = json.loads(_ok("merge-lora", PRETRAIN, "--base", base, "--out", out, "--json").stdout)
    for name in ("modeling_internlm2.py", "tokenization_internlm2.py", "generation_config.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert (out / "README.base.md").read_text() == "# model card\n"
    assert "never embedded" in (out / "README.md").read_text()
    assert not (out / "pytorch_model.bin").exists()
    assert any("pytorch_model.bin" in n for n in report["notes"])


def test_unexplained_keys_go_to_extras(work, tmp_path):
    sd = dict(work["pre"])
    sd["mask_decoder.layers.0.weight"] = torch.randn(4, 4)
    ckpt = tmp_path / "extra.pth"
    torch.save(sd, ckpt)
    _ok("merge-lora", ckpt, "--base", BASE, "--out", tmp_path / "o")
    with safe_open(str(tmp_path / "o" / "extras.safetensors"), "pt") as f:
        assert list(f.keys()) == ["mask_decoder.layers.0.weight"]
        assert torch.equal(f.get_tensor("mask_decoder.layers.0.weight"), sd["mask_decoder.layers.0.weight"])
    with safe_open(str(tmp_path / "o" / "projector.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_merge_matches_cpu(work, tmp_path):
    _ok("merge-lora", FINETUNE, "--base", BASE, "--out", tmp_path / "gpu", "--device", "cuda", "--dtype", "fp32")
    got, cpu = _weights(tmp_path / "gpu"), _weights(work["tmp"] / "ft32")
    for name in cpu:
        torch.testing.assert_close(got[name], cpu[name], rtol=1e-6, atol=1e-6)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_unsafe_checkpoint_refused_exit_3(tmp_path):
    import collections

    from tests.ckpt_builders import data_pkl, tensor_entry, write_torch_zip

    marker = tmp_path / "marker"
    sd = collections.OrderedDict()
    sd["llm.model.tok_embeddings.weight"] = tensor_entry("0", torch.FloatStorage, 4, (4,))
    sd["payload"] = _Payload(marker)
    evil = write_torch_zip(tmp_path / "evil.pth", data_pkl(sd, protocol=3), {"0": bytes(16)})
    result = _run("merge-lora", evil, "--base", BASE, "--out", tmp_path / "o")
    _one_line_error(result, 3, "unsafe pickle")
    assert not marker.exists()
    _assert_nothing_written(tmp_path)
