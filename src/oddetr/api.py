"""The Python API: :class:`Detector` (load, predict, evaluate, export) and :func:`train`.

    import oddetr
    det = oddetr.Detector.from_checkpoint("runs/tiny/best.pt")
    result = det.predict("image.jpg")             # Detections: boxes, scores, labels, names
    det.export("model.onnx", format="onnx")

Predicting imports neither the training loop nor the distillation code: :meth:`Detector.evaluate`,
:meth:`Detector.export` and :func:`train` import what they need when called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from oddetr.config import Config, _merge, eval_image_size, load_preset, resolve_config
from oddetr.data.collate import collate_detection
from oddetr.data.images import load_image
from oddetr.data.transforms import build_transforms
from oddetr.engine.cpu_memory import keep_freed_memory_on_cpu
from oddetr.engine.device import resolve_device
from oddetr.engine.inference import LoadedModel, load_checkpoint_model
from oddetr.errors import ConfigError, DataError
from oddetr.models.detector import DeformableDETR, build_model
from oddetr.models.postprocess import postprocess

__all__ = ["Detections", "Detector", "ImageInput", "train"]

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
"""A path, a PIL image, a numpy (H, W, 3) uint8 array or a (3, H, W) tensor (uint8, or float in [0, 1])."""


@dataclass
class Detections:
    """One image's detections, best first.

    boxes: (N, 4) float32 xyxy in pixels of the original image; scores: (N,) float32 in [0, 1];
    labels: (N,) int64 class indices; names: N class names; image_size: (height, width).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.numel())


