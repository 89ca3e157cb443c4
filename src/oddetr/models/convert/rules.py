"""Renaming rules from the official Deformable-DETR / DINO key layouts to oddetr's, and their helpers.

A rule is ``(source prefix, oddetr prefix)`` where ``{i}`` stands for a layer index; the first matching
rule wins. ``aliases`` name the same tensors a second time (the original code's ``decoder.bbox_embed`` /
``class_embed`` "hack"); they are used where the main name is absent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["DINO_RULES", "OFFICIAL_ALIASES", "OFFICIAL_RULES", "apply_rules", "first_keys", "fix_proposal_projection",
           "layer_count", "rename", "resnet_name", "swap_xy_blocks"]

# ------------------------------------------------------------------ renaming rules
# (source prefix, oddetr prefix); "{i}" stands for a layer index. The first matching rule wins.

_LAYER_RULES = [
    ("transformer.encoder.layers.{i}.self_attn.", "encoder.layers.{i}.self_attn."),
    ("transformer.encoder.layers.{i}.norm1.", "encoder.layers.{i}.norm."),
    ("transformer.encoder.layers.{i}.linear1.", "encoder.layers.{i}.ffn.net.0."),
    ("transformer.encoder.layers.{i}.linear2.", "encoder.layers.{i}.ffn.net.3."),
    ("transformer.encoder.layers.{i}.norm2.", "encoder.layers.{i}.ffn.norm."),
    # the official decoder layer names its norms by module order (cross-attention first), not by
    # execution order: norm2 follows self-attention, norm1 cross-attention
    ("transformer.decoder.layers.{i}.self_attn.", "decoder.layers.{i}.self_attn."),
    ("transformer.decoder.layers.{i}.norm2.", "decoder.layers.{i}.norm1."),
    ("transformer.decoder.layers.{i}.cross_attn.", "decoder.layers.{i}.cross_attn."),
    ("transformer.decoder.layers.{i}.norm1.", "decoder.layers.{i}.norm2."),
    ("transformer.decoder.layers.{i}.linear1.", "decoder.layers.{i}.ffn.net.0."),
    ("transformer.decoder.layers.{i}.linear2.", "decoder.layers.{i}.ffn.net.3."),
    ("transformer.decoder.layers.{i}.norm3.", "decoder.layers.{i}.ffn.norm."),
    ("backbone.0.body.", "backbone.body."),
    ("input_proj.", "input_proj."),
    ("transformer.level_embed", "level_embed"),
    ("class_embed.{i}.", "class_heads.{i}."),
    ("bbox_embed.{i}.", "bbox_heads.{i}."),
    ("transformer.enc_output.", "enc_output.0."),
    ("transformer.enc_output_norm.", "enc_output.1."),
]
OFFICIAL_RULES = _LAYER_RULES + [
    ("query_embed.", "query_embed."),
    ("transformer.reference_points.", "reference_points."),
    ("transformer.pos_trans.", "proposal_to_query.0."),
    ("transformer.pos_trans_norm.", "proposal_to_query.1."),
]
DINO_RULES = _LAYER_RULES + [
    ("transformer.tgt_embed.", "content_embed."),
    ("transformer.decoder.ref_point_head.", "position_head."),
    ("label_enc.", "label_embed."),
]
# the same tensors a second time (the original code's decoder.bbox_embed / class_embed "hack")
OFFICIAL_ALIASES = [
    ("transformer.decoder.class_embed.{i}.", "class_heads.{i}."),
    ("transformer.decoder.bbox_embed.{i}.", "bbox_heads.{i}."),
]

def rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for src, dst in rules:
        regex = re.escape(src).replace(re.escape("{i}"), r"(\d+)")
        m = re.match(regex, key)
        if m:
            return (dst.replace("{i}", m.group(1)) if m.groups() else dst) + key[m.end():]
    return None


def apply_rules(state: Mapping[str, Tensor], rules, aliases=()) -> tuple[dict[str, Tensor], list[str]]:
    """Rename ``state`` by ``rules``; ``aliases`` name duplicates, used where the main name is absent.

    Returns the renamed dict and the source keys no rule covers (or aliases holding other values).
    """
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    duplicates: dict[str, tuple[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = rename(key, rules)
        if new is not None:
            out[new] = value
            continue
        new = rename(key, list(aliases))
        if new is not None:
            duplicates[new] = (key, value)
        else:
            unmapped.append(key)
    for new, (key, value) in duplicates.items():
        if new not in out:
            out[new] = value
        elif out[new].shape != value.shape or not torch.equal(out[new], value):
            unmapped.append(key)
    return out, unmapped


def swap_xy_blocks(weight: Tensor) -> Tensor:
    """Proposal-embedding projection: inputs ordered (x, y, w, h) <-> oddetr's (y, x, w, h) sine order.

    weight: (out, 4 * F); swaps the first two column blocks of F (an involution).
    """
    f = weight.shape[1] // 4
    return torch.cat([weight[:, f:2 * f], weight[:, :f], weight[:, 2 * f:]], 1)


def fix_proposal_projection(state: dict[str, Tensor]) -> None:
    key = "proposal_to_query.0.weight"
    if key in state:
        state[key] = swap_xy_blocks(state[key])


def layer_count(state: Mapping[str, Tensor], prefix: str) -> int:
    regex = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def resnet_name(state: Mapping[str, Tensor], prefix: str) -> str | None:
    """resnet18/34/50/101 from a torchvision-layout backbone state dict (``prefix`` + ``layer3.N.conv3``)."""
    blocks = layer_count(state, prefix + "layer3.")
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    return {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50",
            (23, True): "resnet101"}.get((blocks, bottleneck))


def first_keys(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
