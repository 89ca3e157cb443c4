"""A deterministic, resumable, rank-sharded sampler: epoch e's order depends only on (seed, e)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank; call :meth:`set_epoch` before each epoch.

    Every rank gets ``ceil(N / world)`` indices (the tail is padded by wrapping), so ranks take
    the same number of steps. ``start`` skips the first indices of the epoch (mid-epoch resume).
    """

    def __init__(self, length: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1) -> None:
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(length / world) if length else 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / max(1, len(order))))[:total] if order else order
        return order[self.rank:total:self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)
