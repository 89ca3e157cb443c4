"""``oddetr predict``: run a detector on image files and save drawn PNGs plus COCO results JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

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


def predict_images(detector: Detector, images: str | Path, output: str | Path,
                   score_threshold: float = 0.3) -> list[Path]:
    """Detect objects in each image; write ``<output>/<name>.png`` and ``<output>/detections.json``.

    The JSON holds COCO result dicts (``image_id`` is the image's index in sorted order, and
    ``file_name`` names the file), scores above ``score_threshold``.
    """
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    cat_ids = detector.label_to_cat_id
    results, written = [], []
    for index, file in enumerate(list_images(images)):
        pil = load_image(file)
        det = detector.predict(pil, score_threshold, batch_size=1)
        drawn = draw_detections(pil, det.boxes, det.names, det.scores)
        target = out_dir / f"{file.stem}.png"
        drawn.save(target)
        written.append(target)
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            x0, y0, x1, y1 = box
            cat = cat_ids[label] if label < len(cat_ids) else label
            results.append({"image_id": index, "file_name": file.name, "category_id": int(cat),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    (out_dir / "detections.json").write_text(json.dumps(results))
    return written
