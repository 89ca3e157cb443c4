"""Query initialisers of the one detector, as small pure helpers.

- learned (Deformable-DETR): a learned (position, content) pair per query, reference points from
  the positional half (lives in :mod:`oddetr.models.detector`, it has parameters of its own)
- anchors (DAB-Deformable-DETR): learned content + learned 4-d anchor boxes; positional queries
  from the anchors' sine embedding every layer (``position=None``)
- proposals (two-stage Deformable-DETR): top-K encoder proposals give reference *and* queries
- mixed (DINO): top-K encoder proposals give the reference; content is learned; position from
  the reference (``position=None``)
"""

from __future__ import annotations

import torch

from oddetr.box_ops import inverse_sigmoid
from oddetr.models.outputs import EncoderProposals, QueryGroup


@torch.no_grad()
def init_anchor_boxes(weight: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Fill (Q, 4) logit-space anchors so that ``sigmoid`` gives spread boxes.

    Centres uniform in [0.02, 0.98] (DAB-DETR's ``random_refpoints_xy``), sides uniform in
    [0.05, 0.5]. The anchors are trained (DAB's default).
    """
    q = weight.shape[0]
    xy = torch.rand(q, 2, generator=generator) * 0.96 + 0.02
    wh = torch.rand(q, 2, generator=generator) * 0.45 + 0.05
    weight.copy_(inverse_sigmoid(torch.cat([xy, wh], -1)).to(weight))


def anchor_queries(content: torch.Tensor, anchors: torch.Tensor, batch_size: int) -> QueryGroup:
    """DAB: content (Q, d) learned; anchors (Q, 4) logit-space -> main group, reference = sigmoid(anchors)."""
    reference = anchors.sigmoid()[None].expand(batch_size, -1, -1)
    return QueryGroup(content[None].expand(batch_size, -1, -1), None, reference, "main")


def select_proposals(proposals: EncoderProposals, invalid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k encoder proposals by their best class score, never at padded / edge positions.

    proposals: logits (B, S, C), boxes (B, S, 4); invalid: (B, S, 1) bool.
    Returns the indices (B, k') and their boxes (B, k', 4) detached, k' = min(k, S).
    """
    k = min(k, proposals.logits.shape[1])
    scores = proposals.logits.detach().max(-1).values.float().masked_fill(invalid[..., 0], float("-inf"))
    topk = scores.topk(k, dim=1).indices
    reference = torch.gather(proposals.boxes, 1, topk[..., None].expand(-1, -1, 4)).detach()
    return topk, reference


def mixed_queries(content: torch.Tensor, reference: torch.Tensor) -> QueryGroup:
    """DINO's mixed query selection: content (Q, d) learned, the same for every image; reference
    (B, K, 4) the top-K proposal boxes (detached); position derived from the reference."""
    bsz, k, _ = reference.shape
    return QueryGroup(content[:k][None].expand(bsz, -1, -1), None, reference, "main")
