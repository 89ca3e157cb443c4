"""Tiny on-disk COCO datasets for the data tests (a few 24..64 px images in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


def write_png(path: Path, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Write a random RGB PNG and return its pixels (height, width, 3) uint8."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)
    return pixels


def basic_coco() -> dict[str, Any]:
    """Two images, non-contiguous category ids (3, 7), one crowd annotation, one image without boxes."""
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 32},
            {"id": 4, "file_name": "b.png", "width": 24, "height": 48},
            {"id": 5, "file_name": "c.png", "width": 32, "height": 32},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "bbox": [2.0, 3.0, 10.0, 8.0],
                "area": 60.0,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 10,
                "category_id": 3,
                "bbox": [20.5, 10.0, 15.0, 20.0],
                "area": 300.0,
                "iscrowd": 0,
            },
            {"id": 3, "image_id": 4, "category_id": 3, "bbox": [0, 0, 24, 48], "area": 1152, "iscrowd": 0},
            {"id": 4, "image_id": 4, "category_id": 7, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


@pytest.fixture
def make_coco(tmp_path: Path):
    """Factory: ``make_coco(data=None, text=None) -> (images_dir, annotations_file)`` with real PNGs.

    ``data`` (a COCO dict, default ``basic_coco()``) is written as JSON unless ``text`` gives the raw file.
    PNGs are written for every image in ``data`` with its declared size.
    """

    def make(data: dict[str, Any] | None = None, text: str | None = None) -> tuple[Path, Path]:
        data = basic_coco() if data is None else data
        images_dir = tmp_path / "images"
        images_dir.mkdir(exist_ok=True)
        for k, img in enumerate(data.get("images", [])):
            write_png(images_dir / img["file_name"], img["width"], img["height"], seed=k)
        ann_file = tmp_path / "annotations.json"
        ann_file.write_text(json.dumps(data) if text is None else text)
        return images_dir, ann_file

    return make


@pytest.fixture
def png():
    """The ``write_png(path, width, height, seed=0) -> pixels`` helper, as a fixture."""
    return write_png
