"""Detection losses computed from given assignments.

The criterion never decides *which* query learns *which* GT on its own: callers pass
assignments (the student's Hungarian matching, the teacher's matching, or fixed targets of an
auxiliary group), so every training signal flows through :func:`set_losses`.

Loss dictionaries are flat, keyed ``"{group}/{term}/l{layer}"`` with ``term`` in
``cls | l1 | giou`` and values unweighted. Weights are applied in exactly one place,
:meth:`SetCriterion.total`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from oddetr.box_ops import cxcywh_to_xyxy, paired_giou, paired_iou
from oddetr.config import LossConfig
from oddetr.losses.matcher import Assignment, HungarianMatcher

TERMS = ("cls", "l1", "giou")


def quality_focal_loss(logits: torch.Tensor, soft_targets: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Summed QFL  -|y - p|^beta [y log p + (1 - y) log(1 - p)].  logits, soft_targets: same shape."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")
    return (bce * (soft_targets - prob).abs().pow(beta)).sum()


def varifocal_loss(logits: torch.Tensor, soft_targets: torch.Tensor, alpha: float = 0.75,
                   gamma: float = 2.0) -> torch.Tensor:
    """Summed varifocal loss (VarifocalNet): positives (y > 0) weighted by their target y,
    ``-y [y log p + (1 - y) log(1 - p)]``; negatives down-weighted, ``-alpha p^gamma log(1 - p)``.
    logits, soft_targets: same shape."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")
    weight = torch.where(soft_targets > 0, soft_targets, alpha * prob.detach().pow(gamma))
    return (bce * weight).sum()


def teacher_only_pairs(student: Assignment, teacher: Assignment) -> Assignment:
    """Per image, the teacher's (query, GT) pairs that the student's assignment does not hold."""
    out = []
    for (sq, sg), (tq, tg) in zip(student, teacher):
        if len(tq) and len(sq):
            same = ((tq[:, None] == sq[None, :]) & (tg[:, None] == sg[None, :])).any(1)
            out.append((tq[~same], tg[~same]))
        else:
            out.append((tq, tg))
    return out


