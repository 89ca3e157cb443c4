"""Box conversions and overlaps: the one place where box formats change.

Inside the model and losses boxes are normalised ``cxcywh`` in [0, 1]; at the data and
evaluation edges they are absolute ``xyxy`` (pixels) or COCO ``xywh``.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

__all__ = [
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "paired_iou",
    "paired_giou",
    "inverse_sigmoid",
    "scale_boxes",
]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """boxes: (..., 4) cxcywh -> (..., 4) xyxy, same units."""
    return box_convert(boxes, "cxcywh", "xyxy") if boxes.dim() == 2 else _cxcywh_to_xyxy_nd(boxes)


def _cxcywh_to_xyxy_nd(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """boxes: (..., 4) xyxy -> (..., 4) cxcywh, same units."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def paired_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of corresponding boxes. boxes1, boxes2: (..., 4) xyxy -> (...)."""
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter + eps)


def paired_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalised IoU of corresponding boxes. boxes1, boxes2: (..., 4) xyxy -> (...) in [-1, 1]."""
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    iou = inter / (union + eps)
    enclose = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    enclose_area = enclose.prod(-1)
    return iou - (enclose_area - union) / (enclose_area + eps)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps]."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def scale_boxes(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Normalised boxes (B, N, 4) times image sizes (B, 2) given as (h, w) -> absolute units."""
    h, w = sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1).to(boxes.dtype)
    return boxes * scale[:, None, :]
