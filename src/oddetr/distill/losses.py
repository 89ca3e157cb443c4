"""Prediction-distillation loss: the student's outputs on the teacher's initial queries are pulled
toward the teacher's outputs on the same queries, layer by layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from oddetr.box_ops import cxcywh_to_xyxy, paired_giou
from oddetr.losses.criterion import pair_index, quality_focal_loss
from oddetr.losses.matcher import Assignment
from oddetr.models.outputs import GroupOutput


def pd_box_selection(teacher_logits: torch.Tensor, assignments: Sequence[Assignment] | None, queries: str,
                     threshold: float) -> torch.Tensor:
    """Which queries get a PD box term, per layer: (L, B, N) bool.

    teacher_logits: (L, B, N, C) the teacher's logits on the PD queries; assignments: per layer the
    teacher's Hungarian matching (per image, query and GT indices) or None; ``queries``: ``matched``
    (queries the teacher matched to a GT), ``confident`` (teacher max probability >= ``threshold``),
    ``matched_or_confident`` or ``all``.
    """
    layers, bsz, n, _ = teacher_logits.shape
    if queries == "all":
        return torch.ones(layers, bsz, n, dtype=torch.bool, device=teacher_logits.device)
    keep = torch.zeros(layers, bsz, n, dtype=torch.bool, device=teacher_logits.device)
    if queries in ("matched", "matched_or_confident"):
        if assignments is None:
            raise ValueError(f"distill.pd_box_queries={queries} needs the teacher's matching")
        layer, b, q, _ = pair_index(assignments, [0] * (bsz + 1), keep.device)
        keep.index_put_((layer, b, q), keep.new_ones(()))  # a device scalar: no host -> device copy
    if queries in ("confident", "matched_or_confident"):
        keep |= teacher_logits.detach().float().sigmoid().max(-1).values >= threshold
    elif queries != "matched":
        raise ValueError(f"unknown distill.pd_box_queries {queries!r}")
    return keep


def pd_box_terms(student_boxes: torch.Tensor, teacher_boxes: torch.Tensor, loss: str,
                 beta: float) -> dict[str, torch.Tensor]:
    """Box distillation terms per query, summed over its 4 coordinates. boxes: (..., 4) cxcywh -> (...).

    ``smooth_l1`` (per coordinate, transition at ``beta``) and ``l2`` have a gradient that goes to
    zero with the student-teacher gap, keyed ``l1`` so that they take the L1 weight; ``l1_giou`` is
    DETR's L1 + GIoU pair, whose gradient keeps its size however close the student is.
    """
    if loss == "smooth_l1":
        return {"l1": F.smooth_l1_loss(student_boxes, teacher_boxes, reduction="none", beta=beta).sum(-1)}
    if loss == "l2":
        return {"l1": F.mse_loss(student_boxes, teacher_boxes, reduction="none").sum(-1)}
    if loss == "l1_giou":
        giou = paired_giou(cxcywh_to_xyxy(student_boxes), cxcywh_to_xyxy(teacher_boxes))
        return {"l1": F.l1_loss(student_boxes, teacher_boxes, reduction="none").sum(-1), "giou": 1 - giou}
    raise ValueError(f"unknown distill.pd_box_loss {loss!r}")


def prediction_distillation_losses(student: GroupOutput, teacher: GroupOutput, num_boxes: float,
                                   layers: list[int], beta: float = 2.0, prefix: str = "pd",
                                   teacher_assignments: Sequence[Assignment] | None = None,
                                   box_queries: str = "matched_or_confident", box_threshold: float = 0.5,
                                   box_loss: str = "smooth_l1", box_beta: float = 0.02) -> dict[str, torch.Tensor]:
    """Unweighted PD terms per layer, keyed ``"{prefix}/{cls|l1|giou}/l{layer}"``.

    student, teacher: outputs on the same queries, logits (L, B, N, C), boxes (L, B, N, 4).
    cls: QFL(student logits, y = teacher sigmoid probabilities) over every query, divided by
    ``num_boxes``; boxes: only on the queries :func:`pd_box_selection` keeps (using
    ``teacher_assignments[layer]``), with :func:`pd_box_terms`, divided by their count. All the
    layers in one pass, without a device synchronisation.
    """
    index = torch.tensor(layers).to(student.logits.device, non_blocking=True)
    s_logits = student.logits.index_select(0, index).float()
    s_boxes = student.boxes.index_select(0, index).float()
    t_logits = teacher.logits.detach().index_select(0, index).float()
    t_boxes = teacher.boxes.detach().index_select(0, index).float()
    cls = quality_focal_loss(s_logits, t_logits.sigmoid(), beta, reduction="none").flatten(1).sum(1) / num_boxes
    assignments = None if teacher_assignments is None else [teacher_assignments[layer] for layer in layers]
    keep = pd_box_selection(t_logits, assignments, box_queries, box_threshold)  # (L, B, N)
    count = keep.flatten(1).sum(1).clamp(min=1)
    terms = {"cls": cls}
    for term, per_query in pd_box_terms(s_boxes, t_boxes, box_loss, box_beta).items():
        terms[term] = torch.where(keep, per_query, 0.0).flatten(1).sum(1) / count
    return {f"{prefix}/{term}/l{layer}": value[i] for i, layer in enumerate(layers) for term, value in terms.items()}
