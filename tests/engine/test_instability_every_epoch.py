"""Matching instability compares consecutive epochs (METHOD.md) whatever ``train.eval_every`` is: a run
that evaluates AP only at its end logs the same instability, epoch by epoch, as one that evaluates every
epoch, and the same training state."""

from __future__ import annotations

from pathlib import Path

from engine_testutils import FAST_KEYS, read_jsonl, synthetic_keys, unequal_tensors

from oddetr.cli import main
from oddetr.engine.checkpoint import safe_load


def test_instability_is_probed_every_epoch_independently_of_eval_every(tmp_path: Path, tiny_keys, capsys) -> None:
    keys = tiny_keys(*synthetic_keys(tmp_path / "synthetic"), *FAST_KEYS, "distill.enabled=true", "train.epochs=3")
    every, end_only = tmp_path / "every", tmp_path / "end_only"
    assert main(["train", *keys, f"output={every}", "train.eval_every=1"]) == 0
    assert main(["train", *keys, f"output={end_only}", "train.eval_every=3"]) == 0
    capsys.readouterr()
    a, b = read_jsonl(every / "metrics.jsonl"), read_jsonl(end_only / "metrics.jsonl")
    assert [("student/AP" in r) for r in b] == [False, False, True]
    assert [("student/AP" in r) for r in a] == [True, True, True]
    for name in ("student", "teacher"):
        key = f"{name}/instability"
        assert [key in r for r in b] == [False, True, True]
        assert [r.get(key) for r in b] == [r.get(key) for r in a]
    assert unequal_tensors(safe_load(every / "last.pt")["model"], safe_load(end_only / "last.pt")["model"]) == []
