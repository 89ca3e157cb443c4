"""``oddetr predict``: run a detector on image files and save drawn PNGs plus COCO results JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from oddetr.data.coco import read_image_index
from oddetr.data.images import load_image
from oddetr.errors import DataError
from oddetr.visualize import draw_detections

if TYPE_CHECKING:
    from oddetr.api import Detector

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
        return files
    raise DataError(f"images not found: {path}")


def _dataset_ids(loaded: Detector, files: list[Path], root: Path,
                 annotations: str | Path | None) -> tuple[list[int | str], list[int]]:
    """(image id per file, category id per label): the file names and the checkpoint's category ids, or with
    ``annotations`` (COCO JSON) that file's image ids (by file name) and category ids (by class name)."""
    if annotations is None:
        return [f.name for f in files], list(loaded.label_to_cat_id)
    by_file, by_class = read_image_index(annotations)
    ids: list[int | str] = []
    for f in files:
        rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
        image_id = by_file.get(rel, by_file.get(f.name))
        if image_id is None:
            raise DataError(f"image {f} is not in the annotation file {annotations} (no image with file_name "
                            f"{rel!r})")
        ids.append(image_id)
    if not by_class:
        return ids, list(loaded.label_to_cat_id)
    missing = [name for name in loaded.class_names if name not in by_class]
    if missing:
        raise DataError(f"{annotations}: no category named {missing[0]!r} (the checkpoint's classes are "
                        f"{loaded.class_names})")
    return ids, [by_class[name] for name in loaded.class_names]


def predict_images(detector: Detector, images: str | Path, output: str | Path,
                   score_threshold: float = 0.3, annotations: str | Path | None = None) -> list[Path]:
    """Detect objects in each image; write ``<output>/<name>.png`` and ``<output>/detections.json``.

    The JSON holds COCO result dicts with scores above ``score_threshold`` and ``file_name`` naming the
    file; ``image_id`` is the file name, or with ``annotations`` (a COCO JSON listing the images) the
    dataset's image id, and ``category_id`` that file's id of the class's name.
    """
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, written = [], []
    files = list_images(images)
    image_ids, cat_ids = _dataset_ids(detector, files, Path(images), annotations)
    for file, image_id in zip(files, image_ids):
        pil = load_image(file)
        det = detector.predict(pil, score_threshold, batch_size=1)
        drawn = draw_detections(pil, det.boxes, det.names, det.scores)
        target = out_dir / f"{file.stem}.png"
        drawn.save(target)
        written.append(target)
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            x0, y0, x1, y1 = box
            cat = cat_ids[label] if label < len(cat_ids) else label
            results.append({"image_id": image_id, "file_name": file.name, "category_id": int(cat),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    (out_dir / "detections.json").write_text(json.dumps(results))
    return written
