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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from oddetr.box_ops import cxcywh_to_xyxy, paired_giou, paired_iou
from oddetr.config import LossConfig
from oddetr.losses.matcher import Assignment, HungarianMatcher, gt_offsets

TERMS = ("cls", "l1", "giou")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def quality_focal_loss(logits: torch.Tensor, soft_targets: torch.Tensor, beta: float = 2.0,
                       reduction: str = "sum") -> torch.Tensor:
    """QFL  -|y - p|^beta [y log p + (1 - y) log(1 - p)], summed (``reduction="sum"``) or element-wise
    (``"none"``).  logits, soft_targets: same shape."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")
    return _reduce(bce * (soft_targets - prob).abs().pow(beta), reduction)


def varifocal_loss(logits: torch.Tensor, soft_targets: torch.Tensor, alpha: float = 0.75,
                   gamma: float = 2.0, reduction: str = "sum") -> torch.Tensor:
    """Varifocal loss (VarifocalNet), summed or element-wise: positives (y > 0) weighted by their target y,
    ``-y [y log p + (1 - y) log(1 - p)]``; negatives down-weighted, ``-alpha p^gamma log(1 - p)``.
    logits, soft_targets: same shape."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")
    weight = torch.where(soft_targets > 0, soft_targets, alpha * prob.detach().pow(gamma))
    return _reduce(bce * weight, reduction)


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


def gts_left_to_student(student: Assignment, teacher: Assignment) -> Assignment:
    """Per image, the student's (query, GT) pairs whose GT no teacher pair covers (a two-stage teacher
    query with no student counterpart leaves its GT to the student's own matching)."""
    return [(sq[~torch.isin(sg, tg)], sg[~torch.isin(sg, tg)]) for (sq, sg), (_, tg) in zip(student, teacher)]


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


@dataclass
class BatchGts:
    """The batch's GTs concatenated: ``labels`` (sum G,), ``boxes`` (sum G, 4) cxcywh, and ``offsets``
    (B + 1 ints): image b's GTs are rows ``offsets[b]:offsets[b + 1]``."""

    labels: torch.Tensor
    boxes: torch.Tensor
    offsets: list[int]

    @classmethod
    def of(cls, targets: Sequence[dict]) -> BatchGts:
        return cls(torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]),
                   gt_offsets(targets))


def pair_index(per_layer: Sequence[Assignment], offsets: Sequence[int], device: torch.device) -> torch.Tensor:
    """One assignment per layer -> (4, M) int64 on ``device``: rows layer, image, query and GT (an index
    into :class:`BatchGts`). Built on the host from the matcher's CPU tensors (in numpy: a few calls
    however many layers and images) and sent in one non-blocking copy: no device synchronisation."""
    pieces = [(layer, b, q, g) for layer, assignment in enumerate(per_layer) for b, (q, g) in enumerate(assignment)
              if len(q)]
    if not pieces:
        return torch.zeros(4, 0, dtype=torch.int64, device=device)
    if any(q.device.type != "cpu" or g.device.type != "cpu" for _, _, q, g in pieces):  # e.g. denoising's
        parts = [torch.stack([torch.full_like(q, layer), torch.full_like(q, b), q, g + offsets[b]]).to(
            device, non_blocking=True) for layer, b, q, g in pieces]
        return torch.cat(parts, 1)
    counts = [len(q) for _, _, q, _ in pieces]
    index = np.stack([np.repeat(np.array([p[0] for p in pieces], dtype=np.int64), counts),
                      np.repeat(np.array([p[1] for p in pieces], dtype=np.int64), counts),
                      np.concatenate([q.numpy() for _, _, q, _ in pieces]),
                      np.concatenate([g.numpy() + offsets[b] for _, b, _, g in pieces])])
    return torch.from_numpy(index).to(device, non_blocking=True)


