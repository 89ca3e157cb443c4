"""Pictures of the data before training: ``labels.png`` (label statistics) and ``train_batch.png``.

``labels.png`` is a matplotlib figure (object-oriented API, Agg, no display): boxes per class, box width
vs height after the resize, box centres, and a histogram of box sizes with the model's finest stride
marked. ``train_batch.png`` is drawn with PIL: each image of a batch as the model receives it (after
augmentation and padding, de-normalised), with its boxes and class names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from oddetr.box_ops import cxcywh_to_xyxy
from oddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oddetr.visualize import class_color

__all__ = ["batch_to_pil", "plot_labels", "plot_train_batch"]

_MAX_POINTS = 20_000  # scatter plots subsample beyond this many boxes
_PAD_COLOUR = (40, 40, 40)


def plot_labels(arrays: dict[str, np.ndarray], class_names: Sequence[str], path: str | Path,
                image_size: int, finest_stride: int) -> Path:
    """Write the label statistics of one split to ``path`` (PNG).

    ``arrays``: :func:`oddetr.data.summary.box_arrays` output (``labels`` (M,), ``wh_resized`` (M, 2) px,
    ``centres`` (M, 2) in [0, 1]).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    labels, wh, centres = arrays["labels"], arrays["wh_resized"], arrays["centres"]
    fig = Figure(figsize=(10, 8), dpi=90)  # fixed margins: constrained layout would double the drawing time
    axes = fig.subplots(2, 2, gridspec_kw={"left": 0.08, "right": 0.98, "bottom": 0.07, "top": 0.96,
                                           "wspace": 0.25, "hspace": 0.38 if len(class_names) > 6 else 0.28})
    counts = np.bincount(labels, minlength=len(class_names)) if labels.size else np.zeros(len(class_names))
    colours = [tuple(c / 255 for c in class_color(n)) for n in class_names]
    ax = axes[0, 0]
    ax.bar(range(len(class_names)), counts, color=colours)
    if len(class_names) <= 30:
        many = len(class_names) > 6
        ax.set_xticks(range(len(class_names)), class_names, rotation=45 if many else 0,
                      ha="right" if many else "center", rotation_mode="anchor", fontsize=8 if many else None)
    ax.set_ylabel("boxes")
    ax.set_title(f"boxes per class ({labels.size} boxes)")

    pick = _subsample(labels.size)
    ax = axes[0, 1]
    ax.scatter(wh[pick, 0], wh[pick, 1], s=4, alpha=0.3, c=[colours[i] for i in labels[pick]], linewidths=0)
    ax.axvline(finest_stride, color="k", ls="--", lw=0.8)
    ax.axhline(finest_stride, color="k", ls="--", lw=0.8)
    if labels.size:
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("box width (px, resized)")
    ax.set_ylabel("box height (px, resized)")
    ax.set_title(f"width x height at data.image_size={image_size}")

    ax = axes[1, 0]
    ax.scatter(centres[pick, 0], centres[pick, 1], s=5, alpha=0.5, c=[colours[i] for i in labels[pick]],
               linewidths=0)
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("centre x / image width")
    ax.set_ylabel("centre y / image height")
    ax.set_title("box centres")

    ax = axes[1, 1]
    size = np.sqrt(np.prod(wh, axis=1))
    if size.size:
        low, high = max(size.min(), 0.5), max(size.max(), 1.0)
        bins = np.geomspace(low, high * 1.001, 40) if high > low else 10
        ax.hist(size, bins=bins, color="tab:blue")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.axvline(float(np.median(size)), color="tab:orange", lw=1.2, label=f"median {np.median(size):.1f} px")
    ax.axvline(finest_stride, color="k", ls="--", lw=0.8, label=f"finest stride {finest_stride} px")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("box size sqrt(w*h) (px, resized)")
    ax.set_ylabel("boxes")
    ax.set_title("box sizes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _subsample(n: int) -> np.ndarray:
    if n <= _MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, _MAX_POINTS, replace=False))


def batch_to_pil(images: torch.Tensor, masks: torch.Tensor) -> list[Image.Image]:
    """images: (B, 3, H, W) ImageNet-normalised, masks: (B, H, W) True on padding -> B RGB images of
    (W, H) with the padding dark grey."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = ((images.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy().copy()
    pixels[masks.cpu().numpy()] = _PAD_COLOUR
    return [Image.fromarray(p, "RGB") for p in pixels]


def plot_train_batch(images: torch.Tensor, masks: torch.Tensor, targets: Sequence[dict[str, Any]],
                     class_names: Sequence[str], path: str | Path, tile: int = 320) -> Path:
    """Write a grid of the batch with each image's boxes and class names to ``path`` (PNG).

    images: (B, 3, H, W) normalised; masks: (B, H, W) True on padding; targets: ``boxes`` (N, 4)
    cxcywh in [0, 1] of the image's own ``size`` (h, w), ``labels`` (N,). Each padded image is scaled
    so its longer side is ``tile`` px; the caption under it gives the image id and the size fed in.
    """
    pictures = batch_to_pil(images, masks)
    count = len(pictures)
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    height, width = images.shape[-2:]
    scale = tile / max(height, width)
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    font = _font(12)
    caption_h = 18
    sheet = Image.new("RGB", (cols * (tw + 4) + 4, rows * (th + caption_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (picture, target) in enumerate(zip(pictures, targets)):
        x_off, y_off = 4 + (k % cols) * (tw + 4), 4 + (k // cols) * (th + caption_h + 4)
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
        sheet.paste(picture.resize((tw, th), resample), (x_off, y_off))
        h, w = (int(v) for v in target["size"])
        boxes = cxcywh_to_xyxy(target["boxes"].detach().float().cpu()).reshape(-1, 4)
        boxes = boxes * torch.tensor([w, h, w, h]) * scale + torch.tensor([x_off, y_off, x_off, y_off])
        for box, label in zip(boxes.tolist(), target["labels"].tolist()):
            name = class_names[label] if label < len(class_names) else str(label)
            _draw_box(draw, box, name, font, top=y_off)
        draw.text((x_off, y_off + th + 2), f"image {target['image_id']}  {w}x{h} px, {len(boxes)} boxes",
                  fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _draw_box(draw: ImageDraw.ImageDraw, box: list[float], name: str, font: Any, top: float = 0) -> None:
    """A box outline in the class colour with its name above it (inside it when above is ``top``'s outside)."""
    colour = class_color(name)
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
    left, top_px, right, bottom = draw.textbbox((0, 0), name, font=font)
    text_h = bottom - top_px
    ty = y0 - text_h - 3 if y0 - text_h - 3 >= top else y0
    draw.rectangle((x0, ty, x0 + right - left + 3, ty + text_h + 3), fill=colour)
    luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x0 + 1 - left, ty + 1 - top_px), name, fill=(0, 0, 0) if luma > 150 else (255, 255, 255), font=font)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()
