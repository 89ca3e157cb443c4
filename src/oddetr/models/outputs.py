"""Typed containers that flow between the detector, the criterion and the distiller."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass
class QueryGroup:
    """A group of decoder queries; groups only attend within themselves.

    content:   (B, G, d) content queries (``tgt``)
    position:  (B, G, d) positional queries, or None to derive them from ``reference``
               every layer (the model's sine embedding + MLP, as DAB / DINO do)
    reference: (B, G, 2) normalised points or (B, G, 4) normalised cxcywh boxes
    name:      a label used for loss keys (``main``, ``pd``, ``aux0`` ...)
    """

    content: torch.Tensor
    position: torch.Tensor | None
    reference: torch.Tensor
    name: str = "main"

    def __post_init__(self) -> None:
        if self.content.dim() != 3 or self.reference.dim() != 3:
            raise ValueError("QueryGroup content must be (B, G, d) and reference (B, G, 2|4)")
        if self.reference.shape[:2] != self.content.shape[:2]:
            raise ValueError(f"QueryGroup {self.name}: content {tuple(self.content.shape)} and reference "
                             f"{tuple(self.reference.shape)} disagree on (B, G)")
        if self.reference.shape[-1] not in (2, 4):
            raise ValueError(f"QueryGroup {self.name}: reference last dim must be 2 or 4")

    @property
    def size(self) -> int:
        return self.content.shape[1]

    def detach(self) -> QueryGroup:
        pos = None if self.position is None else self.position.detach()
        return QueryGroup(self.content.detach(), pos, self.reference.detach(), self.name)

    def select(self, batch_index: torch.Tensor, query_index: torch.Tensor, name: str) -> QueryGroup:
        """Gather queries; batch_index, query_index: (B, G') -> a new group of G' queries per image."""
        pos = None if self.position is None else self.position[batch_index, query_index]
        return QueryGroup(self.content[batch_index, query_index], pos, self.reference[batch_index, query_index], name)


@dataclass
class GroupOutput:
    """Per-decoder-layer outputs of one query group.

    logits:     (L, B, G, C) class logits at every decoder layer
    boxes:      (L, B, G, 4) cxcywh boxes in [0, 1] at every decoder layer
    hidden:     (L, B, G, d) decoder hidden state after every layer
    references: L + 1 tensors (B, G, 2|4): the reference each layer received, then the one after
                the last layer (the refined box with box refinement)
    """

    name: str
    logits: torch.Tensor
    boxes: torch.Tensor
    hidden: torch.Tensor
    references: list[torch.Tensor]


@dataclass
class Memory:
    """Encoder output.

    memory:        (B, S, d) flattened multi-scale features after the encoder
    spatial_shapes: L pairs of ints (h, w), one per level
    valid_ratios:  (B, L, 2) fraction of each level that is not padding, (x, y)
    padding_mask:  (B, S) bool, True on padding
    """

    memory: torch.Tensor
    spatial_shapes: list[tuple[int, int]]
    valid_ratios: torch.Tensor
    padding_mask: torch.Tensor


@dataclass
class EncoderProposals:
    """Two-stage encoder predictions over every memory position.

    logits: (B, S, C); boxes: (B, S, 4) cxcywh; topk: (B, K) indices chosen as decoder queries.
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    topk: torch.Tensor


@dataclass
class DenoisingMeta:
    """Where the denoising (DN) queries are and what they must predict.

    The DN queries are ``num_groups`` query groups (named ``names``) of ``group_size = 2 * pad``
    queries each: ``pad`` positive slots (a noised copy of GT j in slot j) then ``pad`` negative
    slots (a farther-noised copy of GT j in slot ``pad + j``); ``pad`` is the batch's largest GT
    count, so images with fewer GTs have padding slots (no target). Indices below count queries
    in the DN groups concatenated in order (N = num_groups * group_size).

    assignment: per image, (query index, GT index) of every positive DN query (fixed targets)
    labels:     (B, N) int64 noised labels fed to the label embedding (-1 on padding)
    positive:   (B, N) bool, True on positive queries
    valid:      (B, N) bool, False on padding
    """

    num_groups: int
    pad: int
    names: list[str]
    assignment: list[tuple[torch.Tensor, torch.Tensor]]
    labels: torch.Tensor
    positive: torch.Tensor
    valid: torch.Tensor

    @property
    def group_size(self) -> int:
        return 2 * self.pad


@dataclass
class DetectorOutput:
    """Everything the losses and the distiller need from one forward pass.

    main:    the main (matching) group's per-layer outputs
    initial: the main group exactly as the decoder received it at layer 0
    extra:   outputs of the caller's ``extra_groups``, in order
    encoder: two-stage encoder proposals (None for learned / anchor queries)
    dn:      outputs of the denoising groups (training with targets and ``model.dn_queries > 0``)
    dn_meta: where the DN queries are and their targets (None without DN)
    query_positions: (B, K) int64, two-stage models only: the encoder position of every main
             query (its index into the flattened multi-level memory, S axis of :class:`Memory`).
             Teacher and student pick their queries from the same positions, so a position is a
             query's identity across models and epochs; None for learned / anchor queries
    """

    main: GroupOutput
    initial: QueryGroup
    extra: list[GroupOutput] = field(default_factory=list)
    encoder: EncoderProposals | None = None
    dn: list[GroupOutput] = field(default_factory=list)
    dn_meta: DenoisingMeta | None = None
    query_positions: torch.Tensor | None = None

    @property
    def pred_logits(self) -> torch.Tensor:
        """(B, Q, C) final-layer logits of the main group."""
        return self.main.logits[-1]

    @property
    def pred_boxes(self) -> torch.Tensor:
        """(B, Q, 4) final-layer cxcywh boxes of the main group."""
        return self.main.boxes[-1]


def cast_floating(value: T, dtype: torch.dtype) -> T:
    """``value`` (a tensor, a list / tuple, or one of this module's dataclasses, nested) with every
    floating-point tensor cast to ``dtype``; integer / bool tensors and other fields unchanged.
    E.g. a teacher pass run under bf16 autocast, brought back to float32 for the student's losses."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value  # type: ignore[return-value]
    if isinstance(value, list | tuple):
        return type(value)(cast_floating(v, dtype) for v in value)  # type: ignore[return-value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes: dict[str, Any] = {f.name: cast_floating(getattr(value, f.name), dtype)
                                   for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value
