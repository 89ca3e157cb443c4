"""What a run directory keeps: ``last.pt`` the full state, ``best.pt`` the teacher's weights only,
``epoch_<N>.pt`` a hard link to that epoch's ``last.pt`` (written once), and ``best.pt`` loads in
``oddetr eval`` and as ``model.init_weights``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from engine_testutils import read_jsonl, synthetic_keys, unequal_tensors

from oddetr.cli import main
from oddetr.config import resolve_config
from oddetr.engine.checkpoint import safe_load
from oddetr.engine.init_weights import load_init_weights
from oddetr.models.detector import build_model


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def test_best_is_the_teachers_weights_and_epoch_files_are_links(tmp_path: Path, tiny_keys, capsys,
                                                                stderr_lines) -> None:
    run = tmp_path / "run"
    keys = tiny_keys(*synthetic_keys(tmp_path / "synthetic", num_train=4), "model.backbone.name=mobilenet_v3_small",
                     "distill.enabled=true", "train.epochs=2", "train.keep_checkpoints=2", f"output={run}")
    assert main(["train", *keys]) == 0
    # an epoch file is that epoch's last.pt under a second name (one inode)
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "epoch_001.pt", "epoch_002.pt", "last.pt"]
    assert os.path.samefile(run / "epoch_002.pt", run / "last.pt")
    assert not os.path.samefile(run / "epoch_001.pt", run / "last.pt")
    assert safe_load(run / "epoch_001.pt")["epoch"] == 1
    assert list(run.glob(".*.tmp")) == []

    last, best = safe_load(run / "last.pt"), safe_load(run / "best.pt")
    assert {"optimizer", "teacher", "scheduler", "rng"} <= set(last)
    assert not {"optimizer", "teacher", "scheduler", "rng", "scaler"} & set(best)
    assert best["contents"] == "weights" and best["weights"] == "teacher"
    assert unequal_tensors(best["model"], safe_load(run / f"epoch_{best['epoch']:03d}.pt")["teacher"]["model"]) == []
    record = {r["epoch"]: r for r in read_jsonl(run / "metrics.jsonl")}[best["epoch"]]
    assert best["best"] == record["teacher/AP"] == max(r["teacher/AP"] for r in read_jsonl(run / "metrics.jsonl"))
    # sizes: best.pt is one model's tensors; last.pt two models and AdamW's two moments per parameter
    weights = _tensor_bytes(best["model"])
    assert weights == _tensor_bytes(last["model"])
    assert (run / "best.pt").stat().st_size < 1.05 * weights + 100_000
    assert (run / "last.pt").stat().st_size > 3.5 * weights
    assert (run / "last.pt").stat().st_size < 1.05 * (_tensor_bytes(last["model"]) + _tensor_bytes(last["teacher"])
                                                      + _tensor_bytes(last["optimizer"])) + 200_000

    # oddetr eval on best.pt: the teacher's numbers of its epoch; weights=student is refused in one line
    capsys.readouterr()
    assert main(["eval", f"checkpoint={run / 'best.pt'}"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result == pytest.approx({k: record[f"teacher/{k}"] for k in result}, abs=1e-9)
    assert main(["eval", f"checkpoint={run / 'best.pt'}", "weights=student"]) == 2
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "holds only the teacher's weights" in lines[0]

    # model.init_weights=best.pt: every tensor of a fresh model comes from it
    cfg = resolve_config(overrides=keys)
    fresh = build_model(cfg.model, int(best["num_classes"]))
    report = load_init_weights(fresh, run / "best.pt", cfg.model)
    assert report.format == "oddetr" and report.kept_init == [] and report.reinitialised == []
    assert unequal_tensors(fresh.state_dict(), best["model"]) == []

    # --resume needs the full state
    (run / "last.pt").unlink()
    (run / "best.pt").rename(run / "last.pt")
    assert main(["train", "--resume", f"output={run}"]) == 2
    assert "holds weights only" in stderr_lines(capsys.readouterr().err)[-1]
