"""``model.init_weights``: start training from converted or earlier weights.

The path may be a Hugging Face Deformable-DETR directory, a fundamentalvision/Deformable-DETR or
IDEA-Research/DINO ``.pth`` checkpoint, or an oddetr checkpoint (its EMA teacher when it has one).
Class heads whose class count differs from the model's are re-initialised; every other tensor of
the backbone, input projections and transformer must be covered by the weights.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from oddetr.config import ModelConfig
from oddetr.errors import CheckpointError
from oddetr.models.convert import (
    adapt_num_classes,
    check_architecture,
    convert_official_deformable_detr,
    convert_official_dino,
    load_hf_pretrained,
    read_official_checkpoint,
)

# the parts of the model a set of weights must cover; heads and query embeddings may start fresh
CORE_PREFIXES = ("backbone.", "input_proj.", "level_embed", "encoder.", "decoder.")
_DINO_MARKERS = ("transformer.tgt_embed.weight", "transformer.enc_out_class_embed.weight", "label_enc.weight")


@dataclass
class InitReport:
    """What :func:`load_init_weights` did (also written as ``init_weights.json`` in the run directory)."""

    path: str
    format: str  # hf | deformable-detr | dino | oddetr
    loaded: list[str] = field(default_factory=list)  # model keys set from the weights
    reinitialised: list[str] = field(default_factory=list)  # class-dependent keys with another class count
    kept_init: list[str] = field(default_factory=list)  # model keys the weights have no value for
    unmapped: list[str] = field(default_factory=list)  # source keys the model has no place for
    source_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # known differences between the source model and this one

    def summary(self) -> str:
        parts = [f"init_weights: {len(self.loaded)} tensors from {self.format} weights {self.path}", *self.notes]
        if self.reinitialised:
            parts.append(f"re-initialised {len(self.reinitialised)} (other class count): {_short(self.reinitialised)}")
        if self.kept_init:
            parts.append(f"kept at initialisation {len(self.kept_init)}: {_short(self.kept_init)}")
        if self.unmapped:
            parts.append(f"unmapped source keys {len(self.unmapped)}: {_short(self.unmapped)}")
        return "; ".join(parts)


@dataclass
class WeightsSource:
    """Weights read from a path and converted to oddetr's layout (see :func:`read_weights`)."""

    format: str  # hf | deformable-detr | dino | oddetr
    overrides: dict[str, Any]  # the architecture, shaped like ModelConfig
    state: dict[str, Tensor]  # oddetr state dict
    unmapped: list[str]  # source keys with no oddetr counterpart
    class_names: list[str]  # empty when the source does not name its classes
    checkpoint: dict[str, Any] | None = None  # an oddetr training checkpoint's other entries (config, epoch...)
    teacher: bool = False  # the state is an oddetr checkpoint's EMA teacher


def read_init_weights(path: str | Path) -> tuple[str, dict[str, Any], dict[str, Tensor], list[str], list[str]]:
    """(format, overrides, oddetr state dict, unmapped source keys, source class names) of ``path``."""
    w = read_weights(path)
    return w.format, w.overrides, w.state, w.unmapped, w.class_names


