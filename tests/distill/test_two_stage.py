"""Two-stage models: the teacher's matching reaches the student's main queries through shared encoder
positions, and the instability metric names two-stage queries by their position."""

from __future__ import annotations

import pytest
import torch
from distill_testutils import fixed_targets, images_and_masks, one_thread, tiny_setup

import oddetr.models.detector as detector_module
from oddetr.distill.two_stage import main_group_teacher_assignments, map_assignment, student_index_of_teacher
from oddetr.engine.evaluate import probe_assignment
from oddetr.engine.step import compute_losses
from oddetr.evaluation.instability import instability, positions_of_queries
from oddetr.losses.detection import detection_losses

# frozen BN: with ordinary BN a training-mode student and an eval-mode teacher see other features
TWO_STAGE = ("model.two_stage=true", "model.backbone.norm=frozen_bn", "model.dropout=0.0")
DINO = ("model=dino-tiny", "model.d_model=32", "model.nheads=2", "model.enc_layers=1", "model.dec_layers=2",
        "model.dim_feedforward=64", "model.num_queries=8", "model.dn_queries=4", *TWO_STAGE[1:])


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_thread():
        yield


def _pairs(queries: list[int], gts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(queries, dtype=torch.long), torch.tensor(gts, dtype=torch.long)


def _as_lists(assignment) -> list[tuple[list[int], list[int]]]:
    return [(q.tolist(), g.tolist()) for q, g in assignment]


@pytest.fixture
def reversed_proposals(monkeypatch):
    """Make the model rank its top-K proposals in reverse order (the same set of positions)."""
    original = detector_module.select_proposals

    def reverse(proposals, invalid, k):
        topk, reference = original(proposals, invalid, k)
        return topk.flip(1), reference.flip(1)

    def enable():
        monkeypatch.setattr(detector_module, "select_proposals", reverse)

    return enable


# ---------------------------------------------------------------------------------------- the mapping


def test_mapping_hand_made():
    teacher = torch.tensor([[5, 9, 2, 7], [0, 1, 2, 3]])
    student = torch.tensor([[7, 5, 3], [3, 2, 1]])  # K_s = 3 < K_t = 4
    index = student_index_of_teacher(teacher, student)
    assert index.tolist() == [[1, -1, -1, 0], [-1, 2, 1, 0]]
    assignment = [_pairs([0, 1, 3], [2, 0, 1]), _pairs([0, 2, 3], [0, 1, 2])]
    # image 0: teacher q0 (pos 5) -> student q1; q1 (pos 9) has no counterpart; q3 (pos 7) -> q0
    # image 1: q0 (pos 0) has none; q2 (pos 2) -> q1; q3 (pos 3) -> q0
    assert _as_lists(map_assignment(assignment, index)) == [([0, 1], [1, 2]), ([0, 1], [2, 1])]
    assert _as_lists(map_assignment([_pairs([], []), _pairs([], [])], index)) == [([], []), ([], [])]
    with pytest.raises(ValueError):
        student_index_of_teacher(teacher, student[:1])


def test_mapping_matches_brute_force_on_random_positions():
    g = torch.Generator().manual_seed(0)
    bsz, k, s = 3, 12, 30
    teacher = torch.stack([torch.randperm(s, generator=g)[:k] for _ in range(bsz)])
    student = torch.stack([torch.randperm(s, generator=g)[:k] for _ in range(bsz)])
    assignment = [(torch.randperm(k, generator=g)[:5], torch.arange(5)) for _ in range(bsz)]
    mapped = map_assignment(assignment, student_index_of_teacher(teacher, student))
    for b in range(bsz):
        where = {int(p): i for i, p in enumerate(student[b])}
        expected = sorted((where[int(teacher[b, q])], int(gt)) for q, gt in zip(*assignment[b])
                          if int(teacher[b, q]) in where)
        assert list(zip(*_as_lists(mapped)[b])) == expected


# ---------------------------------------------------------------------------------------- MD on the main group


def test_identical_weights_map_teacher_assignment_onto_itself():
    cfg, student, criterion, distiller = tiny_setup(*DINO)
    assert cfg.model.arch == "dino" and distiller.md_on_main and distiller.md_on_pd
    images, masks = images_and_masks()
    targets = fixed_targets()
    plan = distiller.prepare(images, masks, targets)
    out = student(images, masks, extra_groups=plan.groups, targets=targets)
    assert out.query_positions.shape == (2, cfg.model.num_queries) and out.query_positions.dtype == torch.long
    # same weights, same images: the student's main queries are the teacher's, in the same order
    assert torch.equal(out.query_positions, plan.teacher.query_positions)
    index = student_index_of_teacher(plan.teacher.query_positions, out.query_positions)
    assert torch.equal(index, torch.arange(cfg.model.num_queries).expand(2, -1))
    mapped = main_group_teacher_assignments(plan.teacher_assignments, plan.teacher, out)
    assert [_as_lists(a) for a in mapped] == [_as_lists(a) for a in plan.teacher_assignments]
    losses, total = compute_losses(student, criterion, distiller, images, masks, targets, 4.0)
    assert {"main", "enc", "dn", "md", "mdpd"} <= {k.split("/")[0] for k in losses} and torch.isfinite(total)


def test_md_loss_follows_proposals_not_query_order(reversed_proposals):
    """Two-stage Deformable-DETR's queries come from their proposals alone, so reversing the student's
    proposal order only reverses its outputs: MD through positions gives the same loss."""
    _, student, criterion, distiller = tiny_setup(*TWO_STAGE, "distill.pd=false", "distill.aux=false")
    images, masks = images_and_masks()
    targets = fixed_targets()
    plan = distiller.prepare(images, masks, targets)

    def md_losses():
        out = student(images, masks, extra_groups=plan.groups)
        _, own = detection_losses(distiller.criterion, out, targets, 4.0)
        losses = distiller.losses(out, targets, 4.0, plan, own)
        return out, {k: v for k, v in losses.items() if k.startswith("md/")}

    out, straight = md_losses()
    reversed_proposals()
    out_r, flipped = md_losses()
    assert torch.equal(out_r.query_positions, out.query_positions.flip(1))
    assert straight.keys() == flipped.keys() and straight
    for key in straight:
        torch.testing.assert_close(flipped[key], straight[key], rtol=1e-4, atol=1e-6)
    # the teacher's pairs land on the reversed indices
    k = out.query_positions.shape[1]
    mapped = main_group_teacher_assignments(plan.teacher_assignments, plan.teacher, out_r)
    for got, (tq, tg) in zip(mapped[-1], plan.teacher_assignments[-1]):
        assert sorted(zip(got[0].tolist(), got[1].tolist())) == sorted(zip((k - 1 - tq).tolist(), tg.tolist()))


# ---------------------------------------------------------------------------------------- instability


def test_positions_of_queries():
    positions = torch.tensor([[40, 41, 42], [7, 8, 9]])
    got = positions_of_queries([_pairs([2, 0], [0, 1]), _pairs([], [])], positions)
    assert _as_lists(got) == [([42, 40], [0, 1]), ([], [])]
    with pytest.raises(ValueError):
        positions_of_queries([_pairs([0], [0])], positions)


def test_two_stage_instability_keys_queries_by_position(reversed_proposals):
    _, model, criterion, _ = tiny_setup(*TWO_STAGE)
    images, masks = images_and_masks(batch=2, seed=1)
    loader = [(images, masks, fixed_targets())]
    device = torch.device("cpu")
    first = probe_assignment(model, loader, criterion.matcher, device)
    assert len(first) == 4
    assert instability(first, probe_assignment(model, loader, criterion.matcher, device)) == 0.0

    def matched_queries():
        with torch.no_grad():
            out = model(images, masks)
        return criterion.matcher(out.pred_logits, out.pred_boxes, fixed_targets()), out.query_positions.shape[1]

    by_index, k = matched_queries()
    reversed_proposals()
    # the same model ranking the same proposals the other way: every query index changes, no position
    assert instability(first, probe_assignment(model, loader, criterion.matcher, device)) == 0.0
    flipped, _ = matched_queries()
    for (q, g), (fq, fg) in zip(by_index, flipped):
        assert sorted(zip((k - 1 - q).tolist(), g.tolist())) == sorted(zip(fq.tolist(), fg.tolist()))


def test_teacher_boxes_follow_positions_onto_student_queries():
    """For each student query, the teacher's box at the same encoder position (hand-made case)."""
    from types import SimpleNamespace

    from oddetr.distill.two_stage import main_group_teacher_boxes

    teacher_pos = torch.tensor([[5, 9, 2]])
    student_pos = torch.tensor([[2, 7, 5]])  # student q0 = teacher q2, q1 has no teacher query, q2 = teacher q0
    teacher_boxes = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)  # (L, B, K_t, 4)
    student_boxes = -torch.ones(2, 1, 3, 4)
    teacher = SimpleNamespace(query_positions=teacher_pos)
    student = SimpleNamespace(query_positions=student_pos, main=SimpleNamespace(boxes=student_boxes))
    got = main_group_teacher_boxes(teacher_boxes, teacher, student)
    for layer in range(2):
        assert torch.equal(got[layer, 0, 0], teacher_boxes[layer, 0, 2])
        assert torch.equal(got[layer, 0, 1], student_boxes[layer, 0, 1])
        assert torch.equal(got[layer, 0, 2], teacher_boxes[layer, 0, 0])
    learned = SimpleNamespace(query_positions=None)
    assert main_group_teacher_boxes(teacher_boxes, learned, learned) is teacher_boxes