def layered_classification_targets(logits: torch.Tensor, boxes: torch.Tensor, gts: BatchGts,
                                   assignments: Sequence[Sequence[Assignment]], soft: bool,
                                   box_sources: Sequence[Sequence[torch.Tensor] | None] | None = None
                                   ) -> torch.Tensor:
    """Targets (L, B, Q, C) for every assigned (query, GT) pair of every layer across ``assignments``
    (each one assignment per layer).

    Hard (focal): 1 at the GT's class. Soft (QFL, varifocal): the largest, over the query's pairs at
    that class, of the IoU between a box and the GT box; 0 elsewhere. The box of a pair of
    ``assignments[i]`` is the detached predicted box (``boxes``, (L, B, Q, 4) cxcywh) unless
    ``box_sources[i]`` gives other (L, B, Q, 4) boxes (e.g. the teacher's), where the largest IoU
    among them counts.
    """
    y = torch.zeros_like(logits, dtype=torch.float32)
    _, nb, nq, nc = logits.shape
    flat_index, values = [], []
    for i, per_layer in enumerate(assignments):
        layer, b, q, g = pair_index(per_layer, gts.offsets, logits.device)
        if len(g) == 0:
            continue
        labels = gts.labels[g]
        flat_index.append(((layer * nb + b) * nq + q) * nc + labels)
        if soft:
            gt_xyxy = cxcywh_to_xyxy(gts.boxes[g].float())
            sources = box_sources[i] if box_sources is not None and box_sources[i] is not None else [boxes]
            values.append(torch.stack([paired_iou(cxcywh_to_xyxy(src[layer, b, q].detach().float()), gt_xyxy)
                                       for src in sources]).amax(0).clamp(min=0.0))
        else:
            values.append(torch.ones_like(labels, dtype=torch.float32))
    if flat_index:  # the largest value per (layer, image, query, class); y starts at 0
        y.view(-1).scatter_reduce_(0, torch.cat(flat_index), torch.cat(values), "amax", include_self=True)
    return y


def classification_targets(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
                           assignments: Sequence[Assignment], soft: bool,
                           box_sources: Sequence[Sequence[torch.Tensor] | None] | None = None) -> torch.Tensor:
    """:func:`layered_classification_targets` of one layer: logits (B, Q, C), boxes and box sources
    (B, Q, 4) -> targets (B, Q, C)."""
    sources = None if box_sources is None else [None if s is None else [t[None] for t in s] for s in box_sources]
    return layered_classification_targets(logits[None], boxes[None], BatchGts.of(targets),
                                          [[a] for a in assignments], soft, sources)[0]