def read_weights(path: str | Path) -> WeightsSource:
    """Detect the format of ``path`` (a Hugging Face directory, an official Deformable-DETR / DINO ``.pth``,
    an oddetr checkpoint or bare state dict) and convert its weights to oddetr's layout."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights not found: {path}")
    if path.is_dir():
        overrides, state, _, names = load_hf_pretrained(path)
        return WeightsSource("hf", overrides, state, [], names)
    if path.suffix == ".safetensors":
        raise CheckpointError(f"model.init_weights={path}: give the Hugging Face directory holding config.json, "
                              "not the .safetensors file")
    obj = read_official_checkpoint(path)
    if obj.get("format") == "oddetr-checkpoint-v1":
        use_teacher = isinstance(obj.get("teacher"), Mapping) and "model" in obj["teacher"]
        state = dict(obj["teacher"]["model"] if use_teacher else obj["model"])
        overrides = dict(obj.get("config", {}).get("model", {}))
        names = list(obj.get("classes", {}).get("names", []))
        rest = {k: v for k, v in obj.items() if k not in ("model", "teacher", "optimizer", "scheduler", "scaler")}
        return WeightsSource("oddetr", overrides, state, [], names, rest, use_teacher)
    model = obj.get("model", obj)
    keys = set(model) if isinstance(model, Mapping) else set()
    if any(k.startswith(("model.encoder.", "model.backbone.")) for k in keys):
        raise CheckpointError(f"model.init_weights={path}: Hugging Face weights need their directory "
                              "(config.json beside them)")
    if any(k.startswith("transformer.") for k in keys):
        if keys & set(_DINO_MARKERS) or any(k.startswith("transformer.decoder.ref_point_head.") for k in keys):
            overrides, state, unmapped = convert_official_dino(obj)
            return WeightsSource("dino", overrides, state, unmapped, [])
        overrides, state, unmapped = convert_official_deformable_detr(obj)
        if unmapped:
            raise CheckpointError(f"model.init_weights={path}: keys with no oddetr counterpart: {_short(unmapped)}")
        return WeightsSource("deformable-detr", overrides, state, [], [])
    if any(k.startswith("encoder.layers.") for k in keys):  # a bare oddetr state dict
        return WeightsSource("oddetr", {}, {k: v for k, v in model.items() if isinstance(v, Tensor)}, [], [])
    raise CheckpointError(f"model.init_weights={path}: not a Hugging Face, Deformable-DETR, DINO or oddetr "
                          f"checkpoint (first keys: {_short(sorted(keys))})")


def load_init_weights(model: nn.Module, path: str | Path, model_cfg: ModelConfig,
                      run_dir: Path | None = None) -> InitReport:
    """Load ``path`` into ``model`` (built from ``model_cfg``); log and return what was kept.

    Raises:
        CheckpointError: a missing or unreadable path, unmappable keys, tensors of the wrong shape, or
            weights that leave part of the backbone / transformer uncovered.
        ConfigError: the weights' architecture (d_model, layers, queries, two_stage, box_refine,
            levels, backbone, ...) differs from ``model_cfg`` (one line naming the keys to set).
    """
    fmt, overrides, state, unmapped, names = read_init_weights(path)
    check_architecture(model_cfg, overrides, str(path))
    num_classes = int(model.num_classes)
    state, reinitialised = adapt_num_classes(state, num_classes)
    own = model.state_dict()
    extra = sorted(k for k in state if k not in own)
    if extra and fmt in ("hf", "deformable-detr"):
        raise CheckpointError(f"model.init_weights={path}: weights with no place in the model: {_short(extra)}")
    unmapped = sorted(unmapped) + extra  # DINO / oddetr parts this model does not have (e.g. no denoising)
    state = {k: v for k, v in state.items() if k in own}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"model.init_weights={path}: shape mismatch: {_short(bad, 3)}")
    kept = sorted(k for k in own if k not in state and k not in reinitialised)
    uncovered = [k for k in kept if k.startswith(CORE_PREFIXES) and not k.endswith("num_batches_tracked")]
    if uncovered:
        raise CheckpointError(f"model.init_weights={path}: the weights do not cover {_short(uncovered)}")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    notes = []
    groups = getattr(getattr(model, "input_proj", [[None, None]])[0][1], "num_groups", 32)
    if fmt != "oddetr" and groups != 32:
        notes.append(f"note: the input projections normalise with GroupNorm({groups}) at d_model={model_cfg.d_model}, "
                     "the source model with GroupNorm(32): outputs differ until fine-tuned")
    report = InitReport(str(path), fmt, sorted(state), sorted(reinitialised), kept, unmapped, names, notes)
    if run_dir is not None:
        print(report.summary(), file=sys.stderr, flush=True)
        (Path(run_dir) / "init_weights.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def main(argv: list[str] | None = None) -> int:
    """``python -m oddetr.engine.init_weights PATH``: kept for old scripts; ``oddetr weights PATH`` does it."""
    from oddetr.cli import main as cli_main

    return cli_main(["weights", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
