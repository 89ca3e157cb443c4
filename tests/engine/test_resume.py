"""Exact resume: 1 epoch + ``--resume`` to epoch 2 gives the same bits as 2 epochs in one go.

With OD-DETR distillation on (EMA teacher and its step counter), dropout, random flips, crops and
multi-scale resizing in a DataLoader worker, a step schedule that drops the lr at the epoch boundary,
and a run directory left as a run killed while writing epoch 2 would leave it.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine_testutils import FAST_KEYS, assert_same_training_state, read_jsonl, synthetic_keys, without_timing

from oddetr.cli import main
from oddetr.engine.checkpoint import safe_load

RANDOM_KEYS = [
    "distill.enabled=true",
    "model.dropout=0.1",
    "data.num_workers=1",
    "data.flip=true",
    "data.crop=true",
    "data.scales=[48,64]",
    "data.crop_scales=[64]",
    "data.crop_min=32",
    "data.crop_max=56",
    "train.warmup_steps=2",
    "train.schedule=step",
    "train.lr_drop_epochs=[1]",
    "train.log_steps=true",
]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path, tiny_keys, capsys) -> None:
    keys = tiny_keys(*synthetic_keys(tmp_path / "synthetic"), *FAST_KEYS, *RANDOM_KEYS)
    run_a, run_b = tmp_path / "a", tmp_path / "b"

    assert main(["train", *keys, f"output={run_a}", "train.epochs=2"]) == 0
    assert main(["train", *keys, f"output={run_b}", "train.epochs=1"]) == 0

    # as if killed while writing epoch 2: a complete and a cut-short record after the checkpoint's epoch,
    # and a half-written temporary checkpoint
    with open(run_b / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "train/loss": 1.0}) + "\n" + '{"epoch": 2, "train/lo')
    with open(run_b / "steps.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "step": 4, "lo')
    (run_b / ".last.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")

    assert main(["train", "--resume", f"output={run_b}", "train.epochs=2"]) == 0
    capsys.readouterr()

    a, b = safe_load(run_a / "last.pt"), safe_load(run_b / "last.pt")
    assert_same_training_state(a, b, epoch=2, step=8)
    assert a["scheduler"]["last_epoch"] == 8

    records_a, records_b = read_jsonl(run_a / "metrics.jsonl"), read_jsonl(run_b / "metrics.jsonl")
    assert [r["epoch"] for r in records_b] == [1, 2]
    assert [without_timing(r) for r in records_a] == [without_timing(r) for r in records_b]
    assert records_b[1]["distill/ema_step"] == 8
    assert "teacher/instability" in records_b[1]  # the probe assignment of epoch 1 survived the resume
    assert read_jsonl(run_a / "steps.jsonl") == read_jsonl(run_b / "steps.jsonl")
    assert [r["step"] for r in read_jsonl(run_b / "steps.jsonl")] == list(range(8))
    assert list(run_b.glob(".*.tmp")) == []
