"""Typed configuration: dataclasses, YAML presets and ``key=value`` overrides.

A config is resolved in this order: built-in defaults, then a preset (``model=NAME`` or the
``base:`` key of a YAML file given with ``--config``), then the YAML file, then ``key=value``
overrides from the command line. Every key is validated against the dataclass types; an
unknown key or a value of the wrong type raises :class:`~oddetr.errors.ConfigError` with a
one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from oddetr.errors import ConfigError


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    weights: str | None = None  # local torchvision state-dict file; never downloaded
    trainable_layers: int = 3
    lr_mult: float = 0.1
    # frozen_bn: the DETR default for pretrained weights; bn: trainable BatchNorm, for training from scratch
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"


@dataclass
class ModelConfig:
    arch: Literal["deformable-detr", "dab-deformable-detr", "dino"] = "deformable-detr"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_feature_levels: int = 4
    enc_points: int = 4
    dec_points: int = 4
    num_queries: int = 300
    box_refine: bool = True
    two_stage: bool = False
    num_classes: int = 0  # 0: taken from the training data's categories
    # start from these weights: a Hugging Face Deformable-DETR directory, an official Deformable-DETR / DINO
    # .pth or an oddetr checkpoint (class heads re-initialised for another class count; docs/WEIGHTS.md)
    init_weights: str | None = None
    # DINO's contrastive denoising (training only): positive/negative pairs per GT copy budget
    # (DINO's dn_number; the batch's GTs are repeated dn_queries // max GT count times); 0 = off
    dn_queries: int = 0
    dn_label_noise: float = 0.5  # a DN query's label is resampled with probability dn_label_noise / 2
    dn_box_noise: float = 1.0  # lambda: positives move corners < lambda * half size, negatives [lambda, 2 lambda)
    look_forward_twice: bool = False  # DINO: layer l's box loss also trains layer l-1's box head

    def __post_init__(self) -> None:
        if self.arch == "dino" and not self.two_stage:
            raise ConfigError("model.arch=dino needs model.two_stage=true (mixed query selection starts from "
                              "the encoder's proposals)")
        if self.arch == "dab-deformable-detr" and self.two_stage:
            raise ConfigError("model.arch=dab-deformable-detr takes learned anchors: set model.two_stage=false "
                              "(or use model.arch=dino for encoder proposals)")
        if self.dn_queries < 0:
            raise ConfigError(f"config key 'model.dn_queries' must be >= 0, got {self.dn_queries}")
        if not 0.0 <= self.dn_label_noise <= 1.0:
            raise ConfigError(f"config key 'model.dn_label_noise' must be in [0, 1], got {self.dn_label_noise}")
        if self.dn_box_noise < 0.0:
            raise ConfigError(f"config key 'model.dn_box_noise' must be >= 0, got {self.dn_box_noise}")


@dataclass
class DataSplitConfig:
    format: Literal["coco", "voc", "synthetic"] = "synthetic"
    images: str | None = None  # COCO image folder
    annotations: str | None = None  # COCO annotation JSON
    root: str | None = None  # VOC root
    split: str | None = None  # VOC ImageSets/Main/<split>.txt


@dataclass
class SyntheticConfig:
    root: str = "~/.cache/oddetr/synthetic"
    num_train: int = 600
    num_val: int = 100
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 20
    seed: int = 0


@dataclass
class DataConfig:
    train: DataSplitConfig = field(default_factory=DataSplitConfig)
    val: DataSplitConfig = field(default_factory=lambda: DataSplitConfig())
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # the training and evaluation size: shorter side in pixels (eval resizes to it; the presets' multi-scale
    # training, max_size and crops follow it in their ratio unless set explicitly). None: max(scales)
    image_size: int | None = None
    # class names, label k = classes[k]; null: VOC reads them from the training split's objects (the 20 VOC
    # names when every object is one of them), COCO takes its categories (README: "Classes")
    classes: list[str] | None = None
    scales: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    crop: bool = True
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    flip: bool = True
    num_workers: int = 2


@dataclass
class LossConfig:
    cls: Literal["focal", "qfl", "varifocal"] = "focal"
    cls_weight: float = 1.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    qfl_beta: float = 2.0
    aux_layers: bool = True  # losses at every decoder layer, not only the last
    # training-only one-to-one groups (Group-DETR style, no teacher): detached copies of the main group's
    # initial queries, each matched by its own Hungarian step. With 1 it is the control for OD-DETR's PD
    # group (the same queries' count, no EMA teacher): the "extra group, no teacher" benchmark row
    extra_groups: int = 0


@dataclass
class DistillConfig:
    enabled: bool = True  # OD-DETR is the default; distill.enabled=false trains the baseline
    md: bool = True
    pd: bool = True
    aux: bool = True
    md_on_pd: bool = True  # MD also on the PD group (its queries correspond to the teacher's index-for-index)
    # EMA teacher: θ_t ← m_k θ_t + (1 − m_k) θ_s, m_k = m (1 − exp(−k / τ)). Left unset (null), m and τ follow
    # ema_horizon: the horizon 1 / (1 − m) = τ = that fraction of the run's optimiser steps (METHOD.md: a few
    # percent), so that a short run on a small dataset and a long COCO run average over the same share of
    # training; set them to fix them in steps
    ema_decay: float | None = None
    ema_tau: float | None = None
    ema_horizon: float = 0.04
    warmup_steps: int = -1  # -1: ema_tau
    # the teacher guides the student up to and including this epoch (1-based); after it the student trains as
    # the baseline does (no teacher pass, groups or distillation losses) while the EMA teacher keeps following
    # it, evaluated and saved as before. 0: the whole run
    end_epoch: int = 0
    # BatchNorm in the teacher's guiding pass: its EMA'd running statistics, or the batch's statistics
    # (running statistics untouched), which normalise as the training-mode student does; evaluation
    # always uses the running statistics
    teacher_bn: Literal["running", "batch"] = "running"
    # autocast precision of the teacher's guiding pass (no grad), its outputs cast back to float32: on CPUs
    # with bf16 units and on GPUs a cheaper teacher; none follows train.amp
    teacher_amp: Literal["none", "bf16", "fp16"] = "none"
    # MD's positives: the union of the student's own pairs and the teacher's (the paper's "not only ...
    # but also"), or the teacher's pairs alone (one-to-one, and as slow to change as the teacher: where two
    # near-equal student queries compete for a GT, only the teacher's choice stays positive)
    md_pairs: Literal["union", "teacher"] = "union"
    md_box: Literal["none", "unmatched_only", "all"] = "unmatched_only"
    # soft-target box of a (query, GT) pair only the teacher made: the teacher's box, the student's, or the
    # better of the two (IoU with the GT); the student's own pairs always use the student's box
    md_target_box: Literal["teacher", "student", "max"] = "teacher"
    md_cls_loss: Literal["qfl", "varifocal"] = "qfl"
    md_weight: float = 1.0
    pd_weight: float = 1.0
    # PD boxes: only on queries the teacher has something to say about (matched to a GT by its Hungarian
    # step at that layer, and/or max class probability >= pd_box_threshold), normalised by their count,
    # with a loss whose gradient fades as the student reaches the teacher
    pd_box_queries: Literal["matched", "confident", "matched_or_confident", "all"] = "matched_or_confident"
    pd_box_threshold: float = 0.5
    pd_box_loss: Literal["smooth_l1", "l2", "l1_giou"] = "smooth_l1"
    pd_box_beta: float = 0.02  # smooth-L1 transition (normalised box units)
    aux_weight: float = 1.0
    aux_k: int = 2
    aux_stages: list[int] | None = None  # None: every decoder layer
    aux_pooled: bool = False


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 2
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["step", "cosine"] = "step"
    lr_drop_epochs: list[int] = field(default_factory=lambda: [11])
    lr_drop_factor: float = 0.1
    min_lr_ratio: float = 0.01
    clip_grad: float = 0.1
    grad_accum: int = 1
    amp: Literal["none", "bf16", "fp16"] = "none"
    eval_every: int = 1
    max_steps_per_epoch: int = 0  # 0: the whole epoch
    keep_checkpoints: int = 0  # epoch_*.pt files kept (hard links to that epoch's last.pt; 0: none)
    checkpoint_every: int = 0  # also write last.pt every N optimiser steps inside an epoch (0: at epoch ends only)
    save_best: bool = True
    max_nonfinite_steps: int = 5
    instability_probe: int = 256
    log_steps: bool = False  # write steps.jsonl: every optimiser step's loss (mean over ranks) and lr
    # on a CPU device, set glibc malloc to keep freed memory for reuse instead of page-faulting large
    # buffers back in every step (oddetr.engine.cpu_memory; 1.6x faster R50 steps); resident memory
    # then stays at its peak
    keep_freed_memory: bool = True


@dataclass
class EvalConfig:
    max_detections: int = 100
    batch_size: int = 4
    # oddetr eval / predict / export and Detector.from_checkpoint fold the backbone's batch norms into
    # its convolutions (same outputs to float rounding, a faster pass; Backbone.fuse_norms)
    fuse_norms: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preset: str = "deformable-detr-tiny"
    output: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    deterministic: bool = False
    # torch.compile the detector (student and teacher in training; the model in eval / predict / the API);
    # a backend of torch._dynamo.list_backends(): "inductor" (fast code, minutes to compile on a CPU) or
    # "aot_eager" / "eager" (no code generation: checks that the model traces, no speed-up)
    compile: bool = False
    compile_backend: str = "inductor"

    def validate(self) -> None:
        """Cross-field checks that types alone cannot express."""
        m = self.model
        positive = {
            "model.d_model": m.d_model, "model.nheads": m.nheads, "model.dec_layers": m.dec_layers,
            "model.num_queries": m.num_queries, "model.num_feature_levels": m.num_feature_levels,
            "train.epochs": self.train.epochs, "train.batch_size": self.train.batch_size,
            "train.grad_accum": self.train.grad_accum, "eval.batch_size": self.eval.batch_size,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"config key '{key}' must be > 0, got {value}")
        if m.d_model % m.nheads:
            raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.nheads={m.nheads}")
        if self.loss.extra_groups < 0:
            raise ConfigError(f"config key 'loss.extra_groups' must be >= 0, got {self.loss.extra_groups}")
        if m.enc_layers < 0:
            raise ConfigError(f"config key 'model.enc_layers' must be >= 0, got {m.enc_layers}")
        d = self.distill
        if not 0.0 <= d.pd_box_threshold <= 1.0:
            raise ConfigError(f"config key 'distill.pd_box_threshold' must be in [0, 1], got {d.pd_box_threshold}")
        if d.pd_box_beta <= 0.0:
            raise ConfigError(f"config key 'distill.pd_box_beta' must be > 0, got {d.pd_box_beta}")
        if self.train.checkpoint_every < 0:
            raise ConfigError(f"config key 'train.checkpoint_every' must be >= 0, got {self.train.checkpoint_every}")
        if d.ema_decay is not None and not 0.0 <= d.ema_decay < 1.0:
            raise ConfigError(f"config key 'distill.ema_decay' must be in [0, 1), got {d.ema_decay}")
        if d.ema_tau is not None and d.ema_tau < 0.0:
            raise ConfigError(f"config key 'distill.ema_tau' must be >= 0, got {d.ema_tau}")
        if d.end_epoch < 0:
            raise ConfigError(f"config key 'distill.end_epoch' must be >= 0, got {d.end_epoch}")
        if not 0.0 < d.ema_horizon <= 1.0:
            raise ConfigError(f"config key 'distill.ema_horizon' must be in (0, 1], got {d.ema_horizon}")
        if self.distill.aux_stages is not None:
            bad = [s for s in self.distill.aux_stages if not 0 <= s < m.dec_layers]
            if bad:
                raise ConfigError(f"config key 'distill.aux_stages' has stages {bad} outside [0, {m.dec_layers})")
        names = self.data.classes
        if names is not None and (not names or len(set(names)) != len(names) or not all(n.strip() for n in names)):
            raise ConfigError(f"config key 'data.classes' must be a non-empty list of distinct names, got {names}")
        if self.compile:
            import torch._dynamo

            backends = {*torch._dynamo.list_backends(), "eager", "aot_eager"}
            if self.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
                raise ConfigError(f"config key 'compile_backend' must be one of {sorted(backends)}, "
                                  f"got '{self.compile_backend}'")
        for split in ("train", "val"):
            _validate_split(getattr(self.data, split), f"data.{split}")
        _validate_sizes(self.data)
        formats = {self.data.train.format == "synthetic", self.data.val.format == "synthetic"}
        if len(formats) == 2:
            raise ConfigError("data.train and data.val must both be given (or both left to the synthetic set); "
                              f"got data.train.format={self.data.train.format}, data.val.format={self.data.val.format}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate_sizes(d: DataConfig) -> None:
    """Positive sizes; ``image_size`` None becomes ``max(scales)`` (configs written before the key existed)."""
    sizes = {"data.max_size": [d.max_size], "data.scales": d.scales, "data.crop_scales": d.crop_scales,
             "data.crop_min": [d.crop_min], "data.crop_max": [d.crop_max]}
    if d.image_size is not None:
        sizes["data.image_size"] = [d.image_size]
    for key, values in sizes.items():
        if not values or min(values) < 1:
            raise ConfigError(f"config key '{key}' must hold positive sizes in pixels, got {values}")
    if d.crop_min > d.crop_max:
        raise ConfigError(f"data.crop_min={d.crop_min} must be <= data.crop_max={d.crop_max}")
    if d.image_size is None:
        d.image_size = max(d.scales)


# keys derived from data.image_size in the ratio of the preset's (or the run's) own values
_SIZE_KEYS = ("scales", "max_size", "crop_scales", "crop_min", "crop_max")


def derive_image_size(base: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` keys implied by ``data.image_size``: what :func:`resolve_config` merges over ``user``.

    ``base`` is the preset's (or a saved run's) config dict, ``user`` the file + command-line dict. When the
    user sets ``data.image_size=N`` and the base was made for ``N0``, every size key of ``_SIZE_KEYS`` the
    user did not set is the base's value times ``N / N0`` (rounded): the preset's multi-scale range, longer
    side cap and crops keep their ratio to the image size. When the user sets ``data.scales`` but no
    ``image_size``, the image size is ``max(scales)`` (the evaluation size before the key existed).
    """
    base_data, user_data = base.get("data") or {}, user.get("data") or {}
    if not isinstance(base_data, dict) or not isinstance(user_data, dict):
        return {}
    if "image_size" not in user_data:
        if "scales" in user_data:
            scales = user_data["scales"]
            if isinstance(scales, int) and not isinstance(scales, bool):
                scales = [scales]
            if isinstance(scales, list) and scales and all(isinstance(v, int) for v in scales):
                return {"image_size": max(scales)}
        return {}
    size, defaults = user_data["image_size"], DataConfig()
    reference = base_data.get("image_size") or max(base_data.get("scales") or defaults.scales)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size == reference:
        return {}  # a bad value is reported by the type check / validate()
    ratio = size / reference
    derived: dict[str, Any] = {}
    for key in _SIZE_KEYS:
        if key in user_data:
            continue
        value = base_data.get(key, getattr(defaults, key))
        if isinstance(value, list):
            derived[key] = sorted({max(1, round(v * ratio)) for v in value})
        else:
            derived[key] = max(1, round(value * ratio))
    return derived


