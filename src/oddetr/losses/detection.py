"""The base detector's losses: main group at every decoder layer, plus two-stage proposals."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oddetr.losses.criterion import SetCriterion
from oddetr.losses.matcher import Assignment
from oddetr.models.outputs import DetectorOutput


def detection_losses(criterion: SetCriterion, out: DetectorOutput, targets: Sequence[dict], num_boxes: float,
                     context: str = "") -> tuple[dict[str, torch.Tensor], list[Assignment]]:
    """Student's own Hungarian matching per layer and its losses (``main/*``, ``enc/*``).

    Returns the loss dict and the main group's per-layer assignments (reused by distillation
    and the instability metric).
    """
    assignments = criterion.match_layers(out.main.logits, out.main.boxes, targets, context)
    losses = criterion.group_losses("main", out.main.logits, out.main.boxes, targets, assignments, num_boxes)
    if out.encoder is not None:
        enc = criterion.matcher(out.encoder.logits, out.encoder.boxes, targets, context=f"{context} encoder".strip())
        losses.update(criterion.group_losses("enc", out.encoder.logits[None], out.encoder.boxes[None], targets,
                                             [enc], num_boxes))
    return losses, assignments
