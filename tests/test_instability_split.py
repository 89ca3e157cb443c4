"""benchmarks/instability_split.py on a tiny run: it re-computes the trainer's logged instability exactly
and splits it into swaps and new queries that add up to it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engine"))
from engine_testutils import read_jsonl, synthetic_keys  # noqa: E402

from oddetr.cli import main  # noqa: E402


def _script():
    spec = importlib.util.spec_from_file_location("instability_split_bench", ROOT / "benchmarks" / "instability_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_with_epoch_files(tmp_path_factory, tiny_keys) -> Path:
    tmp = tmp_path_factory.mktemp("split")
    run = tmp / "run"
    keys = tiny_keys(*synthetic_keys(tmp / "synthetic", num_train=6), "model.backbone.name=mobilenet_v3_small",
                     "distill.enabled=true", "train.epochs=3", "train.keep_checkpoints=3", "train.save_best=false",
                     "train.instability_probe=6", "train.warmup_steps=0", "train.lr=0.005", "model.num_queries=20",
                     "distill.ema_tau=1", "distill.ema_decay=0.8", f"output={run}")  # a high LR: matchings change
    assert main(["train", *keys]) == 0
    return run


def test_split_reproduces_the_logged_instability(run_with_epoch_files, capsys, monkeypatch) -> None:
    split = _script()
    for weights in ("student", "teacher"):
        rows, worst = split.split_run(run_with_epoch_files, weights, min_iou=0.5, min_ratio=0.8)
        logged = {r["epoch"]: r[f"{weights}/instability"] for r in read_jsonl(run_with_epoch_files / "metrics.jsonl")
                  if f"{weights}/instability" in r}
        assert sorted(rows) == [2, 3] and sorted(logged) == [2, 3]
        for epoch, row in rows.items():
            assert row["IS"] == pytest.approx(logged[epoch], abs=1e-12)
            assert row["swap"] + row["new"] == pytest.approx(row["IS"], abs=1e-12)
            assert 0.0 <= row["dup"] <= 1.0
        assert worst < 1e-12
        assert any(row["IS"] > 0 for row in rows.values())  # the run's matching did change: something to split
    # the CLI: one table of epochs and one of means, the reference against itself at 1.00x
    monkeypatch.setattr(sys, "argv", ["instability_split.py", "--threads", "1",
                                      "--runs", f"a={run_with_epoch_files}", f"b={run_with_epoch_files}"])
    split.main()
    out = capsys.readouterr().out
    assert "| a | 2 |" in out and "| b | 3 |" in out
    means = [line for line in out.splitlines() if line.startswith("| a |") and " / " in line]
    assert len(means) == 1 and means[0].split("|")[-2].strip().startswith("1.00x /")  # IS against itself


def test_split_needs_epoch_files(tmp_path) -> None:
    with pytest.raises(SystemExit, match="train.keep_checkpoints"):
        _script().split_run(tmp_path, "student", 0.5, 0.8)
