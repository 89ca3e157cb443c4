"""Shared builders for the OD-DETR distillation tests (tiny models, random images, targets)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from oddetr.config import Config, resolve_config
from oddetr.distill.distiller import OnlineDistiller
from oddetr.losses.criterion import SetCriterion
from oddetr.models.detector import DeformableDETR, build_model

NUM_CLASSES = 3

TINY = [
    "model=deformable-detr-tiny",
    "model.d_model=32",
    "model.nheads=2",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.dim_feedforward=64",
    "model.num_queries=8",
    "model.dropout=0.0",
    "distill.enabled=true",
]


def tiny_config(*overrides: str) -> Config:
    return resolve_config(overrides=TINY + list(overrides))


_BUILT: dict[tuple[str, int], DeformableDETR] = {}


def tiny_model(cfg: Config, seed: int = 0) -> DeformableDETR:
    """A fresh model for ``cfg.model`` (built once per model config and seed, then deep-copied)."""
    key = (repr(cfg.model), seed)
    if key not in _BUILT:
        torch.manual_seed(seed)
        _BUILT[key] = build_model(cfg.model, NUM_CLASSES)
    return copy.deepcopy(_BUILT[key])


def tiny_setup(*overrides: str, seed: int = 0) -> tuple[Config, DeformableDETR, SetCriterion, OnlineDistiller]:
    cfg = tiny_config(*overrides)
    model = tiny_model(cfg, seed)
    criterion = SetCriterion(cfg.loss)
    return cfg, model, criterion, OnlineDistiller(model, cfg, criterion, total_steps=900)


def images_and_masks(batch: int = 2, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.zeros(batch, size, size, dtype=torch.bool)


def fixed_targets() -> list[dict]:
    """Two images: 3 GT boxes (classes 0, 2, 0) and 1 GT box (class 1)."""
    return [
        {"labels": torch.tensor([0, 2, 0]),
         "boxes": torch.tensor([[0.30, 0.30, 0.20, 0.25], [0.65, 0.60, 0.30, 0.40], [0.50, 0.75, 0.40, 0.20]]),
         "image_id": 0},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.50, 0.50, 0.40, 0.40]]), "image_id": 1},
    ]


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) cxcywh boxes inside [0, 1]."""
    wh = torch.rand(n, 2, generator=generator) * 0.4 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=generator) * (1 - wh)
    return torch.cat([c, wh], -1)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread (these tiny models gain nothing from more, and on a shared
    2-core machine extra OpenMP threads make them several times slower); restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
