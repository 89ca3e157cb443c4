"""Export parity: ONNX Runtime, ``torch.export`` and TorchScript against the PyTorch model, for
Deformable-DETR, DAB-Deformable-DETR and DINO at d=32, 64 px; and the exported outputs' meaning."""

from __future__ import annotations

import pytest
import torch

from oddetr.api import Detector
from oddetr.config import Config, _merge, config_from_dict, parse_overrides
from oddetr.errors import ConfigError
from oddetr.export import ExportableDetector, export_detector, export_program
from oddetr.models.detector import build_model

ARCHS = ("deformable-detr-tiny", "dab-deformable-detr-tiny", "dino-tiny")
BOX_TOL = 1e-4  # pixels, float32


def spread(model: torch.nn.Module) -> torch.nn.Module:
    """Random heads that spread scores and move boxes: at the initial prior-bias heads the scores of
    an untrained model nearly tie, and a tie broken differently picks another query's box."""
    with torch.no_grad():
        for head in model.class_heads:
            head.weight.normal_(0.0, 1.0)
        for head in model.bbox_heads:
            head.layers[-1].weight.normal_(0.0, 0.1)
    return model.eval()


def tiny_model(cfg: Config, *keys: str) -> torch.nn.Module:
    """``cfg``'s model with ``keys`` changed, seeded random weights, spread heads."""
    cfg = config_from_dict(_merge(cfg.to_dict(), parse_overrides(list(keys))))
    torch.manual_seed(0)
    return spread(build_model(cfg.model, 3))


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tiny_config):
    """(arch, config, model in eval mode) with random weights, seeded."""
    cfg = tiny_config(f"model={request.param}")
    return request.param, cfg, tiny_model(cfg)


def _reference(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return ExportableDetector(model, 20).eval()(images)


def _check(got, expected, what: str) -> float:
    boxes, scores, labels = (torch.as_tensor(t) for t in got)
    diff = float((boxes - expected[0]).abs().max())
    print(f"{what}: max |boxes diff| {diff:.2e} px, max |scores diff| "
          f"{float((scores - expected[1]).abs().max()):.2e}")
    assert boxes.shape == expected[0].shape and boxes.dtype == torch.float32
    assert diff <= BOX_TOL, what
    torch.testing.assert_close(scores, expected[1], atol=1e-5, rtol=0)
    assert torch.equal(labels, expected[2]), what
    return diff


def test_onnx_runtime_matches_pytorch(tiny, tmp_path, one_thread):
    ort = pytest.importorskip("onnxruntime")  # the [export] / [test] extra
    arch, _, model = tiny
    path = export_detector(model, tmp_path / f"{arch}.onnx", "onnx", (64, 64), max_detections=20)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels"]
    for batch in (3, 1):  # dynamic batch
        images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {"images": images.numpy()})
        _check([torch.from_numpy(g) for g in got], _reference(model, images), f"{arch} onnxruntime batch {batch}")


def test_torch_export_matches_pytorch_at_other_batch_and_image_sizes(tiny, one_thread):
    arch, cfg, _ = tiny
    # one decoder layer and two feature levels: torch.export's symbolic shapes cost seconds per op
    small = tiny_model(cfg, "model.dec_layers=1", "model.num_feature_levels=2")
    exported = export_program(small, (64, 64), max_detections=20).module()
    for shape in ((3, 3, 64, 64), (1, 3, 96, 80)):  # dynamic batch and image size
        images = torch.rand(*shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            got = exported(images)
        _check(got, _reference(small, images), f"{arch} torch.export {shape}")


def test_torch_export_file_loads_and_matches(tiny_config, tmp_path, one_thread):
    model = tiny_model(tiny_config(), "model.dec_layers=1", "model.num_feature_levels=2")
    path = export_detector(model, tmp_path / "m.pt2", "export", (64, 64), max_detections=20)
    loaded = torch.export.load(str(path)).module()
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        _check(loaded(images), _reference(model, images), "torch.export file (2, 3, 64, 96)")


def test_torchscript_matches_pytorch_and_refuses_other_sizes(tiny_config, tmp_path, one_thread):
    cfg = tiny_config("model=dab-deformable-detr-tiny")
    torch.manual_seed(0)
    model = spread(build_model(cfg.model, 3))
    path = export_detector(model, tmp_path / "m.pt", "torchscript", (64, 64), max_detections=20)
    loaded = torch.jit.load(str(path))
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        _check(loaded(images), _reference(model, images), "torchscript batch 3")
    with pytest.raises(Exception, match="exported for 64x64"):
        loaded(torch.rand(1, 3, 96, 64))


def test_exported_boxes_are_the_detectors_pixels(tiny_config, one_thread):
    """The wrapper's outputs are ``Detector.predict``'s top-k at threshold 0 (an image at the eval size)."""
    cfg = tiny_config("model=dino-tiny")
    torch.manual_seed(1)
    det = Detector(spread(build_model(cfg.model, 3)), cfg, ["a", "b", "c"], device="cpu")
    image = torch.rand(3, 64, 64)
    boxes, scores, labels = _reference(det.model, image[None])
    result = det.predict(image, score_threshold=0.0, max_detections=20)
    torch.testing.assert_close(boxes[0], result.boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores[0], result.scores, atol=1e-6, rtol=0)
    assert torch.equal(labels[0], result.labels)
    assert float(boxes.min()) >= 0 and float(boxes.max()) <= 64


def test_bad_export_requests_raise_config_errors(tiny_config, tmp_path):
    det = Detector(build_model(tiny_config().model, 3), tiny_config(), ["a", "b", "c"], device="cpu")
    with pytest.raises(ConfigError, match="'format' got 'tflite'"):
        det.export(tmp_path / "m.tflite", format="tflite")
    with pytest.raises(ConfigError, match=r"name it \*\.pt2"):
        det.export(tmp_path / "m.onnx", format="export")
    with pytest.raises(ConfigError, match="'image_size'"):
        det.export(tmp_path / "m.onnx", image_size="big")
    with pytest.raises(ConfigError, match="'image_size'"):
        det.export(tmp_path / "m.onnx", image_size=[16, 64])
    # four feature levels: the stride-64 level needs 128 px for 2 cells
    four = tiny_config("model.num_feature_levels=4")
    det4 = Detector(build_model(four.model, 3), four, ["a", "b", "c"], device="cpu")
    with pytest.raises(ConfigError, match="sides >= 128 for 4 feature levels"):
        det4.export(tmp_path / "m.pt2", format="export", image_size=[64, 128])
