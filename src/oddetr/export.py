"""Export a detector as a model of plain tensors: ONNX, TorchScript or ``torch.export``.

The exported model is :class:`ExportableDetector`:

- input ``images``: (B, 3, H, W) float32 RGB in [0, 1], already resized (no padding, no mask);
- outputs ``boxes`` (B, K, 4) float32 xyxy in pixels of the input tensor (clamped to it),
  ``scores`` (B, K) float32 sigmoid scores, best first, and ``labels`` (B, K) int64 class
  indices, the top K = min(max_detections, queries x classes) (query, class) pairs per image.

The batch is dynamic in every format. The image size is dynamic for ``export`` (any H, W in
``[64, 4096]``, from 128 for models with 4 feature levels: :func:`min_dynamic_side`); ONNX (the TorchScript-based exporter) and TorchScript (a trace) record the
level sizes as constants, so those files take exactly the export size.

Formats and their runtimes:

- ``onnx``: ``torch.onnx.export`` (opset 17, ``dynamo=False``); run with ONNX Runtime
  (``pip install oddetr[export]``).
- ``torchscript``: ``torch.jit.trace``; load with ``torch.jit.load``.
- ``export``: ``torch.export.export`` saved with ``torch.export.save`` (``.pt2``); load with
  ``torch.export.load(path).module()``.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from oddetr.config import Config, eval_image_size
from oddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oddetr.engine.compiled import eager_copy
from oddetr.errors import ConfigError
from oddetr.models.postprocess import top_detections

__all__ = ["FORMATS", "OUTPUT_NAMES", "ExportableDetector", "default_image_size", "export_detector", "export_program",
           "min_dynamic_side"]

FORMATS = ("onnx", "torchscript", "export")
OUTPUT_NAMES = ("boxes", "scores", "labels")
ONNX_OPSET = 17  # grid_sample needs >= 16
MIN_SIDE, MAX_SIDE = 64, 4096  # the dynamic image sizes of format=export


class ExportableDetector(nn.Module):
    """A detector as a function of plain tensors (see the module docstring for shapes).

    images (B, 3, H, W) float32 RGB in [0, 1] -> boxes (B, K, 4) xyxy pixels, scores (B, K),
    labels (B, K) int64.
    """

    def __init__(self, model: nn.Module, max_detections: int = 100) -> None:
        super().__init__()
        self.model = model
        self.max_detections = int(max_detections)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        normalised = (images - self.mean) / self.std
        masks = torch.zeros_like(images[:, 0], dtype=torch.bool)  # (B, H, W): no padding
        out = self.model(normalised, masks)
        scores, labels, boxes = top_detections(out.pred_logits, out.pred_boxes, self.max_detections)
        cx, cy, w, h = boxes.unbind(-1)
        x0 = (cx - 0.5 * w).clamp(0.0, 1.0) * width
        y0 = (cy - 0.5 * h).clamp(0.0, 1.0) * height
        x1 = (cx + 0.5 * w).clamp(0.0, 1.0) * width
        y1 = (cy + 0.5 * h).clamp(0.0, 1.0) * height
        return torch.stack([x0, y0, x1, y1], -1), scores, labels


class _FixedSize(nn.Module):
    """Refuses inputs of another size than the trace's (a trace would silently return wrong boxes)."""

    def __init__(self, traced: nn.Module, height: int, width: int) -> None:
        super().__init__()
        self.traced = traced
        self.height = height
        self.width = width

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.shape[-2] != self.height or images.shape[-1] != self.width:
            raise ValueError(f"this model was exported for {self.height}x{self.width} images")
        return self.traced(images)


def default_image_size(cfg: Config) -> tuple[int, int]:
    """The square export size: the eval resize's shorter side (``data.image_size``), capped by ``data.max_size``."""
    size, max_size = eval_image_size(cfg)
    side = min(size, max_size)
    return side, side


def parse_image_size(value: object) -> tuple[int, int]:
    """``128``, ``"128"``, ``[96, 128]`` or ``"96,128"`` -> (H, W); ConfigError otherwise."""
    items = value if isinstance(value, list | tuple) else str(value).replace("x", ",").split(",")
    try:
        sizes = [int(v) for v in items]
    except (TypeError, ValueError):
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < MIN_SIDE or max(sizes) > MAX_SIDE:
        raise ConfigError(f"config key 'image_size' got {value!r}, expected one side or H,W in "
                          f"[{MIN_SIDE}, {MAX_SIDE}] pixels")
    return sizes[0], sizes[1]


def export_detector(model: nn.Module, path: str | Path, format: str = "onnx",
                    image_size: tuple[int, int] = (128, 128), max_detections: int = 100) -> Path:
    """Write ``model`` (a DeformableDETR, left untouched) as ``format`` to ``path``; returns the path.

    The export runs on a CPU copy of the model in eval mode, with an example batch of two
    (B, 3, *image_size) images.
    """
    if format not in FORMATS:
        raise ConfigError(f"config key 'format' got {format!r}, expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if format == "export" and path.suffix != ".pt2":
        raise ConfigError(f"output={path}: format=export writes a torch.export archive, name it *.pt2")
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableDetector(eager_copy(model).cpu().eval(), max_detections).eval()
    example = torch.rand(2, 3, *image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values frozen at the export size
        if format == "onnx":
            _export_onnx(wrapper, example, path)
        elif format == "torchscript":  # a trace (scripting fails on the dataclass outputs), size-checked
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            torch.jit.save(torch.jit.script(_FixedSize(traced, *image_size)), str(path))
        else:
            torch.export.save(_torch_export(wrapper, example), str(path))
    return path


def _export_onnx(wrapper: ExportableDetector, example: torch.Tensor, path: Path) -> None:
    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("format=onnx needs the onnx package: pip install 'oddetr[export]' (or onnx onnxruntime)")
    axes = {"images": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                      input_names=["images"], output_names=list(OUTPUT_NAMES), dynamic_axes=axes)


def export_program(model: nn.Module, image_size: tuple[int, int] = (128, 128),
                   max_detections: int = 100) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`ExportableDetector` around a CPU copy of ``model``: batch 1..1024
    and height, width :func:`min_dynamic_side`..4096 dynamic (what ``format=export`` saves)."""
    wrapper = ExportableDetector(eager_copy(model).cpu().eval(), max_detections).eval()
    with torch.no_grad():
        return _torch_export(wrapper, torch.rand(2, 3, *image_size))


def min_dynamic_side(num_feature_levels: int) -> int:
    """The smallest image side ``format=export`` accepts: the coarsest feature level keeps 2 cells
    (levels of stride 8, 16, 32, then 64, 128, ... for extra levels)."""
    return max(MIN_SIDE, 2 * 32 * 2 ** max(0, num_feature_levels - 3))


def _torch_export(wrapper: ExportableDetector, example: torch.Tensor) -> torch.export.ExportedProgram:
    low = min_dynamic_side(wrapper.model.cfg.num_feature_levels)
    if min(example.shape[-2:]) < low:
        raise ConfigError(f"config key 'image_size' got {tuple(example.shape[-2:])}: format=export needs sides "
                          f">= {low} for {wrapper.model.cfg.num_feature_levels} feature levels")
    dims = {0: torch.export.Dim("batch", min=1, max=1024),
            2: torch.export.Dim("height", min=low, max=MAX_SIDE),
            3: torch.export.Dim("width", min=low, max=MAX_SIDE)}
    return torch.export.export(wrapper, (example,), dynamic_shapes={"images": dims})
