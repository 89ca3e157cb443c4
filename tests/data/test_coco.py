"""CocoDetection: items, coco_gt, cleaning and one-line errors (oracle: the JSON written by the test)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from oddetr.box_ops import cxcywh_to_xyxy
from oddetr.data import CocoDetection, build_transforms, load_image
from oddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oddetr.errors import DataError

from .conftest import basic_coco


def _absolute_xywh(target: dict) -> torch.Tensor:
    h, w = target["size"].tolist()
    xyxy = cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])
    return torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)


def test_items_round_trip_to_json_boxes(make_coco):
    images_dir, ann_file = make_coco()
    ds = CocoDetection(images_dir, ann_file)
    assert len(ds) == 3 and ds.image_ids == [10, 4, 5]
    assert ds.categories == [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    assert ds.num_classes == 2 and ds.label_to_cat_id == [3, 7] and ds.class_names == ["cat", "dog"]
    assert ds.file_names == {10: "a.png", 4: "b.png", 5: "c.png"}

    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 40)
    pixels = np.array(Image.open(images_dir / "a.png"))
    expected = (
        torch.from_numpy(pixels).permute(2, 0, 1) / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]
    ) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(image, expected)
    assert target["image_id"] == 10
    assert target["orig_size"].tolist() == [32, 40] and target["size"].tolist() == [32, 40]
    assert target["orig_size"].dtype == torch.int64 and target["labels"].dtype == torch.int64
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (2, 4)
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    assert target["labels"].tolist() == [1, 0]  # category 7 -> label 1, category 3 -> label 0
    json_boxes = torch.tensor([a["bbox"] for a in basic_coco()["annotations"][:2]])
    torch.testing.assert_close(_absolute_xywh(target), json_boxes)

    _, target = ds[1]  # the crowd annotation is not a training target
    assert target["labels"].tolist() == [0]
    torch.testing.assert_close(_absolute_xywh(target), torch.tensor([[0.0, 0.0, 24.0, 48.0]]))

    _, target = ds[2]  # an image without annotations is kept, with empty targets
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_coco_gt_is_the_cleaned_json(make_coco):
    data = basic_coco()
    data["annotations"].append(
        {"id": 9, "image_id": 5, "category_id": 3, "bbox": [30, 30, 4, 4], "iscrowd": 0}
    )
    data["annotations"].append(
        {"id": 11, "image_id": 5, "category_id": 3, "bbox": [3, 3, 0, 4], "iscrowd": 0}
    )
    images_dir, ann_file = make_coco(data)
    with pytest.warns(UserWarning, match="dropped 1 boxes .* clipped 1 boxes"):
        ds = CocoDetection(images_dir, ann_file)
    gt = ds.coco_gt()
    assert gt["categories"] == [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    assert gt["images"] == [
        {k: img[k] for k in ("id", "width", "height", "file_name")} for img in data["images"]
    ]
    expected = copy.deepcopy(data["annotations"][:4])
    expected.append(
        {"id": 9, "image_id": 5, "category_id": 3, "bbox": [30.0, 30.0, 2.0, 2.0], "area": 4.0, "iscrowd": 0}
    )
    assert gt["annotations"] == expected
    gt["annotations"][0]["bbox"][0] = -1  # callers (evaluators) may write into it: no effect on the dataset
    assert ds.coco_gt()["annotations"][0]["bbox"][0] == 2.0


def test_drop_and_clip_counted_in_one_warning(make_coco, recwarn):
    data = basic_coco()
    boxes = [
        [5, 5, 0, 3],  # zero width: dropped
        [5, 5, 3, -1],  # negative height: dropped
        [40, 0, 5, 5],  # entirely right of the 40 px wide image: dropped
        [-10, -10, 5, 5],  # entirely above-left: dropped
        [-2, 0, 6, 6],  # partly outside: clipped to [0, 0, 4, 6]
        [35, 28, 10, 10],  # partly outside: clipped to [35, 28, 5, 4]
    ]
    for k, box in enumerate(boxes):
        data["annotations"].append(
            {"id": 100 + k, "image_id": 10, "category_id": 3, "bbox": box, "iscrowd": 0}
        )
    images_dir, ann_file = make_coco(data)
    ds = CocoDetection(images_dir, ann_file)
    messages = [str(w.message) for w in recwarn.list]
    assert messages == [
        f"{ann_file}: dropped 4 boxes with width/height <= 0 or outside the image, clipped 2 boxes to the image"
    ]
    assert (ds.dropped_boxes, ds.clipped_boxes) == (4, 2)
    kept = {a["id"]: a["bbox"] for a in ds.coco_gt()["annotations"] if a["id"] >= 100}
    assert kept == {104: [0.0, 0.0, 4.0, 6.0], 105: [35.0, 28.0, 5.0, 4.0]}
    _, target = ds[0]
    torch.testing.assert_close(
        _absolute_xywh(target)[2:], torch.tensor([[0.0, 0.0, 4.0, 6.0], [35.0, 28.0, 5.0, 4.0]])
    )


def _bad(data_change):
    data = basic_coco()
    data_change(data)
    return data


BAD_INPUTS = {
    "missing key": (lambda d: d.pop("categories"), ["missing top-level key", "'categories'"]),
    "unknown category": (
        lambda d: d["annotations"][1].update(category_id=99),
        ["annotation 2", "image id 10", "category_id 99"],
    ),
    "unknown image": (lambda d: d["annotations"][2].update(image_id=77), ["annotation 3", "image id 77"]),
    "bbox with 3 numbers": (
        lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
        ["annotation 1", "malformed bbox"],
    ),
    "bbox with a string": (
        lambda d: d["annotations"][3].update(bbox=[1, 2, "3", 4]),
        ["annotation 4", "malformed bbox"],
    ),
    "bbox missing": (lambda d: d["annotations"][3].pop("bbox"), ["annotation 4", "malformed bbox"]),
    "image without size": (lambda d: d["images"][1].pop("height"), ["image id 4", "height"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_annotations_raise_one_line(make_coco, case):
    change, needles = BAD_INPUTS[case]
    data = basic_coco()
    images_dir, ann_file = make_coco(data)
    change(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        CocoDetection(images_dir, ann_file)
    message = str(info.value)
    assert "\n" not in message and str(ann_file) in message
    for needle in needles:
        assert needle in message


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="annotation file not found: .*nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_malformed_json_names_position(make_coco):
    images_dir, ann_file = make_coco(text='{"images": [], "annotations": [,]}')
    with pytest.raises(DataError) as info:
        CocoDetection(images_dir, ann_file)
    message = str(info.value)
    assert "\n" not in message and str(ann_file) in message and "line 1 column 32" in message


def test_missing_image_file_names_file_and_id(make_coco):
    images_dir, ann_file = make_coco()
    (images_dir / "b.png").unlink()
    with pytest.raises(DataError) as info:
        CocoDetection(images_dir, ann_file)
    message = str(info.value)
    assert "\n" not in message and "b.png" in message and "image id 4" in message


@pytest.mark.parametrize("damage", ["random bytes", "truncated png"])
def test_corrupt_image_fails_on_load_naming_file(make_coco, damage):
    images_dir, ann_file = make_coco()
    path = images_dir / "b.png"
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ds = CocoDetection(images_dir, ann_file)  # existence is checked up front, decoding only on load
    ds[0]
    with pytest.raises(DataError) as info:
        ds[1]
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"corrupt or unreadable image {path} (image id 4): ")


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (7, 5), 200).save(tmp_path / "grey.png")
    img = load_image(tmp_path / "grey.png")
    assert img.mode == "RGB" and img.size == (7, 5)


def test_real_image_size_wins_over_json(make_coco, png):
    data = basic_coco()
    images_dir, ann_file = make_coco(data)
    png(images_dir / "a.png", 20, 16)  # the JSON says 40 x 32
    ds = CocoDetection(images_dir, ann_file)
    image, target = ds[0]
    assert image.shape == (3, 16, 20) and target["orig_size"].tolist() == [16, 20]
    # box 1 [2, 3, 10, 8] fits; box 2 starts at x=20.5, outside the real 20 px width: dropped
    torch.testing.assert_close(_absolute_xywh(target), torch.tensor([[2.0, 3.0, 10.0, 8.0]]))
    assert target["labels"].tolist() == [1]


def test_eval_transform_resizes_and_keeps_normalised_boxes(make_coco):
    images_dir, ann_file = make_coco()
    ds = CocoDetection(
        images_dir, ann_file, transforms=build_transforms(False, scales=[48, 64], max_size=100)
    )
    image, target = ds[0]  # 40 x 32 -> shorter side 64 -> 80 x 64
    assert image.shape == (3, 64, 80) and target["size"].tolist() == [64, 80]
    assert target["orig_size"].tolist() == [32, 40]
    json_boxes = torch.tensor([a["bbox"] for a in basic_coco()["annotations"][:2]])
    torch.testing.assert_close(_absolute_xywh(target) / 2, json_boxes)


def test_duplicate_annotation_ids_are_renumbered(make_coco):
    data = basic_coco()
    data["annotations"][1]["id"] = 1
    images_dir, ann_file = make_coco(data)
    with pytest.warns(UserWarning, match="annotation ids are missing, duplicated or < 1"):
        ds = CocoDetection(images_dir, ann_file)
    assert [a["id"] for a in ds.coco_gt()["annotations"]] == [1, 2, 3, 4]


def test_classes_order_the_label_space_by_name(make_coco):
    """``classes``: label k is the category named classes[k]; the file's ids are kept; both sets must agree."""
    images_dir, ann = make_coco()  # categories dog (id 7), cat (id 3)
    ds = CocoDetection(images_dir, ann, classes=["dog", "cat"])
    assert ds.class_names == ["dog", "cat"] and ds.label_to_cat_id == [7, 3]
    first = ds[ds.image_ids.index(10)][1]
    assert first["labels"].tolist() == [0, 1]  # the dog box (category 7), then the cat box (category 3)
    assert CocoDetection(images_dir, ann).class_names == ["cat", "dog"]  # without: by id
    with pytest.raises(DataError, match=r"annotations\.json: category 'dog' \(id 7\) is not in the classes"):
        CocoDetection(images_dir, ann, classes=["cat"])
    with pytest.raises(DataError, match=r"annotations\.json: no category named 'bird'"):
        CocoDetection(images_dir, ann, classes=["cat", "dog", "bird"])
