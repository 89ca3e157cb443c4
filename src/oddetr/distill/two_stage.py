"""Matching distillation on two-stage models' main queries, through shared encoder positions.

A two-stage model's main queries are its top-K encoder proposals, ranked by score, so query i of
the teacher and query i of the student are usually different proposals. Both models pick from the
same flattened encoder positions, though, so a proposal's position is its identity: a teacher
(query, GT) pair maps to the student query at the same position. Teacher pairs whose position is
not among the student's top-K have no counterpart and are dropped (the student's own matching
still covers every GT).

The same lookup with the arguments swapped, ``student_index_of_teacher(student_pos, teacher_pos)``,
gives for every student query the teacher query at its position (-1 if none), e.g. to read the
teacher's box for a student query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oddetr.losses.matcher import Assignment
from oddetr.models.outputs import DetectorOutput


def student_index_of_teacher(teacher_positions: torch.Tensor, student_positions: torch.Tensor) -> torch.Tensor:
    """For every teacher query, the student query at the same encoder position.

    teacher_positions: (B, K_t) int64; student_positions: (B, K_s) int64, positions distinct within
    an image (top-K indices are). Returns (B, K_t) int64 student query indices, -1 where the
    teacher's position is not among the student's.
    """
    if teacher_positions.dim() != 2 or student_positions.dim() != 2 \
            or teacher_positions.shape[0] != student_positions.shape[0]:
        raise ValueError(f"positions must be (B, K) with the same B, got {tuple(teacher_positions.shape)} and "
                         f"{tuple(student_positions.shape)}")
    student_positions = student_positions.to(teacher_positions.device)
    same = teacher_positions[:, :, None] == student_positions[:, None, :]  # (B, K_t, K_s)
    found = same.any(-1)
    index = same.to(torch.uint8).argmax(-1)
    return torch.where(found, index, torch.full_like(index, -1))


def map_assignment(assignment: Assignment, index: torch.Tensor) -> Assignment:
    """Teacher (query, GT) pairs -> student (query, GT) pairs through ``index`` (B, K_t) from
    :func:`student_index_of_teacher`; pairs without a counterpart are dropped. Per image the
    result is sorted by student query, on the device of the input pairs."""
    out: Assignment = []
    for b, (tq, tg) in enumerate(assignment):
        sq = index[b].to(tq.device)[tq]
        keep = sq >= 0
        sq, tg = sq[keep], tg.to(tq.device)[keep]
        order = torch.argsort(sq)
        out.append((sq[order], tg[order]))
    return out


def main_group_teacher_assignments(assignments: Sequence[Assignment], teacher: DetectorOutput,
                                   student: DetectorOutput) -> list[Assignment]:
    """The teacher's per-layer main-group assignments in the student's main-query indices.

    Learned / anchor queries correspond index for index: returned unchanged. Two-stage models
    (``query_positions`` set on both outputs) go through the shared encoder positions.
    """
    if teacher.query_positions is None and student.query_positions is None:
        return list(assignments)
    if teacher.query_positions is None or student.query_positions is None:
        raise ValueError("teacher and student disagree on two-stage query positions")
    index = student_index_of_teacher(teacher.query_positions, student.query_positions)
    return [map_assignment(a, index) for a in assignments]


def main_group_teacher_boxes(teacher_boxes: torch.Tensor, teacher: DetectorOutput,
                             student: DetectorOutput) -> torch.Tensor:
    """The teacher's per-layer main-group boxes in the student's main-query indices.

    teacher_boxes: (L, B, K_t, 4) -> (L, B, K_s, 4): for each student query, the teacher's box at the same
    encoder position; where the teacher has no query there, the student's own (detached) box, which no
    teacher pair can reach. Learned / anchor queries: returned unchanged.
    """
    if teacher.query_positions is None and student.query_positions is None:
        return teacher_boxes
    if teacher.query_positions is None or student.query_positions is None:
        raise ValueError("teacher and student disagree on two-stage query positions")
    index = student_index_of_teacher(student.query_positions, teacher.query_positions)  # (B, K_s) teacher query
    found = index >= 0
    gather = index.clamp(min=0)[None, :, :, None].expand(teacher_boxes.shape[0], -1, -1, 4)
    mapped = torch.gather(teacher_boxes, 2, gather.to(teacher_boxes.device))
    own = student.main.boxes.detach().to(mapped.dtype)
    return torch.where(found[None, :, :, None].to(mapped.device), mapped, own)
