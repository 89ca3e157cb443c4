"""COCO box AP with faster-coco-eval, matching pycocotools' ``COCOeval.stats``.

The metrics are the twelve-number COCO summary minus the per-area recalls::

    AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100

all Python floats. COCO's convention is kept for cells it cannot define: a metric whose
area range (or whole set) has no ground truth is ``-1.0``, exactly as pycocotools reports
it, so that "no small objects in this set" is never confused with "every small object
missed" (``0.0``). An empty detection list gives ``0.0`` for every defined metric.

Agreement with pycocotools' ``COCOeval.stats`` is exact up to 2.2e-16 (measured max 1.1e-16):
pycocotools divides ``tp / (tp + fp + np.spacing(1))`` where faster-coco-eval divides exactly.

Detections are COCO result dicts ``{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}`` in absolute pixels; :func:`detections_from_predictions` builds them from a
model's post-processed per-image tensors at full float precision (no rounding).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torchvision.ops import box_convert

from oddetr.errors import DataError

__all__ = ["METRIC_NAMES", "CocoEvaluator", "detections_from_predictions", "cocoeval_metrics", "evaluate_coco",
           "run_cocoeval"]

#: Keys of the dict returned by :func:`evaluate_coco`, in COCO ``stats`` order (indices 0-8).
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """A print function that prints nothing (faster-coco-eval's ``print_function`` hook)."""


def _copy_gt(coco_gt: Mapping[str, Any]) -> dict[str, Any]:
    """Copy a COCO GT dict one level below each image / annotation / category.

    faster-coco-eval writes into annotation dicts (``ignore``, and ``int`` casts of ids),
    so each record is copied; the nested bbox lists are only read. Annotation ids are
    renumbered ``1..N`` when any is missing, zero or duplicated: COCO's matcher stores
    matched GT ids with ``0`` meaning "unmatched", so an id of 0 silently skews AP in
    pycocotools and faster-coco-eval alike, and duplicated ids collapse annotations.
    """
    for key in ("images", "annotations", "categories"):
        if key not in coco_gt:
            raise DataError(f"COCO ground truth has no '{key}' list")
    images = [dict(img) for img in coco_gt["images"]]
    anns = [dict(ann) for ann in coco_gt["annotations"]]
    cats = [dict(cat) for cat in coco_gt["categories"]]
    image_ids = {img["id"] for img in images}
    for ann in anns:
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise DataError(f"COCO ground-truth annotation {ann.get('id', '?')} has no '{key}'")
        if ann["image_id"] not in image_ids:
            raise DataError(
                f"COCO ground-truth annotation {ann.get('id', '?')} refers to unknown image id {ann['image_id']}"
            )
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
    ids = [ann.get("id") for ann in anns]
    if None in ids or 0 in ids or len(set(ids)) != len(ids):
        for new_id, ann in enumerate(anns, start=1):
            ann["id"] = new_id
    out = {key: value for key, value in coco_gt.items() if key not in ("images", "annotations", "categories")}
    out.update(images=images, annotations=anns, categories=cats)
    return out


def _clean_detections(detections: Sequence[Mapping[str, Any]], image_ids: set[int]) -> list[dict[str, Any]]:
    """Fresh result dicts with plain Python types (faster-coco-eval writes into them)."""
    out: list[dict[str, Any]] = []
    for i, det in enumerate(detections):
        try:
            image_id = int(det["image_id"])
            category_id = int(det["category_id"])
            bbox = [float(v) for v in det["bbox"]]
            score = float(det["score"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"detection {i} is not a COCO result dict {{image_id, category_id, bbox, score}}: {exc}"
            ) from exc
        if len(bbox) != 4:
            raise DataError(
                f"detection {i} (image id {image_id}) has a bbox of length {len(bbox)}, expected 4 (x, y, w, h)"
            )
        if image_id not in image_ids:
            raise DataError(f"detection {i} refers to image id {image_id}, which is not in the ground truth")
        out.append({"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score})
    return out


def evaluate_coco(
    coco_gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], verbose: bool = False
) -> dict[str, float]:
    """COCO bbox metrics of ``detections`` against ``coco_gt``, via faster-coco-eval.

    Args:
        coco_gt: COCO-format ground truth (``images``, ``annotations`` with absolute ``xywh``
            ``bbox``, ``iscrowd``, ``area``; ``categories``). Not modified.
        detections: COCO result dicts ``{"image_id", "category_id", "bbox": [x, y, w, h],
            "score"}``, absolute pixels; every ``image_id`` must be in ``coco_gt``. Not modified.
        verbose: print faster-coco-eval's progress and the usual 12-line summary.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}`` as floats in
        ``[0, 1]``, or ``-1.0`` where COCO leaves a metric undefined (no GT in that area
        range). Evaluated on every image id in ``coco_gt`` with COCO's standard parameters
        (IoU 0.50:0.05:0.95, maxDets 1/10/100, area ranges 32² / 96²).

    Raises:
        DataError: malformed GT or detections, or a detection for an image not in ``coco_gt``.
    """
    return cocoeval_metrics(run_cocoeval(coco_gt, detections, verbose))


def cocoeval_metrics(ev: COCOeval_faster) -> dict[str, float]:
    """The :data:`METRIC_NAMES` dict of a summarised evaluator (see :func:`evaluate_coco`)."""
    stats = np.asarray(ev.stats, dtype=np.float64)
    return {name: _as_metric(stats[i]) for i, name in enumerate(METRIC_NAMES)}


def run_cocoeval(
    coco_gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], verbose: bool = False
) -> COCOeval_faster:
    """The evaluated, accumulated and summarised faster-coco-eval ``COCOeval_faster`` behind
    :func:`evaluate_coco` (same arguments): ``ev.stats``, and ``ev.eval["precision"]`` of shape
    ``(T IoU thresholds, R=101 recall thresholds, K categories (``ev.params.catIds`` order), A=4 area
    ranges, M=3 maxDets)``, ``-1`` where a category has no ground truth."""
    gt_dict = _copy_gt(coco_gt)
    image_ids = {int(img["id"]) for img in gt_dict["images"]}
    dets = _clean_detections(detections, image_ids)

    print_fn = print if verbose else _silent
    # Belt and braces: faster-coco-eval routes its messages through print_function, but a
    # stray print from a future version must not reach a training log unless asked for.
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        gt = COCO(print_function=print_fn)
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=print_fn)
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _as_metric(value: float) -> float:
    """A COCO stat as a Python float; NaN (never expected) becomes COCO's ``-1.0``."""
    value = float(value)
    return -1.0 if math.isnan(value) else value


def detections_from_predictions(
    image_ids: Sequence[int],
    boxes_xyxy: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    label_to_cat_id: Mapping[int, int] | Sequence[int],
) -> list[dict[str, Any]]:
    """Per-image post-processed predictions -> COCO result dicts.

    Args:
        image_ids: one COCO image id per image.
        boxes_xyxy: per image, ``(N_i, 4)`` absolute ``xyxy`` pixels.
        scores: per image, ``(N_i,)``.
        labels: per image, ``(N_i,)`` contiguous class indices ``0..C-1``.
        label_to_cat_id: contiguous index -> COCO ``category_id`` (a mapping or a list).

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` with boxes
        converted in float64 and kept at full precision (no rounding).

    Raises:
        ValueError: the per-image sequences differ in length or shape.
        DataError: a label has no category id.
    """
    n = len(image_ids)
    if not (len(boxes_xyxy) == len(scores) == len(labels) == n):
        raise ValueError(
            f"detections_from_predictions: {n} image ids but {len(boxes_xyxy)} boxes, "
            f"{len(scores)} scores, {len(labels)} labels"
        )
    out: list[dict[str, Any]] = []
    for image_id, boxes, img_scores, img_labels in zip(image_ids, boxes_xyxy, scores, labels):
        boxes_t = torch.as_tensor(boxes).detach().to("cpu", torch.float64).reshape(-1, 4)
        scores_list = torch.as_tensor(img_scores).detach().to("cpu", torch.float64).reshape(-1).tolist()
        labels_list = torch.as_tensor(img_labels).detach().cpu().reshape(-1).tolist()
        if not (boxes_t.shape[0] == len(scores_list) == len(labels_list)):
            raise ValueError(
                f"image id {image_id}: {boxes_t.shape[0]} boxes, {len(scores_list)} scores, {len(labels_list)} labels"
            )
        xywh = box_convert(boxes_t, "xyxy", "xywh").tolist()
        for box, score, label in zip(xywh, scores_list, labels_list):
            try:
                cat_id = label_to_cat_id[int(label)]
            except (KeyError, IndexError) as exc:
                raise DataError(
                    f"image id {image_id}: predicted label {int(label)} has no COCO category id"
                ) from exc
            out.append({"image_id": int(image_id), "category_id": int(cat_id), "bbox": box, "score": score})
    return out


class CocoEvaluator:
    """Accumulates COCO result dicts over batches, then computes :func:`evaluate_coco`.

    ``results`` holds every detection added so far (JSON-serialisable, for
    ``json.dump(evaluator.results, f)``). In distributed evaluation, gather each rank's
    ``results`` and ``update`` one evaluator with all of them before ``compute``.

    Example::

        ev = CocoEvaluator(coco_gt)
        for batch in loader:
            ev.update(detections_from_predictions(...))
        metrics = ev.compute()
    """

    def __init__(self, coco_gt: Mapping[str, Any], verbose: bool = False) -> None:
        self.coco_gt = coco_gt
        self.verbose = verbose
        self.results: list[dict[str, Any]] = []
        self._image_ids = {int(img["id"]) for img in coco_gt.get("images", [])}

    def update(self, detections: Sequence[Mapping[str, Any]]) -> None:
        """Add COCO result dicts (copied; checked against the GT image ids)."""
        self.results.extend(_clean_detections(detections, self._image_ids))

    def reset(self) -> None:
        """Forget every detection added so far."""
        self.results = []

    def compute(self) -> dict[str, float]:
        """Metrics over everything added since construction or the last :meth:`reset`."""
        return evaluate_coco(self.coco_gt, self.results, verbose=self.verbose)