def _concat(assignment: Assignment, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assignment -> (batch idx, query idx, gt idx), each (M,) on ``device``."""
    batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(assignment)])
    query = torch.cat([q for q, _ in assignment])
    gt = torch.cat([g for _, g in assignment])
    return batch.to(device), query.to(device), gt.to(device)


def union_unmatched(student: Assignment, teacher: Assignment, mode: str) -> Assignment:
    """Box-loss pairs for matching distillation.

    ``none``: the student's pairs; ``unmatched_only``: plus the teacher's pairs on queries the
    student left unmatched; ``all``: plus every teacher pair that differs from the student's.
    """
    if mode == "none":
        return student
    out = []
    for (sq, sg), (tq, tg) in zip(student, teacher):
        if mode == "unmatched_only":
            keep = ~torch.isin(tq, sq)
        elif mode == "all":
            same = torch.zeros_like(tq, dtype=torch.bool)
            for i in range(len(tq)):
                same[i] = bool(((sq == tq[i]) & (sg == tg[i])).any())
            keep = ~same
        else:
            raise ValueError(f"unknown md_box mode {mode!r}")
        out.append((torch.cat([sq, tq[keep]]), torch.cat([sg, tg[keep]])))
    return out


def classification_targets(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
                           assignments: Sequence[Assignment], soft: bool,
                           box_sources: Sequence[Sequence[torch.Tensor] | None] | None = None) -> torch.Tensor:
    """Targets (B, Q, C) for every assigned (query, GT) pair across ``assignments``.

    Hard (focal): 1 at the GT's class. Soft (QFL, varifocal): max over the query's targets of the
    IoU between a box and the GT box at the GT's class, 0 elsewhere. The box of a pair of
    ``assignments[i]`` is the detached predicted box (``boxes``, (B, Q, 4) cxcywh) unless
    ``box_sources[i]`` gives other (B, Q, 4) boxes (e.g. the teacher's), where the largest IoU
    among them counts.
    """
    y = torch.zeros_like(logits, dtype=torch.float32)
    for i, assignment in enumerate(assignments):
        b, q, g = _concat(assignment, logits.device)
        if len(b) == 0:
            continue
        labels = torch.cat([targets[j]["labels"][gi.to(logits.device)] for j, (_, gi) in enumerate(assignment)])
        if soft:
            gt_boxes = torch.cat([targets[j]["boxes"][gi.to(logits.device)] for j, (_, gi) in enumerate(assignment)])
            gt_xyxy = cxcywh_to_xyxy(gt_boxes.float())
            sources = box_sources[i] if box_sources is not None and box_sources[i] is not None else [boxes]
            value = torch.stack([paired_iou(cxcywh_to_xyxy(src[b, q].detach().float()), gt_xyxy)
                                 for src in sources]).amax(0).clamp(min=0.0)
            current = y[b, q, labels]
            y[b, q, labels] = torch.maximum(current, value)
        else:
            y[b, q, labels] = 1.0
    return y


def set_losses(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
               cls_assignments: Sequence[Assignment], box_assignment: Assignment, num_boxes: float,
               cls_loss: str = "focal", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
               qfl_beta: float = 2.0,
               cls_box_sources: Sequence[Sequence[torch.Tensor] | None] | None = None) -> dict[str, torch.Tensor]:
    """Unweighted ``cls``, ``l1``, ``giou`` of one layer, each summed and divided by ``num_boxes``.

    logits: (B, Q, C); boxes: (B, Q, 4) cxcywh in [0, 1]; targets: per image ``labels`` (G,) and
    ``boxes`` (G, 4) cxcywh. ``cls_assignments``: the assignments whose pairs are positives;
    ``box_assignment``: the pairs that get L1 + GIoU; ``cls_box_sources``: see
    :func:`classification_targets`. ``cls_loss``: ``focal``, ``qfl`` or ``varifocal``.
    """
    logits = logits.float()
    boxes = boxes.float()
    y = classification_targets(logits, boxes, targets, cls_assignments, soft=cls_loss != "focal",
                               box_sources=cls_box_sources)
    if cls_loss == "qfl":
        cls = quality_focal_loss(logits, y, qfl_beta)
    elif cls_loss == "varifocal":
        cls = varifocal_loss(logits, y)
    elif cls_loss == "focal":
        cls = sigmoid_focal_loss(logits, y, alpha=focal_alpha, gamma=focal_gamma, reduction="sum")
    else:
        raise ValueError(f"unknown classification loss {cls_loss!r}")
    b, q, g = _concat(box_assignment, logits.device)
    if len(b):
        pred = boxes[b, q]
        gt = torch.cat([targets[i]["boxes"][gi.to(logits.device)] for i, (_, gi) in enumerate(box_assignment)]).float()
        l1 = F.l1_loss(pred, gt, reduction="sum")
        giou = (1 - paired_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt))).sum()
    else:
        l1 = giou = boxes.sum() * 0.0
    return {"cls": cls / num_boxes, "l1": l1 / num_boxes, "giou": giou / num_boxes}


class SetCriterion:
    """Matches and weighs DETR losses for per-layer outputs of one query group."""

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg
        self.matcher = HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou,
                                        cfg.focal_alpha, cfg.focal_gamma)
        self.term_weights = {"cls": cfg.cls_weight, "l1": cfg.l1_weight, "giou": cfg.giou_weight}

    def match_layers(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
                     context: str = "", costs: torch.Tensor | None = None) -> list[Assignment]:
        """logits: (L, B, Q, C); boxes: (L, B, Q, 4) -> one Hungarian assignment per layer.

        ``costs``: their (L, B, Q, sum G) :meth:`HungarianMatcher.batch_costs`, if the caller has them.
        """
        contexts = [f"{context} decoder layer {i}".strip() for i in range(logits.shape[0])]
        return self.matcher.match_layers(logits, boxes, targets, contexts, costs)

    def layer_indices(self, num_layers: int) -> list[int]:
        """Which decoder layers get a loss: all of them, or only the last."""
        return list(range(num_layers)) if self.cfg.aux_layers else [num_layers - 1]

    def group_losses(self, prefix: str, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
                     assignments: Sequence[Assignment], num_boxes: float, cls_loss: str | None = None,
                     extra_cls: Sequence[Assignment] | None = None,
                     extra_box: Sequence[Assignment] | None = None,
                     extra_cls_boxes: Sequence[Sequence[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """Losses of every supervised layer of one group.

        logits: (L, B, Q, C); boxes: (L, B, Q, 4); assignments: one per layer (the pairs that are
        positives and regress boxes). ``extra_cls`` / ``extra_box``: per-layer extra pairs (the
        teacher's matching in MD) that add positives / box targets. ``extra_cls_boxes``: per layer,
        the (B, Q, 4) boxes whose IoU with the GT is the soft target of the ``extra_cls`` pairs
        (the largest among them; default the predicted boxes).
        """
        cfg = self.cfg
        out: dict[str, torch.Tensor] = {}
        for layer in self.layer_indices(logits.shape[0]):
            cls_sets = [assignments[layer]] + ([extra_cls[layer]] if extra_cls is not None else [])
            sources = None if extra_cls_boxes is None else [None, extra_cls_boxes[layer]]
            box_pairs = extra_box[layer] if extra_box is not None else assignments[layer]
            terms = set_losses(logits[layer], boxes[layer], targets, cls_sets, box_pairs, num_boxes,
                               cls_loss or cfg.cls, cfg.focal_alpha, cfg.focal_gamma, cfg.qfl_beta, sources)
            for term, value in terms.items():
                out[f"{prefix}/{term}/l{layer}"] = value
        return out

    def total(self, losses: dict[str, torch.Tensor], group_weights: dict[str, float] | None = None) -> torch.Tensor:
        """Weighted sum: term weight (cls 1, L1 5, GIoU 2 by default) times the group's weight."""
        group_weights = group_weights or {}
        total = None
        for key, value in losses.items():
            group, term, _ = key.split("/")
            family = group.rstrip("0123456789")  # aux0, aux1 ... share the weight of "aux"
            weight = self.term_weights[term] * group_weights.get(group, group_weights.get(family, 1.0))
            if weight == 0.0:
                continue
            total = value * weight if total is None else total + value * weight
        if total is None:
            raise ValueError("no loss terms to sum")
        return total


def summarize_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per group and term, the sum over layers (unweighted), for logging."""
    out: dict[str, float] = {}
    for key, value in losses.items():
        group, term, _ = key.split("/")
        name = f"{group}/{term}"
        out[name] = out.get(name, 0.0) + float(value.detach())
    return out