class Detector:
    """A trained (or freshly built) detector with its class names, ready to predict."""

    def __init__(self, model: DeformableDETR, config: Config, class_names: Sequence[str],
                 label_to_cat_id: Sequence[int] | None = None, device: str | torch.device | None = None) -> None:
        self.config = config
        self.weights, self.epoch = "given", 0  # from_checkpoint: "teacher" or "student", and its epoch
        self.class_names = list(class_names)
        self.label_to_cat_id = list(label_to_cat_id) if label_to_cat_id is not None else \
            list(range(1, len(self.class_names) + 1))
        self.device = resolve_device(config.device) if device is None else torch.device(device)
        # on a CPU, glibc malloc keeps freed memory for reuse (process-wide; train.keep_freed_memory=false: off)
        keep_freed_memory_on_cpu(self.device, config.train.keep_freed_memory)
        self.model = model.to(self.device).eval()
        size, max_size = eval_image_size(config)  # the checkpoint's data.image_size unless overridden
        self.transform = build_transforms(train=False, scales=[size], max_size=max_size)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: str = "auto", device: str | torch.device | None = None,
                        overrides: Mapping[str, Any] | None = None) -> Detector:
        """Load a training checkpoint (``weights``: auto = the EMA teacher if any, teacher or student).

        ``overrides``: config keys to change, dotted (``{"eval.max_detections": 50}``) or nested.
        """
        loaded = load_checkpoint_model(path, weights, config_overrides=_nested(overrides or {}))
        return cls.from_loaded(loaded, device)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, device: str | torch.device | None = None) -> Detector:
        det = cls(loaded.model, loaded.config, loaded.class_names, loaded.label_to_cat_id, device)
        det.weights, det.epoch = loaded.weights, loaded.epoch
        return det

    @classmethod
    def from_preset(cls, name: str, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                    device: str | torch.device | None = None, **overrides: Any) -> Detector:
        """A new detector of preset ``name`` (random weights, or ``init_weights=FILE_OR_DIR``).

        Keyword overrides are config keys: a bare name is a ``model.`` key (``d_model=64``), dotted
        keys go through a dict (``**{"data.scales": [256]}``). Give ``num_classes`` or ``class_names``.
        """
        if class_names is None:
            if not num_classes or num_classes < 1:
                raise ConfigError("Detector.from_preset needs num_classes >= 1 or class_names")
            class_names = [str(i) for i in range(num_classes)]
        num_classes = num_classes or len(class_names)
        if len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class_names given for num_classes={num_classes}")
        keys = {(k if "." in k else f"model.{k}"): v for k, v in overrides.items()}
        cfg = config_from_mapping({"preset": name, **keys})
        model = build_model(cfg.model, num_classes)
        if cfg.model.init_weights:
            from oddetr.engine.init_weights import load_init_weights

            load_init_weights(model, cfg.model.init_weights, cfg.model, None)
        return cls(model, cfg, class_names, device=device)

    def to(self, device: str | torch.device) -> Detector:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def compile(self, backend: str | None = None) -> Detector:
        """``torch.compile`` the model in place (``backend``: the config's ``compile_backend`` by default,
        ``inductor``). Predictions stay those of the eager model to float rounding; the first call at each
        image size compiles (minutes on a CPU). Export uses the eager forward either way."""
        from oddetr.engine.compiled import compile_detector

        compile_detector(self.model, backend or self.config.compile_backend)
        return self

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, images: ImageInput | Sequence[ImageInput], score_threshold: float = 0.3,
                batch_size: int = 8, max_detections: int | None = None) -> Detections | list[Detections]:
        """Detect objects: one :class:`Detections` for one image, a list for a list (or a (B, 3, H, W) tensor).

        Images are resized as in evaluation (shorter side ``data.image_size``, longer side at most
        ``data.max_size``), batched ``batch_size`` at a time with bottom/right padding and masks;
        detections scoring below ``score_threshold`` are dropped.
        """
        single = not isinstance(images, list | tuple) and not (torch.is_tensor(images) and images.dim() == 4)
        items = [images] if single else list(images)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        limit = max_detections or self.config.eval.max_detections
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            chunk = [as_image(item, start + k) for k, item in enumerate(items[start:start + batch_size])]
            results.extend(self._predict_batch(chunk, score_threshold, limit))
        return results[0] if single else results

    def _predict_batch(self, images: list[Image.Image | tv_tensors.Image], threshold: float,
                       limit: int) -> list[Detections]:
        empty = torch.zeros(0, dtype=torch.int64)
        sizes, batch = [], []
        for img in images:
            h, w = (img.height, img.width) if isinstance(img, Image.Image) else tuple(img.shape[-2:])
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w))
            batch.append((self.transform(img, boxes, empty)[0], {}))
            sizes.append((h, w))
        tensor, masks, _ = collate_detection(batch)
        out = self.model(tensor.to(self.device), masks.to(self.device))
        dets = postprocess(out.pred_logits, out.pred_boxes, torch.tensor(sizes), limit)
        results = []
        for det, size in zip(dets, sizes):
            keep = det["scores"] >= threshold
            labels = det["labels"][keep].cpu()
            names = [self.class_names[c] if c < len(self.class_names) else str(c) for c in labels.tolist()]
            results.append(Detections(det["boxes"][keep].cpu(), det["scores"][keep].cpu(), labels, names,
                                      (int(size[0]), int(size[1]))))
        return results

    def predict_files(self, images: str | Path, output: str | Path, score_threshold: float = 0.3,
                      annotations: str | Path | None = None) -> list[Path]:
        """Predict every image of a file or folder; write drawn PNGs and ``detections.json`` to ``output``
        (``image_id``: the file name, or the dataset's id when ``annotations`` names its COCO JSON)."""
        from oddetr.engine.predict import predict_images

        return predict_images(self, images, output, score_threshold, annotations)

    # ------------------------------------------------------------------ evaluation and export

    def evaluate(self, images_dir: str | Path, annotations: str | Path, batch_size: int | None = None) -> dict[str, float]:
        """COCO metrics (AP, AP50, ...) on a COCO dataset: an image folder and its annotation JSON."""
        from oddetr.data.coco import CocoDetection
        from oddetr.engine.data import make_loader
        from oddetr.engine.evaluate import evaluate

        dataset = CocoDetection(images_dir, annotations, transforms=self.transform)
        names = list(dataset.class_names)
        if len(names) > len(self.class_names) or names != self.class_names[:len(names)]:
            raise DataError(f"the classes of {annotations} {names} differ from the detector's {self.class_names}")
        loader = make_loader(dataset, batch_size or self.config.eval.batch_size, False, 0, self.config.seed)
        return evaluate(self.model, loader, self.device, dataset.coco_gt(), dataset.label_to_cat_id,
                        self.config.eval.max_detections)

    def export(self, path: str | Path, format: str = "onnx", image_size: int | Sequence[int] | None = None,
               max_detections: int | None = None) -> Path:
        """Write a plain-tensor model (``oddetr.export``): ``onnx``, ``torchscript`` or ``export`` (.pt2).

        ``image_size``: the export input size, one side or (H, W); default the eval resize's size.
        """
        from oddetr.export import default_image_size, export_detector, parse_image_size

        size = default_image_size(self.config) if image_size is None else parse_image_size(image_size)
        return export_detector(self.model, path, format, size, max_detections or self.config.eval.max_detections)


