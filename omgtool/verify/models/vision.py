"""The ConvNeXt-L CLIP visual trunk OMG-LLaVA uses, built through open_clip / timm.

`convnext_large_d_320` is taken from open_clip's model config and built with open_clip's
own TimmModel (timm trunk + mlp head), never with a pretrained download. Weights come
from `--vision-weights` (an open_clip state dict, the tower's own state dict, or the
OMG-Seg checkpoint), with keys renamed by `mappings/vision_*.toml`; otherwise the trunk
keeps its random init and the report says so.

Where the projector says the CLIP features have C != 1536 channels (the tiny fixtures:
32), the same timm ConvNeXt family (`convnext_large`: depths 3/3/27/3) is built with its
stage widths scaled so the last stage has C channels, random init, flagged.

Forward as OMG-Seg's OpenCLIPBackbone_omgseg.forward_func: stem, then the four stages;
OMG-LLaVA takes the last stage's output (stride 32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from omgtool.errors import InvalidArgument, MismatchError

OPEN_CLIP_MODEL = "convnext_large_d_320"
REFERENCE_CHANNELS = 1536
STRIDE = 32
KEYMAP = "vision-convnext-large-d-320"


@dataclass
class VisionInfo:
    model: str
    channels: int
    stage_channels: list[int]
    built_with: str
    weights: str  # "random" or the file loaded
    random_init: bool
    reduced_width: bool
    layout: str | None = None
    loaded_keys: int = 0
    ignored_keys: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ReducedTower(nn.Module):
    """A timm ConvNeXt trunk of other widths, under the same `trunk.` name as open_clip's tower."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk


def _open_clip_cfg() -> dict:
    import open_clip

    cfg = open_clip.get_model_config(OPEN_CLIP_MODEL)
    if cfg is None:
        raise InvalidArgument(f"open_clip has no model config {OPEN_CLIP_MODEL!r}")
    return cfg


def build_tower(channels: int = REFERENCE_CHANNELS, device="cpu", dtype=torch.float32) -> tuple[nn.Module, VisionInfo]:
    """The visual tower (random init). channels = the last stage's width the projector expects."""
    cfg = _open_clip_cfg()
    vcfg = cfg["vision_cfg"]
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(0)  # random init is the same from run to run; the caller's RNG is untouched
        return _build(cfg, vcfg, channels, device, dtype)


def _build(cfg, vcfg, channels, device, dtype):
    if channels == REFERENCE_CHANNELS:
        from open_clip.timm_model import TimmModel

        with torch.device(device):
            tower = TimmModel(vcfg["timm_model_name"], cfg["embed_dim"], image_size=vcfg.get("image_size", 224),
                              pool=vcfg.get("timm_pool", ""), proj=vcfg.get("timm_proj", "mlp"),
                              proj_bias=vcfg.get("timm_proj_bias", False), drop=vcfg.get("timm_drop", 0.0),
                              drop_path=vcfg.get("timm_drop_path"), pretrained=False)
        built = f"open_clip {OPEN_CLIP_MODEL} (TimmModel '{vcfg['timm_model_name']}', pretrained=False)"
        reduced = False
    else:
        import timm

        if channels % 8:
            raise MismatchError(f"CLIP channels {channels} are not divisible by 8: no ConvNeXt width plan fits")
        dims = tuple(d * channels // REFERENCE_CHANNELS for d in (192, 384, 768, 1536))
        with torch.device(device):
            trunk = timm.create_model(vcfg["timm_model_name"], pretrained=False, num_classes=0, global_pool="",
                                      dims=dims)
        tower = ReducedTower(trunk)
        built = f"timm '{vcfg['timm_model_name']}' with dims {list(dims)} (reduced width, pretrained=False)"
        reduced = True
    tower = tower.to(dtype=dtype).eval()
    stage_channels = [int(s.blocks[-1].mlp.fc2.out_features) for s in tower.trunk.stages]
    info = VisionInfo(model=OPEN_CLIP_MODEL, channels=stage_channels[-1], stage_channels=stage_channels,
                      built_with=built, weights="random", random_init=True, reduced_width=reduced)
    if reduced:
        info.notes.append(f"CLIP channels {channels} != {REFERENCE_CHANNELS}: reduced-width ConvNeXt "
                          "(same family), random init")
    return tower, info


def trunk_last_stage(tower: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """stem -> stages[0..3]; the last stage's map [b, C, H/32, W/32]."""
    x = tower.trunk.stem(images)
    for stage in tower.trunk.stages:
        x = stage(x)
    return x


def map_keys(keys: list[str], keymap) -> tuple[str, dict[str, str], list[str], list[str]]:
    """(layout, source->target, ignored, unmatched) for the layout that maps the most keys."""
    best = None
    for layout in keymap.layouts:
        mapped: dict[str, str] = {}
        ignored, unmatched = [], []
        rules = sorted(layout.rules, key=lambda r: len(r.source), reverse=True)
        for key in keys:
            rule = next((r for r in rules if key.startswith(r.source)), None)
            if rule is not None:
                mapped[key] = rule.target + key[len(rule.source):]
            elif any(key.startswith(p) for p in layout.ignore):
                ignored.append(key)
            else:
                unmatched.append(key)
        if best is None or len(mapped) > len(best[1]):
            best = (layout.name, mapped, ignored, unmatched)
    return best


def load_vision_weights(tower: nn.Module, info: VisionInfo, path: str | Path) -> VisionInfo:
    """Load trunk (and head) weights from a file, keys renamed by the keymap mapping."""
    from omgtool.formats import open_checkpoint
    from omgtool.arch.mapping import load_registry

    keymap = load_registry().keymap(KEYMAP)
    ckpt = open_checkpoint(path)
    layout, mapped, ignored, unmatched = map_keys(list(ckpt.tensors), keymap)
    if not mapped:
        raise MismatchError(f"no key matches any layout of mappings {KEYMAP} "
                            f"({', '.join(l.name for l in keymap.layouts)})", path)
    own = tower.state_dict()
    state = {}
    for src, dst in mapped.items():
        if dst not in own:
            unmatched.append(src)
            continue
        t = ckpt.read(src)
        if tuple(t.shape) != tuple(own[dst].shape):
            raise MismatchError(f"{src} is {list(t.shape)} but the {info.built_with} tower's {dst} is "
                                f"{list(own[dst].shape)}", path)
        state[dst] = t
    missing_required = [p for p in keymap.required if not any(k.startswith(p) for k in state)]
    missing = [k for k in own if k.startswith("trunk.stem.") or k.startswith("trunk.stages.")]
    missing = [k for k in missing if k not in state]
    if missing_required or missing:
        shown = ", ".join((missing_required or missing)[:5])
        raise MismatchError(f"layout {layout}: trunk weights missing from the file: {shown}"
                            f"{' ...' if len(missing) > 5 else ''}", path)
    tower.load_state_dict(state, strict=False)
    info.weights = str(path)
    info.random_init = False
    info.layout = layout
    info.loaded_keys = len(state)
    info.ignored_keys = len(ignored) + len(unmatched)
    if unmatched:
        info.notes.append(f"{len(unmatched)} keys of {Path(path).name} not used by the tower "
                          f"(e.g. {unmatched[0]})")
    return info
