"""Fitting converted weights to a config: architecture checks, ``model.*`` keys and another class count."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from oddetr.errors import ConfigError

__all__ = ["ARCH_KEYS", "adapt_num_classes", "check_architecture", "class_dependent_keys", "overrides_as_keys"]

# architecture keys compared between a config and the weights (ModelConfig names, backbone nested)
ARCH_KEYS = ("arch", "d_model", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_feature_levels",
             "enc_points", "dec_points", "num_queries", "box_refine", "two_stage", "backbone.name")


def class_dependent_keys(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Keys whose first dimension is the class count: class heads and the denoising label embedding."""
    return [k for k in state_dict if k.startswith("class_heads.") or k == "label_embed.weight"]


def adapt_num_classes(state_dict: Mapping[str, Tensor], num_classes: int) -> tuple[dict[str, Tensor], list[str]]:
    """Drop the class-dependent tensors whose class count differs from ``num_classes``.

    The model keeps its fresh initialisation for them (prior-probability bias); everything else is
    kept. Returns the new state dict and the dropped keys.
    """
    dropped = [k for k in class_dependent_keys(state_dict) if state_dict[k].shape[0] != num_classes]
    return {k: v for k, v in state_dict.items() if k not in dropped}, dropped


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def check_architecture(model_cfg: Any, overrides: Mapping[str, Any], source: str) -> None:
    """Raise a one-line ConfigError naming every architecture key where ``model_cfg`` and the weights differ."""
    wrong = []
    for key in ARCH_KEYS:
        theirs = _get(overrides, key)
        ours = model_cfg
        for part in key.split("."):
            ours = getattr(ours, part)
        if theirs is not None and theirs != ours:
            wrong.append((key, ours, theirs))
    if wrong:
        have = ", ".join(f"model.{k}={o}" for k, o, _ in wrong)
        need = " ".join(f"model.{k}={_yaml(t)}" for k, _, t in wrong)
        raise ConfigError(f"model.init_weights={source} was trained with another architecture than the config "
                          f"({have}); set {need}")


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def overrides_as_keys(overrides: Mapping[str, Any], prefix: str = "model.") -> list[str]:
    """``{"d_model": 256, "backbone": {"name": "resnet50"}}`` -> ``["model.d_model=256", "model.backbone.name=resnet50"]``."""
    keys = []
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            keys.extend(overrides_as_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}={_yaml(value)}")
    return keys
