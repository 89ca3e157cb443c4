"""Detection transforms built from ``torchvision.transforms.v2`` (boxes travel as ``tv_tensors.BoundingBoxes``).

Every transform returned here is a callable
``(image: PIL.Image, boxes: BoundingBoxes (N, 4) XYXY absolute, labels: (N,) int64)
-> (image: (3, H, W) float32 normalised, boxes: BoundingBoxes (M, 4) XYXY absolute, labels: (M,) int64)``.
Training transforms may drop boxes (and their labels) that a crop leaves degenerate, so ``M <= N``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DetectionTransform",
    "RandomSizeCrop",
    "ResizeShortestSide",
    "build_transforms",
    "default_transforms",
    "shortest_side_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DETR's defaults for the crop branch (resize to one of these, crop 384..600, resize again).
_DETR_CROP_SCALES = (400, 500, 600)


class RandomSizeCrop(v2.Transform):
    """Crop a random region with width and height each uniform in ``[min_size, max_size]``.

    Sizes are capped by the image size (and ``min_size`` too, so small images never fail); the position is
    uniform. Boxes are shifted and clamped to the crop by torchvision; degenerate ones are removed later by
    ``SanitizeBoundingBoxes``. This is DETR's ``RandomSizeCrop``.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_w = _randint(min(self.min_size, width), min(self.max_size, width))
        crop_h = _randint(min(self.min_size, height), min(self.max_size, height))
        top = _randint(0, height - crop_h)
        left = _randint(0, width - crop_w)
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class ResizeShortestSide(v2.Transform):
    """Deterministic resize: shorter side to ``size``, then shrink so the longer side is ``<= max_size``.

    Unlike ``v2.Resize(size, max_size=...)`` it accepts ``max_size == size`` (square images at full size).
    Output sizes are rounded to the nearest pixel.
    """

    def __init__(self, size: int, max_size: int | None = None) -> None:
        super().__init__()
        self.size = size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"size": shortest_side_size(height, width, self.size, self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=list(params["size"]), antialias=True)


def shortest_side_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output ``(h, w)`` of resizing the shorter side to ``size`` with the longer side capped at ``max_size``."""
    scale = size / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class DetectionTransform:
    """Adapter from ``(image, boxes, labels)`` to a ``v2`` pipeline working on a dict.

    The dict lets ``SanitizeBoundingBoxes`` find the labels (key ``"labels"``) and drop them with their boxes.
    """

    def __init__(self, pipeline: v2.Transform) -> None:
        self.pipeline = pipeline

    def __call__(
        self, image: Image.Image | torch.Tensor, boxes: tv_tensors.BoundingBoxes, labels: torch.Tensor
    ) -> tuple[torch.Tensor, tv_tensors.BoundingBoxes, torch.Tensor]:
        """image: PIL or (3, H, W); boxes: (N, 4) XYXY absolute; labels: (N,) -> transformed triple."""
        out = self.pipeline({"image": image, "boxes": boxes, "labels": labels})
        return out["image"], out["boxes"], out["labels"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r})"


def _finish() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]


def default_transforms() -> DetectionTransform:
    """No geometric change: ``ToImage``, float in [0, 1], ImageNet normalisation."""
    return DetectionTransform(v2.Compose([v2.ToImage(), *_finish()]))


def build_transforms(
    train: bool,
    scales: Sequence[int],
    max_size: int,
    crop: bool = True,
    crop_scales: Sequence[int] | None = None,
    crop_min: int = 384,
    crop_max: int = 600,
    flip: bool = True,
    eval_size: int | None = None,
) -> DetectionTransform:
    """DETR-style augmentation (train) or a fixed resize (eval).

    Train: ``RandomHorizontalFlip`` (if ``flip``), then with equal chance either resize the shorter side to a
    random value of ``scales`` (longer side ``<= max_size``) or [resize the shorter side to a random value of
    ``crop_scales``, ``RandomSizeCrop(crop_min, crop_max)``, resize as in the first branch] (if ``crop``);
    then degenerate boxes are removed with their labels, and the image is converted to float and normalised.
    ``crop_scales=None`` means DETR's ``[400, 500, 600]`` (matching the ``384..600`` crop defaults); set all
    three for small images, e.g. ``crop_scales=[96, 112, 128], crop_min=64, crop_max=128``.

    Eval: shorter side to ``eval_size`` (``data.image_size``; None: ``max(scales)``), longer side
    ``<= max_size``, float, normalised.
    """
    scales = [int(s) for s in scales]
    if not scales or min(scales) < 1 or max_size < 1:
        raise ValueError(
            f"scales must be positive and non-empty and max_size positive, got {scales}, {max_size}"
        )
    steps: list[v2.Transform] = [v2.ToImage()]
    if train:
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        resize = v2.RandomShortestSize(min_size=scales, max_size=max_size)
        if crop:
            crop_branch = v2.Compose(
                [
                    v2.RandomShortestSize(min_size=list(crop_scales or _DETR_CROP_SCALES)),
                    RandomSizeCrop(crop_min, crop_max),
                    v2.RandomShortestSize(min_size=scales, max_size=max_size),
                ]
            )
            steps.append(v2.RandomChoice([resize, crop_branch]))
        else:
            steps.append(resize)
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    else:
        if eval_size is not None and eval_size < 1:
            raise ValueError(f"eval_size must be positive, got {eval_size}")
        steps.append(ResizeShortestSide(eval_size or max(scales), max_size))
    return DetectionTransform(v2.Compose(steps + _finish()))


def _randint(low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` from torch's RNG (seeded per DataLoader worker)."""
    if high <= low:
        return low
    return int(torch.randint(low, high + 1, ()))
