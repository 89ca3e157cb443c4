"""Hungarian matching between predictions and ground truth, with DETR's costs.

cost = cost_class * focal_class_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)
Costs are computed for all layers and images of a call at once and reach the host in one copy;
each image's block is solved with :func:`scipy.optimize.linear_sum_assignment`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from oddetr.box_ops import cxcywh_to_xyxy, generalized_box_iou
from oddetr.errors import TrainingError
from oddetr.profiling import scope

Assignment = list[tuple[torch.Tensor, torch.Tensor]]
"""Per image, (query indices, GT indices): two int64 tensors of equal length."""


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                     gamma: float = 2.0) -> torch.Tensor:
    """Focal classification cost. logits: (Q, C); labels: (G,) -> (Q, G)."""
    prob = logits.float().sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher:
    """One-to-one assignment minimising the weighted class + L1 + GIoU cost (weights 2/5/2)."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def batch_costs(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict]) -> torch.Tensor:
        """Every query against every GT of the batch, in one go.

        logits: (..., B, Q, C); boxes: (..., B, Q, 4) cxcywh -> (..., B, Q, sum_b G_b) float32; image b's
        own cost is the column block :func:`gt_offsets` gives (the other blocks are never used).
        """
        labels = torch.cat([t["labels"] for t in targets]) if targets else logits.new_zeros(0, dtype=torch.long)
        lead = logits.shape[:-1]
        if len(labels) == 0:
            return logits.new_zeros((*lead, 0), dtype=torch.float32)
        gt = torch.cat([t["boxes"] for t in targets]).float()
        pred = boxes.reshape(-1, 4).float()
        c_cls = focal_class_cost(logits.reshape(-1, logits.shape[-1]), labels, self.focal_alpha, self.focal_gamma)
        c_l1 = torch.cdist(pred, gt, p=1)
        c_giou = -generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt))
        cost = self.cost_class * c_cls + self.cost_bbox * c_l1 + self.cost_giou * c_giou
        return cost.view(*lead, len(labels))

    @torch.no_grad()
    def cost_matrices(self, logits: torch.Tensor, boxes: torch.Tensor,
                      targets: Sequence[dict]) -> list[torch.Tensor]:
        """logits: (B, Q, C); boxes: (B, Q, 4) cxcywh -> per image a (Q, G_b) float32 cost."""
        return per_image_costs(self.batch_costs(logits, boxes, targets), targets)

    @torch.no_grad()
    def match_layers(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
                     contexts: Sequence[str], costs: torch.Tensor | None = None) -> list[Assignment]:
        """One assignment per layer. logits: (L, B, Q, C); boxes: (L, B, Q, 4); ``contexts[l]`` names layer l
        in errors; ``costs``: their :meth:`batch_costs`, if already computed.

        The costs of all layers and images reach the host in one transfer; scipy then solves each
        image's block. Raises TrainingError on a non-finite cost.
        """
        with scope("matching"):
            if costs is None:
                costs = self.batch_costs(logits, boxes, targets)
            host = costs.detach().cpu().numpy()  # the one device -> host copy (and sync) of the call
            offsets = gt_offsets(targets)
            return [[_solve(host[layer, b, :, offsets[b]:offsets[b + 1]], targets[b].get("image_id"), contexts[layer])
                     for b in range(len(targets))] for layer in range(host.shape[0])]

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
                 context: str = "") -> Assignment:
        """Hungarian assignment per image. Raises TrainingError on a non-finite cost matrix."""
        return self.match_layers(logits[None], boxes[None], targets, [context])[0]


def gt_offsets(targets: Sequence[dict]) -> list[int]:
    """Column offsets of each image's GTs in :meth:`HungarianMatcher.batch_costs`: B + 1 ints."""
    offsets = [0]
    for t in targets:
        offsets.append(offsets[-1] + len(t["labels"]))
    return offsets


def per_image_costs(costs: torch.Tensor, targets: Sequence[dict]) -> list[torch.Tensor]:
    """(B, Q, sum G) batch costs -> per image its own (Q, G_b) block."""
    offsets = gt_offsets(targets)
    return [costs[b, :, offsets[b]:offsets[b + 1]] for b in range(len(targets))]


def solve_assignment(cost: torch.Tensor, image_id: object = None, context: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of a (Q, G) cost -> (query idx, gt idx), sorted by query."""
    return _solve(cost.detach().cpu().numpy(), image_id, context)


def _solve(matrix: np.ndarray, image_id: object, context: str) -> tuple[torch.Tensor, torch.Tensor]:
    if matrix.size == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    if not np.isfinite(matrix).all():
        n_nan, n_inf = int(np.isnan(matrix).sum()), int(np.isinf(matrix).sum())
        where = f" at {context}" if context else ""
        raise TrainingError(
            f"non-finite matching cost{where} (image id {image_id}: {n_nan} NaN, {n_inf} inf entries); "
            "the model's predictions diverged: lower train.lr or check the data"
        )
    rows, cols = linear_sum_assignment(matrix)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def topk_lowest_cost(cost: torch.Tensor, k: int) -> torch.Tensor:
    """For each GT, the k queries with the least cost. cost: (Q, G) -> (G, min(k, Q)) query indices."""
    k = min(k, cost.shape[0])
    return cost.t().topk(k, dim=1, largest=False).indices
