"""Run start: the header shows the image size, the summary counts the data, the pictures are written,
and drawing the first batch leaves the training run's random streams alone."""

from __future__ import annotations

import json

import torch
import yaml
from engine_testutils import FAST_KEYS
from PIL import Image

from oddetr.config import resolve_config
from oddetr.engine.data import build_dataset
from oddetr.engine.run_start import first_train_batch
from oddetr.engine.trainer import Trainer


def test_trainer_announces_the_run(tmp_path, coco_data, tiny_keys, capsys, one_thread):
    data = coco_data(num_images=4, size=96)
    run = tmp_path / "run"
    cfg = resolve_config(overrides=tiny_keys(*FAST_KEYS, *data.keys(), "data.image_size=48", f"output={run}"))
    trainer = Trainer(cfg)
    err = capsys.readouterr().err
    # the picture shows the very batch the loop trains on first (same items, same augmentation)
    shown = first_train_batch(cfg, trainer.train_set)
    trainer.train_sampler.set_epoch(0)
    fed = next(iter(trainer.train_loader))
    assert torch.equal(shown[0], fed[0]) and torch.equal(shown[1], fed[1])
    assert [t["image_id"] for t in shown[2]] == [t["image_id"] for t in fed[2]]
    header = next(line for line in err.splitlines() if line.startswith("oddetr train:"))
    assert "data.image_size=48" in header and "4 train / 4 val images, 3 classes" in header
    assert "warning:" not in err
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["image_size"] == 48
    summary = json.loads((run / "dataset.json").read_text())
    boxes = len(data.data["annotations"])
    assert summary["image_size"] == 48 and summary["finest_stride"] == 8
    train = summary["splits"]["train"]
    assert train["images"] == 4 and train["boxes"] == boxes and sum(train["boxes_per_class"].values()) == boxes
    assert train["short_side"]["p50"] == 96 and train["short_side_resized"]["p50"] == 48
    for name in ("labels.png", "train_batch.png"):
        with Image.open(run / "plots" / name) as image:
            assert image.format == "PNG" and min(image.size) > 200


def test_first_batch_is_reproducible_and_leaves_the_rng_alone(tmp_path, coco_data, tiny_keys):
    data = coco_data(num_images=4)
    cfg = resolve_config(overrides=tiny_keys(*data.keys(), "data.scales=[48, 56, 64]", "train.batch_size=3"))
    train_set = build_dataset(cfg, "train", train=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = first_train_batch(cfg, train_set)
    assert torch.equal(torch.get_rng_state(), state)
    second = first_train_batch(cfg, train_set)
    assert first[0].shape[0] == 3 and torch.equal(first[0], second[0])
    assert [t["image_id"] for t in first[2]] == [t["image_id"] for t in second[2]]
