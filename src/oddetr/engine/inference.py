"""Load a trained detector from a checkpoint for evaluation and prediction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oddetr.config import Config, config_from_dict
from oddetr.engine.checkpoint import safe_load
from oddetr.errors import CheckpointError, ConfigError
from oddetr.models.detector import DeformableDETR, build_model


@dataclass
class LoadedModel:
    model: DeformableDETR
    config: Config
    class_names: list[str]
    label_to_cat_id: list[int]
    categories: list[dict]
    weights: str  # "teacher" or "student"
    epoch: int


def load_checkpoint_model(path: str | Path, weights: str = "auto", device: torch.device | None = None,
                          config_overrides: dict[str, Any] | None = None) -> LoadedModel:
    """Rebuild the detector of a training checkpoint; ``weights``: auto (teacher if any) | teacher | student.

    The model comes back in eval mode, for inference only: with ``eval.fuse_norms`` (default) its
    backbone's batch norms are folded into the convolutions (:meth:`Backbone.fuse_norms`)."""
    state = safe_load(path)
    if state.get("format") != "oddetr-checkpoint-v1" or "model" not in state:
        raise CheckpointError(f"{path} is not an oddetr training checkpoint")
    cfg_dict = state["config"]
    if config_overrides:
        from oddetr.config import merge_user_config

        cfg_dict = merge_user_config(cfg_dict, config_overrides)  # data.image_size=N rescales the sizes
    cfg = config_from_dict(cfg_dict)
    model = build_model(cfg.model, int(state["num_classes"]))
    teacher = state.get("teacher")
    if weights not in ("auto", "teacher", "student"):
        raise ConfigError(f"config key 'weights' got {weights!r}, expected auto, teacher or student")
    if state.get("contents") == "weights":  # a best.pt: one set of weights, ``state["weights"]`` says whose
        holder = state.get("weights", "student")
        if weights not in ("auto", holder):
            raise CheckpointError(f"{path} holds only the {holder}'s weights; use weights=auto or the run's last.pt")
        use_teacher, sd = holder == "teacher", state["model"]
    else:
        if weights == "teacher" and not teacher:
            raise CheckpointError(f"{path} has no EMA teacher (trained with distill.enabled=false); "
                                  "use weights=student")
        use_teacher = weights == "teacher" or (weights == "auto" and bool(teacher))
        sd = teacher["model"] if use_teacher else state["model"]
    try:
        model.load_state_dict(sd)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model: {str(err).splitlines()[0]}") from None
    model.eval()
    if cfg.eval.fuse_norms:
        model.backbone.fuse_norms()
    if device is not None:
        model.to(device)
    classes = state["classes"]
    return LoadedModel(model, cfg, list(classes["names"]), list(classes["label_to_cat_id"]),
                       list(classes["categories"]), "teacher" if use_teacher else "student", int(state["epoch"]))
