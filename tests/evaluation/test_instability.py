"""Matching instability: assignment maps, IS(e), probe selection."""

from __future__ import annotations

import random

import pytest
import torch

from oddetr.errors import ConfigError
from oddetr.evaluation.instability import assignment_map, instability, select_probe_indices


def _idx(queries: list[int], gts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(queries, dtype=torch.long), torch.tensor(gts, dtype=torch.long)


def test_assignment_map_keys_by_image_and_gt() -> None:
    m = assignment_map([10, 11, 12], [_idx([5, 2], [1, 0]), _idx([], []), _idx([7], [0])])
    assert m == {(10, 1): 5, (10, 0): 2, (12, 0): 7}
    assert all(type(k[0]) is int and type(k[1]) is int and type(v) is int for k, v in m.items())


def test_assignment_map_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        assignment_map([1, 2], [_idx([0], [0])])
    with pytest.raises(ValueError, match="matched twice"):
        assignment_map([1], [_idx([0, 1], [0, 0])])
    with pytest.raises(ValueError):
        assignment_map([1], [_idx([0, 1], [0])])


def test_instability_hand_made() -> None:
    prev = {(1, 0): 3, (1, 1): 4, (2, 0): 9, (3, 0): 1}
    cur = {(1, 0): 3, (1, 1): 8, (2, 0): 9, (4, 0): 0}  # (3,0) and (4,0) not shared
    assert instability(prev, cur) == pytest.approx(1 / 3)
    assert instability(prev, prev) == 0.0
    assert instability(prev, {k: v + 1 for k, v in prev.items()}) == 1.0
    assert instability({}, cur) == 0.0
    assert instability({(9, 9): 1}, cur) == 0.0


def test_instability_from_matcher_indices() -> None:
    e1 = assignment_map([0, 1], [_idx([4, 1], [0, 1]), _idx([2], [0])])
    e2 = assignment_map([0, 1], [_idx([1, 4], [1, 0]), _idx([3], [0])])  # same pairs reordered + one change
    assert instability(e1, e2) == pytest.approx(1 / 3)


def test_select_probe_indices() -> None:
    assert select_probe_indices(5, max_images=256) == [0, 1, 2, 3, 4]
    assert select_probe_indices(0) == []
    state = random.getstate()
    a = select_probe_indices(10_000, max_images=256, seed=3)
    assert random.getstate() == state  # global RNG untouched
    assert a == select_probe_indices(10_000, max_images=256, seed=3)
    assert a == sorted(a) and len(set(a)) == 256 and 0 <= a[0] and a[-1] < 10_000
    assert a != select_probe_indices(10_000, max_images=256, seed=4)
    with pytest.raises(ConfigError):
        select_probe_indices(10, max_images=0)
    with pytest.raises(ConfigError):
        select_probe_indices(-1)


def test_rival_queries_against_brute_force() -> None:
    """Rivals: other queries with IoU >= 0.5 to the GT and >= ratio x the matched query's probability of its
    class; checked against a pairwise loop over shapely-free closed-form IoUs of axis-aligned boxes."""
    from oddetr.evaluation.instability import rival_queries

    g = torch.Generator().manual_seed(0)
    q, c, n_gt = 30, 3, 4
    gt_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4], [0.2, 0.8, 0.1, 0.1]])
    gt_labels = torch.tensor([0, 2, 1, 0])
    # queries jittered around the GTs so that some overlap well and some do not
    boxes = gt_boxes[torch.arange(q) % n_gt] + 0.06 * torch.randn(q, 4, generator=g)
    boxes[:, 2:] = boxes[:, 2:].abs() + 0.02
    probs = torch.rand(q, c, generator=g)
    query_idx, gt_idx = torch.tensor([5, 2, 11, 3]), torch.tensor([1, 2, 3, 0])

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
        bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
        inter = max(0.0, float(min(ax1, bx1) - max(ax0, bx0))) * max(0.0, float(min(ay1, by1) - max(ay0, by0)))
        return inter / float(a[2] * a[3] + b[2] * b[3] - inter)

    for ratio in (0.5, 0.8):
        got = rival_queries(4, probs, boxes, gt_boxes, gt_labels, query_idx, gt_idx, min_iou=0.5, min_ratio=ratio)
        assert set(got) == {(4, 1), (4, 2), (4, 3), (4, 0)}
        for mq, mg in zip(query_idx.tolist(), gt_idx.tolist()):
            cls = int(gt_labels[mg])
            want = {r for r in range(q) if r != mq and iou(boxes[r], gt_boxes[mg]) >= 0.5
                    and probs[r, cls] >= ratio * probs[mq, cls]}
            assert got[(4, mg)] == want
        assert any(got.values())  # the case has rivals at all
    assert sum(map(len, rival_queries(4, probs, boxes, gt_boxes, gt_labels, query_idx, gt_idx, min_ratio=0.5).values())) \
        > sum(map(len, rival_queries(4, probs, boxes, gt_boxes, gt_labels, query_idx, gt_idx, min_ratio=0.8).values()))


def test_split_instability_hand_made() -> None:
    from oddetr.evaluation.instability import split_instability

    prev = {(1, 0): 3, (1, 1): 4, (2, 0): 9, (2, 1): 5, (3, 0): 1}
    cur = {(1, 0): 3, (1, 1): 8, (2, 0): 7, (2, 1): 6, (4, 0): 0}  # 4 GTs shared, 3 changed
    prev_rivals = {(1, 1): frozenset({8}), (2, 0): frozenset(), (2, 1): frozenset({2})}  # (1,1): 8 was a rival
    cur_rivals = {(2, 0): frozenset({9}), (2, 1): frozenset({1})}  # (2,0): the old query 9 still is one
    swap, new = split_instability(prev, cur, prev_rivals, cur_rivals)
    assert (swap, new) == (pytest.approx(2 / 4), pytest.approx(1 / 4))  # (2,1) moved to a query that was no rival
    assert swap + new == pytest.approx(instability(prev, cur))
    assert split_instability(prev, cur, {}, {}) == (0.0, pytest.approx(3 / 4))
    assert split_instability({}, cur, {}, {}) == (0.0, 0.0)
