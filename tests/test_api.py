"""The Python API: ``oddetr.train``, ``Detector`` on every input type against the model run by hand,
``Detector.evaluate`` against pycocotools, and predicting without importing the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops.misc import FrozenBatchNorm2d

import oddetr
from oddetr.api import Detector
from oddetr.data.transforms import build_transforms
from oddetr.errors import ConfigError, DataError
from oddetr.models.postprocess import postprocess

# small checkpoints and no extra copies (as tests/engine/engine_testutils.py's FAST_KEYS)
FAST_KEYS = ["model.backbone.name=mobilenet_v3_small", "train.keep_checkpoints=0", "train.save_best=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, coco_writer, tiny_keys) -> tuple[Path, object]:
    """``oddetr.train`` on 4 tiny COCO images for one step: (run directory, dataset)."""
    root = tmp_path_factory.mktemp("api")
    data = coco_writer(root / "coco", num_images=4, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = oddetr.train(tiny_keys(*FAST_KEYS, *data.keys(), "train.epochs=1", "train.max_steps_per_epoch=1",
                                     f"output={root / 'run'}"))
    finally:
        torch.set_num_threads(threads)
    return out, data


@pytest.fixture(scope="module")
def detector(run) -> Detector:
    return Detector.from_checkpoint(run[0] / "last.pt", device="cpu")


def by_hand(det: Detector, pil: Image.Image, threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """The eval transform, the model and postprocess wired by hand, for one image."""
    cfg = det.config
    transform = build_transforms(train=False, scales=cfg.data.scales, max_size=cfg.data.max_size)
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(pil.height, pil.width))
    tensor = transform(pil, empty, torch.zeros(0, dtype=torch.int64))[0][None]
    with torch.no_grad():
        out = det.model(tensor, torch.zeros(1, *tensor.shape[-2:], dtype=torch.bool))
    dets = postprocess(out.pred_logits, out.pred_boxes, torch.tensor([[pil.height, pil.width]]),
                       cfg.eval.max_detections)[0]
    keep = dets["scores"] >= threshold
    return {k: v[keep] for k, v in dets.items()}


def test_train_returns_the_run_directory(run):
    out, _ = run
    assert isinstance(out, Path) and (out / "last.pt").is_file() and (out / "metrics.jsonl").is_file()


def test_predict_on_each_input_type_matches_the_model_by_hand(detector, run):
    data = run[1]
    path = data.path_of(1)
    pil = Image.open(path).convert("RGB")
    pixels = np.array(pil)
    # a threshold between scores (an untrained model's scores sit near the 0.01 prior): keeps 10
    threshold = float(by_hand(detector, pil)["scores"][9:11].mean())
    expected = by_hand(detector, pil, threshold)
    assert len(expected["scores"]) == 10
    inputs = {"path": path, "str": str(path), "pil": pil, "numpy": pixels,
              "uint8 tensor": torch.from_numpy(pixels).permute(2, 0, 1),
              "float tensor": torch.from_numpy(pixels).permute(2, 0, 1).float() / 255}
    for name, item in inputs.items():
        got = detector.predict(item, score_threshold=threshold)
        assert got.image_size == (64, 64), name
        assert len(got) == 10, name
        torch.testing.assert_close(got.boxes, expected["boxes"], atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(got.scores, expected["scores"], atol=1e-6, rtol=0, msg=name)
        assert torch.equal(got.labels, expected["labels"]), name
        assert got.names == [detector.class_names[c] for c in expected["labels"].tolist()], name
    # a list of all of them: one result per image, each the same
    listed = detector.predict(list(inputs.values()), score_threshold=threshold, batch_size=4)
    assert len(listed) == len(inputs)
    for got in listed:
        torch.testing.assert_close(got.boxes, expected["boxes"], atol=1e-4, rtol=0)


def test_predict_resizes_and_pads_a_batch_like_the_hand_made_one(detector, run):
    """Images of two sizes in one batch: resized, zero-padded bottom/right with a mask, boxes in each
    image's own pixels; the oracle pads by hand."""
    pil_a = Image.open(run[1].path_of(2)).convert("RGB")
    pil_b = pil_a.resize((96, 48))  # resized to 64 x 32 (longer side capped at 64)
    cfg = detector.config
    transform = build_transforms(train=False, scales=cfg.data.scales, max_size=cfg.data.max_size)
    tensors = []
    for pil in (pil_a, pil_b):
        empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(pil.height, pil.width))
        tensors.append(transform(pil, empty, torch.zeros(0, dtype=torch.int64))[0])
    assert tensors[1].shape[-2:] == (32, 64)
    batch = torch.zeros(2, 3, 64, 64)
    masks = torch.ones(2, 64, 64, dtype=torch.bool)
    for k, t in enumerate(tensors):
        batch[k, :, :t.shape[1], :t.shape[2]] = t
        masks[k, :t.shape[1], :t.shape[2]] = False
    with torch.no_grad():
        out = detector.model(batch, masks)
    expected = postprocess(out.pred_logits, out.pred_boxes, torch.tensor([[64, 64], [48, 96]]), 100)
    got = detector.predict([pil_a, pil_b], score_threshold=0.0)
    assert got[1].image_size == (48, 96)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.boxes, e["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g.scores, e["scores"], atol=1e-6, rtol=0)
    assert float(got[1].boxes[:, 2].max()) <= 96 and float(got[1].boxes[:, 3].max()) <= 48
    # one at a time: no padding for the first image, so exactly the single-image result
    alone = detector.predict(pil_a, score_threshold=0.0)
    torch.testing.assert_close(alone.boxes, got[0].boxes, atol=1e-4, rtol=0)


def test_evaluate_matches_pycocotools_on_the_predictions(detector, run, tmp_path):
    """Ground truth made from the model's own top boxes, jittered, so that AP is neither 0 nor 1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = run[1]
    rng = np.random.default_rng(0)
    gt = {"images": data.data["images"], "categories": data.data["categories"], "annotations": []}
    for image in data.data["images"]:
        top = by_hand(detector, Image.open(data.images / image["file_name"]).convert("RGB"))
        for (x0, y0, x1, y1), label in zip(top["boxes"][:6:2].tolist(), top["labels"][:6:2].tolist()):
            # jittered, kept inside the image (the dataset would clip it, pycocotools would not)
            x0, y0 = (float(np.clip(v + rng.uniform(-3, 3), 0, 60)) for v in (x0, y0))
            w, h = min(max(x1 - x0, 2.0), 64 - x0), min(max(y1 - y0, 2.0), 64 - y0)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image["id"], "iscrowd": 0,
                                      "category_id": detector.label_to_cat_id[label], "bbox": [x0, y0, w, h],
                                      "area": w * h})
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    metrics = detector.evaluate(data.images, ann)
    results = []
    for image in data.data["images"]:
        det = detector.predict(data.images / image["file_name"], score_threshold=0.0)
        for (x0, y0, x1, y1), score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            results.append({"image_id": image["id"], "category_id": detector.label_to_cat_id[label],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    coco = COCO(str(ann))
    coco_eval = COCOeval(coco, coco.loadRes(results), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    assert 0.05 < coco_eval.stats[0] < 0.95
    for k, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert metrics[key] == pytest.approx(coco_eval.stats[k], abs=1e-4), key


def test_from_preset_builds_each_architecture_with_overrides():
    small = dict(d_model=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=10)
    det = Detector.from_preset("dab-deformable-detr-tiny", class_names=["a", "b"], device="cpu",
                               **small, **{"data.scales": [64], "data.max_size": 64})
    assert det.config.model.arch == "dab-deformable-detr" and det.config.model.d_model == 32
    assert det.model.num_classes == 2 and det.class_names == ["a", "b"]
    result = det.predict(np.full((40, 50, 3), 128, np.uint8), score_threshold=0.0, max_detections=7)
    assert len(result) == 7 and set(result.names) <= {"a", "b"}
    assert Detector.from_preset("dino-tiny", num_classes=3, device="cpu", **small).class_names == ["0", "1", "2"]
    with pytest.raises(ConfigError, match="num_classes"):
        Detector.from_preset("dino-tiny")
    with pytest.raises(ConfigError, match="unknown config key 'model.d_modle'"):
        Detector.from_preset("dino-tiny", num_classes=3, d_modle=32)


def test_bad_images_raise_one_line_data_errors(detector, tmp_path):
    bad = {
        "numpy image must be": np.zeros((64, 64), np.uint8),
        "tensor image must be \\(3, H, W\\)": torch.zeros(1, 64, 64),
        "values in \\[0, 1\\]": torch.full((3, 8, 8), 255.0),
        "uint8 or float": torch.zeros(3, 8, 8, dtype=torch.int32),
        "expected a path, PIL image": 3.0,
        "unreadable image": tmp_path / "missing.png",
    }
    for pattern, item in bad.items():
        with pytest.raises(DataError, match=pattern):
            detector.predict([np.zeros((8, 8, 3), np.uint8), item])


def test_predicting_does_not_import_the_training_stack(run, tmp_path):
    """``import oddetr`` imports nothing heavy; loading and predicting leaves the trainer,
    distillation and optimiser modules unimported (a fresh interpreter)."""
    code = (
        "import sys, numpy as np, oddetr\n"
        "light = 'torch' not in sys.modules\n"
        f"det = oddetr.Detector.from_checkpoint({str(run[0] / 'last.pt')!r}, device='cpu')\n"
        "det.predict([np.zeros((64, 64, 3), np.uint8)] * 2, score_threshold=0.0)\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('oddetr.engine.trainer', 'oddetr.distill',\n"
        "               'oddetr.engine.optim', 'oddetr.losses')))\n"
        "print(__import__('json').dumps({'light': light, 'heavy': heavy}))\n"
    )
    src = str(Path(oddetr.__file__).parents[1])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"light": True, "heavy": []}


def test_export_command_writes_an_onnx_model_that_agrees_with_predict(run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")  # the [export] / [test] extra
    from oddetr.cli import main

    checkpoint = run[0] / "last.pt"
    out = tmp_path / "model.onnx"
    assert main(["export", f"checkpoint={checkpoint}", "format=onnx", f"output={out}", "image_size=64"]) == 0
    assert f"wrote {out} (onnx, teacher weights)" in capsys.readouterr().err  # OD-DETR is the default
    det = Detector.from_checkpoint(checkpoint, device="cpu")
    pixels = torch.from_numpy(np.array(Image.open(run[1].path_of(1)).convert("RGB"))).permute(2, 0, 1)
    image = pixels.float() / 255
    boxes, scores, labels = ort.InferenceSession(str(out)).run(None, {"images": image[None].numpy()})
    expected = det.predict(image, score_threshold=0.0)
    assert boxes.shape == (1, len(expected), 4)
    # an untrained model's scores nearly tie, so the order of equal scores may differ: match each row
    for box, score, label in zip(boxes[0], scores[0], labels[0]):
        same = (expected.labels == int(label)) & ((expected.scores - float(score)).abs() < 1e-5)
        near = (expected.boxes[same] - torch.from_numpy(box)).abs().max(-1).values
        assert near.numel() and float(near.min()) <= 1e-4
    # bad requests: one line naming the key
    assert main(["export", f"checkpoint={checkpoint}", "format=tflite", f"output={tmp_path / 'm'}"]) == 2
    assert capsys.readouterr().err.strip() == ("oddetr export: error: config key 'format' got 'tflite', "
                                               "expected one of onnx, torchscript, export")
    assert main(["export", f"checkpoint={checkpoint}"]) == 2
    assert "oddetr export: error: oddetr export needs output=..." in capsys.readouterr().err


def test_loaded_models_fold_their_norms_and_predict_the_same(run):
    """Oracle: the same checkpoint loaded with ``eval.fuse_norms=false`` (the model as it trained)."""
    norms = (torch.nn.BatchNorm2d, FrozenBatchNorm2d)
    fused = Detector.from_checkpoint(run[0] / "last.pt", device="cpu")
    plain = Detector.from_checkpoint(run[0] / "last.pt", device="cpu", overrides={"eval.fuse_norms": False})
    assert not any(isinstance(m, norms) for m in fused.model.modules())
    assert sum(isinstance(m, norms) for m in plain.model.backbone.modules()) > 10
    torch.manual_seed(0)
    images, masks = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    masks[1, :, 70:] = True
    with torch.no_grad():
        a, b = fused.model(images, masks), plain.model(images, masks)
    torch.testing.assert_close(a.pred_logits, b.pred_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes, rtol=1e-4, atol=1e-5)
