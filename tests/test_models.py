"""omgtool/models: each piece against an oracle written here from the spec (omg-llava.md and
OMG-Seg's training code), transformers/PEFT, or the plain-torch InternLM2 forward
(tests/reference_internlm2.py) — never against omgtool's own code path."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.reference_internlm2 import internlm2_forward
from tests.verify_helpers import TINY_BASE, TINY_FINETUNE, TINY_PRETRAIN, load_base, load_ckpt


# --- pixel shuffle ------------------------------------------------------------------------------

def shuffle_oracle(x: torch.Tensor, r: int) -> torch.Tensor:
    """From the spec, element by element: out[b, (rh*r + rw)*C + c, i, j] = x[b, c, i*r + rh, j*r + rw]
    (channel order (rh, rw, c), as reshape (b,c,h/2,2,w/2,2) + permute (0,3,5,1,2,4) + flatten 1..3)."""
    b, c, h, w = x.shape
    out = torch.empty(b, r * r * c, h // r, w // r, dtype=x.dtype)
    for rh in range(r):
        for rw in range(r):
            for ch in range(c):
                out[:, (rh * r + rw) * c + ch] = x[:, ch, rh::r, rw::r]
    return out


def test_pixel_shuffle_matches_training_channel_order():
    from omgtool.verify.models.pixel_shuffle import grid_tokens, pixel_shuffle

    x = torch.randn(2, 6, 8, 4, generator=torch.Generator().manual_seed(1))
    got = pixel_shuffle(x, 2)
    assert got.shape == (2, 24, 4, 2)
    assert torch.equal(got, shuffle_oracle(x, 2))
    # grid tokens: row-major cells, channels last
    tokens = grid_tokens(got)
    assert tokens.shape == (2, 8, 24)
    assert torch.equal(tokens[1, 1 * 2 + 1], got[1, :, 1, 1])


def test_pixel_shuffle_channel_order_mistakes_are_caught():
    """torch's pixel_unshuffle ((c, rh, rw) order) and a (rw, rh, c) permutation hold the same numbers
    in another order: the oracle tells them apart, and the projector's first layer sees different
    inputs (its output changes), so a wrong order cannot pass as right."""
    from omgtool.verify.models.pixel_shuffle import pixel_shuffle

    x = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    right = shuffle_oracle(x, 2)
    unshuffle = F.pixel_unshuffle(x, 2)  # (c, rh, rw)
    swapped = x.reshape(1, 8, 2, 2, 2, 2).permute(0, 5, 3, 1, 2, 4).flatten(1, 3)  # (rw, rh, c)
    for wrong in (unshuffle, swapped):
        assert torch.equal(wrong.sort(dim=1).values, right.sort(dim=1).values)  # same numbers
        assert not torch.equal(wrong, right)
        assert not torch.equal(pixel_shuffle(x, 2), wrong)
    layer = torch.nn.Linear(32, 16)
    cells = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731
    assert (layer(cells(right)) - layer(cells(unshuffle))).abs().max() > 1e-2


def test_pixel_shuffle_rejects_odd_maps():
    from omgtool.verify.models.pixel_shuffle import pixel_shuffle

    with pytest.raises(ValueError):
        pixel_shuffle(torch.zeros(1, 2, 5, 4), 2)


# --- projector and text2vision ------------------------------------------------------------------

def _read_pth(path):
    from omgtool.formats import open_checkpoint

    return open_checkpoint(path)


@pytest.mark.parametrize("path", [TINY_PRETRAIN, TINY_FINETUNE])
def test_projector_against_functional_oracle(path):
    from omgtool.verify.models.projector import load_projector, load_text2vision

    sd = load_ckpt(path)
    ckpt = _read_pth(path)
    proj = load_projector(ckpt)
    t2v = load_text2vision(ckpt)
    p = lambda n: sd[f"projector.model.{n}"].float()  # noqa: E731
    g = torch.Generator().manual_seed(3)
    hw, q = 6, 5
    clip_feature = torch.randn(1, hw, p("model_feat.0.weight").shape[1], generator=g)
    queries = torch.randn(1, q, p("query_proj.weight").shape[1], generator=g)
    attn_mask = torch.ones(1, q, hw, dtype=torch.bool)
    attn_mask[0, 0, :3] = False  # query 0 owns cells 0-2, query 3 owns cell 5; 1, 2, 4 own nothing
    attn_mask[0, 3, 5] = False
    with torch.no_grad():
        got = proj(clip_feature, queries, attn_mask)[0]
        mlp = lambda x, n: F.linear(F.gelu(F.linear(x, p(f"{n}.0.weight"), p(f"{n}.0.bias"))),  # noqa: E731
                                    p(f"{n}.2.weight"), p(f"{n}.2.bias"))
        grid = mlp(clip_feature[0], "model_feat")
        qs = mlp(F.linear(queries[0], p("query_proj.weight"), p("query_proj.bias")), "model")
        want = torch.cat([grid, p("seperate_embed.weight"), qs[[0, 3]]])
        assert got.shape == (hw + 1 + 2, p("model.2.weight").shape[0])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        h = torch.randn(3, t2v.model[0].in_features, generator=g)
        tv = lambda n: sd[f"projector_text2vision.model.{n}"].float()  # noqa: E731
        want_t = F.linear(F.gelu(F.linear(h, tv("0.weight"), tv("0.bias"))), tv("2.weight"), tv("2.bias"))
        torch.testing.assert_close(t2v(h), want_t, rtol=1e-5, atol=1e-5)
        assert t2v(h).shape == (3, 32)


# --- preprocessing ------------------------------------------------------------------------------

def test_preprocess_pads_to_square_resizes_and_normalizes():
    import numpy as np
    from PIL import Image

    from omgtool.verify.models.preprocess import CLIP_MEAN, CLIP_STD, preprocess, test_image

    a, b = test_image(), test_image()
    assert a.size == (640, 480) and np.array_equal(np.asarray(a), np.asarray(b))  # deterministic
    x = preprocess(a, size=64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    # 640x480 padded to 640x640 with the mean colour: rows above the image are (int(255 m)/255 - m) / s
    pad = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(x[0, :, 0, 0], pad, atol=1e-6, rtol=0)
    torch.testing.assert_close(x[0, :, 63, 32], pad, atol=1e-6, rtol=0)
    # a square image is only resized: compare against PIL + the formula
    sq = Image.fromarray(np.full((10, 10, 3), (200, 100, 50), dtype=np.uint8))
    y = preprocess(sq, size=16)
    want = torch.tensor([(v / 255 - m) / s for v, m, s in zip((200, 100, 50), CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(y[0, :, 5, 5], want, atol=1e-5, rtol=0)


def test_load_image_errors(tmp_path):
    from omgtool.errors import UnreadableInput
    from omgtool.verify.models.preprocess import load_image

    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UnreadableInput):
        load_image(bad)
    with pytest.raises(UnreadableInput):
        load_image(tmp_path / "missing.png")


# --- tokenizer ----------------------------------------------------------------------------------

def test_chat_tokenizer_against_sentencepiece(tmp_path):
    import sentencepiece as spm

    from omgtool.verify.models.chat import IMAGE_TOKEN_INDEX, ChatTokenizer, chat_prompt
    from tests.verify_helpers import write_tokenizer

    write_tokenizer(TINY_BASE, tmp_path, 320)
    tok = ChatTokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(TINY_BASE / "tokenizer.model"))
    spec = json.loads((TINY_BASE.parent / "spec.json").read_text())["derived"]["special_token_ids"]
    text = chat_prompt("<image>\nWhat is this?", "It is [SEG].")
    ids = tok.encode(text)
    want = [1, spec["<|im_start|>"], *sp.encode("user\n"), IMAGE_TOKEN_INDEX, *sp.encode("\nWhat is this?"),
            spec["<|im_end|>"], *sp.encode("\n"), spec["<|im_start|>"], *sp.encode("assistant\n"),
            *sp.encode("It is "), spec["[SEG]"], *sp.encode(".")]
    assert ids == want
    assert tok.token_id("<mark>") == 324 and len(tok) == 325
    assert ChatTokenizer(TINY_BASE).token_id("[SEG]") is None  # the base tokenizer has no [SEG]


# --- vision tower ---------------------------------------------------------------------------------

def test_reduced_width_tower_and_weight_layouts(tmp_path):
    """A reduced-width ConvNeXt for the tiny projector; weights saved in the open_clip layout and in
    the OMG-Seg checkpoint layout load back (keys renamed by the mapping) and reproduce the features."""
    from safetensors.torch import save_file

    from omgtool.verify.models.vision import build_tower, load_vision_weights, trunk_last_stage

    tower, info = build_tower(32)
    assert info.reduced_width and info.random_init and info.stage_channels == [4, 8, 16, 32]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for p in tower.parameters():  # make every parameter matter (ConvNeXt's layer scale starts at 1e-6)
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        want = trunk_last_stage(tower, x)
    assert want.shape == (1, 32, 2, 2)
    sd = tower.state_dict()
    open_clip_sd = {f"visual.{k}": v.clone() for k, v in sd.items()}
    open_clip_sd["text_projection"] = torch.zeros(4, 4)
    save_file(open_clip_sd, str(tmp_path / "open_clip.safetensors"))
    omg = {}
    for k, v in sd.items():
        k = k.replace("trunk.stem.", "backbone.stem.")
        for i in range(4):
            k = k.replace(f"trunk.stages.{i}.", f"backbone.layer{i + 1}.")
        omg[k.replace("trunk.head.", "backbone.head.0.")] = v.clone()
    omg["panoptic_head.query_feat.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": omg, "meta": {"epoch": 1}}, tmp_path / "omg_seg.pth")
    for name, layout in (("open_clip.safetensors", "open_clip"), ("omg_seg.pth", "omg_seg")):
        fresh, finfo = build_tower(32)
        finfo = load_vision_weights(fresh, finfo, tmp_path / name)
        assert not finfo.random_init and finfo.layout == layout and finfo.ignored_keys == 1
        with torch.no_grad():
            torch.testing.assert_close(trunk_last_stage(fresh, x), want, rtol=0, atol=0)


def test_vision_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    from omgtool.errors import MismatchError
    from omgtool.verify.models.vision import build_tower, load_vision_weights

    small, _ = build_tower(32)
    save_file({f"visual.{k}": v for k, v in small.state_dict().items()}, str(tmp_path / "w.safetensors"))
    other, info = build_tower(64)
    with pytest.raises(MismatchError, match="is \\["):
        load_vision_weights(other, info, tmp_path / "w.safetensors")
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(MismatchError, match="no key matches"):
        load_vision_weights(other, info, tmp_path / "junk.safetensors")


def test_full_size_tower_is_open_clip_convnext_large():
    """channels 1536: open_clip's own convnext_large_d_320 vision tower (no download), whose trunk
    state dict equals timm's convnext_large (the family the reduced towers are built from)."""
    import timm

    from omgtool.verify.models.vision import build_tower

    tower, info = build_tower(1536)
    assert not info.reduced_width and info.stage_channels == [192, 384, 768, 1536]
    assert "open_clip convnext_large_d_320" in info.built_with
    ref = timm.create_model("convnext_large", pretrained=False, num_classes=0, global_pool="")
    got = {k: tuple(v.shape) for k, v in tower.trunk.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


# --- LLM builders -----------------------------------------------------------------------------------

IDS = [1, 319, 164, 283, 20, 18, 5, 242, 318, 283, 319, 165, 283]


def test_internlm2_folder_becomes_llama_with_oracle_logits():
    from omgtool.verify.models.llm import Placement, load_llm

    model, info = load_llm(TINY_BASE, torch.float32, Placement("cpu"))
    assert info.layout == "internlm2" and info.vocab_size == 320 and type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        got = model(input_ids=torch.tensor([IDS])).logits
    want = internlm2_forward(load_base(), json.loads((TINY_BASE / "config.json").read_text()), torch.tensor([IDS]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_reference_is_base_plus_unmerged_lora():
    """PEFT LoRA layers on the Llama layout (wqkv B split by the grouped rows, A shared) equal the
    InternLM2 oracle with the LoRA applied unmerged on the fused wqkv."""
    from omgtool.formats import open_checkpoint
    from omgtool.arch.infer import analyze
    from omgtool.verify.models.llm import Placement
    from omgtool.verify.models.reference import build_reference

    ad = open_checkpoint(TINY_FINETUNE)
    model, info, _ = build_reference(TINY_BASE, ad, analyze(ad), torch.float32, Placement("cpu"))
    assert info.scale == 32.0 and info.lora_pairs == 11 and info.lora_modules == 15 and info.vocab_size == 324
    sd = load_ckpt(TINY_FINETUNE)
    w = load_base()
    pre = "llm.base_model.model."
    w["model.tok_embeddings.weight"] = sd[pre + "model.tok_embeddings.weight"]
    w["output.weight"] = sd[pre + "output.base_layer.weight"]
    lora = {k[len(pre):].split(".lora_A.")[0] + ".weight": (a, sd[k.replace("lora_A", "lora_B")], 256 / 8)
            for k, a in sd.items() if ".lora_A." in k}
    ids = torch.tensor([IDS + [320, 321]])
    cfg = json.loads((TINY_BASE / "config.json").read_text())
    with torch.no_grad():
        got = model(input_ids=ids).logits
        with model.disable_adapter():
            base_only = model(input_ids=ids).logits
    torch.testing.assert_close(got, internlm2_forward(w, cfg, ids, lora=lora), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(base_only, internlm2_forward(w, cfg, ids), rtol=1e-4, atol=1e-4)


def test_device_map_split_gives_the_unsplit_logits(tmp_path):
    """--device-map auto with a max_memory limit: accelerate places part of the tiny model on the CPU
    and offloads the rest to disk; the logits equal the unsplit run (InternLM2 in memory, and a Llama
    folder through from_pretrained)."""
    from omgtool.verify.models.llm import Placement, load_llm
    from tests.verify_helpers import build_merged

    llama = build_merged(tmp_path / "llama", layout="llama")
    ids = torch.tensor([IDS])
    for folder in (TINY_BASE, llama):
        whole, _ = load_llm(folder, torch.float32, Placement("cpu"))
        place = Placement("cpu", device_map="auto", max_memory={"cpu": 8_000_000},
                          offload_folder=str(tmp_path / "offload"))
        split, info = load_llm(folder, torch.float32, place)
        devices = set((info.device_map or {}).values())
        assert {"cpu", "disk"} <= devices, info.device_map
        with torch.no_grad():
            torch.testing.assert_close(split(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=0, atol=0)
        place.cleanup()
        assert not any((tmp_path / "offload").iterdir())
