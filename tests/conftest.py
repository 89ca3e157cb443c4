"""Shared fixtures: tiny model configs and tiny on-disk COCO / VOC datasets of coloured rectangles.

``tests/data/conftest.py`` has writers for random-noise PNGs bound to its own ``tmp_path``
fixtures (visible to ``tests/data`` only); the engine, CLI and overfitting tests need images whose
objects can be learnt (one solid colour per class on a plain background), so they are written here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from oddetr.config import Config, resolve_config

# The smallest useful Deformable-DETR: d=32, 1 encoder + 2 decoder layers, 10 queries, 64 px.
TINY_OVERRIDES = [
    "model=deformable-detr-tiny",
    "model.d_model=32",
    "model.nheads=2",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.dim_feedforward=64",
    "model.num_queries=10",
    "model.backbone.name=resnet18",
    "data.scales=[64]",
    "data.max_size=64",
    "data.crop=false",
    "data.num_workers=0",
    "train.batch_size=2",
    "eval.batch_size=4",
    "train.instability_probe=4",
    "device=cpu",
]

# class id -> (COCO name, VOC name, RGB colour)
CLASSES = {
    1: ("red", "cat", (220, 40, 40)),
    2: ("green", "dog", (40, 200, 60)),
    3: ("blue", "car", (50, 70, 230)),
}
BACKGROUND = (128, 128, 128)


def tiny_overrides(*extra: str) -> list[str]:
    """The tiny model's overrides followed by ``extra`` (later keys win)."""
    return [*TINY_OVERRIDES, *extra]


def rectangle_scene(seed: int, size: int = 64, min_boxes: int = 1, max_boxes: int = 3,
                    min_side: int = 14, max_side: int = 28) -> tuple[np.ndarray, list[tuple[list[int], int]]]:
    """A grey image with 1..3 non-overlapping solid rectangles, one colour per class.

    Returns pixels (size, size, 3) uint8 and ``[(xyxy pixel-edge box, class id), ...]``.
    """
    rng = np.random.default_rng(seed)
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = BACKGROUND
    wanted = int(rng.integers(min_boxes, max_boxes + 1))
    objects: list[tuple[list[int], int]] = []
    for _ in range(200):
        if len(objects) == wanted:
            break
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = [x0, y0, x0 + w, y0 + h]
        if any(box[0] < o[2] + 2 and o[0] < box[2] + 2 and box[1] < o[3] + 2 and o[1] < box[3] + 2
               for o, _ in objects):
            continue  # keep a 2 px gap: boxes never touch
        cls = int(rng.integers(1, len(CLASSES) + 1))
        pixels[box[1]:box[3], box[0]:box[2]] = CLASSES[cls][2]
        objects.append((box, cls))
    return pixels, objects


@dataclass
class TinyCoco:
    """A COCO dataset on disk: ``images`` folder, ``annotations`` JSON and the dict written."""

    images: Path
    annotations: Path
    data: dict[str, Any]
    scenes: list[list[tuple[list[int], int]]] = field(default_factory=list)

    def keys(self, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
        """``data.<split>.*`` overrides pointing at this dataset."""
        return [item for s in splits for item in (f"data.{s}.format=coco", f"data.{s}.images={self.images}",
                                                  f"data.{s}.annotations={self.annotations}")]

    def path_of(self, image_id: int) -> Path:
        name = next(img["file_name"] for img in self.data["images"] if img["id"] == image_id)
        return self.images / name


def write_coco(root: Path, num_images: int = 4, size: int = 64, seed: int = 0, min_boxes: int = 1,
               max_boxes: int = 3, edit: Callable[[dict[str, Any]], None] | None = None) -> TinyCoco:
    """Write ``num_images`` rectangle scenes as PNGs and a COCO JSON under ``root``.

    Image ids are 1..N (files ``img_<id>.png``); ``edit`` may change the COCO dict before it is
    written (the PNGs are written for the images listed before the edit).
    """
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": cid, "name": name} for cid, (name, _, _) in CLASSES.items()],
    }
    scenes = []
    for image_id in range(1, num_images + 1):
        pixels, objects = rectangle_scene(seed * 1000 + image_id, size, min_boxes, max_boxes)
        name = f"img_{image_id}.png"
        Image.fromarray(pixels, "RGB").save(images_dir / name)
        data["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
        for (x0, y0, x1, y1), cls in objects:
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": image_id, "category_id": cls,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
        scenes.append(objects)
    if edit is not None:
        edit(data)
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps(data))
    return TinyCoco(images_dir, ann_file, data, scenes)


