"""The dataset summary against a hand-made dataset, and its size warnings (4 px boxes vs the synthetic set)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oddetr.data.coco import CocoDetection
from oddetr.data.summary import format_summary, size_warnings, summarize_split, write_summary
from oddetr.data.synthetic import generate_synthetic_coco


def _write(root: Path, images: list[tuple[int, int]], boxes: list[tuple[int, list[float], int, int]]) -> CocoDetection:
    """images: (w, h) with ids 1..; boxes: (image id, xywh, category id, iscrowd)."""
    (root / "images").mkdir(parents=True)
    data = {"images": [], "annotations": [],
            "categories": [{"id": 1, "name": "plane"}, {"id": 2, "name": "ship"}, {"id": 3, "name": "car"}]}
    for k, (w, h) in enumerate(images, start=1):
        Image.new("RGB", (w, h)).save(root / "images" / f"{k}.png")
        data["images"].append({"id": k, "file_name": f"{k}.png", "width": w, "height": h})
    for k, (image_id, xywh, cat, crowd) in enumerate(boxes, start=1):
        data["annotations"].append({"id": k, "image_id": image_id, "category_id": cat, "bbox": xywh,
                                    "area": 1.0, "iscrowd": crowd})
    (root / "ann.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped / clipped boxes warning, tested in test_coco.py
        return CocoDetection(root / "images", root / "ann.json")


def test_counts_and_sizes_of_a_hand_made_dataset(tmp_path):
    dataset = _write(tmp_path, [(200, 100), (50, 50), (80, 60)], [
        (1, [10, 10, 20, 40], 1, 0),   # plane, size sqrt(800)
        (1, [100, 50, 10, 10], 2, 0),  # ship, size 10
        (1, [0, 0, 5, 5], 1, 1),       # crowd: not trained on, not counted
        (1, [190, 90, 20, 20], 2, 0),  # ship, clipped to 10 x 10
        (1, [300, 10, 5, 5], 1, 0),    # outside the image: dropped
        (1, [5, 5, 0, 5], 1, 0),       # zero width: dropped
        (2, [0, 0, 50, 50], 1, 0),     # plane, size 50
    ])                                 # image 3: no boxes
    s = summarize_split(dataset, "train", image_size=40, max_size=80)
    assert (s.images, s.boxes, s.images_without_boxes, s.dropped_boxes, s.clipped_boxes) == (3, 4, 1, 2, 1)
    assert s.crowd_or_difficult == 1
    assert s.boxes_per_class == {"plane": 2, "ship": 2, "car": 0}
    # resize factors: 200x100 -> 80x40 (0.4, capped by max_size), 50x50 -> 40x40 (0.8), 80x60 -> 53x40
    before = np.array([np.sqrt(800), 10, 10, 50])
    after = np.array([np.sqrt(800) * 0.4, 4, 4, 40])
    for q in (0, 5, 50, 95, 100):
        assert s.box_size[f"p{q}"] == pytest.approx(np.percentile(before, q), abs=0.01)
        assert s.box_size_resized[f"p{q}"] == pytest.approx(np.percentile(after, q), abs=0.01)
    assert s.short_side["p50"] == 60 and s.short_side_resized["p100"] == 40
    assert s.shrunk_over_2x == pytest.approx(1 / 3, abs=1e-3)  # only the 200x100 image (factor 0.4)
    table = format_summary([s], 40, 80)
    assert "train" in table and "plane" in table and "data.image_size=40" in table
    write_summary(tmp_path / "dataset.json", [s], 40, 80, 8, [])
    saved = json.loads((tmp_path / "dataset.json").read_text())
    assert saved["splits"]["train"]["boxes"] == 4 and saved["splits"]["train"]["boxes_per_class"]["ship"] == 2
    assert saved["image_size"] == 40 and saved["warnings"] == []


def test_warning_fires_on_4_px_boxes(tmp_path):
    dataset = _write(tmp_path, [(64, 64)] * 3, [(k, [8 * j, 8 * j, 4, 4], 1, 0) for k in (1, 2, 3) for j in range(5)])
    s = summarize_split(dataset, "train", image_size=64, max_size=64)
    assert s.box_size_resized["p50"] == 4
    found = size_warnings(s, image_size=64, finest_stride=8)
    assert len(found) == 1  # the images are not shrunk
    assert "4.0 px" in found[0] and "stride (8 px)" in found[0] and "data.image_size=256" in found[0]
    assert size_warnings(s, image_size=64, finest_stride=4) == []
    assert "warning: train: the median box" in format_summary([s], 64, 64, found)


def test_no_warning_on_the_synthetic_set_until_it_is_shrunk(tmp_path):
    paths = generate_synthetic_coco(tmp_path / "synthetic", num_train=40, num_val=5, image_size=128)
    dataset = CocoDetection(paths["train_images"], paths["train_annotations"])
    # the tiny presets' size and stride: no warning
    assert size_warnings(summarize_split(dataset, "train", 128, 192), 128, 8) == []
    # a quarter of the size: median box ~4 px and every image shrunk 4x
    s = summarize_split(dataset, "train", 32, 48)
    found = size_warnings(s, 32, 8)
    assert len(found) == 2 and s.shrunk_over_2x == 1.0 and s.box_size_resized["p50"] < 8
    assert "shrunk more than 2x" in found[1] and "data.image_size=128" in found[1]
