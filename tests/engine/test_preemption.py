"""Mid-epoch checkpoints: SIGTERM or a crash in the middle of an epoch, ``--resume``, and the finished run
equals an uninterrupted one bit for bit.

The same random setting as ``test_resume.py`` (distillation, dropout, flips, crops and multi-scale
resizing in a DataLoader worker, a step schedule), plus gradient accumulation over 2 batches: SIGTERM
arrives on the first batch of a window, so the run finishes that window before saving. 12 images,
batch 2: 6 batches and 3 optimiser steps per epoch, 2 epochs.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_testutils import (
    FAST_KEYS,
    assert_same_training_state,
    read_jsonl,
    synthetic_keys,
    without_timing,
)
from test_resume import RANDOM_KEYS

from oddetr.cli import main
from oddetr.engine import step as step_module
from oddetr.engine.checkpoint import safe_load
from oddetr.engine.preemption import PREEMPTED_EXIT
from oddetr.engine.sampler import EpochSampler, SeededSamples


@pytest.fixture(scope="module")
def keys(tmp_path_factory, tiny_keys) -> list[str]:
    root = tmp_path_factory.mktemp("preemption")
    return tiny_keys(*synthetic_keys(root / "synthetic", num_train=12), *FAST_KEYS, *RANDOM_KEYS,
                     "train.grad_accum=2", "train.epochs=2")


@pytest.fixture(scope="module")
def straight(keys, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *keys, f"output={run}"]) == 0
    return run


def _interrupt_at(monkeypatch, call: int, action) -> None:
    """Run ``action()`` just before the ``call``-th (1-based) forward pass of the run."""
    real, calls = step_module.compute_losses, []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "compute_losses", wrapped)


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    assert_same_training_state(safe_load(a_dir / "last.pt"), safe_load(b_dir / "last.pt"), epoch=2, step=6)
    records_a, records_b = read_jsonl(a_dir / "metrics.jsonl"), read_jsonl(b_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records_b] == [1, 2]
    assert [without_timing(r) for r in records_a] == [without_timing(r) for r in records_b]
    assert read_jsonl(a_dir / "steps.jsonl") == read_jsonl(b_dir / "steps.jsonl")
    assert [r["step"] for r in read_jsonl(b_dir / "steps.jsonl")] == [s for s in range(6) for _ in range(2)]
    assert list(b_dir.glob(".*.tmp")) == []


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(straight, keys, tmp_path, monkeypatch,
                                                                   capsys, stderr_lines) -> None:
    run = tmp_path / "run"
    # the 9th batch is epoch 2's third (batch 2, the first of the window 2-3): SIGTERM while it trains
    _interrupt_at(monkeypatch, 9, lambda: os.kill(os.getpid(), signal.SIGTERM))
    capsys.readouterr()
    assert main(["train", *keys, f"output={run}"]) == PREEMPTED_EXIT == 143
    lines = stderr_lines(capsys.readouterr().err)
    assert lines[-1] == (f"oddetr train: stopped by SIGTERM at epoch 2 batch 4 (step 5); saved {run / 'last.pt'}; "
                         f"continue with: oddetr train --resume output={run}")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    saved = safe_load(run / "last.pt")
    assert (saved["epoch"], saved["step"], saved["progress_ranks"][0]["batches"]) == (1, 5, 4)
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    monkeypatch.undo()

    assert main(["train", "--resume", f"output={run}"]) == 0
    capsys.readouterr()
    _assert_same_run(straight, run)


def test_checkpoint_every_survives_a_crash_after_it(straight, keys, tmp_path, monkeypatch, capsys) -> None:
    """``train.checkpoint_every=2``: killed (here: an interrupt) 2 batches after the step-4 checkpoint."""
    run = tmp_path / "run"

    def crash():
        raise KeyboardInterrupt

    _interrupt_at(monkeypatch, 11, crash)  # epoch 2 batch 4: after the step-4 checkpoint (epoch 2 batch 2)
    assert main(["train", *keys, f"output={run}", "train.checkpoint_every=2"]) == 130
    saved = safe_load(run / "last.pt")
    assert (saved["epoch"], saved["step"], saved["progress_ranks"][0]["batches"]) == (1, 4, 2)
    assert max(r["step"] for r in read_jsonl(run / "steps.jsonl")) == 4  # logged after the checkpoint
    monkeypatch.undo()

    assert main(["train", "--resume", f"output={run}"]) == 0
    capsys.readouterr()
    _assert_same_run(straight, run)


@pytest.mark.parametrize("n, world", [(12, 2), (10, 3), (5, 4)])
def test_sample_seeds_follow_the_epoch_order_not_the_rank_or_the_start(n: int, world: int) -> None:
    single = EpochSampler(n, True, seed=3, sample_seeds=True)
    single.set_epoch(1)
    pairs = list(single)
    assert sorted(i for i, _ in pairs) == list(range(n)) and len({s for _, s in pairs}) == n
    shards = []
    for rank in range(world):
        sampler = EpochSampler(n, True, seed=3, rank=rank, world=world, sample_seeds=True)
        sampler.set_epoch(1)
        shards.append(list(sampler))
        sampler.set_epoch(1, start=2)  # resumed after two samples: the rest, with the same seeds
        assert list(sampler) == shards[-1][2:] and len(sampler) == len(shards[-1]) - 2
    padded = [shards[p % world][p // world] for p in range(len(shards[0]) * world)]
    assert padded[:n] == pairs  # position p of the epoch's order: the same index and seed on any number of ranks
    other = EpochSampler(n, True, seed=3, sample_seeds=True)
    other.set_epoch(2)
    assert {s for _, s in other}.isdisjoint(s for _, s in pairs)


def test_seeded_samples_are_reproducible_and_leave_the_callers_rng_alone() -> None:
    class Noise(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int):
            return index, torch.rand(2), random.random(), np.random.rand()

    data = SeededSamples(Noise())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    first, again, other = data[(1, 42)], data[(1, 42)], data[(1, 43)]
    assert first[0] == 1 and torch.equal(first[1], again[1]) and first[2:] == again[2:]
    assert not torch.equal(first[1], other[1]) and first[2] != other[2] and first[3] != other[3]
    assert (torch.rand(1), random.random(), np.random.rand()) == expected
