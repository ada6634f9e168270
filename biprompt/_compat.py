"""Stand-ins for the two torchvision/timm helpers our model packages import at module level.

`segment-anything` imports `torchvision.transforms.functional.{resize, to_pil_image}` (its
predictor's ResizeLongestSide) and `torchvision.ops.boxes.{batched_nms, box_area}` (its automatic
mask generator); `torchscale` imports `timm.models.layers.drop_path`, and timm itself needs
torchvision. The CPU torch wheel this project installs has no importable torchvision on PyPI, so when
(and only when) the real modules cannot be imported, `install()` registers small stand-ins with the
same behaviour for the calls those packages make:

- `resize(pil_image, [h, w])` is PIL's bilinear resize, exactly what torchvision does for PIL input;
- `to_pil_image(uint8 HxWxC array)` is `PIL.Image.fromarray`;
- `batched_nms` / `box_area` are plain-torch equivalents of torchvision's;
- `drop_path` is stochastic depth as timm defines it (identity at inference).

With a GPU install that has real torchvision and timm, nothing is replaced.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

import numpy as np
import torch

_STANDIN_ORIGIN = "biprompt._compat"


def _module(name: str, **attrs: object) -> types.ModuleType:
    mod = types.ModuleType(name, f"biprompt stand-in for {name}")
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=_STANDIN_ORIGIN)
    mod.__dict__.update(attrs)
    return mod


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # ImportError, or torchvision's RuntimeError on an operator mismatch
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        return False


# --- torchvision stand-ins -------------------------------------------------------------------


def resize(img, size, interpolation=None, max_size=None, antialias=None):
    """PIL-image resize to ``size`` = [h, w] (bilinear), as torchvision does for PIL input."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise TypeError("biprompt's torchvision stand-in resizes PIL images only")
    if isinstance(size, int) or len(size) != 2:
        raise TypeError("biprompt's torchvision stand-in needs size=[h, w]")
    h, w = int(size[0]), int(size[1])
    return img.resize((w, h), Image.BILINEAR if interpolation is None else interpolation)


def to_pil_image(pic, mode=None):
    from PIL import Image

    if isinstance(pic, torch.Tensor):
        pic = pic.detach().cpu().numpy()
    arr = np.asarray(pic)
    if arr.dtype != np.uint8:
        raise TypeError("biprompt's torchvision stand-in converts uint8 arrays only")
    return Image.fromarray(arr, mode=mode)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    order = torch.argsort(scores, descending=True)
    areas = box_area(boxes)
    keep: list[int] = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def batched_nms(boxes, scores, idxs, iou_threshold):
    """Per-category NMS (boxes XYXY), indices sorted by decreasing score, as torchvision's."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    keep = _nms(boxes + offsets[:, None], scores, iou_threshold)
    return keep[torch.argsort(scores[keep], descending=True)]


# --- timm stand-in ---------------------------------------------------------------------------


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Stochastic depth per sample (identity when not training or drop_prob == 0)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


_installed: dict[str, bool] = {}


def install() -> dict[str, bool]:
    """Register stand-ins where the real packages can't be imported. Returns what was replaced."""
    if _installed:
        return dict(_installed)
    _installed["torchvision"] = not _importable("torchvision")
    if _installed["torchvision"]:
        functional = _module("torchvision.transforms.functional", resize=resize,
                             to_pil_image=to_pil_image)
        transforms = _module("torchvision.transforms", functional=functional)
        boxes = _module("torchvision.ops.boxes", batched_nms=batched_nms, box_area=box_area)
        ops = _module("torchvision.ops", boxes=boxes, batched_nms=batched_nms, box_area=box_area)
        root = _module("torchvision", transforms=transforms, ops=ops, __version__="0+biprompt")
        sys.modules.update({
            "torchvision": root, "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
            "torchvision.ops": ops, "torchvision.ops.boxes": boxes,
        })
    _installed["timm"] = not _importable("timm.models.layers")
    if _installed["timm"]:
        layers = _module("timm.models.layers", drop_path=drop_path)
        models = _module("timm.models", layers=layers)
        root = _module("timm", models=models, __version__="0+biprompt")
        sys.modules.update({"timm": root, "timm.models": models, "timm.models.layers": layers})
    return dict(_installed)
