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
