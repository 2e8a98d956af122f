"""Pixel shuffle as OMG-LLaVA trains it (OMGSegVisualEncoder.pixel_shuffle_feat).

A [b, c, h, w] feature map becomes [b, r*r*c, h/r, w/r] with the channel order
(rh, rw, c): reshape to (b, c, h/r, r, w/r, r), permute (0, 3, 5, 1, 2, 4), flatten
dims 1..3. Note this is *not* torch.nn.functional.pixel_unshuffle, whose channel order
is (c, rh, rw): the projector's first Linear was trained on the (rh, rw, c) order, so
any other order feeds it permuted inputs.
"""

from __future__ import annotations


def pixel_shuffle(feat, ratio: int = 2):
    """[b, c, h, w] -> [b, ratio*ratio*c, h/ratio, w/ratio], channel order (rh, rw, c)."""
    if ratio == 1:
        return feat
    b, c, h, w = feat.shape
    if h % ratio or w % ratio:
        raise ValueError(f"feature map {h}x{w} is not divisible by the pixel shuffle ratio {ratio}")
    feat = feat.reshape(b, c, h // ratio, ratio, w // ratio, ratio)
    feat = feat.permute(0, 3, 5, 1, 2, 4)  # (b, rh, rw, c, h/r, w/r)
    return feat.flatten(1, 3)


def grid_tokens(feat):
    """[b, C, h, w] -> [b, h*w, C] (row-major cells), as llava_visual_feat flattens them."""
    return feat.flatten(2).permute(0, 2, 1)
