"""The visual tokens of one image, as OMG-LLaVA forms them: synthesized object queries (no OMG-Seg
panoptic head), trunk -> pixel shuffle -> grid ++ per-pixel prior -> projector, spliced into the
text embeddings at <image>."""

from __future__ import annotations

from typing import Any


def synthesize_queries(num_queries: int, query_in: int, h: int, w: int, seed: int):
    """Object queries, their masks and the per-pixel prior, as OMG-Seg's panoptic_postprocess forms
    them, from synthetic (seeded) query features, class scores and mask logits.

    Returns (query_pos_feat [1, Q, query_in], pixel_prior [1, h*w, query_in], attn_mask [1, Q, h*w]).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    query_pos_feat = torch.randn(num_queries, query_in, generator=g)
    scores = torch.rand(num_queries, generator=g)
    mask_logits = torch.randn(num_queries, h, w, generator=g) * 2.0
    prob = (scores.view(-1, 1, 1) * 0.5 + 0.5) * mask_logits.sigmoid()  # smooth_ratio 0.5
    mask_ids = prob.argmax(0)  # [h, w]
    pixel_prior = prob.softmax(dim=0).permute(1, 2, 0) @ query_pos_feat  # [h, w, query_in]
    attn_mask = (mask_ids.unsqueeze(0) != torch.arange(num_queries).view(-1, 1, 1)).flatten(1)  # [Q, hw]
    return query_pos_feat.unsqueeze(0), pixel_prior.reshape(1, h * w, query_in), attn_mask.unsqueeze(0)


def visual_tokens(tower, projector, pixels, ratio: int, num_queries: int, query_in: int, seed: int,
                  timed=None) -> dict[str, Any]:
    """image -> trunk last stage -> pixel shuffle -> grid ++ per-pixel prior -> projector.

    Returns the intermediates and `visual` [grid + 1 + valid queries, hidden] for one image.
    """
    import contextlib

    import torch

    from omgtool.verify.models.pixel_shuffle import grid_tokens, pixel_shuffle
    from omgtool.verify.models.vision import trunk_last_stage

    timed = timed or (lambda name: contextlib.nullcontext())
    with timed("forward_vision"):
        feat = trunk_last_stage(tower, pixels)
    shuffled = pixel_shuffle(feat, ratio)
    grid = grid_tokens(shuffled)
    queries, prior, attn_mask = synthesize_queries(num_queries, query_in, shuffled.shape[-2], shuffled.shape[-1],
                                                   seed)
    clip_feature = torch.cat([grid, prior.to(grid.device, grid.dtype)], dim=-1)
    with timed("forward_projector"):
        visual = projector(clip_feature, queries.to(grid.device, grid.dtype), attn_mask.to(grid.device))[0]
    return {"feat": feat, "shuffled": shuffled, "grid": grid, "queries": queries, "prior": prior,
            "attn_mask": attn_mask, "clip_feature": clip_feature, "visual": visual,
            "valid_queries": int((attn_mask.sum(-1) < attn_mask.shape[-1]).sum())}


def splice_image(text_emb, visual, pos: int):
    """Text embeddings [T, H] with the visual tokens [N, H] inserted at `pos` -> [1, T + N, H]."""
    import torch

    visual = visual.to(text_emb.device, text_emb.dtype)
    return torch.cat([text_emb[:pos], visual, text_emb[pos:]], dim=0).unsqueeze(0)
