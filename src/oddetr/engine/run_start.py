"""What rank 0 shows before training: the run header, the dataset summary and the data pictures.

One call, :func:`announce_run`, from :class:`~oddetr.engine.trainer.Trainer` once the data and the model are
built. It prints the header line (preset, image size, data, device) and the dataset table on stderr, and
writes ``RUN/dataset.json``, ``RUN/plots/labels.png`` and ``RUN/plots/train_batch.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from oddetr.config import Config
from oddetr.data.coco import DetectionDataset
from oddetr.data.collate import collate_detection
from oddetr.data.preview import plot_labels, plot_train_batch
from oddetr.data.summary import box_arrays, format_summary, size_warnings, summarize_split, write_summary
from oddetr.engine.sampler import EpochSampler, SeededSamples

__all__ = ["announce_run", "first_train_batch", "run_header"]


def run_header(cfg: Config, train_set: DetectionDataset, val_set: DetectionDataset, device: torch.device) -> str:
    """One line: preset and architecture, image size (train scales, eval size, cap), data and device."""
    d = cfg.data
    scales = f"{min(d.scales)}-{max(d.scales)}" if len(d.scales) > 1 else f"{d.scales[0]}"
    data = d.train.format if d.train.format != "synthetic" else "synthetic shapes"
    return (f"oddetr train: {cfg.preset} ({cfg.model.arch}) | data.image_size={d.image_size} (train shorter side "
            f"{scales}{', crops' if d.crop else ''}, eval {d.image_size}, longer side <= {d.max_size}) | "
            f"{data}: {len(train_set)} train / {len(val_set)} val images, {train_set.num_classes} classes | "
            f"batch {cfg.train.batch_size} x {cfg.train.epochs} epochs | device {device} | {cfg.output}")


def first_train_batch(cfg: Config, train_set: DetectionDataset, world_size: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Rank 0's first training batch: the sampler's epoch-0 items, each augmented under its own sample
    seed exactly as the training loader does (:class:`SeededSamples`, which leaves the caller's RNG
    states as they were).

    Returns ``images`` (B, 3, H, W), ``masks`` (B, H, W), targets.
    """
    sampler = EpochSampler(len(train_set), True, cfg.seed, 0, world_size, sample_seeds=True)
    sampler.set_epoch(0)
    items = list(sampler)[: cfg.train.batch_size]
    samples = SeededSamples(train_set)
    return collate_detection([samples[item] for item in items])


def announce_run(cfg: Config, run_dir: Path, train_set: DetectionDataset, val_set: DetectionDataset,
                 finest_stride: int, device: torch.device, world_size: int = 1,
                 file: TextIO | None = None) -> list[str]:
    """Print the header and the dataset summary; write ``dataset.json`` and the two pictures.

    ``finest_stride``: the model's smallest feature stride in pixels (8 for the presets). Returns the
    warnings (also printed and saved).
    """
    out = file if file is not None else sys.stderr
    d = cfg.data
    image_size = int(d.image_size if d.image_size is not None else max(d.scales))
    print(run_header(cfg, train_set, val_set, device), file=out, flush=True)
    splits = [summarize_split(train_set, "train", image_size, d.max_size),
              summarize_split(val_set, "val", image_size, d.max_size)]
    warnings = size_warnings(splits[0], image_size, finest_stride)
    print(format_summary(splits, image_size, d.max_size, warnings), file=out, flush=True)
    write_summary(run_dir / "dataset.json", splits, image_size, d.max_size, finest_stride, warnings)
    plots = run_dir / "plots"
    plot_labels(box_arrays(train_set, image_size, d.max_size), train_set.class_names, plots / "labels.png",
                image_size, finest_stride)
    images, masks, targets = first_train_batch(cfg, train_set, world_size)
    plot_train_batch(images, masks, targets, train_set.class_names, plots / "train_batch.png")
    return warnings
