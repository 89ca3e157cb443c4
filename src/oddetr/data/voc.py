"""Pascal VOC detection dataset, converted at construction to the COCO-format records of ``DetectionDataset``.

Layout: ``root/Annotations/<id>.xml``, ``root/JPEGImages/<id>.jpg``, ``root/ImageSets/Main/<split>.txt``.
Image ids are the 1-based line index in the split file; category ids are ``1..len(classes)``.

Coordinates: VOC boxes are 1-based inclusive pixel indices, so pixel ``(1, 1)`` is the top-left one. They
become absolute xyxy pixel-edge coordinates (COCO's convention) as ``(xmin - 1, ymin - 1, xmax, ymax)``: a
box covering the whole ``W x H`` image, ``xmin=1 .. xmax=W``, becomes ``[0, 0, W, H]``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from oddetr.data.coco import BoxCleaner, DetectionDataset, TransformFn
from oddetr.data.images import read_image_size
from oddetr.errors import DataError

__all__ = ["VOC_CLASSES", "VocDetection", "infer_class_names", "voc_class_names"]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class VocDetection(DetectionDataset):
    """Pascal VOC dataset for one split (``train``, ``val``, ``trainval``, ``test``...).

    ``classes`` names the categories (category id = position + 1); an object of another class is a
    ``DataError`` naming its XML file. Without it the split's own objects decide (:func:`infer_class_names`):
    the 20 VOC names when every object is one of them, else the distinct names found, sorted. Objects
    with ``difficult=1`` become ``iscrowd=1`` in ``coco_gt()`` (ignored by COCO evaluation) and are left
    out of the training targets.
    Boxes are dropped / clipped as in ``CocoDetection``, with one warning. ``voc_ids`` lists the file stems in
    dataset order; ``file_names`` maps image id -> file name under ``JPEGImages``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transforms: TransformFn | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.voc_ids = _read_split(self.root, split)
        parsed = []
        for voc_id in self.voc_ids:
            xml_path = self.root / "Annotations" / f"{voc_id}.xml"
            parsed.append((voc_id, xml_path, *_parse_xml(xml_path)))
        names = list(classes) if classes is not None else infer_class_names(
            obj["name"] for *_, objects in parsed for obj in objects
        )
        if not names or len(set(names)) != len(names):
            raise DataError(f"VOC classes must be a non-empty list of distinct names, got {names!r}")
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(names)]
        name_to_id = {name: k + 1 for k, name in enumerate(names)}
        cleaner = BoxCleaner()
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for image_id, (voc_id, xml_path, info, objects) in enumerate(parsed, start=1):
            file_name = _find_image(self.root / "JPEGImages", voc_id, info["filename"], xml_path, image_id)
            width, height = info["width"], info["height"]
            if width is None or height is None:
                width, height = read_image_size(self.root / "JPEGImages" / file_name, image_id)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            for k, obj in enumerate(objects):
                if obj["name"] not in name_to_id:
                    raise DataError(
                        f"{xml_path}: object #{k} has class {obj['name']!r}, which is not one of the "
                        f"{len(names)} classes {_short(names)} (list every class in data.classes)"
                    )
                x0, y0, x1, y1 = obj["box"]
                box = cleaner.clean(x0 - 1, y0 - 1, x1, y1, width, height)
                if box is None:
                    continue
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": name_to_id[obj["name"]],
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": int(obj["difficult"]),
                    }
                )
        cleaner.warn(f"{self.root / 'Annotations'} (split {split})")
        super().__init__(
            self.root / "JPEGImages",
            images,
            annotations,
            categories,
            transforms,
            cleaner.dropped,
            cleaner.clipped,
        )


def infer_class_names(names: Iterable[str]) -> list[str]:
    """The class list of a split's object names: the 20 VOC names when every object is one of them (or
    there are none), else the distinct names sorted (code-point order, so the same on every machine)."""
    found = set(names)
    return list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)


def voc_class_names(root: str | Path, split: str) -> list[str]:
    """:func:`infer_class_names` of the objects in ``root``'s split ``split`` (reads its XML files)."""
    root = Path(root)
    return infer_class_names(
        obj["name"]
        for voc_id in _read_split(root, split)
        for obj in _parse_xml(root / "Annotations" / f"{voc_id}.xml")[1]
    )


def _short(names: list[str], n: int = 10) -> str:
    return repr(names) if len(names) <= n else repr(names[:n])[:-1] + f", ... ({len(names)} in all)]"


def _read_split(root: Path, split: str) -> list[str]:
    if not root.is_dir():
        raise DataError(f"VOC root directory not found: {root}")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(f"VOC split file not found: {split_file}")
    ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DataError(f"VOC split file is empty: {split_file}")
    return ids


def _text(node: ET.Element, tag: str) -> str | None:
    child = node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _parse_xml(xml_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """-> (``{"filename", "width", "height"}`` (size None when absent), objects: ``name``, 1-based ``box``,
    ``difficult``)."""
    if not xml_path.is_file():
        raise DataError(f"VOC annotation file not found: {xml_path}")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise DataError(f"malformed XML in {xml_path}: {err}") from err
    width = height = None
    size = root.find("size")
    if size is not None:
        try:
            width, height = int(float(_text(size, "width") or "")), int(float(_text(size, "height") or ""))
        except ValueError as err:
            raise DataError(f"{xml_path}: <size> needs numeric <width> and <height>") from err
        if width <= 0 or height <= 0:
            width = height = None  # some tools write 0: fall back to the image header
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = _text(obj, "name")
        if not name:
            raise DataError(f"{xml_path}: object #{k} has no <name>")
        bndbox = obj.find("bndbox")
        coords = [None if bndbox is None else _text(bndbox, tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
        try:
            box = [float(c) for c in coords]  # type: ignore[arg-type]  # None -> TypeError
        except (TypeError, ValueError) as err:
            raise DataError(
                f"{xml_path}: object #{k} ({name}) needs a <bndbox> with numeric xmin/ymin/xmax/ymax"
            ) from err
        difficult = _text(obj, "difficult")
        objects.append(
            {"name": name, "box": box, "difficult": difficult in ("1", "1.0", "true")}
        )
    return {"filename": _text(root, "filename"), "width": width, "height": height}, objects


def _find_image(
    images_dir: Path, voc_id: str, xml_filename: str | None, xml_path: Path, image_id: int
) -> str:
    """File name under ``JPEGImages``: ``<id>.jpg``, else the XML's ``<filename>``."""
    for candidate in (f"{voc_id}.jpg", xml_filename):
        if candidate and (images_dir / candidate).is_file():
            return candidate
    raise DataError(
        f"image file not found: {images_dir / f'{voc_id}.jpg'} (image id {image_id}, for {xml_path})"
    )
