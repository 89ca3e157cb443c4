"""Turn raw predictions into scored, absolute-coordinate detections."""

from __future__ import annotations

import torch

from oddetr.box_ops import cxcywh_to_xyxy, scale_boxes


def top_detections(logits: torch.Tensor, boxes: torch.Tensor,
                   max_detections: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (query, class) pairs per image by sigmoid score, batched (traceable: no Python loop).

    logits: (B, Q, C); boxes: (B, Q, 4) cxcywh in [0, 1] -> scores (B, K) float32, labels (B, K)
    int64 and boxes (B, K, 4) cxcywh of the chosen queries, K = min(max_detections, Q * C).
    """
    num_classes = logits.shape[-1]
    prob = logits.float().sigmoid().flatten(1)
    k = min(max_detections, prob.shape[1])
    scores, index = prob.topk(k, dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    labels = index % num_classes
    picked = torch.gather(boxes.float(), 1, query[..., None].expand(-1, -1, 4))
    return scores, labels, picked


@torch.no_grad()
def postprocess(logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor,
                max_detections: int = 100) -> list[dict[str, torch.Tensor]]:
    """Top-k (query, class) pairs per image by sigmoid score.

    logits: (B, Q, C); boxes: (B, Q, 4) cxcywh in [0, 1]; image_sizes: (B, 2) (h, w) of the
    original images -> per image ``scores`` (K,), ``labels`` (K,) int64, ``boxes`` (K, 4) absolute xyxy.
    """
    bsz = logits.shape[0]
    scores, labels, picked = top_detections(logits, boxes, max_detections)
    absolute = scale_boxes(cxcywh_to_xyxy(picked), image_sizes.to(picked.device))
    h, w = image_sizes.to(picked.device).unbind(-1)
    limits = torch.stack([w, h, w, h], -1)[:, None].to(absolute.dtype)
    absolute = torch.minimum(absolute.clamp(min=0), limits)
    return [{"scores": scores[b], "labels": labels[b], "boxes": absolute[b]} for b in range(bsz)]
