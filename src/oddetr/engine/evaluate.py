"""Inference over a loader: COCO metrics and the matching-instability probe."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import DataLoader

from oddetr.engine import distributed as dist
from oddetr.evaluation.coco_eval import detections_from_predictions, evaluate_coco
from oddetr.evaluation.instability import assignment_map, positions_of_queries
from oddetr.losses.matcher import HungarianMatcher
from oddetr.models.postprocess import postprocess


def autocast_context(device: torch.device, amp: str):
    """bf16 / fp16 autocast, or nothing."""
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_batch(images: torch.Tensor, masks: torch.Tensor, targets: Sequence[dict], device: torch.device):
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True), masks.to(device, non_blocking=True), targets


@torch.no_grad()
def predict_detections(model: nn.Module, loader: DataLoader, device: torch.device, label_to_cat_id: Sequence[int],
                       max_detections: int = 100, amp: str = "none", progress=None) -> list[dict]:
    """COCO result dicts for every image this rank sees (original image coordinates)."""
    model.eval()
    results: list[dict] = []
    for images, masks, targets in loader:
        images, masks, targets = move_batch(images, masks, targets, device)
        with autocast_context(device, amp):
            out = model(images, masks)
        sizes = torch.stack([t["orig_size"] for t in targets])
        dets = postprocess(out.pred_logits, out.pred_boxes, sizes, max_detections)
        results.extend(detections_from_predictions(
            [int(t["image_id"]) for t in targets], [d["boxes"].cpu() for d in dets],
            [d["scores"].cpu() for d in dets], [d["labels"].cpu() for d in dets], label_to_cat_id))
        if progress is not None:
            progress.update(len(targets))
    return results


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, coco_gt: dict,
             label_to_cat_id: Sequence[int], max_detections: int = 100, amp: str = "none") -> dict[str, float]:
    """COCO metrics of ``model`` on ``loader``'s dataset, gathered over ranks (same result everywhere)."""
    return evaluate_coco(coco_gt, gather_detections(model, loader, device, label_to_cat_id, max_detections, amp))


def gather_detections(model: nn.Module, loader: DataLoader, device: torch.device, label_to_cat_id: Sequence[int],
                      max_detections: int = 100, amp: str = "none") -> list[dict]:
    """COCO result dicts of every image of ``loader``'s dataset, gathered over ranks, once per image, by image id."""
    local = predict_detections(model, loader, device, label_to_cat_id, max_detections, amp)
    per_image: dict[int, list[dict]] = {}
    for d in local:
        per_image.setdefault(d["image_id"], []).append(d)
    # the sampler pads ranks by repeating a few images: keep each image's detections once
    merged: dict[int, list[dict]] = {}
    for part in dist.gather_objects(per_image):
        for image_id, dets in part.items():
            merged.setdefault(image_id, dets)
    return [d for image_id in sorted(merged) for d in merged[image_id]]


@torch.no_grad()
def probe_assignment(model: nn.Module, loader: DataLoader, matcher: HungarianMatcher,
                     device: torch.device) -> dict[tuple[int, int], int]:
    """Which query each probe GT is Hungarian-matched to (final decoder layer, main group).

    A query is named by its index, or by its encoder position for two-stage models."""
    model.eval()
    out_map: dict[tuple[int, int], int] = {}
    for images, masks, targets in loader:
        images, masks, targets = move_batch(images, masks, targets, device)
        out = model(images, masks)
        indices = matcher(out.pred_logits, out.pred_boxes, targets, context="instability probe")
        if out.query_positions is not None:
            indices = positions_of_queries(indices, out.query_positions)
        out_map.update(assignment_map([int(t["image_id"]) for t in targets], indices))
    merged: dict[tuple[int, int], int] = {}
    for part in dist.gather_objects(out_map):
        merged.update(part)
    return merged
