"""DDP on CPU (gloo): 2 processes x batch 2 follow the loss curve of 1 process x batch 4 on the same data.

Why the curves agree: ``EpochSampler`` gives rank r the indices r, r+W, r+2W, ... of one permutation that
depends on (seed, epoch) only, so at step s the two ranks' batches of 2 together hold exactly the images of
the 1-process batch of 4 (tested below); every loss is a sum over images divided by the number of boxes
all-reduced over ranks, so the mean of the ranks' losses is the 1-process loss and DDP's mean of their
gradients is its gradient. What differs is float summation order (per-rank partial sums, gloo's
all-reduce), so losses agree to ~1e-5 relative, not bitwise: the test allows rtol=1e-4 per step.
Frozen BatchNorm (per-rank batch statistics would differ), no dropout, flips or crops, one scale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_testutils import FAST_KEYS, read_jsonl, synthetic_keys, unequal_tensors, without_timing

from oddetr.config import resolve_config
from oddetr.engine import step as step_module
from oddetr.engine.checkpoint import safe_load
from oddetr.engine.sampler import EpochSampler
from oddetr.engine.trainer import Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RTOL = 1e-4


def _torchrun(args: list[str], **env: str) -> None:
    proc = subprocess.run([*TORCHRUN, *args], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("n, world, batch", [(16, 2, 2), (12, 3, 2), (10, 2, 1), (8, 4, 2)])
def test_rank_shards_of_a_step_make_up_the_single_process_batch(n: int, world: int, batch: int) -> None:
    for epoch in range(3):
        single = EpochSampler(n, True, seed=5)
        single.set_epoch(epoch)
        order = list(single)
        shards = []
        for rank in range(world):
            sampler = EpochSampler(n, True, seed=5, rank=rank, world=world)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert sorted(i for s in shards for i in s) == sorted(order)  # n divisible by world: no padding
        for step in range(n // (world * batch)):
            union = sorted(i for s in shards for i in s[step * batch:(step + 1) * batch])
            assert union == sorted(order[step * world * batch:(step + 1) * world * batch])


def _keys(tmp_path: Path, tiny_keys, *extra: str) -> list[str]:
    return tiny_keys(*synthetic_keys(tmp_path / "synthetic", num_train=16), *FAST_KEYS,
                     "distill.enabled=true", "model.backbone.norm=frozen_bn", "model.dropout=0", "data.flip=false",
                     "data.crop=false", "data.scales=[64]", "train.epochs=1", "train.max_steps_per_epoch=4",
                     "train.lr=1e-4", "train.warmup_steps=0", "train.log_steps=true", *extra)


def test_ddp_two_processes_match_one_process(tmp_path: Path, tiny_keys, monkeypatch) -> None:
    # 1 process, batch 4 (also generates the synthetic set before the two ranks read it); the 3rd batch NaN
    single_run, ddp_run, dump = tmp_path / "single", tmp_path / "ddp", tmp_path / "dump"
    cfg = resolve_config(overrides=_keys(tmp_path, tiny_keys, "train.batch_size=4", f"output={single_run}"))
    real = step_module.compute_losses
    calls = []

    def nan_third(*args, **kwargs):
        calls.append(1)
        losses, total = real(*args, **kwargs)
        return losses, (total * float("nan") if len(calls) == 3 else total)

    monkeypatch.setattr(step_module, "compute_losses", nan_third)
    trainer = Trainer(cfg)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    single = trainer.fit()
    monkeypatch.undo()

    # 2 processes, batch 2 each; the 3rd batch is NaN on rank 1 only: both ranks must skip it together
    dump.mkdir()
    _torchrun([str(WORKER), "train", *_keys(tmp_path, tiny_keys, "train.batch_size=2", f"output={ddp_run}")],
              ODDETR_TEST_DUMP=str(dump), ODDETR_TEST_NAN_CALLS="3", ODDETR_TEST_NAN_RANK="1")

    steps_single, steps_ddp = read_jsonl(single_run / "steps.jsonl"), read_jsonl(ddp_run / "steps.jsonl")
    assert [s["step"] for s in steps_ddp] == [s["step"] for s in steps_single] == [0, 1, 2]
    assert [s["lr"] for s in steps_ddp] == [s["lr"] for s in steps_single]
    losses_single = torch.tensor([s["loss"] for s in steps_single], dtype=torch.float64)
    losses_ddp = torch.tensor([s["loss"] for s in steps_ddp], dtype=torch.float64)
    torch.testing.assert_close(losses_ddp, losses_single, rtol=RTOL, atol=0)

    # both ranks: the same all-reduced epoch record, the same student and teacher, the same skipped step
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert without_timing(ranks[0]["record"]) == without_timing(ranks[1]["record"])
    assert ranks[0]["student"] == ranks[1]["student"] and ranks[0]["teacher"] == ranks[1]["teacher"]
    assert ranks[0]["calls"] == ranks[1]["calls"] == 4
    record = ranks[0]["record"]
    assert record["train/nonfinite_steps"] == single["train/nonfinite_steps"] == 1
    assert record["step"] == single["step"] == 3 and record["distill/ema_step"] == 3
    assert (read_jsonl(ddp_run / "metrics.jsonl")[0]["train/loss"]
            == pytest.approx(single["train/loss"], rel=RTOL))

    # the weights: AdamW turns tiny gradient differences on near-zero gradients into differences up to
    # ~lr per element, so compare the whole update: the two runs' weights differ by < 1% of how far they moved
    # (measured: 0.14%; the same 3 steps on batches of 2 instead of 4 land 60% of the movement away)
    a, b = safe_load(single_run / "last.pt"), safe_load(ddp_run / "last.pt")
    keys = [k for k in a["model"] if a["model"][k].is_floating_point()]
    difference = torch.cat([(a["model"][k] - b["model"][k]).flatten() for k in keys]).norm()
    moved = torch.cat([(a["model"][k] - initial[k]).flatten() for k in keys]).norm()
    assert moved > 0 and difference < 1e-2 * moved
    assert len(b["rng_ranks"]) == 2  # each rank's RNG streams, for an exact resume


def test_ddp_resume_is_bit_identical(tmp_path: Path, tiny_keys) -> None:
    """``torchrun -m oddetr train --resume`` from epoch 1 ends where the uninterrupted 2-epoch run ends.

    Trainable BatchNorm (ranks' statistics differ), dropout, flips and two scales (ranks' RNG streams
    differ): every rank's RNG state and rank 0's buffers are what a resume must restore. The resumed
    run starts from the uninterrupted run's ``epoch_001.pt`` (the same state its ``last.pt`` held then).
    """
    keys = tiny_keys(*synthetic_keys(tmp_path / "synthetic"), *FAST_KEYS, "distill.enabled=true",
                     "model.backbone.norm=bn", "model.dropout=0.1", "data.flip=true", "data.scales=[48,64]",
                     "train.batch_size=2", "train.epochs=2", "train.keep_checkpoints=2", "train.log_steps=true")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _torchrun(["-m", "oddetr", "train", *keys, f"output={straight}"])
    resumed.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "steps.jsonl"):
        shutil.copy(straight / name, resumed / name)
    shutil.copy(straight / "epoch_001.pt", resumed / "last.pt")
    _torchrun(["-m", "oddetr", "train", "--resume", f"output={resumed}"])

    a, b = safe_load(straight / "last.pt"), safe_load(resumed / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 4
    assert unequal_tensors(a["model"], b["model"]) == []
    assert unequal_tensors(a["teacher"]["model"], b["teacher"]["model"]) == []
    for ra, rb in zip(a["rng_ranks"], b["rng_ranks"], strict=True):
        assert torch.equal(ra["torch"], rb["torch"])
    assert read_jsonl(straight / "steps.jsonl") == read_jsonl(resumed / "steps.jsonl")
    records_a, records_b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [without_timing(r) for r in records_a] == [without_timing(r) for r in records_b]
