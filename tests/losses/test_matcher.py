"""HungarianMatcher against brute force over every assignment, and its costs against hand formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from oddetr.errors import TrainingError
from oddetr.losses.matcher import HungarianMatcher, focal_class_cost, solve_assignment, topk_lowest_cost


def _xyxy(b):
    cx, cy, w, h = b
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou(a, b):
    """Scalar generalised IoU of two xyxy boxes (the textbook definition)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _focal_cost(logit, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit))
    return alpha * (1 - p) ** gamma * -math.log(p) - (1 - alpha) * p ** gamma * -math.log(1 - p)


def _oracle_cost(logits, boxes, labels, gt, weights=(2.0, 5.0, 2.0)):
    """(Q, G) list of lists: class + L1 + (-GIoU), each term computed from its formula in Python floats."""
    wc, wb, wg = weights
    out = []
    for q in range(len(boxes)):
        row = []
        for g in range(len(gt)):
            c_cls = _focal_cost(float(logits[q][labels[g]]))
            c_l1 = sum(abs(float(x) - float(y)) for x, y in zip(boxes[q], gt[g]))
            c_giou = -_giou(_xyxy([float(v) for v in boxes[q]]), _xyxy([float(v) for v in gt[g]]))
            row.append(wc * c_cls + wb * c_l1 + wg * c_giou)
        out.append(row)
    return out


def _random_boxes(gen, n):
    cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([cxcy, wh], 1)


def _brute_force_min(cost, q, g):
    """Minimum total cost over every one-to-one assignment of min(Q, G) pairs."""
    if g <= q:
        return min(sum(cost[perm[j]][j] for j in range(g)) for perm in itertools.permutations(range(q), g))
    return min(sum(cost[i][perm[i]] for i in range(q)) for perm in itertools.permutations(range(g), q))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("q,g", [(6, 4), (5, 3), (4, 4), (3, 1), (6, 2), (2, 3)])
def test_hungarian_total_cost_equals_brute_force_minimum(seed, q, g):
    gen = torch.Generator().manual_seed(seed * 100 + q * 10 + g)
    num_classes = 3
    logits = torch.randn(2, q, num_classes, generator=gen) * 2
    boxes = torch.stack([_random_boxes(gen, q), _random_boxes(gen, q)])
    targets = []
    for _ in range(2):
        targets.append({"labels": torch.randint(0, num_classes, (g,), generator=gen), "boxes": _random_boxes(gen, g)})
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    assignment = matcher(logits, boxes, targets)
    for b in range(2):
        qi, gi = assignment[b]
        assert qi.dtype == gi.dtype == torch.int64
        assert len(qi) == len(gi) == min(q, g)
        assert len(set(qi.tolist())) == len(qi) and len(set(gi.tolist())) == len(gi)  # one-to-one
        assert qi.tolist() == sorted(qi.tolist())
        cost = _oracle_cost(logits[b].tolist(), boxes[b].tolist(), targets[b]["labels"].tolist(),
                            targets[b]["boxes"].tolist())
        ours = sum(cost[i][j] for i, j in zip(qi.tolist(), gi.tolist()))
        # float32 costs: log(1 - p) of a confident logit (|x| ~ 6) is good to ~1e-4, hence 1e-3
        assert ours == pytest.approx(_brute_force_min(cost, q, g), abs=1e-3)
        # the matcher's own cost matrix is the weighted formula
        ours_matrix = matcher.cost_matrices(logits[b:b + 1], boxes[b:b + 1], targets[b:b + 1])[0]
        torch.testing.assert_close(ours_matrix, torch.tensor(cost, dtype=torch.float32), atol=1e-3, rtol=1e-4)


def test_weights_change_the_assignment_as_the_costs_say():
    """Box cost alone picks the nearest box; class cost alone picks the most confident query."""
    logits = torch.tensor([[[5.0, -5.0], [-5.0, -5.0]]])  # query 0 confident in class 0
    boxes = torch.tensor([[[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]])  # query 1 sits on the GT
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1]])}]
    assert HungarianMatcher(0.0, 5.0, 2.0)(logits, boxes, targets)[0][0].tolist() == [1]
    assert HungarianMatcher(2.0, 0.0, 0.0)(logits, boxes, targets)[0][0].tolist() == [0]


def test_focal_class_cost_hand_formula():
    logits = torch.tensor([[-3.0, 0.0, 2.5], [1.0, -1.0, 4.0]])
    labels = torch.tensor([2, 0, 2, 1])
    for alpha, gamma in ((0.25, 2.0), (0.5, 1.0)):
        cost = focal_class_cost(logits, labels, alpha, gamma)
        assert cost.shape == (2, 4)
        for q in range(2):
            for g, c in enumerate(labels.tolist()):
                expected = _focal_cost(float(logits[q, c]), alpha, gamma)
                assert float(cost[q, g]) == pytest.approx(expected, abs=1e-5)


