"""``oddetr predict``: run a detector on image files and save drawn PNGs plus COCO results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision import tv_tensors

from oddetr.config import eval_image_size
from oddetr.data.coco import read_image_index
from oddetr.data.images import load_image
from oddetr.data.transforms import build_transforms
from oddetr.engine.inference import LoadedModel
from oddetr.engine.trainer import resolve_device
from oddetr.errors import DataError
from oddetr.models.postprocess import postprocess
from oddetr.visualize import draw_detections

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


def _dataset_ids(loaded: LoadedModel, files: list[Path], root: Path,
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


@torch.no_grad()
def predict_images(loaded: LoadedModel, images: str | Path, output: str | Path,
                   score_threshold: float = 0.3, annotations: str | Path | None = None) -> list[Path]:
    """Detect objects in each image; write ``<output>/<name>.png`` and ``<output>/detections.json``.

    The JSON holds COCO result dicts with scores above ``score_threshold`` and ``file_name`` naming the
    file; ``image_id`` is the file name, or with ``annotations`` (a COCO JSON listing the images) the
    dataset's image id, and ``category_id`` that file's id of the class's name.
    """
    cfg = loaded.config
    device = resolve_device(cfg.device)
    model = loaded.model.to(device).eval()
    size, max_size = eval_image_size(cfg)  # the checkpoint's data.image_size unless overridden
    transform = build_transforms(train=False, scales=[size], max_size=max_size)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, written = [], []
    files = list_images(images)
    image_ids, cat_ids = _dataset_ids(loaded, files, Path(images), annotations)
    for file, image_id in zip(files, image_ids):
        pil = load_image(file)
        empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(pil.height, pil.width))
        tensor, _, _ = transform(pil, empty, torch.zeros(0, dtype=torch.int64))
        batch = tensor[None].to(device)
        mask = torch.zeros(batch.shape[0], *batch.shape[-2:], dtype=torch.bool, device=device)
        out = model(batch, mask)
        size = torch.tensor([[pil.height, pil.width]], device=device)
        det = postprocess(out.pred_logits, out.pred_boxes, size, cfg.eval.max_detections)[0]
        keep = det["scores"] >= score_threshold
        boxes, scores, labels = det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()
        names = [loaded.class_names[int(c)] if int(c) < len(loaded.class_names) else str(int(c)) for c in labels]
        drawn = draw_detections(pil, boxes, names, scores)
        target = out_dir / f"{file.stem}.png"
        drawn.save(target)
        written.append(target)
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            x0, y0, x1, y1 = box
            cat = cat_ids[label] if label < len(cat_ids) else label
            results.append({"image_id": image_id, "file_name": file.name, "category_id": int(cat),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    (out_dir / "detections.json").write_text(json.dumps(results))
    return written
