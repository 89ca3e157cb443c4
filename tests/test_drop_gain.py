"""The LR-drop readings of benchmarks/drop_gain.py against values computed by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def drop_gain():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # drop_gain imports the convergence benchmark's helpers
    try:
        spec = importlib.util.spec_from_file_location("drop_gain_bench", ROOT / "benchmarks" / "drop_gain.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


# two seeds, 4 epochs, the LR drops after epoch 3; epoch 2 not evaluated in seed 1's OD-DETR run
CURVES = {
    "m|baseline": {"student/AP": [[0.10, 0.20, 0.30, 0.50], [0.10, 0.30, 0.20, 0.40]]},
    "m|baseline + EMA": {"student/AP": [[0.10, 0.20, 0.30, 0.50], [0.10, 0.30, 0.20, 0.40]],
                         "teacher/AP": [[0.10, 0.25, 0.40, 0.50], [0.10, 0.30, 0.30, 0.42]]},
    "m|OD-DETR": {"student/AP": [[0.20, 0.30, 0.40, 0.55], [0.20, None, 0.40, 0.45]],
                  "teacher/AP": [[0.20, 0.40, 0.60, 0.55], [0.20, None, 0.50, 0.50]]},
}


def test_seed_readings_by_hand(drop_gain):
    row = drop_gain.seed_row(CURVES, "m", 0, drop=3)
    expected = {"baseline drop gain": 20.0, "OD student drop gain": 15.0,
                "baseline EMA - student before drop": 10.0, "OD teacher - student before drop": 20.0,
                "OD student - baseline at end": 5.0, "OD teacher - baseline EMA before drop": 20.0,
                "OD teacher - baseline EMA at end": 5.0}
    assert row == pytest.approx(expected)
    assert drop_gain.ema_student_difference(CURVES, "m") == 0.0


def test_leads_over_training_skips_epochs_not_evaluated_in_every_run(drop_gain):
    leads = drop_gain.leads_over_training(CURVES, "m")
    assert [r["epoch"] for r in leads] == [1, 3, 4]
    epoch3 = leads[1]  # seed 0: student 0.40 - 0.30, teacher 0.60 - 0.40; seed 1: 0.40 - 0.20, 0.50 - 0.30
    assert epoch3["OD student - baseline"] == pytest.approx(15.0)
    assert epoch3["OD teacher - baseline EMA"] == pytest.approx(20.0)
    assert epoch3["OD teacher - its student"] == pytest.approx(15.0)
    assert epoch3["baseline EMA - its student"] == pytest.approx(10.0)
    assert leads[2]["OD teacher - baseline EMA"] == pytest.approx((5.0 + 8.0) / 2)


def test_cli_prints_the_table_over_training(drop_gain, tmp_path, capsys, monkeypatch):
    report = tmp_path / "convergence.json"
    report.write_text(json.dumps({"seeds": [0, 1], "curves": CURVES}))
    monkeypatch.setattr(sys, "argv", ["drop_gain.py", "--drop", "3", "--over-training", str(report)])
    drop_gain.main()
    out = capsys.readouterr().out
    assert "| 3 | +15.00 | +20.00 | +15.00 | +10.00 |" in out
    assert "largest difference 0.00e+00 AP" in out
