"""An independent plain-torch InternLM2 forward, written for the tests from InternLM2's
modeling code (not from omgtool): the oracle that merged / exported models are judged by.

wqkv is split the way modeling_internlm2.py does it: view the fused rows as
[kv_heads, g + 2, head_dim] ("b q (h gs d) -> b q h gs d"), q = [:, :g], k = [:, -2], v = [:, -1].

`lora` optionally adds unmerged LoRA paths: {weight_name: (A, B, scale)} applied as
x @ W.T + scale * (x @ A.T) @ B.T, which is what PEFT's Linear does in eval mode.
"""

from __future__ import annotations

import torch


def _rms_norm(x, weight, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * x32


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def internlm2_forward(weights: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor,
                      lora: dict | None = None, inputs_embeds: torch.Tensor | None = None,
                      return_hidden: bool = False):
    """Logits [batch, seq, vocab] in float32 (all math in float32)."""
    lora = lora or {}
    w = {k: v.float() for k, v in weights.items()}
    heads = config["num_attention_heads"]
    kv = config["num_key_value_heads"]
    hidden = config["hidden_size"]
    hd = hidden // heads
    g = heads // kv
    eps = config["rms_norm_eps"]
    theta = config["rope_theta"]

    def linear(x, name):
        y = x @ w[name].T
        if name in lora:
            a, b, scale = lora[name]
            y = y + scale * ((x @ a.float().T) @ b.float().T)
        return y

    x = w["model.tok_embeddings.weight"][input_ids] if inputs_embeds is None else inputs_embeds.float()
    bsz, seq, _ = x.shape
    pos = torch.arange(seq, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    mask = torch.full((seq, seq), float("-inf")).triu(1)

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "attention_norm.weight"], eps)
        qkv = linear(h, p + "attention.wqkv.weight").view(bsz, seq, kv, g + 2, hd)
        q = qkv[:, :, :, :g].reshape(bsz, seq, heads, hd).transpose(1, 2)
        k = qkv[:, :, :, -2].transpose(1, 2)
        v = qkv[:, :, :, -1].transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        att = (q @ k.transpose(-1, -2)) / hd ** 0.5 + mask
        out = (att.softmax(-1) @ v).transpose(1, 2).reshape(bsz, seq, hidden)
        x = x + linear(out, p + "attention.wo.weight")
        h = _rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate = torch.nn.functional.silu(linear(h, p + "feed_forward.w1.weight"))
        up = linear(h, p + "feed_forward.w3.weight")
        x = x + linear(gate * up, p + "feed_forward.w2.weight")
    x = _rms_norm(x, w["model.norm.weight"], eps)
    logits = linear(x, "output.weight")
    return (logits, x) if return_hidden else logits
