"""The training order: torch's ``DistributedSampler`` plus a start position (mid-epoch resume) and per-sample seeds.

Epoch e's order depends only on (seed, e): one permutation of the dataset, padded by wrapping to a
multiple of the number of ranks, rank r taking positions r, r + W, r + 2W, ... (``DistributedSampler``).
With ``sample_seeds=True`` each index comes with a seed of its own, drawn from (seed, e, position in the
epoch's order): :class:`SeededSamples` runs the dataset's random augmentation under that seed, so a
sample's crop, flip and scale do not depend on which DataLoader worker loads it, nor on how many
samples that worker loaded before. That is what lets a run resumed in the middle of an epoch continue
with the very augmentations the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def sample_seeds(seed: int, epoch: int, positions: range) -> list[int]:
    """63-bit seeds for the samples at ``positions`` of epoch ``epoch``'s order.

    SplitMix64 (a bijective mixer) of the positions offset by a SeedSequence hash of (seed, epoch):
    distinct positions of an epoch get distinct seeds; vectorised, ~10 ms for COCO's 118k images.
    """
    base = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint64)
    x = np.arange(positions.start, positions.stop, positions.step, dtype=np.uint64) + base
    x += np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(1)).tolist()


class EpochSampler(DistributedSampler):
    """One rank's indices of epoch e (call :meth:`set_epoch` before each epoch).

    Every rank gets ``ceil(N / world)`` indices, so ranks take the same number of steps. ``start``
    skips the first indices of this rank's share (a run resumed mid-epoch). With ``sample_seeds`` the
    items are ``(index, seed)`` pairs for :class:`SeededSamples`.
    """

    def __init__(self, length: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1,
                 sample_seeds: bool = False) -> None:
        super().__init__(range(length), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.sample_seeds = sample_seeds
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())
        if self.sample_seeds:  # this rank's j-th index sits at position j * world + rank of the epoch's order
            seeds = sample_seeds(self.seed, self.epoch, range(self.rank, self.total_size, self.num_replicas))
            indices = list(zip(indices, seeds))
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class SeededSamples(Dataset):
    """``dataset[index]`` computed with torch, NumPy and Python RNGs seeded from the key ``(index, seed)``.

    The caller's RNG states are restored afterwards (in the main process they drive dropout).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
