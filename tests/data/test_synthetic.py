"""Synthetic shapes: determinism, idempotence, content (counts, boxes, classes) and loadability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oddetr.data import SHAPE_CLASSES, CocoDetection, generate_synthetic_coco
from oddetr.errors import ConfigError

SMALL = {"num_train": 4, "num_val": 2, "image_size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate_synthetic_coco(tmp_path / "a", seed=3, **SMALL)
    generate_synthetic_coco(tmp_path / "b", seed=3, **SMALL)
    generate_synthetic_coco(tmp_path / "c", seed=4, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert len(a) == 4 + 2 + 3  # PNGs, two JSON files, params.json
    assert (
        a["annotations/train.json"] != c["annotations/train.json"]
        and a["train/000001.png"] != c["train/000001.png"]
    )
    assert a["train/000001.png"] != a["val/000001.png"]  # train and val use different derived seeds


def test_content_counts_boxes_and_classes(tmp_path):
    paths = generate_synthetic_coco(
        tmp_path, num_train=12, num_val=1, image_size=64, seed=1, min_objects=3, max_objects=8
    )
    data = json.loads(paths["train_annotations"].read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPE_CLASSES)
    assert [c["id"] for c in data["categories"]] == list(range(1, len(SHAPE_CLASSES) + 1))
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=13)[1:]
    assert counts.min() >= 3 and counts.max() <= 8
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
        assert w >= 2 and h >= 2 and 0 < ann["area"] <= w * h
    img = data["images"][0]
    with Image.open(paths["train_images"] / img["file_name"]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    labels = {a["category_id"] for a in data["annotations"]}
    assert len(labels) >= 4  # all classes are drawn, not one


def test_loads_as_coco_without_cleaning(tmp_path, recwarn):
    paths = generate_synthetic_coco(tmp_path, seed=0, **SMALL)
    ds = CocoDetection(paths["val_images"], paths["val_annotations"])
    assert not recwarn.list and ds.dropped_boxes == ds.clipped_boxes == 0
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and len(target["labels"]) >= 1 and ds.class_names == list(SHAPE_CLASSES)


def test_idempotent_and_regenerates_on_change(tmp_path):
    paths = generate_synthetic_coco(tmp_path, seed=0, **SMALL)
    png = paths["train_images"] / "000001.png"
    png.write_bytes(b"marker")  # not regenerated while params.json matches
    assert generate_synthetic_coco(tmp_path, seed=0, **SMALL) == paths
    assert png.read_bytes() == b"marker"
    (tmp_path / "params.json").unlink()  # an interrupted run leaves no params.json: regenerate
    generate_synthetic_coco(tmp_path, seed=0, **SMALL)
    assert png.read_bytes().startswith(b"\x89PNG")
    first = paths["train_annotations"].read_bytes()
    generate_synthetic_coco(tmp_path, seed=0, **{**SMALL, "num_train": 5})  # other params: regenerate
    data = json.loads(paths["train_annotations"].read_text())
    assert len(data["images"]) == 5 and paths["train_annotations"].read_bytes() != first
    assert json.loads((tmp_path / "params.json").read_text())["num_train"] == 5


@pytest.mark.parametrize(
    "bad",
    [
        {"num_train": 0},
        {"image_size": 16},
        {"min_objects": 0},
        {"min_objects": 5, "max_objects": 4},
        {"seed": -1},
    ],
)
def test_bad_params(tmp_path, bad):
    with pytest.raises(ConfigError):
        generate_synthetic_coco(tmp_path, **{**SMALL, **bad})
