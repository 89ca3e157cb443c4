"""Optimiser parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from oddetr.config import Config

# Deformable-DETR trains sampling offsets and reference-point projections at 0.1x the lr
LINEAR_PROJ_PATTERNS = ("sampling_offsets", "reference_points")


def parameter_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups by name: backbone (lr x backbone.lr_mult), linear projections (x0.1), the rest.

    Every trainable parameter lands in exactly one group (asserted); parameters shared by
    several modules appear once (``named_parameters`` de-duplicates them).
    """
    lr = cfg.train.lr
    groups = {"backbone": [], "linear_proj": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif any(pat in name for pat in LINEAR_PROJ_PATTERNS):
            groups["linear_proj"].append(p)
        else:
            groups["other"].append(p)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for ps in groups.values() for p in ps]
    assert len(grouped) == len(trainable) and len({id(p) for p in grouped}) == len(grouped), \
        "every trainable parameter must land in exactly one optimiser group"
    mults = {"backbone": cfg.model.backbone.lr_mult, "linear_proj": 0.1, "other": 1.0}
    return [{"params": ps, "lr": lr * mults[name], "name": name} for name, ps in groups.items() if ps]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups`, fused (one kernel for all parameters) where the device has it.

    The fused kernel is 3x faster than the default per-tensor loop on CPU (benchmarks/profile_steps.py)
    and agrees with it to 1 ulp; a resumed run uses what its checkpoint's optimiser used.
    """
    groups = parameter_groups(model, cfg)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)


def lr_factor(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """Multiplier of the base lr at optimiser step ``step``: linear warm-up, then step or cosine."""
    t = cfg.train
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        total = max(1, t.epochs * steps_per_epoch - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / total)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    epoch = step // max(1, steps_per_epoch)
    return t.lr_drop_factor ** sum(1 for e in t.lr_drop_epochs if epoch >= e)


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, cfg: Config):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