def merge_user_config(base: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a preset's or a saved run's dict) overridden by ``user``, with the sizes ``data.image_size``
    implies (:func:`derive_image_size`)."""
    derived = derive_image_size(base, user)
    merged = _merge(base, user)
    if derived:
        merged = _merge(merged, {"data": derived})
    return merged


def eval_image_size(cfg: Config) -> tuple[int, int]:
    """``(shorter side, longer-side cap)`` of the evaluation resize of a (checkpoint's) config."""
    d = cfg.data
    return int(d.image_size if d.image_size is not None else max(d.scales)), int(d.max_size)


def _validate_split(split: DataSplitConfig, prefix: str) -> None:
    if split.format == "synthetic" and (split.images or split.annotations):
        split.format = "coco"  # giving COCO paths selects COCO
    if split.format == "coco":
        for key in ("images", "annotations"):
            if not getattr(split, key):
                raise ConfigError(f"{prefix}.format=coco needs {prefix}.{key}")
    elif split.format == "voc":
        for key in ("root", "split"):
            if not getattr(split, key):
                raise ConfigError(f"{prefix}.format=voc needs {prefix}.{key}")


# --------------------------------------------------------------------------- type coercion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"config key '{key}' got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value is None and "none" in choices:  # key=none on the command line parses as YAML's null
            return "none"
        if value not in choices:
            raise ConfigError(f"config key '{key}' got {value!r}, expected one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value] if isinstance(value, int | float | str) and item_tp is not str else value
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' got {value!r}, expected a list")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' got {value!r}, expected a mapping of its fields")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads exponents without a dot (1e-4) as strings
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        raise ConfigError(f"config key '{key}' got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' got {value!r}, expected a string")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a (possibly partial) nested dict."""
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(str(key), list(hints), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- presets and files


def preset_names() -> list[str]:
    folder = resources.files("oddetr") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path | Any, label: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {label}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {label}{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {label} must hold a mapping, got {type(data).__name__}")
    return data


def load_preset(name: str) -> dict[str, Any]:
    """The nested dict of preset ``name`` (following its ``base:`` chain)."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(preset_names())}")
    data = _read_yaml(resources.files("oddetr") / "configs" / f"{name}.yaml", f"preset {name}")
    base = data.pop("base", None)
    data["preset"] = name
    return _merge(load_preset(base), data) if base else data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "model=dino-tiny"]`` -> nested dict; values parsed as YAML scalars (``None`` = null)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"empty key in '{item}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if value in ("None", "none"):  # Python's spelling of YAML's null / ~
            value = None
        if key == "model" and isinstance(value, str):
            key = "preset"
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' conflicts with another override")
        node[parts[-1]] = value
    return out


def resolve_config(config_file: str | None = None, overrides: list[str] | None = None,
                   base: dict[str, Any] | None = None) -> Config:
    """Defaults <- preset <- YAML file <- overrides, validated. ``base`` replaces the preset."""
    override_dict = parse_overrides(overrides or [])
    file_dict: dict[str, Any] = {}
    if config_file:
        file_dict = _read_yaml(Path(config_file), config_file)
        if "base" in file_dict:
            file_dict["preset"] = file_dict.pop("base")
    preset = override_dict.get("preset") or file_dict.get("preset") or Config.preset
    merged = base if base is not None else load_preset(str(preset))
    merged = merge_user_config(merged, _merge(file_dict, override_dict))
    merged["preset"] = str(preset)
    cfg = _build(Config, merged)
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    cfg = _build(Config, data)
    cfg.validate()
    return cfg
