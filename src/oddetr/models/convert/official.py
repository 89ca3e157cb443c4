"""Official checkpoints: fundamentalvision/Deformable-DETR and IDEA-Research/DINO ``.pth`` files.

Deformable-DETR: a ``model`` entry with keys ``backbone.0.body...``, ``transformer...``, ``class_embed.N``,
``bbox_embed.N`` (and ``args``). DINO: what the oddetr DINO preset has; the rest is reported as unmapped.
Files are read with ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed for ``args``).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oddetr.errors import CheckpointError
from oddetr.models.convert.rules import (
    DINO_RULES,
    OFFICIAL_ALIASES,
    OFFICIAL_RULES,
    apply_rules,
    fix_proposal_projection,
    layer_count,
    rename,
    resnet_name,
    swap_xy_blocks,
)

__all__ = ["convert_official_deformable_detr", "convert_official_dino", "read_official_checkpoint",
           "to_official_layout", "torch_load_tensors"]

def torch_load_tensors(path: Path) -> dict[str, Any]:
    """torch.load with weights_only (argparse.Namespace allowed: the official repos store ``args``)."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        line = next((ln for ln in str(err).splitlines() if ln.strip() and "Weights only load failed" not in ln),
                    type(err).__name__)
        raise CheckpointError(
            f"{path}: cannot read it with weights_only=True ({line.strip()}); if you trust the file, re-save its "
            "state dict: torch.save(torch.load(p, weights_only=False)['model'], 'model_only.pth')") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    return dict(obj)


def read_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Deformable-DETR / DINO ``.pth`` (``{"model": ..., "args": ...}`` or a bare state dict)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return torch_load_tensors(path)


def _split_checkpoint(checkpoint_state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, args as a dict) of an official checkpoint object or a bare state dict."""
    model = checkpoint_state.get("model", checkpoint_state)
    if not isinstance(model, Mapping):
        raise CheckpointError("official checkpoint: its 'model' entry is not a state dict")
    state = {k.removeprefix("module."): v for k, v in model.items() if isinstance(v, Tensor)}
    args = checkpoint_state.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    return state, args


def _official_overrides(state: Mapping[str, Tensor], args: Mapping[str, Any], arch: str) -> dict[str, Any]:
    if "transformer.level_embed" not in state:
        raise CheckpointError("official checkpoint: no transformer.level_embed (not a deformable model?)")
    levels, d = state["transformer.level_embed"].shape
    out: dict[str, Any] = {
        "arch": arch, "d_model": int(d), "num_feature_levels": int(levels),
        "enc_layers": layer_count(state, "transformer.encoder.layers."),
        "dec_layers": layer_count(state, "transformer.decoder.layers."),
        "two_stage": "transformer.enc_output.weight" in state,
    }
    ffn = state.get("transformer.encoder.layers.0.linear1.weight")
    if ffn is not None:
        out["dim_feedforward"] = int(ffn.shape[0])
    if arch == "dino":
        out["box_refine"] = True
        if "transformer.tgt_embed.weight" in state:
            out["num_queries"] = int(state["transformer.tgt_embed.weight"].shape[0])
    else:
        out["box_refine"] = "transformer.decoder.bbox_embed.0.layers.0.weight" in state
        if "query_embed.weight" in state:
            out["num_queries"] = int(state["query_embed.weight"].shape[0])
        elif "num_queries" in args:
            out["num_queries"] = int(args["num_queries"])
    for ours, theirs in (("nheads", "nheads"), ("enc_points", "enc_n_points"), ("dec_points", "dec_n_points")):
        if isinstance(args.get(theirs), int):
            out[ours] = int(args[theirs])
    name = resnet_name(state, "backbone.0.body.")
    if name is None:
        raise CheckpointError("official checkpoint: the backbone is not a torchvision-layout resnet18/34/50/101")
    out["backbone"] = {"name": name}
    return out


def convert_official_deformable_detr(checkpoint_state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """A fundamentalvision/Deformable-DETR checkpoint -> (overrides, oddetr state dict, unmapped source keys).

    checkpoint_state: the loaded ``.pth`` (``model`` + optional ``args``) or its bare ``model`` dict.
    ``nheads`` / points are read from ``args`` when present (the state dict cannot tell them apart).
    """
    state, args = _split_checkpoint(checkpoint_state)
    overrides = _official_overrides(state, args, "deformable-detr")
    out, unmapped = apply_rules(state, OFFICIAL_RULES, OFFICIAL_ALIASES)
    fix_proposal_projection(out)
    return overrides, out, unmapped


def convert_official_dino(checkpoint_state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """An IDEA-Research/DINO (4-scale, ResNet) checkpoint -> (overrides, oddetr state dict, unmapped keys).

    Mapped: backbone, input projections, level embedding, encoder and decoder layers, per-layer heads,
    the encoder-output projection and proposal heads (``enc_out_*``), ``tgt_embed`` (learned content),
    ``decoder.ref_point_head`` (positional queries) and ``label_enc`` (denoising labels, its rows cut to
    the class count). Unmapped (reported): ``transformer.decoder.norm`` (oddetr's decoder has no final
    norm) and anything else DINO has and oddetr does not.
    """
    state, args = _split_checkpoint(checkpoint_state)
    overrides = _official_overrides(state, args, "dino")
    n = overrides["dec_layers"]
    rules = DINO_RULES + [("transformer.enc_out_class_embed.", f"class_heads.{n}."),
                          ("transformer.enc_out_bbox_embed.", f"bbox_heads.{n}.")]
    out, unmapped = apply_rules(state, rules, OFFICIAL_ALIASES)
    head = out.get("class_heads.0.weight")
    label = out.get("label_embed.weight")
    if head is not None and label is not None and label.shape[0] > head.shape[0]:
        out["label_embed.weight"] = label[: head.shape[0]]  # DINO keeps one extra row (dn_labelbook_size + 1)
    return overrides, out, unmapped


def to_official_layout(state_dict: Mapping[str, Tensor], box_refine: bool = True,
                       dino: bool = False) -> dict[str, Tensor]:
    """The inverse mapping: an oddetr state dict in the official Deformable-DETR (or DINO) key layout.

    With ``box_refine`` the box heads are also written under ``transformer.decoder.bbox_embed`` (and
    for DINO the class heads under ``transformer.decoder.class_embed``), as the official code's state
    dicts have them; keys the official layout has no name for are left out.
    """
    n = layer_count(state_dict, "decoder.layers.")
    rules = DINO_RULES if dino else OFFICIAL_RULES
    inverse = [(ours, theirs) for theirs, ours in rules]
    if dino:
        inverse = [(f"class_heads.{n}.", "transformer.enc_out_class_embed."),
                   (f"bbox_heads.{n}.", "transformer.enc_out_bbox_embed.")] + inverse
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = rename(key, inverse)
        if new is None:
            continue
        out[new] = swap_xy_blocks(value) if key == "proposal_to_query.0.weight" else value
        if (box_refine and new.startswith("bbox_embed.")) or (dino and new.startswith("class_embed.")):
            out["transformer.decoder." + new] = value
    return out
