"""The convergence benchmark's readings (benchmarks/convergence.py) against values computed by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def convergence():
    spec = importlib.util.spec_from_file_location("convergence_bench", ROOT / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# two seeds per variant, 4 epochs; the LR drops after epoch 3
CURVES = {
    ("baseline", 0): {"student/AP": [0.10, 0.20, 0.30, 0.50]},
    ("baseline", 1): {"student/AP": [0.10, 0.30, 0.20, 0.40]},
    ("OD-DETR", 0): {"student/AP": [0.20, 0.30, 0.40, 0.55], "teacher/AP": [0.20, 0.40, 0.60, 0.55]},
    ("OD-DETR", 1): {"student/AP": [0.20, 0.30, 0.40, 0.45], "teacher/AP": [0.20, 0.40, 0.50, 0.50]},
}


def write_runs(tmp_path: Path) -> list[dict]:
    runs = []
    for (variant, seed), curves in CURVES.items():
        run_dir = tmp_path / variant / f"seed{seed}"
        run_dir.mkdir(parents=True)
        records = [{"epoch": e + 1, "time/epoch_s": 1.0, **{k: v[e] for k, v in curves.items()}} for e in range(4)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append({"model": "m", "variant": variant, "seed": seed, "dir": str(run_dir)})
    return runs


def test_best_checkpoint_is_the_deployed_models_best_epoch(convergence, tmp_path):
    summary = convergence.summarize(write_runs(tmp_path), 4)
    base, full = summary["table"][("m", "baseline")], summary["table"][("m", "OD-DETR")]
    assert base["best_pt"][0] == "student" and base["best_pt"][1][0] == pytest.approx((0.50 + 0.40) / 2)
    # the teacher is deployed; its best epochs are 3 (0.60) and 3 (0.50), not the last ones
    assert full["best_pt"][0] == "teacher" and full["best_pt"][1][0] == pytest.approx((0.60 + 0.50) / 2)
    lines = convergence.best_checkpoints(summary["table"])
    assert lines[1] == "- m OD-DETR: 0.550 ± 0.071 (teacher) (+10.0 AP)"


def test_lr_drop_lines(convergence, tmp_path):
    summary = convergence.summarize(write_runs(tmp_path), 4)
    lines = convergence.lr_drop_lines(summary["curves"], 3)
    # baseline mean at epoch 3: 0.25, at 4: 0.45; OD-DETR teacher 0.55 -> 0.525
    assert "- m baseline (student): epoch 3 0.250 (+0.0 AP over the baseline), epoch 4 0.450 (+0.0 AP); " \
           "the drop gives +20.0 AP" in lines
    assert "- m OD-DETR (teacher): epoch 3 0.550 (+30.0 AP over the baseline), epoch 4 0.525 (+7.5 AP); " \
           "the drop gives -2.5 AP" in lines


def test_shorter_budget_reads_the_fraction_of_steps(convergence, tmp_path):
    table = convergence.summarize(write_runs(tmp_path), 4)["table"]
    reference = {"epochs": 8, "steps": 1000, "table": {"m|baseline": {"student_final_ap": [0.48, 0.0]}}}
    lines = convergence.check_shorter_budget(table, 4, 600, reference)
    assert any(line.startswith("- m OD-DETR (student): 4 epochs (60% of the steps)") and "0.500 vs 0.480" in line
               and line.endswith("**met**") for line in lines)
    # without recorded steps (older files), the fraction is the epochs': 4 of 8 = 50%
    del reference["steps"]
    assert "4 epochs (50% of the steps)" in convergence.check_shorter_budget(table, 4, 600, reference)[0]
