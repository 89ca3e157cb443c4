"""The non-finite guard: NaN steps are skipped (changing nothing), counted, and stop training when in a row.

NaNs are injected by wrapping the guarded step's ``compute_losses`` (a NaN total after a real forward pass)
or the trainer's ``move_batch`` (NaN pixels, so that the predictions and the matching cost are NaN).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from engine_testutils import FAST_KEYS, clone_state, read_jsonl, synthetic_keys, unequal_tensors

from oddetr.cli import main
from oddetr.config import resolve_config
from oddetr.engine import step as step_module
from oddetr.engine import trainer as trainer_module
from oddetr.engine.checkpoint import safe_load
from oddetr.engine.trainer import Trainer


def _keys(tmp_path: Path, tiny_keys, num_train: int, *extra: str) -> list[str]:
    # distillation on (EMA teacher), trainable BatchNorm (the tiny preset's norm=bn): a skipped step
    # must leave the student's running statistics, the teacher and its step counter as they were
    return tiny_keys(*synthetic_keys(tmp_path / "synthetic", num_train=num_train), *FAST_KEYS,
                     "distill.enabled=true", "model.backbone.norm=bn", f"output={tmp_path / 'run'}", *extra)


class Recorder:
    """Wraps ``compute_losses``: snapshots the training state at each call, makes chosen calls NaN."""

    def __init__(self, monkeypatch, nan_calls, trainer: Trainer | None = None) -> None:
        self.nan_calls = nan_calls
        self.trainer = trainer
        self.snapshots: list[dict] = []
        self.real = step_module.compute_losses
        monkeypatch.setattr(step_module, "compute_losses", self)

    def __call__(self, model, criterion, distiller, *args, **kwargs):
        snap = {"student": clone_state(model), "teacher": clone_state(distiller.teacher.model),
                "ema_step": distiller.teacher.step}
        if self.trainer is not None:
            snap["step"] = self.trainer.step
            snap["optimizer"] = {i: {k: v.clone() for k, v in s.items()}
                                 for i, s in self.trainer.optimizer.state_dict()["state"].items()}
        self.snapshots.append(snap)
        losses, total = self.real(model, criterion, distiller, *args, **kwargs)
        if len(self.snapshots) in self.nan_calls:
            total = total * float("nan")
        return losses, total


def _same(a: dict, b: dict) -> bool:
    same_opt = a["optimizer"].keys() == b["optimizer"].keys() and all(
        not unequal_tensors(a["optimizer"][i], b["optimizer"][i]) for i in a["optimizer"])
    return (not unequal_tensors(a["student"], b["student"]) and not unequal_tensors(a["teacher"], b["teacher"])
            and a["ema_step"] == b["ema_step"] and a["step"] == b["step"] and same_opt)


def test_nan_loss_steps_are_skipped_counted_and_change_nothing(tmp_path: Path, tiny_keys, monkeypatch) -> None:
    cfg = resolve_config(overrides=_keys(tmp_path, tiny_keys, 12, "train.epochs=1", "train.max_nonfinite_steps=4"))
    trainer = Trainer(cfg)
    nan_calls = {2, 3, 4}  # three in a row: one fewer than max_nonfinite_steps
    recorder = Recorder(monkeypatch, nan_calls, trainer)
    record = trainer.fit()

    snaps = recorder.snapshots
    assert len(snaps) == 6
    for call in nan_calls:  # the state before the NaN call == the state before the next call
        assert _same(snaps[call - 1], snaps[call]), f"the skipped call {call} changed the training state"
    assert not unequal_tensors(snaps[1]["student"], snaps[4]["student"])  # BN statistics included
    # the good steps do move the student, its BatchNorm statistics, the teacher and the counters
    assert not _same(snaps[0], snaps[1])
    bn = [k for k in snaps[0]["student"] if k.endswith("running_mean")]
    assert bn and any(not torch.equal(snaps[0]["student"][k], snaps[1]["student"][k]) for k in bn)
    assert [s["ema_step"] for s in snaps] == [0, 1, 1, 1, 1, 2]
    assert [s["step"] for s in snaps] == [0, 1, 1, 1, 1, 2]

    (logged,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert logged["train/nonfinite_steps"] == record["train/nonfinite_steps"] == 3
    assert logged["step"] == 3 and logged["distill/ema_step"] == 3
    assert math.isfinite(logged["train/loss"]) and logged["student/AP"] is not None
    assert trainer.state.nonfinite_total == 3 and safe_load(tmp_path / "run" / "last.pt")["nonfinite_total"] == 3


def test_nan_predictions_are_skipped_not_a_matcher_crash(tmp_path: Path, tiny_keys, monkeypatch) -> None:
    """NaN pixels -> NaN predictions -> non-finite matching cost: skipped and counted like a NaN loss."""
    cfg = resolve_config(overrides=_keys(tmp_path, tiny_keys, 8, "train.epochs=1"))
    trainer = Trainer(cfg)
    real_move = trainer_module.move_batch
    calls = []

    def nan_pixels(images, masks, targets, device):
        calls.append(1)
        images, masks, targets = real_move(images, masks, targets, device)
        return (images * float("nan") if len(calls) == 2 else images), masks, targets

    monkeypatch.setattr(trainer_module, "move_batch", nan_pixels)
    record = trainer.fit()

    assert len(calls) == 4
    assert record["train/nonfinite_steps"] == 1 and record["step"] == 3 and record["distill/ema_step"] == 3
    assert "non-finite matching cost" in trainer.stepper.last_nonfinite
    # the NaN forward pass ran through trainable BatchNorm: its statistics were restored, not poisoned
    for model in (trainer.model, trainer.distiller.teacher.model):
        bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert bad == []
    assert all(record[f"{m}/AP"] >= 0 for m in ("student", "teacher"))


def test_consecutive_nan_steps_stop_training_with_one_line(tmp_path: Path, tiny_keys, monkeypatch, capsys,
                                                           stderr_lines) -> None:
    keys = _keys(tmp_path, tiny_keys, 8, "train.epochs=2", "train.max_nonfinite_steps=3")
    recorder = Recorder(monkeypatch, nan_calls=set(range(5, 100)))  # every batch of epoch 2
    assert main(["train", *keys]) != 0

    lines = stderr_lines(capsys.readouterr().err)
    errors = [ln for ln in lines if ln.startswith("oddetr train: error:")]
    assert len(errors) == 1 and not any("Traceback" in ln for ln in lines)
    assert "training stopped at epoch 2 step 4: 3 non-finite steps in a row" in errors[0]
    run = tmp_path / "run"
    assert str(run / "last.pt") in errors[0]
    assert len(recorder.snapshots) == 7  # 4 good batches, then 2 survived and the 3rd stops it

    # last.pt is epoch 1's, intact, and equals the state training had before the NaN steps
    state = safe_load(run / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 4 and state["teacher"]["step"] == 4
    before_nan = recorder.snapshots[4]
    assert unequal_tensors(state["model"], before_nan["student"]) == []
    assert unequal_tensors(state["teacher"]["model"], before_nan["teacher"]) == []
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]


def test_a_single_nan_step_stops_training_when_the_limit_is_one(tmp_path: Path, tiny_keys, monkeypatch) -> None:
    cfg = resolve_config(overrides=_keys(tmp_path, tiny_keys, 4, "train.epochs=1", "train.max_nonfinite_steps=1"))
    trainer = Trainer(cfg)
    Recorder(monkeypatch, nan_calls={1})
    with pytest.raises(trainer_module.TrainingError, match=r"^training stopped at epoch 1 step 0: 1 non-finite"):
        trainer.fit()
    assert not (tmp_path / "run" / "last.pt").exists() and trainer.step == 0


def test_only_the_statistics_a_forward_pass_can_move_are_saved_before_a_step() -> None:
    from torchvision.ops import FrozenBatchNorm2d

    from oddetr.engine.step import moving_buffers

    trained, frozen, in_eval = torch.nn.BatchNorm2d(3), FrozenBatchNorm2d(3), torch.nn.BatchNorm2d(3)
    no_stats = torch.nn.BatchNorm2d(3, track_running_stats=False)
    model = torch.nn.Sequential(trained, frozen, in_eval, no_stats, torch.nn.Conv2d(3, 3, 1)).train()
    in_eval.eval()
    saved = moving_buffers(model)
    assert [id(b) for b in saved] == [id(trained.running_mean), id(trained.running_var),
                                      id(trained.num_batches_tracked)]
    # oracle: the buffers that one training forward pass actually changes
    before = {name: b.clone() for name, b in model.named_buffers()}
    model(torch.randn(2, 3, 4, 4))
    changed = {name for name, b in model.named_buffers() if not torch.equal(b, before[name])}
    assert changed == {"0.running_mean", "0.running_var", "0.num_batches_tracked"}
