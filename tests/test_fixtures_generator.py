"""Tests for the deterministic fixture generator (fixtures/generate.py).

They check that the committed fixtures in fixtures/tiny are exactly what the
generator produces, that the key layout matches the real OMG-LLaVA files, that
every container variant round-trips, and that the tiny model is numerically
sane (finite, non-degenerate logits; LoRA visibly changes them).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fixtures import generate as G  # noqa: E402

TINY_DIR = REPO / "fixtures" / "tiny"
BASE = "internlm2-chat-tiny"
PRE = "omg_llava_tiny_pretrain.pth"
FT = "omg_llava_tiny_finetune.pth"
S = G.TINY


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_base(folder: Path) -> dict:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (dtype, shape and raw bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def regen(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    G.build_tiny(out)
    return out


@pytest.fixture(scope="module")
def committed_ft() -> dict:
    return _load(TINY_DIR / FT)


@pytest.fixture(scope="module")
def committed_base() -> dict:
    return _load_base(TINY_DIR / BASE)


# ----------------------------------------------------------------------------
# (1) determinism / committed fixtures are up to date
# ----------------------------------------------------------------------------


def test_committed_files_present():
    for rel in [
        "spec.json",
        PRE,
        FT,
        f"{BASE}/config.json",
        f"{BASE}/generation_config.json",
        f"{BASE}/model.safetensors.index.json",
        f"{BASE}/model-00001-of-00002.safetensors",
        f"{BASE}/model-00002-of-00002.safetensors",
        f"{BASE}/tokenizer.model",
        f"{BASE}/tokenizer_config.json",
        f"{BASE}/special_tokens_map.json",
    ]:
        assert (TINY_DIR / rel).is_file(), rel
    total = sum(p.stat().st_size for p in TINY_DIR.rglob("*") if p.is_file())
    assert total < 16 * 2**20


@pytest.mark.parametrize("name", [PRE, FT])
def test_regenerated_checkpoints_match_committed(regen, name):
    old, new = _load(TINY_DIR / name), _load(regen / name)
    assert list(old) == list(new)
    for k in old:
        assert _same(old[k], new[k]), k


def test_regenerated_base_matches_committed(regen, committed_base):
    new = _load_base(regen / BASE)
    assert list(committed_base) == list(new)
    for k in new:
        assert _same(committed_base[k], new[k]), k
    # the streaming safetensors writer and the tokenizer are byte-deterministic
    for rel in sorted(p.relative_to(TINY_DIR / BASE) for p in (TINY_DIR / BASE).iterdir()):
        assert (regen / BASE / rel).read_bytes() == (TINY_DIR / BASE / rel).read_bytes(), rel
    assert json.loads((regen / "spec.json").read_text()) == json.loads((TINY_DIR / "spec.json").read_text())


def test_torch_save_is_byte_identical_run_to_run(regen, tmp_path):
    for name, sd in [(PRE, G.pretrain_state_dict(S)), (FT, G.finetune_state_dict(S))]:
        G.write_checkpoint(sd, tmp_path / name, "zip")
        assert (tmp_path / name).read_bytes() == (regen / name).read_bytes(), name


def test_base_state_dict_iterator_matches_folder(committed_base):
    names = []
    for name, t in G.base_state_dict(S):
        names.append(name)
        assert _same(t, committed_base[name]), name
    assert sorted(names) == sorted(committed_base)


# ----------------------------------------------------------------------------
# (2) key layout and shapes
# ----------------------------------------------------------------------------


def test_pretrain_structure():
    sd = _load(TINY_DIR / PRE)
    H, V4, C4, Q2, T = S.hidden_size, S.ckpt_vocab_size, S.clip_in, S.query_in, S.text2vision_dim
    expected = {
        "llm.model.tok_embeddings.weight": (V4, H),
        "llm.output.weight": (V4, H),
        "projector.model.query_proj.weight": (C4, Q2),
        "projector.model.query_proj.bias": (C4,),
        "projector.model.model.0.weight": (H, C4),
        "projector.model.model.0.bias": (H,),
        "projector.model.model.2.weight": (H, H),
        "projector.model.model.2.bias": (H,),
        "projector.model.model_feat.0.weight": (H, C4 + Q2),
        "projector.model.model_feat.0.bias": (H,),
        "projector.model.model_feat.2.weight": (H, H),
        "projector.model.model_feat.2.bias": (H,),
        "projector.model.seperate_embed.weight": (1, H),
        "projector_text2vision.model.0.weight": (T, H),
        "projector_text2vision.model.0.bias": (T,),
        "projector_text2vision.model.2.weight": (T, T),
        "projector_text2vision.model.2.bias": (T,),
    }
    assert len(sd) == 17
    assert list(sd) == list(expected)  # same order as the real file's listing
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert sd["llm.output.weight"].dtype == torch.bfloat16
    assert sd["projector.model.model.0.weight"].dtype == torch.float32
    # tiny dims that other code depends on
    assert (C4, Q2, C4 + Q2, T, H) == (128, 32, 160, 32, 512)


def test_finetune_structure(committed_ft):
    sd = committed_ft
    L, H, I, r = S.num_layers, S.hidden_size, S.intermediate_size, S.lora_rank
    p = "llm.base_model.model."
    assert len(sd) == 2 + 2 + 10 * L + 15 == G.finetune_num_tensors(S) == 39
    keys = list(sd)
    assert keys[:2] == [p + "model.tok_embeddings.weight", p + "output.base_layer.weight"]
    # first 20 keys follow the real listing exactly (layer 0 then layer 1, A then B)
    expect = []
    for i in range(L):
        for t in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"):
            expect += [f"{p}model.layers.{i}.{t}.lora_A.default.weight", f"{p}model.layers.{i}.{t}.lora_B.default.weight"]
    assert keys[2:2 + 10 * L] == expect
    assert keys[2 + 10 * L:4 + 10 * L] == [p + "output.lora_A.default.weight", p + "output.lora_B.default.weight"]
    assert keys[4 + 10 * L:] == list(G.PROJECTOR_KEYS)
    dims = {
        "attention.wqkv": (1024, H),
        "attention.wo": (H, 512),
        "feed_forward.w1": (I, H),
        "feed_forward.w3": (I, H),
        "feed_forward.w2": (H, I),
    }
    for i in range(L):
        for t, (out_f, in_f) in dims.items():
            a = sd[f"{p}model.layers.{i}.{t}.lora_A.default.weight"]
            b = sd[f"{p}model.layers.{i}.{t}.lora_B.default.weight"]
            assert tuple(a.shape) == (r, in_f) and tuple(b.shape) == (out_f, r)
            assert a.dtype == b.dtype == torch.float32
    assert tuple(sd[p + "output.lora_A.default.weight"].shape) == (r, H)
    assert tuple(sd[p + "output.lora_B.default.weight"].shape) == (S.ckpt_vocab_size, r)
    assert tuple(sd[p + "model.tok_embeddings.weight"].shape) == (S.ckpt_vocab_size, H)
    assert sd[p + "output.base_layer.weight"].dtype == torch.bfloat16


def test_base_structure(committed_base):
    V, H, I, L = S.vocab_size, S.hidden_size, S.intermediate_size, S.num_layers
    assert len(committed_base) == 3 + 7 * L
    assert tuple(committed_base["model.tok_embeddings.weight"].shape) == (V, H)
    assert tuple(committed_base["output.weight"].shape) == (V, H)
    for i in range(L):
        q = f"model.layers.{i}."
        assert tuple(committed_base[q + "attention.wqkv.weight"].shape) == ((4 + 2 * 2) * 128, H)
        assert tuple(committed_base[q + "attention.wo.weight"].shape) == (H, 4 * 128)
        assert tuple(committed_base[q + "feed_forward.w1.weight"].shape) == (I, H)
        assert tuple(committed_base[q + "feed_forward.w3.weight"].shape) == (I, H)
        assert tuple(committed_base[q + "feed_forward.w2.weight"].shape) == (H, I)
        n = committed_base[q + "attention_norm.weight"].float()
        assert abs(n.mean().item() - 1.0) < 0.05
    assert all(t.dtype == torch.bfloat16 for t in committed_base.values())
    folder = TINY_DIR / BASE
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["InternLM2ForCausalLM"] and cfg["model_type"] == "internlm2"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (V, H, I)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (L, 4, 2)
    assert cfg["rope_scaling"] == {"type": "dynamic", "factor": 2.0} and cfg["tie_word_embeddings"] is False
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(committed_base)
    assert len(set(index["weight_map"].values())) == 2
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in committed_base.values())


def test_pretrain_rows_relate_to_base(committed_base):
    sd = _load(TINY_DIR / PRE)
    V = S.vocab_size
    for ck, base in [("llm.model.tok_embeddings.weight", "model.tok_embeddings.weight"), ("llm.output.weight", "output.weight")]:
        c, b = sd[ck].float(), committed_base[base].float()
        rel = ((c[:V] - b).norm() / b.norm()).item()
        assert 0.005 < rel < 0.05, (ck, rel)  # trained a little, not replaced
        assert not torch.equal(c[:V], b)
        assert c[V:].abs().sum() > 0 and c.shape[0] == V + 4


def test_spec_json():
    info = json.loads((TINY_DIR / "spec.json").read_text())
    assert G.Spec.from_dict(info) == S
    assert json.loads(S.to_json()) == S.to_dict()
    pre, ft = info["checkpoints"][PRE], info["checkpoints"][FT]
    assert pre["num_tensors"] == 17 and pre["stage"] == "pretrain"
    assert pre["architecture"]["intermediate_size"] is None and pre["architecture"]["num_layers"] is None
    assert ft["num_tensors"] == 39 and ft["stage"] == "finetune"
    a = ft["architecture"]
    assert (a["vocab_size"], a["hidden_size"], a["intermediate_size"], a["num_layers"]) == (324, 512, 384, 2)
    assert (a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]) == (4, 2, 128)
    assert a["lora"]["rank"] == 8 and a["lora"]["alpha"] == 256 and a["lora"]["scale"] == 32
    assert info["base"]["vocab_size"] == S.vocab_size < 1000


def test_extra_keys():
    sd = G.finetune_state_dict(S, extra_keys=5)
    assert len(sd) == 39 + 5
    extra = list(sd)[39:]
    assert extra == [f"mask_decoder.layers.{j}.weight" for j in range(5)]


def test_real_spec_shapes_without_materialising():
    R = G.real(32)
    assert R.qkv_size == 6144 and R.clip_in == 6144 and R.feat_in == 6656 and R.query_in == 512
    assert R.ckpt_vocab_size == 92548 and R.lora_scale == 0.5
    assert G.finetune_num_tensors(R) == 339
    assert G.finetune_num_tensors(R, extra_keys=110) == 449


# ----------------------------------------------------------------------------
# (3) containers
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("container", G.CONTAINERS)
def test_containers_round_trip(tmp_path, container):
    sd = G.finetune_state_dict(S, extra_keys=2)
    path = tmp_path / ("ck.safetensors" if container == "safetensors" else "ck" if container == "deepspeed" else "ck.pth")
    G.write_checkpoint(sd, path, container)
    if container == "safetensors":
        back = load_file(str(path))
    elif container == "deepspeed":
        assert (path / "latest").read_text().strip() == "global_step1"
        obj = _load(path / "global_step1" / "mp_rank_00_model_states.pt")
        assert obj["global_steps"] == 1 and obj["buffer_names"] == [] and obj["optimizer"] is None
        assert obj["param_shapes"][0] == {k: v.shape for k, v in sd.items()}
        back = obj["module"]
    else:
        obj = _load(path)
        back = {"module": lambda o: o["module"], "state_dict": lambda o: o["state_dict"]}.get(container, lambda o: o)(obj)
    assert list(back) == list(sd) or container == "safetensors"
    assert set(back) == set(sd)
    for k in sd:
        assert _same(back[k], sd[k]), k


# ----------------------------------------------------------------------------
# (4) tokenizer
# ----------------------------------------------------------------------------


def test_tokenizer():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TINY_DIR / BASE / "tokenizer.model"))
    V = S.vocab_size
    assert sp.get_piece_size() == V
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.id_to_piece(0) == "<unk>" and sp.id_to_piece(1) == "<s>" and sp.id_to_piece(2) == "</s>"
    ids = S.special_token_ids()
    assert ids["<|im_start|>"] == V - 1 and ids["<|im_end|>"] == V - 2 and ids["<|plugin|>"] == V - 6
    for tok in G.CHAT_TOKENS:
        assert sp.encode(tok) == [ids[tok]]
        assert sp.piece_to_id(tok) == ids[tok]
    prompt = "<|im_start|>user\nPlease segment the cat.<|im_end|>\n<|im_start|>assistant\n"
    enc = sp.encode(prompt)
    assert enc[0] == ids["<|im_start|>"] and enc.count(ids["<|im_end|>"]) == 1
    assert 0 not in enc  # no <unk>: newline and the words are in the vocab
    assert sp.decode(enc) == prompt
    tc = json.loads((TINY_DIR / BASE / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "InternLM2Tokenizer"
    assert tc["added_tokens_decoder"][str(V - 1)]["content"] == "<|im_start|>"


# ----------------------------------------------------------------------------
# (5) LoRA and numerics
# ----------------------------------------------------------------------------


def _lora_pairs(sd: dict):
    for k in sd:
        if ".lora_A.default.weight" in k:
            mod = k[: -len(".lora_A.default.weight")]
            yield mod, sd[k].float(), sd[mod + ".lora_B.default.weight"].float()


def test_lora_b_nonzero_and_visible(committed_ft, committed_base):
    p = "llm.base_model.model."
    seen = 0
    for mod, a, b in _lora_pairs(committed_ft):
        assert b.count_nonzero() == b.numel(), mod  # dense, trained B (PEFT initialises B to 0)
        name = mod[len(p):]
        w = committed_ft[p + "output.base_layer.weight"] if name == "output" else committed_base[name + ".weight"]
        rel = (S.lora_scale * (b @ a)).norm() / w.float().norm()
        assert 0.05 <= rel.item() <= 0.2, (mod, rel.item())
        seen += 1
    assert seen == 5 * S.num_layers + 1


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = torch.outer(pos.float(), inv)
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _forward(w: dict, ids: torch.Tensor) -> torch.Tensor:
    """Minimal InternLM2 forward (float32) using the grouped wqkv layout."""
    nh, nkv, hd = S.num_attention_heads, S.num_key_value_heads, S.head_dim
    g = nh // nkv
    T = ids.shape[0]
    pos = torch.arange(T)
    h = w["model.tok_embeddings.weight"][ids]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(S.num_layers):
        q_ = f"model.layers.{i}."
        x = _rms(h, w[q_ + "attention_norm.weight"], S.rms_norm_eps)
        qkv = (x @ w[q_ + "attention.wqkv.weight"].T).view(T, nkv, g + 2, hd)
        q = qkv[:, :, :g].reshape(T, nh, hd).transpose(0, 1)
        k = qkv[:, :, g].transpose(0, 1).repeat_interleave(g, 0)
        v = qkv[:, :, g + 1].transpose(0, 1).repeat_interleave(g, 0)
        q, k = _rope(q, pos, S.rope_theta), _rope(k, pos, S.rope_theta)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        h = h + att.transpose(0, 1).reshape(T, nh * hd) @ w[q_ + "attention.wo.weight"].T
        x = _rms(h, w[q_ + "ffn_norm.weight"], S.rms_norm_eps)
        up = torch.nn.functional.silu(x @ w[q_ + "feed_forward.w1.weight"].T) * (x @ w[q_ + "feed_forward.w3.weight"].T)
        h = h + up @ w[q_ + "feed_forward.w2.weight"].T
    return _rms(h, w["model.norm.weight"], S.rms_norm_eps) @ w["output.weight"].T


def test_forward_is_sane_and_lora_changes_logits(committed_ft, committed_base):
    p = "llm.base_model.model."
    w = {k: v.float() for k, v in committed_base.items()}
    w["model.tok_embeddings.weight"] = committed_ft[p + "model.tok_embeddings.weight"].float()
    w["output.weight"] = committed_ft[p + "output.base_layer.weight"].float()
    ids = torch.tensor([S.vocab_size - 1, 5, 17, 42, 99, S.vocab_size + 0, 7, 3])
    plain = _forward(w, ids)
    assert plain.shape == (len(ids), S.ckpt_vocab_size)
    assert torch.isfinite(plain).all()
    assert 0.3 < plain.std().item() < 10.0
    assert len(set(plain.argmax(-1).tolist())) > 1  # not one constant answer
    merged = dict(w)
    for mod, a, b in _lora_pairs(committed_ft):
        name = mod[len(p):] + ".weight"
        merged[name] = merged[name] + S.lora_scale * (b @ a)
    lora = _forward(merged, ids)
    assert torch.isfinite(lora).all()
    rel = ((lora - plain).norm() / plain.norm()).item()
    assert 0.02 < rel < 1.0, rel
