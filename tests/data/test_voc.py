"""VocDetection: XML parsing, 1-based boxes, difficult objects, classes and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from oddetr.box_ops import cxcywh_to_xyxy
from oddetr.data import VOC_CLASSES, VocDetection
from oddetr.errors import DataError


def _xml(
    filename: str, width: int, height: int, objects: list[tuple[str, int, tuple[int, int, int, int]]]
) -> str:
    parts = [f"<annotation><filename>{filename}</filename>"]
    parts.append(f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>")
    for name, difficult, (x0, y0, x1, y1) in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


OBJECTS = {
    "img_a": (
        40,
        30,
        [("dog", 0, (1, 1, 40, 30)), ("cat", 1, (5, 6, 14, 20)), ("person", 0, (10, 10, 19, 12))],
    ),
    "img_b": (24, 36, [("cat", 0, (3, 4, 30, 20))]),  # xmax beyond the 24 px width: clipped
    "img_c": (32, 32, []),
}


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, (w, h, objects) in OBJECTS.items():
        (root / "Annotations" / f"{stem}.xml").write_text(_xml(f"{stem}.jpg", w, h, objects))
        Image.new("RGB", (w, h), (90, 120, 30)).save(root / "JPEGImages" / f"{stem}.jpg")
    (root / "ImageSets" / "Main" / "train.txt").write_text("img_a\nimg_b\n\nimg_c\n")
    return root


def test_parse_one_based_boxes_and_difficult(voc_root):
    with pytest.warns(UserWarning, match="dropped 0 boxes .* clipped 1 boxes"):
        ds = VocDetection(voc_root, "train")
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3] and ds.voc_ids == ["img_a", "img_b", "img_c"]
    assert ds.file_names == {1: "img_a.jpg", 2: "img_b.jpg", 3: "img_c.jpg"}
    assert ds.num_classes == 20 and ds.class_names == list(VOC_CLASSES)
    assert ds.categories[0] == {"id": 1, "name": "aeroplane"} and ds.categories[-1] == {
        "id": 20,
        "name": "tvmonitor",
    }
    dog, cat, person = (VOC_CLASSES.index(n) + 1 for n in ("dog", "cat", "person"))
    gt = ds.coco_gt()
    assert gt["images"][1] == {"id": 2, "width": 24, "height": 36, "file_name": "img_b.jpg"}
    assert [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in gt["annotations"]] == [
        (1, dog, [0.0, 0.0, 40.0, 30.0], 0),  # xmin=1..xmax=W is the whole image
        (1, cat, [4.0, 5.0, 10.0, 15.0], 1),  # difficult -> crowd (ignored by COCO eval)
        (1, person, [9.0, 9.0, 10.0, 3.0], 0),
        (2, cat, [2.0, 3.0, 22.0, 17.0], 0),  # clipped to the 24 px width
    ]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4]

    image, target = ds[0]
    assert image.shape == (3, 30, 40) and target["image_id"] == 1 and target["orig_size"].tolist() == [30, 40]
    assert target["labels"].tolist() == [dog - 1, person - 1]  # the difficult cat is not a training target
    xyxy = cxcywh_to_xyxy(target["boxes"]) * torch.tensor([40, 30, 40, 30])
    torch.testing.assert_close(xyxy, torch.tensor([[0.0, 0.0, 40.0, 30.0], [9.0, 9.0, 19.0, 12.0]]))
    assert ds[2][1]["boxes"].shape == (0, 4)


@pytest.mark.filterwarnings("ignore:.*clipped 1 boxes")
def test_custom_classes(voc_root):
    (voc_root / "ImageSets" / "Main" / "small.txt").write_text("img_b\n")
    ds = VocDetection(voc_root, "small", classes=["cat"])
    assert ds.categories == [{"id": 1, "name": "cat"}] and ds.label_to_cat_id == [1]
    assert ds[0][1]["labels"].tolist() == [0]


def _break(root: Path, case: str) -> list[str]:
    """Damage the dataset for ``case``; return the strings the error must contain."""
    ann = root / "Annotations"
    if case == "no root":
        return [str(root / "missing")]
    if case == "no split":
        return ["split file not found", str(root / "ImageSets" / "Main" / "nosplit.txt")]
    if case == "no xml":
        (ann / "img_b.xml").unlink()
        return [str(ann / "img_b.xml")]
    if case == "bad xml":
        (ann / "img_b.xml").write_text("<annotation><object></annotation>")
        return ["malformed XML", str(ann / "img_b.xml"), "line 1"]
    if case == "unknown class":
        (ann / "img_b.xml").write_text(_xml("img_b.jpg", 24, 36, [("unicorn", 0, (1, 1, 5, 5))]))
        return [str(ann / "img_b.xml"), "'unicorn'"]
    if case == "bad bndbox":
        (ann / "img_b.xml").write_text(
            _xml("img_b.jpg", 24, 36, [("cat", 0, (1, 1, 5, 5))]).replace("<xmin>1", "<xmin>x")
        )
        return [str(ann / "img_b.xml"), "bndbox"]
    if case == "no image":
        (root / "JPEGImages" / "img_c.jpg").unlink()
        return ["img_c.jpg", "image id 3"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["no root", "no split", "no xml", "bad xml", "unknown class", "bad bndbox", "no image"]
)
def test_errors_are_one_line_and_name_the_file(voc_root, case):
    needles = _break(voc_root, case)
    root = voc_root / "missing" if case == "no root" else voc_root
    classes = list(VOC_CLASSES) if case == "unknown class" else None  # without a list the class would be learnt
    with pytest.raises(DataError) as info:
        VocDetection(root, "nosplit" if case == "no split" else "train", classes=classes)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_size_read_from_image_when_xml_has_none(voc_root):
    xml = voc_root / "Annotations" / "img_c.xml"
    xml.write_text(
        xml.read_text().replace("<size><width>32</width><height>32</height><depth>3</depth></size>", "")
    )
    (voc_root / "ImageSets" / "Main" / "c.txt").write_text("img_c\n")
    assert VocDetection(voc_root, "c").coco_gt()["images"][0] == {
        "id": 1,
        "width": 32,
        "height": 32,
        "file_name": "img_c.jpg",
    }


def _custom(root: Path, stem: str, names: list[str]) -> None:
    (root / "Annotations" / f"{stem}.xml").write_text(
        _xml(f"{stem}.jpg", 32, 32, [(n, 0, (2 + 3 * k, 2, 12 + 3 * k, 12)) for k, n in enumerate(names)]))
    Image.new("RGB", (32, 32), (90, 120, 30)).save(root / "JPEGImages" / f"{stem}.jpg")


@pytest.mark.filterwarnings("ignore:.*clipped 1 boxes")
def test_classes_are_read_from_the_split_when_not_all_voc_names(voc_root):
    from oddetr.data.voc import voc_class_names

    _custom(voc_root, "own_1", ["Tree", "Car"])
    _custom(voc_root, "own_2", ["car", "Tree", "Tree"])
    (voc_root / "ImageSets" / "Main" / "own.txt").write_text("own_1\nown_2\n")
    ds = VocDetection(voc_root, "own")
    assert ds.class_names == ["Car", "Tree", "car"] == voc_class_names(voc_root, "own")  # sorted, code points
    assert ds.label_to_cat_id == [1, 2, 3]
    assert [a["category_id"] for a in ds.coco_gt()["annotations"]] == [2, 1, 3, 2, 2]
    assert voc_class_names(voc_root, "train") == list(VOC_CLASSES)  # only VOC names: the VOC label space
    # a list given names the label space in its order; an object outside it names its XML file
    assert VocDetection(voc_root, "own", classes=["Tree", "Car", "car", "Bus"]).class_names[0] == "Tree"
    with pytest.raises(DataError, match=r"own_2\.xml: object #0 has class 'car'"):
        VocDetection(voc_root, "own", classes=["Tree", "Car"])
