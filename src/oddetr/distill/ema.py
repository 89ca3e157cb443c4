"""EMA teacher: θ_t ← m_k θ_t + (1 − m_k) θ_s with m_k = m (1 − exp(−k / τ))."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, tau: float) -> float:
    """m_k for k = ``step`` optimiser steps so far (warm-up: 0 at k=0, -> ``decay``)."""
    if tau <= 0:
        return decay
    return decay * (1.0 - math.exp(-step / tau))


MIN_HORIZON_STEPS = 10


def ema_schedule(decay: float | None, tau: float | None, horizon: float,
                 total_steps: int | None) -> tuple[float, float]:
    """The teacher's (m, τ): each as given, or, left None, from the horizon rule
    1 / (1 − m) = τ = ``horizon`` × ``total_steps`` (at least ``MIN_HORIZON_STEPS``)."""
    if decay is not None and tau is not None:
        return decay, tau
    if total_steps is None or total_steps <= 0:
        raise ValueError("distill.ema_decay / distill.ema_tau unset: the EMA horizon needs the run's total "
                         "optimiser steps")
    steps = max(float(MIN_HORIZON_STEPS), horizon * total_steps)
    return (1.0 - 1.0 / steps if decay is None else decay), (steps if tau is None else tau)


class EmaTeacher:
    """An exponential moving average of a student model, kept frozen and in eval mode.

    Parameters are averaged over ``named_parameters()`` (de-duplicated, so a head shared by
    several decoder layers is averaged once per step). Floating-point buffers (BatchNorm running
    statistics) follow the same EMA as the weights, so that the teacher's normalisation matches its
    averaged weights; integer buffers (``num_batches_tracked``) are copied.
    """

    def __init__(self, student: nn.Module, decay: float, tau: float) -> None:
        self.decay = decay
        self.tau = tau
        self.step = 0
        self.model = copy.deepcopy(_unwrap(student))
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """One EMA step after an optimiser step; returns the decay used."""
        self.step += 1
        m = ema_decay_at(self.step, self.decay, self.tau)
        student = _unwrap(student)
        t_params = dict(self.model.named_parameters())
        s_params = dict(student.named_parameters())
        if t_params.keys() != s_params.keys():
            raise RuntimeError("teacher and student have different parameters")
        names = list(t_params)
        teacher_tensors = [t_params[n] for n in names]
        student_tensors = [s_params[n].detach().to(t_params[n].dtype) for n in names]
        t_buffers = dict(self.model.named_buffers())
        s_buffers = dict(student.named_buffers())
        if t_buffers.keys() != s_buffers.keys():
            raise RuntimeError("teacher and student have different buffers")
        for name, tb in t_buffers.items():
            if tb.is_floating_point():
                teacher_tensors.append(tb)
                student_tensors.append(s_buffers[name].detach().to(tb.dtype))
            else:
                tb.copy_(s_buffers[name])
        torch._foreach_lerp_(teacher_tensors, student_tensors, 1.0 - m)
        return m

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "step": self.step, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s BatchNorm layers normalise with the batch's statistics, as in
    training mode, without updating their running statistics or ``num_batches_tracked``; every other
    module keeps its mode (an eval-mode model stays in eval mode: no dropout, no denoising queries).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            m.training, m.track_running_stats = True, False
        yield model
    finally:
        for m, (training, track) in zip(norms, saved):
            m.training, m.track_running_stats = training, track


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
