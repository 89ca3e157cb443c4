"""DINO's contrastive denoising (CDN) as a pure function: GT boxes -> noised query groups + metadata.

Every GT box of the batch is copied ``num_groups`` times; each copy gives a *positive* query
(label and box lightly noised: it must reconstruct its GT) and a *negative* query (box noised
farther: it must predict background). Each DN group is one :class:`QueryGroup`, so the decoder's
block-diagonal mask gives DINO's DN attention mask: the matching queries never see DN queries and
DN groups never see each other. The queries' content is the (noised) label's embedding, their
reference the noised box; their positional query comes from the reference (``position=None``).

Box noise follows DINO's code: each corner of the xyxy box moves by ``u * lambda * (w/2 | h/2)``
in a random direction, ``u`` uniform in [0, 1) for positives and [1, 2) for negatives
(``lambda = box_noise_scale``), then corners are clipped to the image and re-ordered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oddetr.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh
from oddetr.models.outputs import DenoisingMeta, QueryGroup

# reference of padding slots (images with fewer GTs than the batch's largest count); no target
PAD_BOX = (0.5, 0.5, 0.1, 0.1)


def noise_boxes(boxes: torch.Tensor, scale: float, negative: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Corner noise of DINO's CDN. boxes: (M, 4) cxcywh in [0, 1] -> (M, 4) cxcywh in [0, 1].

    Each xyxy corner moves by ``sign * u * scale * half_size`` (``half_size`` = w/2 for x, h/2
    for y), ``u ~ U[0, 1)`` (positives) or ``U[1, 2)`` (negatives).
    """
    if scale <= 0 or boxes.numel() == 0:
        return boxes.clone()
    xyxy = cxcywh_to_xyxy(boxes)
    half = (boxes[:, 2:] / 2).repeat(1, 2)
    sign = torch.randint(0, 2, boxes.shape, generator=generator, device=boxes.device).to(boxes.dtype) * 2 - 1
    mag = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype)
    if negative:
        mag = mag + 1.0
    xyxy = (xyxy + sign * mag * half * scale).clamp(0.0, 1.0)
    x1, y1, x2, y2 = xyxy.unbind(-1)  # a negative's corners may cross: re-order them
    xyxy = torch.stack([torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2),
                        torch.maximum(y1, y2)], -1)
    return xyxy_to_cxcywh(xyxy)


def noise_labels(labels: torch.Tensor, num_classes: int, ratio: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label is replaced by a uniformly random class (possibly itself) with probability ``ratio / 2``."""
    if ratio <= 0 or labels.numel() == 0:
        return labels.clone()
    chosen = torch.rand(labels.shape, generator=generator, device=labels.device) < ratio * 0.5
    random = torch.randint(0, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(chosen, random, labels)


def num_denoising_groups(max_gt: int, num_dn_queries: int) -> int:
    """DINO's rule: as many GT copies as fit in ``num_dn_queries`` positive slots (at least one)."""
    return max(1, num_dn_queries // max_gt) if max_gt > 0 else 1


def build_denoising_groups(targets: Sequence[dict], num_classes: int, label_embedding: nn.Embedding,
                           num_dn_queries: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                           generator: torch.Generator | None = None) -> tuple[list[QueryGroup], DenoisingMeta]:
    """Contrastive denoising groups for one batch.

    targets: per image ``labels`` (G_b,) int64 and ``boxes`` (G_b, 4) cxcywh in [0, 1].
    label_embedding: ``nn.Embedding(num_classes, d)``; a query's content is its noised label's row.
    num_dn_queries: positive slots in all (DINO's ``dn_number``): ``K = num_dn_queries // max_b G_b``
    groups, each of ``2 * max_b G_b`` queries (positives first, then negatives; images with fewer
    GTs are padded with zero-content queries that have no target). A batch without any GT gets one
    group of two padding queries, so the label embedding stays in the graph (DDP needs that).

    Returns the K groups (named ``dn0`` ...; content (B, 2P, d), position None, reference (B, 2P, 4))
    and a :class:`DenoisingMeta` with the positives' fixed assignment.
    """
    device = label_embedding.weight.device
    bsz = len(targets)
    counts = [int(len(t["labels"])) for t in targets]
    max_gt = max(counts, default=0)
    pad = max(1, max_gt)
    k = num_denoising_groups(max_gt, num_dn_queries)
    size = 2 * pad
    n = k * size
    labels = torch.full((bsz, n), -1, dtype=torch.long, device=device)
    boxes = torch.tensor(PAD_BOX).to(device, non_blocking=True).repeat(bsz, n, 1)  # no host-device sync
    positive = torch.zeros(bsz, n, dtype=torch.bool, device=device)
    valid = torch.zeros(bsz, n, dtype=torch.bool, device=device)
    assignment = []
    starts = torch.arange(k) * size  # first slot of every group, (K,)
    for b, (tgt, g) in enumerate(zip(targets, counts)):
        pos_idx = (starts[:, None] + torch.arange(g)[None]).flatten()  # (K*g,) group-major
        gt_idx = torch.arange(g).repeat(k)
        assignment.append((pos_idx, gt_idx))
        if g == 0:
            continue
        gt_labels = tgt["labels"].to(device).repeat(k)
        gt_boxes = tgt["boxes"].to(device).float().repeat(k, 1)
        pos_dev, neg_dev = pos_idx.to(device), (pos_idx + pad).to(device)
        labels[b, pos_dev] = noise_labels(gt_labels, num_classes, label_noise_ratio, generator)
        labels[b, neg_dev] = noise_labels(gt_labels, num_classes, label_noise_ratio, generator)
        boxes[b, pos_dev] = noise_boxes(gt_boxes, box_noise_scale, False, generator)
        boxes[b, neg_dev] = noise_boxes(gt_boxes, box_noise_scale, True, generator)
        positive[b, pos_dev] = True
        valid[b, pos_dev] = True
        valid[b, neg_dev] = True
    content = label_embedding(labels.clamp(min=0)) * valid[..., None].to(label_embedding.weight.dtype)
    names = [f"dn{i}" for i in range(k)]
    groups = [QueryGroup(content[:, i * size:(i + 1) * size], None, boxes[:, i * size:(i + 1) * size], name)
              for i, name in enumerate(names)]
    meta = DenoisingMeta(num_groups=k, pad=pad, names=names, assignment=assignment, labels=labels,
                         positive=positive, valid=valid)
    return groups, meta