@dataclass
class TinyVoc:
    """A Pascal VOC dataset on disk (``root`` with Annotations, JPEGImages, ImageSets/Main/<split>.txt)."""

    root: Path
    split: str
    scenes: list[list[tuple[list[int], int]]] = field(default_factory=list)

    def keys(self, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
        return [item for s in splits for item in (f"data.{s}.format=voc", f"data.{s}.root={self.root}",
                                                  f"data.{s}.split={self.split}")]


def write_voc(root: Path, num_images: int = 4, size: int = 64, seed: int = 0, split: str = "trainval",
              names: dict[int, str] | None = None) -> TinyVoc:
    """Write rectangle scenes as a VOC dataset; classes use the VOC names cat / dog / car, or ``names``
    (class id 1..3 -> the name written in the XML files)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids, scenes = [], []
    for k in range(1, num_images + 1):
        voc_id = f"{2007_000000 + k:06d}"
        pixels, objects = rectangle_scene(seed * 1000 + k, size)
        Image.fromarray(pixels, "RGB").save(root / "JPEGImages" / f"{voc_id}.jpg", quality=95)
        parts = [f"<annotation><filename>{voc_id}.jpg</filename>",
                 f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"]
        for (x0, y0, x1, y1), cls in objects:
            # VOC boxes are 1-based inclusive pixel indices: pixel-edge box [x0, x1) -> xmin x0+1, xmax x1
            parts.append(f"<object><name>{(names or {})[cls] if names else CLASSES[cls][1]}</name><difficult>0</difficult><bndbox>"
                         f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
                         "</bndbox></object>")
        (root / "Annotations" / f"{voc_id}.xml").write_text("".join(parts) + "</annotation>")
        ids.append(voc_id)
        scenes.append(objects)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return TinyVoc(root, split, scenes)


@pytest.fixture(scope="session")
def tiny_keys() -> Callable[..., list[str]]:
    """Factory: ``tiny_keys("key=value", ...) -> list`` of the tiny model's overrides plus extra keys."""
    return tiny_overrides


@pytest.fixture(scope="session")
def coco_writer() -> Callable[..., TinyCoco]:
    """The :func:`write_coco` function (for module-scoped fixtures that use ``tmp_path_factory``)."""
    return write_coco


@pytest.fixture(scope="session")
def voc_writer() -> Callable[..., TinyVoc]:
    """The :func:`write_voc` function."""
    return write_voc


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., Config]:
    """Factory: ``tiny_config("key=value", ...) -> Config`` of the tiny model (extra keys win)."""

    def make(*extra: str) -> Config:
        return resolve_config(overrides=tiny_overrides(*extra))

    return make


@pytest.fixture
def coco_data(tmp_path: Path) -> Callable[..., TinyCoco]:
    """Factory: ``coco_data(name="coco", **write_coco kwargs) -> TinyCoco`` under ``tmp_path / name``."""

    def make(name: str = "coco", **kwargs: Any) -> TinyCoco:
        return write_coco(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def voc_data(tmp_path: Path) -> Callable[..., TinyVoc]:
    """Factory: ``voc_data(name="voc", **write_voc kwargs) -> TinyVoc`` under ``tmp_path / name``."""

    def make(name: str = "voc", **kwargs: Any) -> TinyVoc:
        return write_voc(tmp_path / name, **kwargs)

    return make


def visible_stderr_lines(text: str) -> list[str]:
    """Non-empty lines as a terminal shows them (text after the last carriage return of each line)."""
    shown = (ln.rsplit("\r", 1)[-1].strip() for ln in text.split("\n"))
    return [ln for ln in shown if ln]


@pytest.fixture(scope="session")
def stderr_lines() -> Callable[[str], list[str]]:
    return visible_stderr_lines


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread (restored afterwards).

    Training results then do not depend on the machine's core count, and on a shared 2-core
    machine one thread is several times faster than two oversubscribed ones.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