def layered_set_losses(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
                       cls_assignments: Sequence[Sequence[Assignment]], box_assignments: Sequence[Assignment],
                       num_boxes: float, cls_loss: str = "focal", focal_alpha: float = 0.25,
                       focal_gamma: float = 2.0, qfl_beta: float = 2.0,
                       cls_box_sources: Sequence[Sequence[torch.Tensor] | None] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Unweighted ``cls``, ``l1``, ``giou`` of L layers at once, each (L,): summed per layer and divided by
    ``num_boxes``.

    logits: (L, B, Q, C); boxes: (L, B, Q, 4) cxcywh in [0, 1]; targets: per image ``labels`` (G,) and
    ``boxes`` (G, 4) cxcywh. ``cls_assignments``: sets of positives, each one assignment per layer;
    ``box_assignments``: per layer the pairs that get L1 + GIoU; ``cls_box_sources``: see
    :func:`layered_classification_targets`. ``cls_loss``: ``focal``, ``qfl`` or ``varifocal``.
    Every layer in one pass: a fixed number of kernels and no device synchronisation, however many
    layers and images.
    """
    logits = logits.float()
    boxes = boxes.float()
    gts = BatchGts.of(targets)
    y = layered_classification_targets(logits, boxes, gts, cls_assignments, soft=cls_loss != "focal",
                                       box_sources=cls_box_sources)
    if cls_loss == "qfl":
        cls = quality_focal_loss(logits, y, qfl_beta, reduction="none")
    elif cls_loss == "varifocal":
        cls = varifocal_loss(logits, y, reduction="none")
    elif cls_loss == "focal":
        cls = sigmoid_focal_loss(logits, y, alpha=focal_alpha, gamma=focal_gamma, reduction="none")
    else:
        raise ValueError(f"unknown classification loss {cls_loss!r}")
    layer, b, q, g = pair_index(box_assignments, gts.offsets, logits.device)
    _, nb, nq, _ = boxes.shape
    # index_select, not boxes[layer, b, q]: its backward is an index_add; advanced indexing's backward
    # (a sorting index_put_) is the likely source of the backward's GPU syncs that the probe counted
    pred = boxes.reshape(-1, 4).index_select(0, (layer * nb + b) * nq + q)
    gt = gts.boxes[g].float()
    per_layer = boxes.new_zeros(logits.shape[0])  # the pairs' sums, layer by layer (0 for a layer without pairs)
    l1 = per_layer.index_add(0, layer, (pred - gt).abs().sum(-1))
    giou = per_layer.index_add(0, layer, 1 - paired_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt)))
    return {"cls": cls.flatten(1).sum(1) / num_boxes, "l1": l1 / num_boxes, "giou": giou / num_boxes}


def set_losses(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
               cls_assignments: Sequence[Assignment], box_assignment: Assignment, num_boxes: float,
               cls_loss: str = "focal", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
               qfl_beta: float = 2.0,
               cls_box_sources: Sequence[Sequence[torch.Tensor] | None] | None = None) -> dict[str, torch.Tensor]:
    """:func:`layered_set_losses` of one layer: logits (B, Q, C), boxes and box sources (B, Q, 4) ->
    scalar ``cls``, ``l1``, ``giou``."""
    sources = None if cls_box_sources is None else [None if s is None else [t[None] for t in s]
                                                    for s in cls_box_sources]
    terms = layered_set_losses(logits[None], boxes[None], targets, [[a] for a in cls_assignments], [box_assignment],
                               num_boxes, cls_loss, focal_alpha, focal_gamma, qfl_beta, sources)
    return {term: value[0] for term, value in terms.items()}


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
                     extra_cls_boxes: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Losses of every supervised layer of one group, computed in one pass.

        logits: (L, B, Q, C); boxes: (L, B, Q, 4); assignments: one per layer (the pairs that are
        positives and regress boxes). ``extra_cls`` / ``extra_box``: per-layer extra pairs (the
        teacher's matching in MD) that add positives / box targets. ``extra_cls_boxes``: (L, B, Q, 4)
        boxes whose IoU with the GT is the soft target of the ``extra_cls`` pairs (the largest among
        them; default the predicted boxes).
        """
        cfg = self.cfg
        layers = self.layer_indices(logits.shape[0])
        first = layers[0]  # the supervised layers are a suffix: all of them or the last

        def supervised(per_layer: Sequence[Assignment]) -> list[Assignment]:
            return [per_layer[layer] for layer in layers]

        cls_sets = [supervised(assignments)] + ([supervised(extra_cls)] if extra_cls is not None else [])
        sources = None if extra_cls_boxes is None else [None, [b[first:] for b in extra_cls_boxes]]
        terms = layered_set_losses(logits[first:], boxes[first:], targets, cls_sets,
                                   supervised(extra_box if extra_box is not None else assignments), num_boxes,
                                   cls_loss or cfg.cls, cfg.focal_alpha, cfg.focal_gamma, cfg.qfl_beta, sources)
        return {f"{prefix}/{term}/l{layer}": value[i] for i, layer in enumerate(layers)
                for term, value in terms.items()}

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
    """Per group and term, the sum over layers (unweighted), for logging, in one device -> host copy.
    A key without ``/`` (e.g. the weighted total ``loss``) is passed through."""
    values = torch.stack([v.detach().float() for v in losses.values()]).tolist() if losses else []
    out: dict[str, float] = {}
    for key, value in zip(losses, values):
        name = "/".join(key.split("/")[:2]) if "/" in key else key
        out[name] = out.get(name, 0.0) + value
    return out
