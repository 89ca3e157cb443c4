"""Prediction-distillation loss: the student's outputs on the teacher's initial queries are pulled
toward the teacher's outputs on the same queries, layer by layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oddetr.box_ops import cxcywh_to_xyxy, paired_giou
from oddetr.losses.criterion import quality_focal_loss
from oddetr.models.outputs import GroupOutput


def prediction_distillation_losses(student: GroupOutput, teacher: GroupOutput, num_boxes: float,
                                   layers: list[int], beta: float = 2.0, prefix: str = "pd") -> dict[str, torch.Tensor]:
    """Unweighted PD terms per layer, keyed ``"{prefix}/{cls|l1|giou}/l{layer}"``.

    student, teacher: outputs on the same queries, logits (L, B, N, C), boxes (L, B, N, 4).
    cls: QFL(student logits, y = teacher sigmoid probabilities); l1 / giou: toward the teacher's
    boxes, each query weighted by the teacher's max class probability. All divided by ``num_boxes``.
    """
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        s_logits = student.logits[layer].float()
        s_boxes = student.boxes[layer].float()
        t_prob = teacher.logits[layer].detach().float().sigmoid()
        t_boxes = teacher.boxes[layer].detach().float()
        weight = t_prob.max(-1).values.flatten()  # (B*N,)
        cls = quality_focal_loss(s_logits, t_prob, beta)
        s_flat, t_flat = s_boxes.flatten(0, 1), t_boxes.flatten(0, 1)
        l1 = (F.l1_loss(s_flat, t_flat, reduction="none").sum(-1) * weight).sum()
        giou = ((1 - paired_giou(cxcywh_to_xyxy(s_flat), cxcywh_to_xyxy(t_flat))) * weight).sum()
        out[f"{prefix}/cls/l{layer}"] = cls / num_boxes
        out[f"{prefix}/l1/l{layer}"] = l1 / num_boxes
        out[f"{prefix}/giou/l{layer}"] = giou / num_boxes
    return out
