"""Extra query groups built from the teacher's pass: PD (initial queries) and AUX (stage queries)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from oddetr.losses.matcher import Assignment, HungarianMatcher, per_image_costs, topk_lowest_cost
from oddetr.models.outputs import GroupOutput, QueryGroup


def prediction_group(initial: QueryGroup) -> QueryGroup:
    """PD: the teacher's initial queries, detached, as one student group named ``pd``."""
    group = initial.detach()
    group.name = "pd"
    return group


@dataclass
class AuxGroup:
    """An AUX query group with fixed targets.

    group:      the queries (B, N, ·), N = k * max GT count in the batch (padding has no target)
    assignment: per image, (query index within the group, GT index)
    stages:     the teacher stage(s) the queries come from
    """

    group: QueryGroup
    assignment: Assignment
    stages: tuple[int, ...]


def select_aux_queries(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict],
                       matcher: HungarianMatcher, k: int, costs: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per image, the k lowest-cost teacher queries for every GT at one stage.

    logits: (B, Q, C); boxes: (B, Q, 4) -> per image a (G, k) int64 tensor of query indices.
    ``costs``: the stage's (B, Q, sum G) :meth:`HungarianMatcher.batch_costs`, if already computed.
    """
    if costs is None:
        costs = matcher.batch_costs(logits, boxes, targets)
    costs = per_image_costs(costs, targets)
    return [topk_lowest_cost(c, k) if c.shape[1] else torch.zeros(0, min(k, c.shape[0]), dtype=torch.long)
            for c in costs]


def aux_group(teacher_main: GroupOutput, teacher_initial: QueryGroup, stages: Sequence[int],
              selections: Sequence[Sequence[torch.Tensor]], name: str,
              use_learned_position: bool) -> AuxGroup:
    """Build one AUX group from the teacher's state after each stage in ``stages``.

    selections[i][b]: (G_b, k) query indices chosen at ``stages[i]`` for image b. Each chosen
    query contributes its hidden state after that stage and its refined reference; a query
    chosen for two GTs appears once per GT. Positional queries are the teacher's learned ones of
    that query index (learned-query models) or None (derived from the reference by the student).
    """
    bsz, _, d = teacher_initial.content.shape
    device = teacher_initial.content.device
    # per image the chosen (stage, query, GT) items, stage by stage, GT by GT: the queries stay on the
    # device; stages and GT indices follow from the selections' shapes (no device -> host copy)
    stage_ids, query_ids, gt_ids = [], [], []
    for b in range(bsz):
        stage_ids.append(torch.cat([torch.full((sel[b].numel(),), stage, dtype=torch.long)
                                    for stage, sel in zip(stages, selections)]))
        query_ids.append(torch.cat([sel[b].reshape(-1).to(device) for sel in selections]))
        gt_ids.append(torch.cat([torch.arange(sel[b].shape[0]).repeat_interleave(sel[b].shape[1])
                                 for sel in selections]))
    n = max(1, max(len(g) for g in gt_ids))
    ref_dim = teacher_main.references[stages[0] + 1].shape[-1]
    content = torch.zeros(bsz, n, d, device=device, dtype=teacher_initial.content.dtype)
    reference = torch.full((bsz, n, ref_dim), 0.5, device=device, dtype=teacher_initial.reference.dtype)
    if ref_dim == 4:
        reference[..., 2:] = 0.1
    position = torch.zeros_like(content) if use_learned_position else None
    after_stage = torch.stack(teacher_main.references[1:])  # (L, B, Q, R): the reference after each stage
    assignment: Assignment = []
    for b in range(bsz):
        m = len(gt_ids[b])
        if m:
            stage_t, query_t = stage_ids[b].to(device, non_blocking=True), query_ids[b]
            content[b, :m] = teacher_main.hidden[stage_t, b, query_t]
            reference[b, :m] = after_stage[stage_t, b, query_t].to(reference.dtype)
            if position is not None:
                position[b, :m] = teacher_initial.position[b, query_t]
        assignment.append((torch.arange(m, dtype=torch.long), gt_ids[b]))
    group = QueryGroup(content.detach(), None if position is None else position.detach(), reference.detach(), name)
    return AuxGroup(group, assignment, tuple(stages))
