"""The base detector's losses: main group at every decoder layer, two-stage proposals, denoising."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from oddetr.losses.criterion import SetCriterion
from oddetr.losses.matcher import Assignment
from oddetr.models.outputs import DetectorOutput, QueryGroup

COPY_GROUP = "copy"  # the name prefix of ``loss.extra_groups``' query groups


def detection_losses(criterion: SetCriterion, out: DetectorOutput, targets: Sequence[dict], num_boxes: float,
                     context: str = "") -> tuple[dict[str, torch.Tensor], list[Assignment]]:
    """Student's own Hungarian matching per layer and its losses (``main/*``, ``enc/*``, ``dn/*``).

    Returns the loss dict and the main group's per-layer assignments (reused by distillation
    and the instability metric).
    """
    assignments = criterion.match_layers(out.main.logits, out.main.boxes, targets, context)
    losses = criterion.group_losses("main", out.main.logits, out.main.boxes, targets, assignments, num_boxes)
    if out.encoder is not None:
        enc = criterion.matcher(out.encoder.logits, out.encoder.boxes, targets, context=f"{context} encoder".strip())
        losses.update(criterion.group_losses("enc", out.encoder.logits[None], out.encoder.boxes[None], targets,
                                             [enc], num_boxes))
    if out.dn:
        losses.update(denoising_losses(criterion, out, targets, num_boxes))
    for group in out.extra:
        if group.name.startswith(COPY_GROUP):  # Group-DETR-style copies: their own matching, the main losses
            own = criterion.match_layers(group.logits, group.boxes, targets, f"{context} {group.name}".strip())
            losses.update(criterion.group_losses(group.name, group.logits, group.boxes, targets, own, num_boxes))
    return losses, assignments



def main_group_copies(count: int) -> Callable[[QueryGroup], list[QueryGroup]]:
    """``loss.extra_groups``: a builder of ``count`` detached copies of the main group's initial queries,
    named ``copy0``, ``copy1`` ..., for the detector's ``extra_groups`` (training only)."""
    def build(initial: QueryGroup) -> list[QueryGroup]:
        copies = []
        for i in range(count):
            group = initial.detach()
            group.name = f"{COPY_GROUP}{i}"
            copies.append(group)
        return copies
    return build


def denoising_losses(criterion: SetCriterion, out: DetectorOutput, targets: Sequence[dict],
                     num_boxes: float) -> dict[str, torch.Tensor]:
    """DINO's denoising losses (``dn/*``) at every supervised decoder layer, fixed assignments.

    Positive DN queries regress and classify their own GT; negatives and padding are background
    (focal / QFL over every DN query). Normalised by ``num_boxes * num_groups`` (each GT has one
    positive per group), as DINO does.
    """
    meta = out.dn_meta
    if meta is None:
        raise ValueError("denoising outputs without their DenoisingMeta")
    logits = torch.cat([g.logits for g in out.dn], 2)  # (L, B, N, C)
    boxes = torch.cat([g.boxes for g in out.dn], 2)
    return criterion.group_losses("dn", logits, boxes, targets, [meta.assignment] * logits.shape[0],
                                  num_boxes * meta.num_groups)
