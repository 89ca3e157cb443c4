"""What the speed benchmarks share: random batches and the trainer's step on a fresh model (imported by the
scripts run as ``python benchmarks/X.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oddetr.config import Config, resolve_config
from oddetr.distill.distiller import OnlineDistiller
from oddetr.engine.checkpoint import TrainState
from oddetr.engine.optim import build_optimizer, build_scheduler
from oddetr.engine.step import GuardedStep
from oddetr.losses.criterion import SetCriterion
from oddetr.models.detector import build_model


def random_batch(batch: int, size: int, boxes: int, num_classes: int, seed: int = 0):
    """(images (B, 3, S, S), masks (B, S, S) all False, targets: per image ``labels`` (boxes,) and
    ``boxes`` (boxes, 4) cxcywh in [0, 1], ``image_id``), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    targets = []
    for i in range(batch):
        xy = torch.rand(boxes, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(boxes, 2, generator=g) * 0.2 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (boxes,), generator=g),
                        "boxes": torch.cat([xy, wh], 1), "image_id": i})
    return images, masks, targets


def build_step(preset: str, distill: bool, num_classes: int,
               overrides: Sequence[str] = ()) -> tuple[GuardedStep, Config]:
    """The trainer's step for ``preset`` (random init, seed 0), distillation on or off, and the config;
    the model and distiller are ``step.state.model`` and ``step.state.distiller``."""
    torch.manual_seed(0)
    cfg = resolve_config(overrides=[f"model={preset}", f"distill.enabled={str(distill).lower()}", *overrides])
    model = build_model(cfg.model, num_classes).train()
    criterion = SetCriterion(cfg.loss)
    distiller = OnlineDistiller(model, cfg, criterion, total_steps=1000) if distill else None
    optimizer = build_optimizer(model, cfg)
    state = TrainState(model, optimizer, build_scheduler(optimizer, 1000, cfg),
                       torch.amp.GradScaler("cpu", enabled=False), distiller, {})
    return GuardedStep(state, None, criterion, cfg.train, torch.device("cpu")), cfg


def add_step_arguments(parser) -> None:
    """The options of a benchmark that times trainer steps on one random batch (preset, image size,
    batch, boxes and classes, steps, warm-up, threads, config overrides)."""
    parser.add_argument("--preset", default="deformable-detr-tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=10)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--override", nargs="*", default=[], help="config overrides, key=value")
