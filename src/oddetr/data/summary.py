"""What a run will train on: counts, box sizes before and after the resize, and warnings about the size.

:func:`summarize_split` reads a :class:`~oddetr.data.coco.DetectionDataset`'s cleaned records (no image is
decoded), :func:`size_warnings` says when ``data.image_size`` makes the objects too small for the model,
:func:`format_summary` prints one short table and :func:`write_summary` saves ``dataset.json``.

"Box size" is ``sqrt(w * h)`` in pixels. "After the resize" is the evaluation resize of ``data.image_size``
(shorter side ``image_size``, longer side ``<= max_size``); training scales vary around it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oddetr.data.coco import DetectionDataset
from oddetr.data.transforms import shortest_side_size

__all__ = [
    "PERCENTILES",
    "SplitSummary",
    "box_arrays",
    "format_summary",
    "size_warnings",
    "summarize_split",
    "write_summary",
]

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
_TABLE_CLASSES = 12  # classes shown in the printed table (dataset.json lists all)


@dataclass
class SplitSummary:
    """Counts and size statistics of one split (sizes in pixels; percentiles keyed ``"p50"`` etc.)."""

    split: str
    images: int
    boxes: int
    images_without_boxes: int
    dropped_boxes: int
    clipped_boxes: int
    boxes_per_class: dict[str, int]
    box_size: dict[str, float]  # sqrt(w h) percentiles in the images as stored
    box_size_resized: dict[str, float]  # the same after the evaluation resize
    short_side: dict[str, float]  # image shorter side percentiles, as stored
    short_side_resized: dict[str, float]
    shrunk_over_2x: float  # fraction of images whose resize factor is < 1/2
    crowd_or_difficult: int = 0  # crowd (COCO) or difficult (VOC) boxes: evaluated as ignored, not trained


def box_arrays(dataset: DetectionDataset, image_size: int, max_size: int) -> dict[str, np.ndarray]:
    """Per-box and per-image arrays of ``dataset`` (crowd / difficult boxes left out, as in training).

    Returns ``wh`` (M, 2) box width/height in stored pixels, ``wh_resized`` (M, 2) after the resize,
    ``centres`` (M, 2) box centres as fractions of the image, ``labels`` (M,), ``image_hw`` (N, 2) and
    ``image_hw_resized`` (N, 2) image heights/widths, ``boxes_per_image`` (N,).
    """
    infos = dataset._images
    hw = np.array([[i["height"], i["width"]] for i in infos], np.float64).reshape(-1, 2)
    hw_out = np.array([shortest_side_size(int(h), int(w), image_size, max_size) for h, w in hw],
                      np.float64).reshape(-1, 2)
    boxes = [b.astype(np.float64).reshape(-1, 4) for b in dataset._boxes]
    counts = np.array([len(b) for b in boxes], np.int64)
    xyxy = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    per_box_hw = np.repeat(hw, counts, axis=0)
    per_box_scale = np.repeat(hw_out / np.maximum(hw, 1), counts, axis=0)  # (M, 2): y, x factors
    wh = xyxy[:, 2:] - xyxy[:, :2]
    centres = (xyxy[:, :2] + xyxy[:, 2:]) / 2 / np.maximum(per_box_hw[:, ::-1], 1)
    labels = np.concatenate(dataset._labels) if dataset._labels else np.zeros(0, np.int64)
    return {"wh": wh, "wh_resized": wh * per_box_scale[:, ::-1], "centres": centres, "labels": labels,
            "image_hw": hw, "image_hw_resized": hw_out, "boxes_per_image": counts}


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {f"p{q}": math.nan for q in PERCENTILES}
    return {f"p{q}": round(float(v), 2) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def summarize_split(dataset: DetectionDataset, split: str, image_size: int, max_size: int) -> SplitSummary:
    """Counts and size percentiles of one split under the resize ``(image_size, max_size)``."""
    a = box_arrays(dataset, image_size, max_size)
    size = np.sqrt(np.prod(a["wh"], axis=1))
    size_resized = np.sqrt(np.prod(a["wh_resized"], axis=1))
    counts = np.bincount(a["labels"], minlength=dataset.num_classes) if a["labels"].size else \
        np.zeros(dataset.num_classes, np.int64)
    short, short_out = a["image_hw"].min(axis=1), a["image_hw_resized"].min(axis=1)
    factor = short_out / np.maximum(short, 1)
    crowd = sum(int(ann["iscrowd"]) for ann in dataset._annotations)
    return SplitSummary(
        split=split,
        images=len(dataset),
        boxes=int(a["labels"].size),
        images_without_boxes=int((a["boxes_per_image"] == 0).sum()),
        dropped_boxes=int(dataset.dropped_boxes),
        clipped_boxes=int(dataset.clipped_boxes),
        boxes_per_class={name: int(n) for name, n in zip(dataset.class_names, counts)},
        box_size=_percentiles(size),
        box_size_resized=_percentiles(size_resized),
        short_side=_percentiles(short),
        short_side_resized=_percentiles(short_out),
        shrunk_over_2x=round(float((factor < 0.5).mean()) if factor.size else 0.0, 4),
        crowd_or_difficult=crowd,
    )


def _round_up(value: float, multiple: int = 32) -> int:
    return int(math.ceil(value / multiple) * multiple)


def size_warnings(summary: SplitSummary, image_size: int, finest_stride: int) -> list[str]:
    """One line per problem with the size: the median box after the resize is under the model's finest
    feature stride, or most images are shrunk more than 2x. Each names ``data.image_size`` and a value."""
    out: list[str] = []
    median = summary.box_size_resized["p50"]
    if summary.boxes and median < finest_stride:
        suggest = _round_up(image_size * 2 * finest_stride / max(median, 1e-6))
        out.append(
            f"{summary.split}: the median box is {median:.1f} px after the resize to data.image_size={image_size} "
            f"({summary.box_size['p50']:.1f} px as stored), under the model's finest feature stride "
            f"({finest_stride} px): the objects are too small to learn; raise it, e.g. data.image_size={suggest}")
    if summary.images and summary.shrunk_over_2x > 0.5:
        native = int(round(summary.short_side["p50"]))
        out.append(
            f"{summary.split}: {summary.shrunk_over_2x:.0%} of the images are shrunk more than 2x (median shorter "
            f"side {native} px -> {summary.short_side_resized['p50']:.0f} px by data.image_size={image_size}); "
            f"small objects shrink with them: set data.image_size near the images' size, e.g. "
            f"data.image_size={native}")
    return out


def _cell(p: dict[str, float]) -> str:
    if any(math.isnan(v) for v in p.values()):
        return "-"
    return f"{p['p5']:.0f}/{p['p50']:.0f}/{p['p95']:.0f}"


def format_summary(splits: list[SplitSummary], image_size: int, max_size: int,
                   warnings: list[str] | None = None) -> str:
    """The table printed at the start of a run (one row per split, then boxes per class, then warnings)."""
    lines = [f"dataset (resize: shorter side data.image_size={image_size}, longer side <= {max_size}; "
             "box size = sqrt(w*h) px, p5/p50/p95)"]
    head = (f"{'split':<6}{'images':>8}{'boxes':>8}{'no box':>8}{'dropped':>9}{'clipped':>9}"
            f"{'short side':>13}{'resized':>10}{'box size':>13}{'resized':>12}")
    lines.append(head)
    for s in splits:
        lines.append(
            f"{s.split:<6}{s.images:>8}{s.boxes:>8}{s.images_without_boxes:>8}{s.dropped_boxes:>9}"
            f"{s.clipped_boxes:>9}{s.short_side['p50']:>13.0f}{s.short_side_resized['p50']:>10.0f}"
            f"{_cell(s.box_size):>13}{_cell(s.box_size_resized):>12}")
    names = list(splits[0].boxes_per_class) if splits else []
    width = max([5] + [len(n) for n in names[:_TABLE_CLASSES]]) + 2
    lines.append(f"{'class':<{width}}" + "".join(f"{s.split:>8}" for s in splits))
    order = sorted(names, key=lambda n: -splits[0].boxes_per_class[n])
    for name in order[:_TABLE_CLASSES]:
        lines.append(f"{name:<{width}}" + "".join(f"{s.boxes_per_class.get(name, 0):>8}" for s in splits))
    if len(order) > _TABLE_CLASSES:
        lines.append(f"... {len(order) - _TABLE_CLASSES} more classes (all in dataset.json)")
    lines += [f"warning: {w}" for w in warnings or []]
    return "\n".join(lines)


def write_summary(path: Path, splits: list[SplitSummary], image_size: int, max_size: int, finest_stride: int,
                  warnings: list[str]) -> None:
    """``dataset.json``: the resize, the model's finest stride, each split's summary and the warnings."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    record = {"image_size": image_size, "max_size": max_size, "finest_stride": finest_stride,
              "splits": {s.split: clean(asdict(s)) for s in splits}, "warnings": warnings}
    path.write_text(json.dumps(record, indent=1))
