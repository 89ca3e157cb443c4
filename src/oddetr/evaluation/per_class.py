"""Per-class COCO AP and precision-recall curves, read from an accumulated faster-coco-eval evaluator.

``ev.eval["precision"]`` has shape ``(T, R, K, A, M)``: IoU thresholds 0.50:0.05:0.95, 101 recall
thresholds, categories (``ev.params.catIds`` order), area ranges (0 = all) and maxDets (last = 100);
``-1`` marks a category without ground truth. A class's AP is the mean of its ``(T, R)`` slice at area
"all" and 100 detections, which is exactly how COCO's overall AP averages the same array over classes
too, so a one-class set's class AP equals its overall AP, and the overall AP is the mean of the class
APs of the classes that have ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["format_per_class_table", "per_class_ap", "plot_pr_curves", "pr_curves"]


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def _slice(ev: Any) -> tuple[np.ndarray, list[int]]:
    """precision (T, R, K) at area "all" and the largest maxDets, and the category ids of K."""
    precision = np.asarray(ev.eval["precision"], dtype=np.float64)
    return precision[:, :, :, 0, -1], [int(c) for c in ev.params.catIds]


def _iou_index(ev: Any, iou: float) -> int:
    return int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - iou)))


def per_class_ap(ev: Any, coco_gt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per category of ``coco_gt`` (its order): ``{"class", "category_id", "num_gt", "AP", "AP50",
    "AP75"}``; ``num_gt`` counts non-crowd boxes, and the APs are ``-1.0`` for a class without them."""
    precision, cat_ids = _slice(ev)
    i50, i75 = _iou_index(ev, 0.5), _iou_index(ev, 0.75)
    counts: dict[int, int] = {}
    for ann in coco_gt["annotations"]:
        if not ann.get("iscrowd", 0):
            counts[int(ann["category_id"])] = counts.get(int(ann["category_id"]), 0) + 1
    rows = []
    for cat in coco_gt["categories"]:
        k = cat_ids.index(int(cat["id"]))
        p = precision[:, :, k]
        rows.append({"class": str(cat["name"]), "category_id": int(cat["id"]), "num_gt": counts.get(int(cat["id"]), 0),
                     "AP": _mean_valid(p), "AP50": _mean_valid(p[i50]), "AP75": _mean_valid(p[i75])})
    return rows


def format_per_class_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width table of :func:`per_class_ap` rows (``-`` for a class without ground truth)."""
    width = max([5, *(len(str(r["class"])) for r in rows)])
    lines = [f"{'class':<{width}} {'id':>5} {'GT':>6} {'AP':>7} {'AP50':>7} {'AP75':>7}"]
    for r in rows:
        aps = "".join(f" {r[k]:>7.4f}" if r[k] >= 0 else f" {'-':>7}" for k in ("AP", "AP50", "AP75"))
        lines.append(f"{str(r['class']):<{width}} {r['category_id']:>5} {r['num_gt']:>6}{aps}")
    return "\n".join(lines)


def pr_curves(ev: Any, iou: float | None = 0.5) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(recall (R,), precision (K, R), category ids) at IoU ``iou`` (None: mean over 0.50:0.95), area
    "all", 100 detections; a class without ground truth has a row of -1."""
    precision, cat_ids = _slice(ev)
    p = precision[_iou_index(ev, iou)] if iou is not None else np.where(
        (precision > -1).all(0), precision.mean(0), -1.0)
    return np.asarray(ev.params.recThrs, dtype=np.float64), p.T.copy(), cat_ids


def plot_pr_curves(ev: Any, names: Mapping[int, str], path: str | Path, max_legend: int = 12) -> Path:
    """Write a PNG with precision-recall curves per class and their mean (over classes with ground truth):
    one panel at IoU 0.50, one averaged over IoU 0.50:0.95. ``names``: category id -> class name."""
    fig = Figure(figsize=(11, 4.8))
    for j, (iou, title) in enumerate(((0.5, "IoU 0.50"), (None, "mean over IoU 0.50:0.95"))):
        ax = fig.add_subplot(1, 2, j + 1)
        recall, precision, cat_ids = pr_curves(ev, iou)
        valid = [k for k in range(len(cat_ids)) if (precision[k] > -1).all()]
        legend = len(valid) <= max_legend
        for k in valid:
            ax.plot(recall, precision[k], linewidth=1, alpha=0.8 if legend else 0.3,
                    label=f"{names.get(cat_ids[k], cat_ids[k])} ({precision[k].mean():.3f})" if legend else None)
        if valid:
            mean = precision[valid].mean(0)
            ax.plot(recall, mean, color="black", linewidth=2.2, label=f"all classes ({mean.mean():.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"precision-recall, {title}")
        ax.grid(alpha=0.3)
        if valid:
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
