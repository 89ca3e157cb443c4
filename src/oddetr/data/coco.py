"""COCO-format detection datasets.

``DetectionDataset`` is the common base: it holds cleaned COCO-format records (images, annotations,
categories) and turns them into training items; ``CocoDetection`` reads a COCO JSON file and VOC
(``voc.py``) converts its XML files to the same records. All validation happens at construction, before
any training work, and fails with one ``DataError`` line naming the file and the image / annotation id.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from oddetr.box_ops import xyxy_to_cxcywh
from oddetr.data.images import load_image
from oddetr.data.transforms import default_transforms
from oddetr.errors import DataError

__all__ = ["BoxCleaner", "CocoDetection", "DetectionDataset", "TransformFn", "read_image_index"]

TransformFn = Callable[[Any, tv_tensors.BoundingBoxes, torch.Tensor], tuple[torch.Tensor, Any, torch.Tensor]]
"""``(PIL image, BoundingBoxes (N, 4) XYXY absolute, labels (N,)) -> (image (3, H, W), boxes, labels)``."""


class BoxCleaner:
    """Drops and clips boxes against their image, counting both for one warning per dataset.

    A box with width or height <= 0 is dropped; a box partly outside the image is clipped to it; a box
    entirely outside (nothing left after clipping) is dropped.
    """

    def __init__(self) -> None:
        self.dropped = 0
        self.clipped = 0

    def clean(
        self, x0: float, y0: float, x1: float, y1: float, width: float, height: float
    ) -> list[float] | None:
        """Absolute xyxy box and image size -> clipped xyxy box, or None when the box is dropped."""
        if not (x1 > x0 and y1 > y0):
            self.dropped += 1
            return None
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
        if not (cx1 > cx0 and cy1 > cy0):
            self.dropped += 1
            return None
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            self.clipped += 1
        return [cx0, cy0, cx1, cy1]

    def warn(self, source: str) -> None:
        """Emit one warning with both counts (nothing when no box was changed)."""
        if self.dropped or self.clipped:
            warnings.warn(
                f"{source}: dropped {self.dropped} boxes with width/height <= 0 or outside the image, "
                f"clipped {self.clipped} boxes to the image",
                stacklevel=3,
            )


class DetectionDataset(Dataset):
    """Base dataset over cleaned COCO-format records.

    Items are ``(image, target)``: ``image`` float32 (3, H, W) normalised with the ImageNet mean/std;
    ``target`` has ``boxes`` (N, 4) float32 normalised cxcywh in [0, 1] of the transformed image, ``labels``
    (N,) int64 in ``[0, num_classes)``, ``image_id`` int, ``orig_size`` and ``size`` int64 ``[h, w]`` before
    and after the transforms. Crowd annotations stay in ``coco_gt()`` but not in the targets.

    Attributes: ``categories`` (``{"id", "name"}`` in label order), ``num_classes``, ``label_to_cat_id``,
    ``class_names``, ``image_ids`` (dataset order), ``file_names`` (image id -> file name under
    ``images_dir``), ``dropped_boxes`` / ``clipped_boxes`` (counts from cleaning).
    """

    def __init__(
        self,
        images_dir: str | Path,
        images: Sequence[dict[str, Any]],
        annotations: Sequence[dict[str, Any]],
        categories: Sequence[dict[str, Any]],
        transforms: TransformFn | None = None,
        dropped_boxes: int = 0,
        clipped_boxes: int = 0,
        keep_order: bool = False,
    ) -> None:
        """images: ``{"id", "file_name", "width", "height"}``; annotations: cleaned, COCO ``bbox`` xywh
        absolute inside the image, with ``id``, ``image_id``, ``category_id``, ``area``, ``iscrowd``.
        Label ``k`` is the ``k``-th category by id, or in the given order with ``keep_order``."""
        self.images_dir = Path(images_dir)
        self.transforms: TransformFn = transforms if transforms is not None else default_transforms()
        ordered = categories if keep_order else sorted(categories, key=lambda c: c["id"])
        self.categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in ordered]
        self.num_classes = len(self.categories)
        self.label_to_cat_id = [c["id"] for c in self.categories]
        self.class_names = [c["name"] for c in self.categories]
        self.cat_id_to_label = {cid: label for label, cid in enumerate(self.label_to_cat_id)}
        self.image_ids = [int(img["id"]) for img in images]
        self.file_names = {int(img["id"]): str(img["file_name"]) for img in images}
        self.dropped_boxes = dropped_boxes
        self.clipped_boxes = clipped_boxes
        self._images = [
            {
                "id": int(i["id"]),
                "width": int(i["width"]),
                "height": int(i["height"]),
                "file_name": str(i["file_name"]),
            }
            for i in images
        ]
        self._annotations = list(annotations)
        index = {image_id: k for k, image_id in enumerate(self.image_ids)}
        per_image: list[list[dict[str, Any]]] = [[] for _ in self.image_ids]
        for ann in self._annotations:
            if not ann["iscrowd"]:
                per_image[index[ann["image_id"]]].append(ann)
        self._boxes = [_xywh_to_xyxy_array(anns) for anns in per_image]
        self._labels = [
            np.array([self.cat_id_to_label[a["category_id"]] for a in anns], np.int64) for anns in per_image
        ]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """-> image (3, H, W) float32 normalised, target dict (see the class docstring)."""
        info = self._images[index]
        image_id = info["id"]
        path = self.images_dir / info["file_name"]
        image = load_image(path, image_id)
        width, height = image.size
        boxes = torch.from_numpy(self._boxes[index].copy())
        labels = torch.from_numpy(self._labels[index].copy())
        if (width, height) != (info["width"], info["height"]):
            # The annotation file's size was wrong: trust the pixels and re-clip (boxes are absolute pixels).
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[keep], labels[keep]
        bboxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
        image_t, bboxes, labels = self.transforms(image, bboxes, labels)
        out_h, out_w = image_t.shape[-2:]
        scale = torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32)
        norm = (xyxy_to_cxcywh(bboxes.as_subclass(torch.Tensor).float()) / scale).clamp(0, 1)
        target = {
            "boxes": norm.reshape(-1, 4),
            "labels": labels.as_subclass(torch.Tensor).long(),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([out_h, out_w], dtype=torch.int64),
        }
        return image_t.as_subclass(torch.Tensor), target

    def coco_gt(self) -> dict[str, Any]:
        """COCO-format ground truth of the cleaned annotations (original image pixels), for COCO evaluation.

        Returns fresh dicts on each call (evaluators write into them).
        """
        return {
            "info": {"description": "oddetr ground truth"},
            "licenses": [],
            "images": [dict(img) for img in self._images],
            "annotations": [dict(ann, bbox=list(ann["bbox"])) for ann in self._annotations],
            "categories": [dict(cat) for cat in self.categories],
        }


def _xywh_to_xyxy_array(anns: list[dict[str, Any]]) -> np.ndarray:
    """COCO annotations -> (N, 4) float32 absolute xyxy."""
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


class CocoDetection(DetectionDataset):
    """COCO-format detection dataset: ``images_dir`` holds the files named by ``file_name``.

    Construction validates the annotation file and that every listed image exists; boxes with width or
    height <= 0 or entirely outside the image are dropped and boxes partly outside are clipped (against the
    JSON width/height), with one warning counting both. If an image's real size differs from the JSON, the
    real size is used at load time (boxes are re-clipped to it). See ``DetectionDataset`` for items.

    ``classes`` (names) fixes the label space by name: label ``k`` is the category named ``classes[k]``
    (category ids stay the file's). The file's categories must be exactly these names: a category not in
    the list, or a listed name with no category, is a ``DataError`` naming the file.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations_file: str | Path,
        transforms: TransformFn | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.annotations_file = Path(annotations_file)
        src = str(annotations_file)
        data = _read_json(self.annotations_file)
        categories = _parse_categories(src, data["categories"])
        if classes is not None:
            categories = _order_categories(src, categories, list(classes))
        images = _parse_images(src, data["images"])
        cleaner = BoxCleaner()
        annotations = _parse_annotations(
            src, data["annotations"], images, {c["id"] for c in categories}, cleaner
        )
        _check_image_files(src, Path(images_dir), images.values())
        cleaner.warn(src)
        super().__init__(
            images_dir,
            list(images.values()),
            annotations,
            categories,
            transforms,
            cleaner.dropped,
            cleaner.clipped,
            keep_order=classes is not None,
        )


def _order_categories(src: str, categories: list[dict[str, Any]], classes: list[str]) -> list[dict[str, Any]]:
    """The file's categories in the order of ``classes`` (names), checking both name the same set."""
    if [c["name"] for c in categories] == classes:
        return categories  # already in that order (also where names repeat, as in some exported files)
    by_name: dict[str, dict[str, Any]] = {}
    for cat in categories:
        if cat["name"] in by_name:
            raise DataError(f"{src}: categories {by_name[cat['name']]['id']} and {cat['id']} share the name "
                            f"{cat['name']!r}; class names (data.classes) need distinct names")
        by_name[cat["name"]] = cat
    extra = [c["name"] for c in categories if c["name"] not in classes]
    if extra:
        raise DataError(f"{src}: category {extra[0]!r} (id {by_name[extra[0]]['id']}) is not in the classes "
                        f"{classes} (data.classes or the checkpoint's)")
    missing = [name for name in classes if name not in by_name]
    if missing:
        raise DataError(f"{src}: no category named {missing[0]!r}; its categories are "
                        f"{[c['name'] for c in categories]} (data.classes must name exactly these)")
    return [by_name[name] for name in classes]


def read_image_index(annotations_file: str | Path) -> tuple[dict[str, int], dict[str, int]]:
    """(file name -> image id, category name -> category id) of a COCO annotation file, validated as
    ``CocoDetection`` validates it. Images are found by their ``file_name`` and, where unambiguous, by its
    last path component; a file with an empty ``categories`` list gives an empty name map."""
    path = Path(annotations_file)
    data = _read_json(path)
    images = _parse_images(str(path), data["images"])
    categories = _parse_categories(str(path), data["categories"]) if data["categories"] else []
    by_name: dict[str, int] = {}
    base_count: dict[str, int] = {}
    for img in images.values():
        base = Path(img["file_name"]).name
        base_count[base] = base_count.get(base, 0) + 1
    for img in images.values():
        by_name[img["file_name"]] = img["id"]
        base = Path(img["file_name"]).name
        if base_count[base] == 1:
            by_name.setdefault(base, img["id"])
    return by_name, {c["name"]: c["id"] for c in categories}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(
            f"malformed JSON in {path}: {err.msg} at line {err.lineno} column {err.colno} (char {err.pos})"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read annotation file {path}: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise DataError(f"{path}: missing top-level key(s) {', '.join(repr(k) for k in missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DataError(f"{path}: top-level key '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_categories(src: str, raw: list[Any]) -> list[dict[str, Any]]:
    categories: dict[int, dict[str, Any]] = {}
    for k, cat in enumerate(raw):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(f"{src}: category #{k} needs an integer 'id' and a string 'name', got {cat!r}")
        if cat["id"] in categories:
            raise DataError(f"{src}: duplicate category id {cat['id']} ({cat['name']!r})")
        categories[cat["id"]] = {"id": cat["id"], "name": cat["name"]}
    if not categories:
        raise DataError(f"{src}: 'categories' is empty")
    return [categories[i] for i in sorted(categories)]


def _parse_images(src: str, raw: list[Any]) -> dict[int, dict[str, Any]]:
    images: dict[int, dict[str, Any]] = {}
    for k, img in enumerate(raw):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise DataError(f"{src}: image #{k} has no integer 'id': {img!r}")
        image_id = img["id"]
        if image_id in images:
            raise DataError(f"{src}: duplicate image id {image_id}")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DataError(f"{src}: image id {image_id} has no 'file_name'")
        width, height = img.get("width"), img.get("height")
        if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
            raise DataError(
                f"{src}: image id {image_id} needs positive 'width' and 'height', got {width!r}, {height!r}"
            )
        images[image_id] = {
            "id": image_id,
            "file_name": img["file_name"],
            "width": int(width),
            "height": int(height),
        }
    return images


def _parse_annotations(
    src: str, raw: list[Any], images: dict[int, dict[str, Any]], cat_ids: set[int], cleaner: BoxCleaner
) -> list[dict[str, Any]]:
    """Validate annotations and return the cleaned ones (COCO bbox xywh, area, iscrowd)."""
    cleaned: list[dict[str, Any]] = []
    seen_ids: set[int] = set()
    renumber = False
    for k, ann in enumerate(raw):
        if not isinstance(ann, dict):
            raise DataError(f"{src}: annotation #{k} is not an object: {ann!r}")
        ann_id = ann.get("id")
        name = f"annotation {ann_id}" if _is_int(ann_id) else f"annotation #{k} (no integer id)"
        if not _is_int(ann_id) or ann_id < 1 or ann_id in seen_ids:
            renumber = True
        else:
            seen_ids.add(ann_id)
        image_id, cat_id = ann.get("image_id"), ann.get("category_id")
        if not _is_int(image_id) or image_id not in images:
            raise DataError(f"{src}: {name} refers to image id {image_id!r}, which is not in 'images'")
        if not _is_int(cat_id) or cat_id not in cat_ids:
            known = ", ".join(str(c) for c in sorted(cat_ids)[:20]) + (", ..." if len(cat_ids) > 20 else "")
            raise DataError(
                f"{src}: {name} (image id {image_id}) has category_id {cat_id!r}, which is not in 'categories' ({known})"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DataError(
                f"{src}: {name} (image id {image_id}) has a malformed bbox {bbox!r}: expected 4 numbers [x, y, w, h]"
            )
        x, y, w, h = (float(v) for v in bbox)
        img = images[image_id]
        box = cleaner.clean(x, y, x + w, y + h, img["width"], img["height"])
        if box is None:
            continue
        area = ann.get("area")
        if box == [x, y, x + w, y + h]:
            xywh = [x, y, w, h]  # unchanged: keep the file's numbers exactly
        else:
            xywh = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            area = None
        if not _is_number(area) or area <= 0:
            area = xywh[2] * xywh[3]
        cleaned.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat_id,
                "bbox": xywh,
                "area": float(area),
                "iscrowd": 1 if ann.get("iscrowd") else 0,
            }
        )
    if renumber:
        warnings.warn(
            f"{src}: annotation ids are missing, duplicated or < 1; coco_gt() numbers them 1..N", stacklevel=3
        )
        for new_id, ann in enumerate(cleaned, start=1):
            ann["id"] = new_id
    return cleaned


def _check_image_files(src: str, images_dir: Path, images: Any) -> None:
    if not images_dir.is_dir():
        raise DataError(f"images directory not found: {images_dir} (for {src})")
    missing = [img for img in images if not (images_dir / img["file_name"]).is_file()]
    if missing:
        first = missing[0]
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(
            f"{src}: image file {images_dir / first['file_name']} (image id {first['id']}) does not exist{more}"
        )
