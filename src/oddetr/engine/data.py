"""Build datasets and loaders from the config (COCO, VOC, or the embedded synthetic set)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from oddetr.config import Config, DataSplitConfig
from oddetr.data.coco import CocoDetection
from oddetr.data.collate import collate_detection
from oddetr.data.synthetic import generate_synthetic_coco
from oddetr.data.transforms import build_transforms
from oddetr.data.voc import VocDetection
from oddetr.errors import DataError


def synthetic_paths(cfg: Config) -> dict[str, str]:
    """Generate (once, deterministically) the synthetic COCO dataset and return its paths."""
    s = cfg.data.synthetic
    root = Path(s.root).expanduser()
    return generate_synthetic_coco(root, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size,
                                   seed=s.seed, min_objects=s.min_objects, max_objects=s.max_objects)


def build_dataset(cfg: Config, split: str, train: bool, transforms_on: bool = True) -> Dataset:
    """The ``data.train`` or ``data.val`` dataset; ``train`` picks the augmentation."""
    d = cfg.data
    spec: DataSplitConfig = getattr(d, split)
    transforms = build_transforms(train=train, scales=d.scales, max_size=d.max_size, crop=d.crop,
                                  crop_scales=d.crop_scales, crop_min=d.crop_min, crop_max=d.crop_max,
                                  flip=d.flip) if transforms_on else \
        build_transforms(train=False, scales=d.scales, max_size=d.max_size)
    if spec.format == "synthetic":
        paths = synthetic_paths(cfg)
        return CocoDetection(paths[f"{split}_images"], paths[f"{split}_annotations"], transforms=transforms)
    if spec.format == "coco":
        return CocoDetection(spec.images, spec.annotations, transforms=transforms)
    if spec.format == "voc":
        return VocDetection(spec.root, spec.split, transforms=transforms)
    raise DataError(f"unknown data format {spec.format!r} for data.{split}")


def check_same_categories(train_set: Dataset, val_set: Dataset) -> None:
    """Training and validation must share one label space."""
    if train_set.categories != val_set.categories:
        raise DataError("data.train and data.val have different categories: "
                        f"{[c['name'] for c in train_set.categories]} vs {[c['name'] for c in val_set.categories]}")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                sampler: torch.utils.data.Sampler | None = None, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate_detection,
                      generator=generator, drop_last=drop_last, persistent_workers=False,
                      worker_init_fn=_seed_worker)


def _seed_worker(worker_id: int) -> None:
    import random
    import signal

    import numpy as np

    # a scheduler's SIGTERM reaches every process of the job: the main process saves and then shuts the
    # workers down; a worker dying of it first would fail the batch the checkpoint waits for
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
