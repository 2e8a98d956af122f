"""Image preprocessing as OMG-LLaVA trains it.

The finetune config's CLIPImageProcessor (size 1024, bicubic, center crop 1024, rescale,
CLIP mean/std) after xtuner's `expand2square` padding with the mean colour:
pad to a square (image centred), resize to 1024x1024 bicubic, scale to [0, 1],
normalise with the CLIP mean and std.
"""

from __future__ import annotations

from pathlib import Path

CLIP_MEAN = (0.4814, 0.4578, 0.4082)
CLIP_STD = (0.2686, 0.2613, 0.2757)
IMAGE_SIZE = 1024


def test_image(width: int = 640, height: int = 480):
    """A deterministic, non-square RGB test image (gradients, a disc, stripes): no file needed."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 127.5 * np.sin(x / 17.0) * np.cos(y / 23.0)
    disc = (x - 0.6 * width) ** 2 + (y - 0.45 * height) ** 2 < (0.2 * height) ** 2
    r[disc], g[disc], b[disc] = 240, 40, 40
    stripes = (x.astype(int) // 32) % 2 == 0
    b[(y > 0.8 * height) & stripes] = 0
    arr = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def load_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    from omgtool.errors import UnreadableInput

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise UnreadableInput("no such image file", path) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UnreadableInput(f"not a readable image ({exc})", path) from None


def expand2square(img, background: tuple[int, int, int]):
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess(img, size: int = IMAGE_SIZE, mean=CLIP_MEAN, std=CLIP_STD):
    """PIL RGB image -> float32 tensor [1, 3, size, size]."""
    import numpy as np
    import torch
    from PIL import Image

    img = expand2square(img.convert("RGB"), tuple(int(m * 255) for m in mean))
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)