def as_image(item: ImageInput, index: int = 0) -> Image.Image | tv_tensors.Image:
    """One input image as a PIL image or a (3, H, W) ``tv_tensors.Image`` (uint8, or float in [0, 1])."""
    if isinstance(item, str | Path):
        return load_image(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[-1] != 3:
            raise DataError(f"image {index}: a numpy image must be (H, W, 3), got shape {item.shape}")
        item = torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1)
    if torch.is_tensor(item):
        if item.dim() != 3 or item.shape[0] != 3:
            raise DataError(f"image {index}: a tensor image must be (3, H, W), got shape {tuple(item.shape)}")
        if item.is_floating_point():
            if item.numel() and (item.min() < -1e-3 or item.max() > 1 + 1e-3):
                raise DataError(f"image {index}: a float image must hold values in [0, 1] (divide uint8 by 255)")
        elif item.dtype != torch.uint8:
            raise DataError(f"image {index}: a tensor image must be uint8 or float, got {item.dtype}")
        return tv_tensors.Image(item.detach().cpu())
    raise DataError(f"image {index}: expected a path, PIL image, numpy array or tensor, got {type(item).__name__}")


def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": {"d": 2}}`` -> ``{"a": {"b": 1}, "c": {"d": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        parts = str(key).split(".")
        node: dict[str, Any] = {}
        leaf = node
        for part in parts[:-1]:
            leaf = leaf.setdefault(part, {})
        leaf[parts[-1]] = value
        out = _merge(out, node)
    return out


def config_from_mapping(values: Mapping[str, Any]) -> Config:
    """A config from dotted or nested keys; ``preset`` (or ``model=NAME``) picks the preset."""
    nested = _nested(values)
    preset = nested.pop("preset", None)
    if isinstance(nested.get("model"), str):
        preset = nested.pop("model")
    preset = str(preset or Config.preset)
    return resolve_config(overrides=[f"model={preset}"], base=_merge(load_preset(preset), nested))


def train(config: Config | Mapping[str, Any] | Sequence[str] | str | Path | None = None,
          resume: bool = False) -> Path:
    """Train a detector and return its run directory (``best.pt``, ``last.pt``, metrics, plots).

    ``config``: a :class:`Config`, a mapping of (dotted) keys, a list of ``key=value`` strings as
    on the command line, or a YAML file; None trains the default preset.
    """
    from oddetr.engine import distributed as dist
    from oddetr.engine.trainer import Trainer

    if isinstance(config, Config):
        cfg = config
        cfg.validate()
    elif isinstance(config, str | Path):
        cfg = resolve_config(str(config))
    elif isinstance(config, Mapping):
        cfg = config_from_mapping(config)
    else:
        cfg = resolve_config(overrides=list(config or []))
    try:
        trainer = Trainer(cfg, resume=resume)
        trainer.fit()
    finally:
        dist.cleanup()
    return Path(trainer.run_dir)
