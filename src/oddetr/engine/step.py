"""One training forward pass: teacher (if distilling), student with extra groups, all losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oddetr.distill.distiller import OnlineDistiller
from oddetr.engine.evaluate import autocast_context
from oddetr.losses.criterion import SetCriterion
from oddetr.losses.detection import detection_losses, main_group_copies


def compute_losses(model: nn.Module, criterion: SetCriterion, distiller: OnlineDistiller | None,
                   images: torch.Tensor, masks: torch.Tensor, targets: Sequence[dict], num_boxes: float,
                   amp: str = "none", context: str = "") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Unweighted loss dict and the weighted total for one batch.

    images: (B, 3, H, W); masks: (B, H, W) True on padding; targets: per image ``labels`` (G,),
    ``boxes`` (G, 4) cxcywh. Raises TrainingError on a non-finite matching cost.
    """
    with autocast_context(images.device, amp):
        plan = distiller.prepare(images, masks, targets) if distiller is not None else None
        groups = plan.groups if plan is not None else []
        if criterion.cfg.extra_groups:  # the student's own queries, copied after it makes them
            copies = main_group_copies(criterion.cfg.extra_groups)
            teacher_groups = groups
            groups = lambda initial: [*teacher_groups, *copies(initial)]  # noqa: E731
        # targets: the student builds its denoising groups from them (DINO; training only)
        out = model(images, masks, extra_groups=groups, targets=targets)
    losses, assignments = detection_losses(criterion, out, targets, num_boxes, context)
    weights: dict[str, float] = {}
    if plan is not None:
        losses.update(distiller.losses(out, targets, num_boxes, plan, assignments))
        weights = distiller.group_weights()
    return losses, criterion.total(losses, weights)
