"""Draw detections on an image (PIL only: default font, nothing downloaded)."""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["class_color", "draw_detections"]


def class_color(name: str) -> tuple[int, int, int]:
    """A deterministic, saturated RGB colour for a class name (same on every run and machine)."""
    digest = hashlib.md5(name.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536.0
    value = 0.75 + 0.25 * digest[2] / 255.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``bg``."""
    luma = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luma > 150 else (255, 255, 255)


def draw_detections(
    image: Image.Image,
    boxes_xyxy: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[str],
    scores: Sequence[float] | torch.Tensor | np.ndarray,
    score_threshold: float = 0.0,
    line_width: int | None = None,
) -> Image.Image:
    """A copy of ``image`` (RGB) with boxes and ``"name 0.87"`` captions drawn on it.

    Args:
        image: any PIL image; it is not modified.
        boxes_xyxy: ``(N, 4)`` absolute ``xyxy`` pixels.
        labels: ``N`` class names (the colour is a hash of the name, see :func:`class_color`).
        scores: ``(N,)`` confidences.
        score_threshold: only detections with ``score >= score_threshold`` are drawn.
        line_width: box outline width in pixels; default scales with the image
            (``max(1, min(W, H) // 200)``).

    Returns:
        A new RGB image of the same size.

    Raises:
        ValueError: ``boxes_xyxy``, ``labels`` and ``scores`` disagree in length, or boxes
            are not ``(N, 4)``.
    """
    if not isinstance(boxes_xyxy, torch.Tensor):
        boxes_xyxy = torch.from_numpy(np.asarray(boxes_xyxy, dtype=np.float64))
    boxes = boxes_xyxy.detach().to("cpu", torch.float64)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"draw_detections: boxes must be (N, 4), got {tuple(boxes.shape)}")
    score_list = [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    if not (boxes.shape[0] == len(labels) == len(score_list)):
        raise ValueError(
            f"draw_detections: {boxes.shape[0]} boxes, {len(labels)} labels and {len(score_list)} scores"
        )

    out = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(out)
    width = line_width if line_width is not None else max(1, min(out.size) // 200)
    for (x0, y0, x1, y1), name, score in zip(boxes.tolist(), labels, score_list):
        if score < score_threshold:
            continue
        color = class_color(name)
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        caption = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption)
        tw, th = right - left, bottom - top
        # Caption above the box when there is room, else just inside its top edge.
        ty = y0 - th - 2 if y0 - th - 2 >= 0 else y0
        tx = min(max(x0, 0), max(out.width - tw - 2, 0))
        draw.rectangle((tx, ty, tx + tw + 2, ty + th + 2), fill=color)
        draw.text((tx + 1 - left, ty + 1 - top), caption, fill=_text_color(color))
    return out