def test_empty_targets_give_empty_assignments():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=gen)
    boxes = torch.stack([_random_boxes(gen, 5), _random_boxes(gen, 5)])
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([1, 2]), "boxes": _random_boxes(gen, 2)},
    ]
    assignment = HungarianMatcher()(logits, boxes, targets)
    q0, g0 = assignment[0]
    assert q0.shape == g0.shape == (0,) and q0.dtype == g0.dtype == torch.int64
    assert len(assignment[1][0]) == 2
    # every image empty
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    assert all(len(q) == 0 for q, _ in HungarianMatcher()(logits, boxes, empty))


@pytest.mark.parametrize("where,bad", [("logits", float("nan")), ("boxes", float("nan")), ("boxes", float("inf"))])
def test_non_finite_predictions_raise_one_line_training_error_with_context(where, bad):
    """(An infinite *logit* gives a finite focal cost thanks to the 1e-8 in log(p + eps): no error.)"""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 3, generator=gen)
    boxes = _random_boxes(gen, 4)[None]
    (logits if where == "logits" else boxes)[0, 2, 1] = bad
    targets = [{"labels": torch.tensor([0, 1]), "boxes": _random_boxes(gen, 2), "image_id": 42}]
    with pytest.raises(TrainingError) as info:
        HungarianMatcher()(logits, boxes, targets, context="epoch 3 step 17")
    message = str(info.value)
    assert "epoch 3 step 17" in message
    assert "42" in message  # the image id
    assert "\n" not in message


def test_solve_assignment_rectangular_and_sorted():
    cost = torch.tensor([[9.0, 1.0], [0.5, 8.0], [3.0, 3.0]])
    q, g = solve_assignment(cost)
    assert q.tolist() == [0, 1] and g.tolist() == [1, 0]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("q,g,k", [(6, 4, 2), (5, 1, 3), (3, 2, 5), (8, 3, 1)])
def test_topk_lowest_cost_vs_sorting(seed, q, g, k):
    cost = torch.rand(q, g, generator=torch.Generator().manual_seed(seed))
    idx = topk_lowest_cost(cost, k)
    assert idx.shape == (g, min(k, q))
    for j in range(g):
        expected = sorted(range(q), key=lambda i, j=j: float(cost[i, j]))[:k]
        assert idx[j].tolist() == expected


def test_infinite_logits_still_match():
    """An infinite logit has a finite focal cost (the 1e-8 inside the logs), so matching goes on."""
    logits = torch.tensor([[[float("inf"), 0.0], [float("-inf"), 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    cost = HungarianMatcher().cost_matrices(logits, boxes, targets)[0]
    assert torch.isfinite(cost).all()
    assert HungarianMatcher()(logits, boxes, targets)[0][0].tolist() == [0]


@pytest.mark.parametrize("seed", range(3))
def test_batched_layers_equal_single_image_matching(seed):
    """All layers and images matched in one call (one cost tensor, one host copy) give each image the
    assignment and (to float32 rounding) the cost block it gets alone, itself checked against brute force
    above; empty GT sets included."""
    gen = torch.Generator().manual_seed(seed)
    layers, q, num_classes, counts = 3, 7, 4, [0, 3, 1, 5]
    logits = torch.randn(layers, len(counts), q, num_classes, generator=gen) * 2
    boxes = torch.stack([torch.stack([_random_boxes(gen, q) for _ in counts]) for _ in range(layers)])
    targets = [{"labels": torch.randint(0, num_classes, (g,), generator=gen), "boxes": _random_boxes(gen, g)}
               for g in counts]
    matcher = HungarianMatcher()
    costs = matcher.batch_costs(logits, boxes, targets)
    assert costs.shape == (layers, len(counts), q, sum(counts))
    batched = matcher.match_layers(logits, boxes, targets, [f"layer {i}" for i in range(layers)], costs)
    for layer in range(layers):
        blocks = matcher.cost_matrices(logits[layer], boxes[layer], targets)
        for b, t in enumerate(targets):
            alone_cost = matcher.cost_matrices(logits[layer, b:b + 1], boxes[layer, b:b + 1], [t])[0]
            # the same formula on a larger tensor: equal up to float32 rounding (vectorised vs tail loops)
            torch.testing.assert_close(blocks[b], alone_cost, rtol=1e-6, atol=1e-6)
            alone = matcher(logits[layer, b:b + 1], boxes[layer, b:b + 1], [t])[0]
            assert batched[layer][b][0].tolist() == alone[0].tolist()
            assert batched[layer][b][1].tolist() == alone[1].tolist()
