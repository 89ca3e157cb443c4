"""``distill.end_epoch``: after that epoch a step is the baseline's step, and the EMA teacher still follows.

Oracle: the same step taken by a state without a distiller (the baseline), from the same weights and
optimiser state, bit for bit; the teacher's update is the EMA rule applied to the new student.
"""

from __future__ import annotations

import copy

import pytest
import torch
from distill_testutils import fixed_targets, images_and_masks, tiny_setup

from oddetr.config import resolve_config
from oddetr.engine.checkpoint import TrainState
from oddetr.engine.optim import build_optimizer, build_scheduler
from oddetr.engine.step import GuardedStep
from oddetr.errors import ConfigError


def _stepper(model, cfg, criterion, distiller) -> GuardedStep:
    optimizer = build_optimizer(model, cfg)
    state = TrainState(model, optimizer, build_scheduler(optimizer, 100, cfg),
                       torch.amp.GradScaler("cpu", enabled=False), distiller, {})
    return GuardedStep(state, None, criterion, cfg.train, torch.device("cpu"))


def _two_steppers(end_epoch: int):
    """A distilling step (``distill.end_epoch=end_epoch``) and a baseline step on a copy of the same student."""
    cfg, model, criterion, distiller = tiny_setup(f"distill.end_epoch={end_epoch}", "distill.warmup_steps=0")
    distiller.teacher.step = 50  # a teacher past its warm-up, so that its guidance would weigh in
    baseline_model = copy.deepcopy(model)
    return _stepper(model, cfg, criterion, distiller), _stepper(baseline_model, cfg, criterion, None)


@pytest.mark.parametrize("epoch_index, guided", [(0, True), (1, True), (2, False), (5, False)])
def test_steps_after_end_epoch_are_baseline_steps(epoch_index: int, guided: bool) -> None:
    distilling, baseline = _two_steppers(end_epoch=2)
    distilling.state.epoch = baseline.state.epoch = epoch_index
    teacher = distilling.state.distiller.teacher
    teacher_before = copy.deepcopy(teacher.model.state_dict())
    images, masks = images_and_masks()
    targets = fixed_targets()

    result = distilling(images, masks, targets, window_end=True, context="test")
    reference = baseline(images, masks, targets, window_end=True, context="test")
    assert result.finite and reference.finite

    distill_keys = [k for k in result.losses if k.split("/")[0] in ("md", "mdpd", "pd") or k.startswith("aux")]
    same = all(torch.equal(a, b) for a, b in zip(distilling.state.model.state_dict().values(),
                                                  baseline.state.model.state_dict().values()))
    if guided:
        assert distill_keys and not same  # the teacher's losses moved the student elsewhere
    else:
        assert distill_keys == [] and same
        assert result.losses["loss"] == reference.losses["loss"]
    # the EMA teacher follows the student either way: one more step, weights moved toward the student
    assert teacher.step == 51
    moved = [k for k, v in teacher.model.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, teacher_before[k])]
    assert moved


def test_end_epoch_zero_guides_every_epoch() -> None:
    distilling, _ = _two_steppers(end_epoch=0)
    assert all(distilling.state.distiller.guides(e) for e in (0, 1, 100))


def test_negative_end_epoch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="distill.end_epoch"):
        resolve_config(overrides=["distill.end_epoch=-1"])
