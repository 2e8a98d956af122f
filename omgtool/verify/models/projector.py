"""OMG-LLaVA's projector and text2vision heads in plain torch.

Same module names as the training code (ProjectorModel_OMG_LLaVA wraps a `model` holding
`query_proj`, `model`, `model_feat`, `seperate_embed`; projector_text2vision is a `model`
Sequential), so the checkpoint's keys load with `strict=True` after stripping the
`projector.model.` / `projector_text2vision.` prefixes.

Projector forward (as Naive_Proj.forward, without the optional cross-attention and
visual-prompt branches the released config does not use):
  clip_feature [b, hw, C*r^2 + 2q] -> model_feat -> [b, hw, hidden]   (grid tokens)
  query_feat   [b, Q, 2q] -> query_proj -> model -> [b, Q, hidden]    (object queries)
  per image: [grid tokens, seperate_embed, queries whose mask covers >= 1 cell]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PROJECTOR_PREFIX = "projector.model."
TEXT2VISION_PREFIX = "projector_text2vision."


def _mlp(in_features: int, hidden: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ProjectorDims:
    hidden_size: int
    shuffled_channels: int  # C * ratio^2
    query_in_channels: int  # 2 * query_channels (query feature ++ query position)
    feat_in_channels: int  # shuffled + query_in


class OmgProjector(nn.Module):
    """Naive_Proj of ProjectorModel_OMG_LLaVA (depth 2, GELU, bias)."""

    def __init__(self, dims: ProjectorDims, depth: int = 2):
        super().__init__()
        self.dims = dims
        self.query_proj = nn.Linear(dims.query_in_channels, dims.shuffled_channels)
        self.model = _mlp(dims.shuffled_channels, dims.hidden_size, depth)
        self.model_feat = _mlp(dims.feat_in_channels, dims.hidden_size, depth)
        self.seperate_embed = nn.Embedding(1, dims.hidden_size)

    def forward(self, clip_feature: torch.Tensor, query_feat: torch.Tensor,
                attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """clip_feature [b, hw, feat_in], query_feat [b, Q, query_in], attention_mask [b, Q, hw]
        (True = the query does not own that cell). Returns per image [hw + 1 + valid, hidden]."""
        valid = attention_mask.sum(dim=-1) < attention_mask.shape[-1]  # [b, Q]
        queries = self.model(self.query_proj(query_feat))
        grid = self.model_feat(clip_feature)
        return [torch.cat([g, self.seperate_embed.weight, q[keep]], dim=0)
                for g, q, keep in zip(grid, queries, valid)]


class Text2Vision(nn.Module):
    """projector_text2vision: Linear(hidden -> d), GELU, Linear(d -> d)."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(hidden_size, out_features), nn.GELU(),
                                   nn.Linear(out_features, out_features))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model(hidden)


def _sub_state(ckpt, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: ckpt.read(k) for k in ckpt.tensors if k.startswith(prefix)}


def load_projector(ckpt, dtype: torch.dtype = torch.float32, device="cpu",
                   prefix: str = PROJECTOR_PREFIX) -> OmgProjector:
    """Build the projector from a checkpoint holding `projector.model.*` keys (shapes give the dims)."""
    state = _sub_state(ckpt, prefix)
    if "query_proj.weight" not in state or "model_feat.0.weight" not in state:
        raise KeyError(f"no projector weights under {prefix!r}")
    shuffled, query_in = state["query_proj.weight"].shape
    hidden, feat_in = state["model_feat.0.weight"].shape
    depth = sum(1 for k in state if k.startswith("model.") and k.endswith(".weight"))  # Linears
    module = OmgProjector(ProjectorDims(hidden, shuffled, query_in, feat_in), depth=max(depth, 1))
    module.load_state_dict(state, strict=True)
    return module.to(device=device, dtype=dtype).eval()


def load_text2vision(ckpt, dtype: torch.dtype = torch.float32, device="cpu",
                     prefix: str = TEXT2VISION_PREFIX) -> Text2Vision:
    state = _sub_state(ckpt, prefix)
    if "model.0.weight" not in state:
        raise KeyError(f"no text2vision weights under {prefix!r}")
    out_features, hidden = state["model.0.weight"].shape
    module = Text2Vision(hidden, out_features)
    module.load_state_dict(state, strict=True)
    return module.to(device=device, dtype=dtype).eval()
