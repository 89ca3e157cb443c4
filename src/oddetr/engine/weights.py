"""``oddetr weights PATH [output=FILE]``: what a set of weights holds, and its conversion to an oddetr checkpoint.

PATH is anything ``model.init_weights`` takes: a Hugging Face Deformable-DETR directory, an official
Deformable-DETR / DINO ``.pth``, an oddetr checkpoint or a bare oddetr state dict. The converted file is an
oddetr checkpoint (``oddetr-checkpoint-v1``: config, classes, weights; no optimiser state) that
``oddetr eval`` / ``oddetr predict`` (``checkpoint=FILE``) and ``model.init_weights=FILE`` load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from oddetr.config import Config, config_from_dict, resolve_config
from oddetr.engine.checkpoint import atomic_save
from oddetr.engine.init_weights import WeightsSource, load_init_weights, read_weights
from oddetr.errors import CheckpointError
from oddetr.models.convert import ARCH_KEYS, overrides_as_keys
from oddetr.models.detector import build_model

__all__ = ["WeightsInfo", "convert_weights", "format_info", "inspect_weights"]

FORMAT_NAMES = {
    "hf": "Hugging Face Deformable-DETR directory",
    "deformable-detr": "fundamentalvision/Deformable-DETR checkpoint",
    "dino": "IDEA-Research/DINO checkpoint",
    "oddetr": "oddetr checkpoint",
}
# the preset a converted model starts from (data scales, loss, schedule), by architecture
BASE_PRESETS = {"deformable-detr": "deformable-detr-r50", "dab-deformable-detr": "dab-deformable-detr-r50",
                "dino": "dino-4scale-r50"}


@dataclass
class WeightsInfo:
    path: str
    format: str  # hf | deformable-detr | dino | oddetr
    description: str
    tensors: int  # tensors of the converted (oddetr) state dict
    values: int  # their total number of elements
    num_classes: int  # 0: no class head found
    class_names: list[str] = field(default_factory=list)
    model_keys: list[str] = field(default_factory=list)  # model.* overrides matching the architecture
    unmapped: list[str] = field(default_factory=list)  # source keys with no oddetr counterpart


def _num_classes(state: dict[str, Tensor]) -> int:
    head = state.get("class_heads.0.weight")
    return 0 if head is None else int(head.shape[0])


def _info(path: str | Path, src: WeightsSource) -> WeightsInfo:
    description = FORMAT_NAMES[src.format]
    if src.format == "oddetr" and src.checkpoint is None:
        description = "oddetr state dict"
    elif src.checkpoint is not None:
        source = src.checkpoint.get("converted_from")
        description += f", epoch {src.checkpoint.get('epoch', '?')}, "
        if isinstance(source, dict):
            description += f"converted from {source.get('format')} weights {source.get('path')}" + (
                " (their EMA teacher)" if source.get("teacher") else "")
        else:
            description += "EMA teacher weights" if src.teacher else "student weights, no EMA teacher"
    arch = {k: v for k, v in src.overrides.items() if k in ARCH_KEYS or k == "backbone"}
    if "backbone" in arch:
        arch["backbone"] = {"name": arch["backbone"].get("name")}
    keys = overrides_as_keys(arch) + ([] if src.format == "oddetr" else ["model.backbone.norm=frozen_bn"])
    tensors = [v for v in src.state.values() if isinstance(v, Tensor)]
    return WeightsInfo(str(path), src.format, description, len(tensors), sum(t.numel() for t in tensors),
                       _num_classes(src.state), list(src.class_names), keys, list(src.unmapped))


def inspect_weights(path: str | Path) -> WeightsInfo:
    """Read and convert the weights at ``path`` (nothing is written)."""
    return _info(path, read_weights(path))


def format_info(info: WeightsInfo, max_names: int = 20) -> str:
    """Human-readable lines; the last one holds the ``model.*`` keys (one ``key=value`` per word)."""
    names = info.class_names[:max_names]
    more = f", ... ({len(info.class_names)} in all)" if len(info.class_names) > max_names else ""
    lines = [f"weights: {info.path}", f"format: {info.format} ({info.description})",
             f"tensors: {info.tensors} ({info.values:,} values)",
             f"classes: {info.num_classes}" + (f" ({', '.join(names)}{more})" if names else "")]
    if info.unmapped:
        lines.append(f"unmapped source keys: {len(info.unmapped)} ({', '.join(info.unmapped[:4])}"
                     + (", ..." if len(info.unmapped) > 4 else "") + ")")
    lines.append("config keys: " + " ".join(info.model_keys))
    return "\n".join(lines)


def _converted_config(src: WeightsSource) -> Config:
    if src.checkpoint is not None and "config" in src.checkpoint:
        return config_from_dict(src.checkpoint["config"])
    if src.format == "oddetr":
        raise CheckpointError("a bare oddetr state dict carries no architecture to convert; give the training "
                              "checkpoint instead")
    preset = BASE_PRESETS[src.overrides.get("arch", "deformable-detr")]
    keys = overrides_as_keys(src.overrides)
    if "label_embed.weight" not in src.state:
        keys.append("model.dn_queries=0")  # no denoising label embedding to load
    return resolve_config(overrides=[f"model={preset}", *keys, "model.backbone.norm=frozen_bn"])


def convert_weights(path: str | Path, output: str | Path) -> tuple[WeightsInfo, Path]:
    """Write the weights at ``path`` as an oddetr checkpoint ``output`` (loaded into the model it describes,
    with ``load_init_weights``' checks); return what was read and the file written."""
    src = read_weights(path)
    info = _info(path, src)
    if not info.num_classes:
        raise CheckpointError(f"{path}: no class head (class_heads.0) in the weights, so no class count")
    cfg = _converted_config(src)
    model = build_model(cfg.model, info.num_classes)
    load_init_weights(model, path, cfg.model)
    if src.checkpoint is not None and "classes" in src.checkpoint:
        classes: dict[str, Any] = dict(src.checkpoint["classes"])
    else:
        names = src.class_names or [f"class_{k}" for k in range(info.num_classes)]
        classes = {"names": names, "label_to_cat_id": list(range(len(names))),
                   "categories": [{"id": k, "name": n} for k, n in enumerate(names)]}
    output = Path(output)
    atomic_save({
        "format": "oddetr-checkpoint-v1",
        "config": cfg.to_dict(),
        "num_classes": info.num_classes,
        "classes": classes,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "teacher": None,
        "epoch": int(src.checkpoint.get("epoch", 0)) if src.checkpoint else 0,
        "converted_from": {"path": str(path), "format": src.format, "teacher": src.teacher},
    }, output)
    return info, output

