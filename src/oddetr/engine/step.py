"""One training step: the forward pass (teacher if distilling, then the student) and the guarded update."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from oddetr.config import TrainConfig
from oddetr.distill.distiller import OnlineDistiller
from oddetr.engine import distributed as dist
from oddetr.engine.checkpoint import TrainState
from oddetr.engine.evaluate import autocast_context
from oddetr.errors import TrainingError
from oddetr.losses.criterion import SetCriterion, summarize_losses
from oddetr.losses.detection import detection_losses, main_group_copies
from oddetr.models.backbone import Backbone, BackbonePrefix
from oddetr.profiling import scope


def compute_losses(model: nn.Module, criterion: SetCriterion, distiller: OnlineDistiller | None,
                   images: torch.Tensor, masks: torch.Tensor, targets: Sequence[dict], num_boxes: float,
                   amp: str = "none", context: str = "") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Unweighted loss dict and the weighted total for one batch.

    images: (B, 3, H, W); masks: (B, H, W) True on padding; targets: per image ``labels`` (G,),
    ``boxes`` (G, 4) cxcywh. Raises TrainingError on a non-finite matching cost.
    """
    with autocast_context(images.device, amp):
        # the backbone's frozen first blocks give the teacher and the student the same maps: run them once
        prefix = shared_backbone_prefix(model, images) if distiller is not None else None
        with scope("teacher"):
            plan = distiller.prepare(images, masks, targets, prefix) if distiller is not None else None
        groups = plan.groups if plan is not None else []
        if criterion.cfg.extra_groups:  # the student's own queries, copied after it makes them
            copies = main_group_copies(criterion.cfg.extra_groups)
            teacher_groups = groups
            groups = lambda initial: [*teacher_groups, *copies(initial)]  # noqa: E731
        # targets: the student builds its denoising groups from them (DINO; training only)
        with scope("student"):
            kwargs = {} if prefix is None else {"backbone_prefix": prefix}
            out = model(images, masks, extra_groups=groups, targets=targets, **kwargs)
    with scope("losses"):
        losses, assignments = detection_losses(criterion, out, targets, num_boxes, context)
    weights: dict[str, float] = {}
    if plan is not None:
        with scope("distill_losses"):
            losses.update(distiller.losses(out, targets, num_boxes, plan, assignments))
        weights = distiller.group_weights()
    return losses, criterion.total(losses, weights)


def shared_backbone_prefix(model: nn.Module, images: torch.Tensor) -> BackbonePrefix | None:
    """The student backbone's frozen first blocks run on images (B, 3, H, W), or None (none frozen,
    or a model without a :class:`~oddetr.models.backbone.Backbone`)."""
    backbone = getattr(model.module if hasattr(model, "module") else model, "backbone", None)
    if not isinstance(backbone, Backbone):
        return None
    with scope("shared_backbone"):
        return backbone.frozen_prefix(images)


def moving_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a training forward pass can change: the running statistics of BatchNorm layers in
    training mode that track them (frozen BatchNorm and eval-mode layers have none to save)."""
    return [b for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


@dataclass
class StepResult:
    """What one batch did. ``finite`` False: it was skipped on every rank (with its accumulation window)."""

    finite: bool
    losses: dict[str, float] = field(default_factory=dict)  # unweighted terms and the weighted ``loss``


class GuardedStep:
    """Forward, backward and, every ``train.grad_accum`` batches, an optimiser step, guarded against NaNs.

    A batch whose loss, matching cost or gradient norm is not finite on *any* rank is skipped by every
    rank together (one rank leaving out ``backward()`` would leave DDP's all-reduce hanging): the
    gradients of its accumulation window are dropped and the BatchNorm statistics its forward pass
    moved are put back, so that the optimiser, scheduler, EMA teacher and step counter stay as they
    were. Under DDP the batches inside a window run under ``no_sync()``: gradients are all-reduced
    once per optimiser step, not once per batch.
    """

    def __init__(self, state: TrainState, ddp: nn.Module | None, criterion: SetCriterion,
                 train_cfg: TrainConfig, device: torch.device) -> None:
        self.state, self.ddp, self.criterion, self.cfg, self.device = state, ddp, criterion, train_cfg, device
        self.net = ddp or state.model
        self.last_nonfinite = ""  # why the last skipped batch was skipped

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, targets: Sequence[dict], window_end: bool,
                 context: str) -> StepResult:
        """One batch (images: (B, 3, H, W); masks: (B, H, W)); ``window_end``: step the optimiser after it."""
        state = self.state
        buffers = moving_buffers(state.model)
        saved = [b.detach().clone() for b in buffers]
        sync = window_end or self.ddp is None
        with nullcontext() if sync else self.ddp.no_sync():  # DDP: forward and backward inside no_sync
            total, losses = self._forward(images, masks, targets, context)
            if total is not None:
                with scope("backward"):
                    state.scaler.scale(total / self.cfg.grad_accum).backward()
        finite = total is not None and (not window_end or self._optimizer_step(context))
        if not finite:
            state.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, value in zip(buffers, saved):
                    b.copy_(value)
            return StepResult(False)
        return StepResult(True, summarize_losses({**losses, "loss": total}))

    def _forward(self, images, masks, targets, context) -> tuple[torch.Tensor | None, dict]:
        """The weighted total (None if not finite on some rank) and the loss dict."""
        n_boxes = sum(len(t["labels"]) for t in targets)
        num_boxes = max(dist.all_reduce_sum(n_boxes, self.device) / dist.world_size(), 1.0)
        try:
            distiller = self.state.distiller
            if distiller is not None and not distiller.guides(self.state.epoch):
                distiller = None  # past distill.end_epoch: a baseline step (the EMA teacher still follows)
            losses, total = compute_losses(self.net, self.criterion, distiller, images, masks, targets,
                                           num_boxes, self.cfg.amp, context)
            finite = bool(torch.isfinite(total))
            if not finite:
                self.last_nonfinite = f"non-finite loss at {context}"
        except TrainingError as err:  # non-finite matching cost
            self.last_nonfinite, losses, total, finite = str(err), {}, None, False
        if not dist.all_true(finite, self.device):  # the ranks skip together
            if finite:
                self.last_nonfinite = f"non-finite loss on another rank at {context}"
            return None, losses
        return total, losses

    def _optimizer_step(self, context: str) -> bool:
        """Clip, step, schedule, EMA. False (and nothing changes) if the gradient norm is not finite."""
        with scope("optimizer"):  # the EMA step (``ema``) nests inside
            return self._clip_and_step(context)

    def _clip_and_step(self, context: str) -> bool:
        state = self.state
        state.scaler.unscale_(state.optimizer)
        params = [p for g in state.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf"))
        if not torch.isfinite(norm):
            state.scaler.update()  # fp16: the scaler lowers its scale; the step is left out either way
            state.optimizer.zero_grad(set_to_none=True)
            if state.scaler.is_enabled():
                return True  # an fp16 overflow while the scale settles: not a skipped batch
            self.last_nonfinite = f"non-finite gradient norm at {context}"
            return False
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.step += 1
        if state.distiller is not None:
            with scope("ema"):
                state.distiller.update(state.model)
        return True
