"""A synthetic COCO-format shapes dataset, small and learnable, for tests, demos and CPU benchmarks.

Each image has a cluttered background (soft low-contrast blotches, thin lines, pixel noise) and 1..20
crisp, axis-aligned, high-contrast shapes. The class is the shape, never the colour. Shapes may overlap,
but a shape is only placed if every shape under it stays at least 40% visible, so no labelled object is
mostly hidden. Boxes are tight around each shape's drawn pixels (the whole shape, including any part a
later shape covers), in absolute pixel-edge coordinates, always inside the image.

Everything derives from ``seed`` (image ``i`` of split ``s`` uses ``np.random.default_rng([seed, s, i])``),
so the same arguments give byte-identical PNG and JSON files, and train and val differ.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from oddetr.errors import ConfigError

__all__ = ["SHAPE_CLASSES", "generate_synthetic_coco", "render_synthetic_image"]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "diamond")
"""Category names; category id = position + 1."""

_VERSION = 1
_MIN_VISIBLE = 0.4  # an object under a new shape must keep at least this fraction of its pixels
_MIN_SIDE, _MAX_SIDE = 0.06, 0.5  # object size range as a fraction of the image side
_SPLITS = ("train", "val")
_LUMA = np.array([0.299, 0.587, 0.114])


def generate_synthetic_coco(
    root: str | Path,
    num_train: int = 600,
    num_val: int = 100,
    image_size: int = 128,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 20,
) -> dict[str, Path]:
    """Write (or reuse) the synthetic shapes dataset under ``root`` and return its paths.

    Layout: ``root/train/*.png``, ``root/val/*.png``, ``root/annotations/{train,val}.json`` (COCO format,
    image ids from 1, category ids 1..6 for ``SHAPE_CLASSES``) and ``root/params.json``, written last:
    when it exists and matches the arguments, nothing is regenerated. Images are ``image_size`` square RGB.

    Returns ``{"train_images", "train_annotations", "val_images", "val_annotations"}`` -> paths.
    """
    params = {
        "generator": "oddetr.synthetic",
        "version": _VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "seed": int(seed),
        "min_objects": int(min_objects),
        "max_objects": int(max_objects),
    }
    _check_params(params)
    root = Path(root)
    paths = {
        "train_images": root / "train",
        "train_annotations": root / "annotations" / "train.json",
        "val_images": root / "val",
        "val_annotations": root / "annotations" / "val.json",
    }
    params_file = root / "params.json"
    if _matches(params_file, params) and all(p.exists() for p in paths.values()):
        return paths
    params_file.unlink(missing_ok=True)  # a crash from here on leaves no params.json: an incomplete set
    for split_index, split in enumerate(_SPLITS):
        count = params[f"num_{split}"]
        coco = _generate_split(paths[f"{split}_images"], split, split_index, count, params)
        _write_atomic(paths[f"{split}_annotations"], _dumps(coco))
    _write_atomic(params_file, _dumps(params))
    return paths


def _check_params(p: dict[str, Any]) -> None:
    if p["num_train"] < 1 or p["num_val"] < 1:
        raise ConfigError(
            f"synthetic dataset needs num_train >= 1 and num_val >= 1, got {p['num_train']}, {p['num_val']}"
        )
    if p["image_size"] < 32:
        raise ConfigError(f"synthetic image_size must be >= 32, got {p['image_size']}")
    if p["seed"] < 0:
        raise ConfigError(f"synthetic seed must be >= 0, got {p['seed']}")
    if not 1 <= p["min_objects"] <= p["max_objects"]:
        raise ConfigError(
            f"synthetic needs 1 <= min_objects <= max_objects, got {p['min_objects']}, {p['max_objects']}"
        )


def _matches(params_file: Path, params: dict[str, Any]) -> bool:
    try:
        return json.loads(params_file.read_text(encoding="utf-8")) == params
    except (OSError, ValueError):
        return False


def _dumps(data: Any) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _generate_split(
    images_dir: Path, split: str, split_index: int, count: int, params: dict[str, Any]
) -> dict:
    images, annotations = [], []
    size = params["image_size"]
    for image_id in range(1, count + 1):
        rng = np.random.default_rng([params["seed"], split_index, image_id])
        pixels, objects = render_synthetic_image(rng, size, params["min_objects"], params["max_objects"])
        file_name = f"{image_id:06d}.png"
        _write_atomic(images_dir / file_name, _png_bytes(pixels))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["label"] + 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(obj["area"]),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {
            "description": "oddetr synthetic shapes",
            "split": split,
            "seed": params["seed"],
            "version": _VERSION,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPE_CLASSES)
        ],
    }


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def render_synthetic_image(
    rng: np.random.Generator, size: int, min_objects: int = 1, max_objects: int = 20
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image.

    Returns ``pixels`` (size, size, 3) uint8 and objects ``{"label": int in [0, 6), "box": (x0, y0, x1, y1)
    absolute pixel edges, "area": pixel count of the whole shape}`` (between ``min_objects`` and
    ``max_objects`` of them, in drawing order).
    """
    background = rng.integers(0, 256, size=3)
    canvas = _background(rng, size, background)
    owner = np.zeros((size, size), dtype=np.int32)  # 0 = background, k = k-th placed object
    visible: list[int] = []
    totals: list[int] = []
    colours: list[np.ndarray] = []
    objects: list[dict[str, Any]] = []
    target = int(rng.integers(min_objects, max_objects + 1))
    lo, hi = math.log(max(6.0, _MIN_SIDE * size)), math.log(_MAX_SIDE * size)
    for k in range(target):
        tries = 500 if k < min_objects else 40
        for attempt in range(tries):
            # Later attempts prefer smaller shapes, which fit between the others more easily.
            shrink = min(1.0, 20 / (attempt + 1))
            side = math.exp(rng.uniform(lo, lo + (hi - lo) * shrink))
            aspect = math.exp(rng.uniform(-0.15, 0.15))
            w = max(6, min(size, round(side * aspect)))
            h = max(6, min(size, round(side / aspect)))
            label = int(rng.integers(len(SHAPE_CLASSES)))
            x = int(rng.integers(0, size - w + 1))
            y = int(rng.integers(0, size - h + 1))
            mask = _shape_mask(SHAPE_CLASSES[label], w, h)
            covered = np.bincount(owner[y : y + h, x : x + w][mask], minlength=len(totals) + 1)[1:]
            if any(v - c < _MIN_VISIBLE * t for v, c, t in zip(visible, covered, totals)):
                continue
            colour = _shape_colour(rng, background, [colours[j] for j in np.flatnonzero(covered)])
            canvas[y : y + h, x : x + w][mask] = colour
            owner[y : y + h, x : x + w][mask] = len(totals) + 1
            for j in np.flatnonzero(covered):
                visible[j] -= int(covered[j])
            area = int(mask.sum())
            visible.append(area)
            totals.append(area)
            colours.append(colour)
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1)
            objects.append({"label": label, "box": box, "area": area})
            break
    noise = rng.normal(0.0, 4.0, size=canvas.shape)
    pixels = np.clip(canvas.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)
    return pixels, objects


def _background(rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
    """(size, size, 3) uint8: flat colour, blurred low-contrast blotches, thin low-contrast lines."""
    img = Image.new("RGB", (size, size), tuple(int(c) for c in base))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.1, 0.35, 2) * size
        points = [
            (cx + rx * rng.uniform(0.6, 1.0) * math.cos(a), cy + ry * rng.uniform(0.6, 1.0) * math.sin(a))
            for a in np.sort(rng.uniform(0, 2 * math.pi, 7))
        ]
        draw.polygon(points, fill=_near(rng, base, 30))
    img = img.filter(ImageFilter.GaussianBlur(radius=size / 24))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line([(x0, y0), (x1, y1)], fill=_near(rng, base, 40), width=int(rng.integers(1, 3)))
    return np.array(img, dtype=np.uint8)


def _near(rng: np.random.Generator, base: np.ndarray, spread: int) -> tuple[int, int, int]:
    """A colour within ``spread`` of ``base`` per channel (clutter: visible but low contrast)."""
    return tuple(int(v) for v in np.clip(base + rng.integers(-spread, spread + 1, 3), 0, 255))  # type: ignore[return-value]


def _shape_colour(rng: np.random.Generator, background: np.ndarray, under: list[np.ndarray]) -> np.ndarray:
    """A random colour with luminance >= 80 away from the background and distinct from shapes it covers."""
    candidates = rng.integers(0, 256, size=(64, 3))
    ok = np.abs(candidates @ _LUMA - background @ _LUMA) >= 80
    for colour in under:
        ok &= np.abs(candidates - colour).sum(1) >= 150
    if ok.any():
        return candidates[int(np.argmax(ok))]
    return np.array([0, 0, 0] if background @ _LUMA > 127 else [255, 255, 255])


def _shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """Bool (h, w) mask of ``shape`` filling a ``w x h`` box (crisp, no anti-aliasing)."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    x1, y1 = w - 1, h - 1
    if shape == "circle":
        draw.ellipse([0, 0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(0, y1), (x1, y1), (x1 / 2, 0)], fill=255)
    elif shape == "cross":
        t = max(2, round(0.34 * min(w, h)))
        top, left = (h - t) // 2, (w - t) // 2
        draw.rectangle([0, top, x1, top + t - 1], fill=255)
        draw.rectangle([left, 0, left + t - 1, y1], fill=255)
    elif shape == "ring":
        t = max(2, round(0.22 * min(w, h)))
        draw.ellipse([0, 0, x1, y1], fill=255)
        draw.ellipse([t, t, x1 - t, y1 - t], fill=0)
    elif shape == "diamond":
        draw.polygon([(x1 / 2, 0), (x1, y1 / 2), (x1 / 2, y1), (0, y1 / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img) > 0
