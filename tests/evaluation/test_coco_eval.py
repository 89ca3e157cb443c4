"""evaluate_coco / CocoEvaluator against pycocotools' COCOeval (the oracle)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random

import pytest
import torch

from oddetr.errors import DataError
from oddetr.evaluation.coco_eval import (
    METRIC_NAMES,
    CocoEvaluator,
    detections_from_predictions,
    evaluate_coco,
)

pycocotools_coco = pytest.importorskip("pycocotools.coco")
pycocotools_eval = pytest.importorskip("pycocotools.cocoeval")

# Measured agreement with pycocotools 2.0.11 (faster-coco-eval 1.8.0), 200 random seeds x 9 metrics:
# max |diff| = 1.1e-16, in 79 of 1800 cells (the rest bit-identical). Cause: pycocotools computes each
# precision as tp / (tp + fp + np.spacing(1)), faster-coco-eval's C++ as the exact tp / (tp + fp), so a
# cell differs by at most eps / (tp + fp) <= 2.2e-16 and a mean of cells by no more. 1e-9 is therefore an
# honest bound with room for summation-order changes; anything larger would be a real disagreement.
TOL = 1e-9


def _make_gt(seed: int, n_images: int = 12, n_cats: int = 4) -> dict:
    """Random COCO GT with every area range, crowd boxes and a GT-less image."""
    rng = random.Random(seed)
    images, anns = [], []
    ann_id = 1
    for img_id in range(1, n_images + 1):
        w, h = rng.choice([(320, 240), (640, 480), (500, 375)])
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id}.jpg"})
        if img_id == n_images:  # an image with no objects at all
            continue
        for _ in range(rng.randint(1, 9)):
            side = rng.choice([rng.uniform(6, 30), rng.uniform(35, 90), rng.uniform(100, 220)])
            bw = min(side * rng.uniform(0.6, 1.5), w - 2)
            bh = min(side * side / bw, h - 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append(
                {
                    "id": ann_id,
                    "image_id": img_id,
                    "category_id": rng.randint(1, n_cats) * 2,  # non-contiguous ids
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": int(rng.random() < 0.1),
                }
            )
            ann_id += 1
    cats = [{"id": c * 2, "name": f"c{c}"} for c in range(1, n_cats + 1)]
    return {"images": images, "annotations": anns, "categories": cats}


def _noisy_detections(gt: dict, seed: int) -> list[dict]:
    """Jittered copies of (some) GT boxes, wrong classes, and false positives."""
    rng = random.Random(seed + 1000)
    cat_ids = [c["id"] for c in gt["categories"]]
    dets = []
    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        x, y, w, h = ann["bbox"]
        for _ in range(rng.randint(1, 3)):  # duplicates
            j = rng.uniform(0.0, 0.3)
            cat = ann["category_id"] if rng.random() < 0.85 else rng.choice(cat_ids)
            dets.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": cat,
                    "bbox": [
                        x + rng.gauss(0, j * w),
                        y + rng.gauss(0, j * h),
                        w * rng.uniform(0.7, 1.3),
                        h * rng.uniform(0.7, 1.3),
                    ],
                    "score": rng.random(),
                }
            )
    for img in gt["images"]:
        for _ in range(rng.randint(0, 4)):
            w, h = rng.uniform(5, 150), rng.uniform(5, 150)
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": rng.choice(cat_ids),
                    "bbox": [rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h), w, h],
                    "score": rng.random() * 0.5,
                }
            )
    return dets


def _pycocotools_stats(gt: dict, dets: list[dict]) -> list[float]:
    gt, dets = copy.deepcopy(gt), copy.deepcopy(dets)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = pycocotools_coco.COCO()
        coco.dataset = gt
        coco.createIndex()
        dt = coco.loadRes(dets) if dets else pycocotools_coco.COCO()
        ev = pycocotools_eval.COCOeval(coco, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:9]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools(seed: int) -> None:
    gt = _make_gt(seed)
    dets = _noisy_detections(gt, seed)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    ours = evaluate_coco(gt, dets)
    ref = _pycocotools_stats(gt, dets)
    assert list(ours) == list(METRIC_NAMES)
    assert all(type(v) is float for v in ours.values())
    for name, r in zip(METRIC_NAMES, ref):
        assert abs(ours[name] - r) <= TOL, (name, ours[name], r)
    assert 0.05 < ours["AP"] < 0.95  # a non-trivial case, not all zeros or ones
    assert gt == gt_before and dets == dets_before  # inputs untouched


def test_perfect_detections_give_ap_one() -> None:
    gt = _make_gt(3)
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    m = evaluate_coco(gt, dets)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert m[name] == pytest.approx(1.0, abs=1e-12), name


def test_empty_detections_give_zeros() -> None:
    gt = _make_gt(4)
    m = evaluate_coco(gt, [])
    assert m == {name: 0.0 for name in METRIC_NAMES}
    assert evaluate_coco(gt, []) == dict(zip(METRIC_NAMES, _pycocotools_stats(gt, [])))


def test_missing_area_range_is_minus_one_like_pycocotools() -> None:
    gt = _make_gt(5)
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] >= 32**2]  # no small objects
    dets = _noisy_detections(gt, 5)
    m = evaluate_coco(gt, dets)
    assert m["APs"] == -1.0
    ref = _pycocotools_stats(gt, dets)
    assert [m[n] for n in METRIC_NAMES] == pytest.approx(ref, abs=TOL)


def test_quiet_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    gt = _make_gt(6)
    evaluate_coco(gt, _noisy_detections(gt, 6))
    assert capsys.readouterr().out == ""
    evaluate_coco(gt, _noisy_detections(gt, 6), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_annotation_id_zero_is_handled() -> None:
    """pycocotools treats a GT id of 0 as 'unmatched'; we renumber so it still counts."""
    gt = _make_gt(7)
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    for i, a in enumerate(gt["annotations"]):
        a["id"] = i  # 0-based ids
    assert evaluate_coco(gt, dets)["AP"] == pytest.approx(1.0)
    assert gt["annotations"][0]["id"] == 0


def test_unknown_image_id_is_a_data_error() -> None:
    gt = _make_gt(8)
    with pytest.raises(DataError, match="image id 999"):
        evaluate_coco(gt, [{"image_id": 999, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.5}])
    with pytest.raises(DataError, match="detection 0"):
        evaluate_coco(gt, [{"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])


def test_evaluator_accumulates_batches() -> None:
    gt = _make_gt(9)
    dets = _noisy_detections(gt, 9)
    ev = CocoEvaluator(gt)
    ev.update(dets[: len(dets) // 2])
    ev.update(dets[len(dets) // 2 :])
    assert ev.compute() == evaluate_coco(gt, dets)
    json.dumps(ev.results)  # saveable
    assert len(ev.results) == len(dets)
    ev.reset()
    assert ev.results == [] and ev.compute()["AP"] == 0.0


def test_detections_from_predictions() -> None:
    boxes = [torch.tensor([[10.25, 20.5, 30.125, 60.0], [0.0, 0.0, 1.0, 2.0]]), torch.zeros(0, 4)]
    scores = [torch.tensor([0.9, 0.123456789]), torch.zeros(0)]
    labels = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    dets = detections_from_predictions([7, 8], boxes, scores, labels, {0: 1, 1: 3, 2: 5})
    assert len(dets) == 2
    assert dets[0] == {
        "image_id": 7,
        "category_id": 1,
        "bbox": [10.25, 20.5, 30.125 - 10.25, 60.0 - 20.5],
        "score": pytest.approx(0.9),
    }
    assert dets[1]["category_id"] == 5 and dets[1]["bbox"] == [0.0, 0.0, 1.0, 2.0]
    assert dets[1]["score"] == float(torch.tensor(0.123456789))  # full precision, no rounding
    assert all(type(v) is float for d in dets for v in d["bbox"])
    # a list works as the label map, too
    assert detections_from_predictions([7], boxes[:1], scores[:1], labels[:1], [1, 3, 5]) == dets
    with pytest.raises(DataError, match="label 2"):
        detections_from_predictions([7], boxes[:1], scores[:1], labels[:1], {0: 1})
    with pytest.raises(ValueError):
        detections_from_predictions([7, 8], boxes[:1], scores, labels, {0: 1})


def test_roundtrip_from_predictions_matches_gt() -> None:
    gt = _make_gt(10)
    cat_ids = [c["id"] for c in gt["categories"]]
    per_image: dict[int, list] = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        if not a["iscrowd"]:
            per_image[a["image_id"]].append(a)
    ids = list(per_image)
    boxes = [
        torch.tensor(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in per_image[i]
            ],
            dtype=torch.float64,
        ).reshape(-1, 4)
        for i in ids
    ]
    scores = [torch.ones(len(per_image[i])) for i in ids]
    labels = [
        torch.tensor([cat_ids.index(a["category_id"]) for a in per_image[i]], dtype=torch.long) for i in ids
    ]
    dets = detections_from_predictions(ids, boxes, scores, labels, cat_ids)
    assert math.isclose(evaluate_coco(gt, dets)["AP"], 1.0)
