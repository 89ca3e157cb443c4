"""Hugging Face transformers ``DeformableDetrForObjectDetection`` directories as oddetr state dicts.

``config.json`` + ``model.safetensors`` (read with the ``safetensors`` package) or ``pytorch_model.bin``,
sharded or not, in the 4.x key layout (``backbone.conv_encoder``, ``fc1``, ``out_proj``) and the 5.x one
(``backbone.model``, ``mlp.fc1``, ``o_proj``), with a timm or a Hugging Face ResNet backbone. Read
without transformers installed; nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from oddetr.errors import CheckpointError, ConfigError
from oddetr.models.convert.official import torch_load_tensors
from oddetr.models.convert.rules import apply_rules, first_keys, fix_proposal_projection

__all__ = ["convert_hf_deformable_detr", "hf_overrides", "load_hf_pretrained", "read_safetensors"]

_HF_RULES = [
    ("model.encoder.layers.{i}.self_attn.", "encoder.layers.{i}.self_attn."),
    ("model.encoder.layers.{i}.self_attn_layer_norm.", "encoder.layers.{i}.norm."),
    ("model.encoder.layers.{i}.fc1.", "encoder.layers.{i}.ffn.net.0."),
    ("model.encoder.layers.{i}.fc2.", "encoder.layers.{i}.ffn.net.3."),
    ("model.encoder.layers.{i}.final_layer_norm.", "encoder.layers.{i}.ffn.norm."),
    ("model.decoder.layers.{i}.self_attn.out_proj.", "decoder.layers.{i}.self_attn.out_proj."),
    ("model.decoder.layers.{i}.self_attn_layer_norm.", "decoder.layers.{i}.norm1."),
    ("model.decoder.layers.{i}.encoder_attn.", "decoder.layers.{i}.cross_attn."),
    ("model.decoder.layers.{i}.encoder_attn_layer_norm.", "decoder.layers.{i}.norm2."),
    ("model.decoder.layers.{i}.fc1.", "decoder.layers.{i}.ffn.net.0."),
    ("model.decoder.layers.{i}.fc2.", "decoder.layers.{i}.ffn.net.3."),
    ("model.decoder.layers.{i}.final_layer_norm.", "decoder.layers.{i}.ffn.norm."),
    ("model.level_embed", "level_embed"),
    ("model.input_proj.", "input_proj."),
    ("model.query_position_embeddings.", "query_embed."),
    ("model.reference_points.", "reference_points."),
    ("model.enc_output.", "enc_output.0."),
    ("model.enc_output_norm.", "enc_output.1."),
    ("model.pos_trans.", "proposal_to_query.0."),
    ("model.pos_trans_norm.", "proposal_to_query.1."),
    ("class_embed.{i}.", "class_heads.{i}."),
    ("bbox_embed.{i}.", "bbox_heads.{i}."),
]
_HF_ALIASES = [
    ("model.decoder.class_embed.{i}.", "class_heads.{i}."),
    ("model.decoder.bbox_embed.{i}.", "bbox_heads.{i}."),
]
_HF_BACKBONE = "model.backbone.conv_encoder.model."
# transformers 5.x module names -> the 4.x names its save_pretrained writes by default
_HF_5X_NAMES = [
    (re.compile(r"^model\.backbone\.model\."), _HF_BACKBONE),
    (re.compile(r"\.self_attn\.o_proj\."), ".self_attn.out_proj."),
    (re.compile(r"(layers\.\d+)\.mlp\.(fc[12])\."), r"\1.\2."),
]


def _hf_backbone(cfg: dict[str, Any], levels: int) -> tuple[str, bool]:
    """(oddetr backbone name, uses HF's own ResNet layout) from a DeformableDetr config dict."""
    bc = cfg.get("backbone_config") or None
    n_out = min(levels, 3)
    if bc is None or bc.get("model_type") == "timm_backbone":
        bc = bc or {}
        name = bc.get("backbone") or cfg.get("backbone") or "resnet50"
        if cfg.get("dilation") or bc.get("output_stride") == 16:
            raise ConfigError("Hugging Face config: dilation (DC5) backbones are not supported by oddetr")
        indices = bc.get("out_indices")
        if indices is not None and list(indices)[-n_out:] != [2, 3, 4][-n_out:]:
            raise ConfigError(f"Hugging Face config: backbone out_indices {indices} differ from the last "
                              f"{n_out} ResNet stages oddetr uses with num_feature_levels={levels}")
        if bc == {} and not cfg.get("use_timm_backbone", True):
            raise ConfigError("Hugging Face config: use_timm_backbone=false without a backbone_config")
        return str(name), False
    if bc.get("model_type") == "resnet":
        kind = bc.get("layer_type", "bottleneck")
        depths = tuple(bc.get("depths", (3, 4, 6, 3)))
        name = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
                ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101"}.get((kind, depths))
        widths = list(bc.get("hidden_sizes", ()))
        expected = [64, 128, 256, 512] if kind == "basic" else [256, 512, 1024, 2048]
        if name is None or widths != expected or bc.get("embedding_size", 64) != 64 \
                or bc.get("downsample_in_first_stage") or bc.get("downsample_in_bottleneck"):
            raise ConfigError(f"Hugging Face config: ResNet backbone ({kind}, depths {list(depths)}, widths {widths}) "
                              "is not a torchvision resnet18/34/50/101")
        feats = bc.get("out_features")
        if feats is not None and list(feats)[-n_out:] != ["stage2", "stage3", "stage4"][-n_out:]:
            raise ConfigError(f"Hugging Face config: backbone out_features {feats} differ from the last {n_out} "
                              f"ResNet stages oddetr uses with num_feature_levels={levels}")
        return name, True
    raise ConfigError(f"Hugging Face config: backbone model_type {bc.get('model_type')!r} is not supported "
                      "(timm or Hugging Face ResNets only)")


def hf_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """The oddetr architecture of a DeformableDetr ``config.json`` dict (ModelConfig-shaped)."""
    if cfg.get("model_type", "deformable_detr") != "deformable_detr":
        raise ConfigError(f"Hugging Face config: model_type {cfg.get('model_type')!r}, expected deformable_detr")
    get = cfg.get
    for key, ours, theirs in (("decoder_attention_heads", "encoder_attention_heads", "heads"),
                              ("decoder_ffn_dim", "encoder_ffn_dim", "feed-forward widths")):
        if get(key, 8 if "heads" in key else 1024) != get(ours, 8 if "heads" in key else 1024):
            raise ConfigError(f"Hugging Face config: encoder and decoder {theirs} differ ({get(ours)} vs {get(key)}); "
                              "oddetr uses one value for both")
    if get("position_embedding_type", "sine") != "sine":
        raise ConfigError("Hugging Face config: only position_embedding_type='sine' is supported")
    if get("activation_function", "relu") != "relu":
        raise ConfigError(f"Hugging Face config: activation_function {get('activation_function')!r}; oddetr uses relu")
    levels = int(get("num_feature_levels", 4))
    name, _ = _hf_backbone(cfg, levels)
    two_stage = bool(get("two_stage", False))
    return {
        "arch": "deformable-detr", "d_model": int(get("d_model", 256)), "nheads": int(get("encoder_attention_heads", 8)),
        "enc_layers": int(get("encoder_layers", 6)), "dec_layers": int(get("decoder_layers", 6)),
        "dim_feedforward": int(get("encoder_ffn_dim", 1024)), "num_feature_levels": levels,
        "enc_points": int(get("encoder_n_points", 4)), "dec_points": int(get("decoder_n_points", 4)),
        "num_queries": int(get("two_stage_num_proposals", 300) if two_stage else get("num_queries", 300)),
        "box_refine": bool(get("with_box_refine", False)), "two_stage": two_stage, "backbone": {"name": name},
    }


_HF_RESNET = re.compile(
    re.escape(_HF_BACKBONE) + r"(?:embedder\.embedder\.(?P<stem>convolution|normalization)"
    r"|encoder\.stages\.(?P<s>\d+)\.layers\.(?P<j>\d+)\.(?:shortcut\.(?P<sc>convolution|normalization)"
    r"|layer\.(?P<k>\d+)\.(?P<conv>convolution|normalization)))\.(?P<rest>.+)$")


def _hf_resnet_key(key: str) -> str | None:
    """A Hugging Face ResNet backbone key -> the torchvision name under ``backbone.body.``."""
    m = _HF_RESNET.match(key)
    if m is None:
        return None
    if m["stem"]:
        name = "conv1" if m["stem"] == "convolution" else "bn1"
    else:
        block = f"layer{int(m['s']) + 1}.{m['j']}"
        if m["sc"]:
            name = f"{block}.downsample." + ("0" if m["sc"] == "convolution" else "1")
        else:
            name = f"{block}.{'conv' if m['conv'] == 'convolution' else 'bn'}{int(m['k']) + 1}"
    return f"backbone.body.{name}.{m['rest']}"


def convert_hf_deformable_detr(state_dict: Mapping[str, Tensor], hf_config: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A transformers ``DeformableDetrForObjectDetection`` state dict -> (overrides, oddetr state dict).

    hf_config: the parsed ``config.json`` (a dict) or a transformers config object.
    Heads saved once because transformers ties them (``class_embed.N`` -> ``class_embed.0``) are
    repeated for every layer, as transformers itself loads them.

    Raises:
        ConfigError: an architecture oddetr does not have (learned position embeddings, DC5, ...).
        CheckpointError: keys with no oddetr counterpart.
    """
    cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    overrides = hf_overrides(cfg)
    _, hf_resnet = _hf_backbone(cfg, overrides["num_feature_levels"])
    state: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for regex, repl in _HF_5X_NAMES:
            key = regex.sub(repl, key)
        state[key] = value
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(_HF_BACKBONE):
            new = _hf_resnet_key(key) if hf_resnet else "backbone.body." + key[len(_HF_BACKBONE):]
            if new is not None:
                out[new] = value
                continue
        m = re.match(r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:  # separate q/k/v projections -> nn.MultiheadAttention's packed in_proj
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        rest[key] = value
    renamed, unmapped = apply_rules(rest, _HF_RULES, _HF_ALIASES)
    out.update(renamed)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unmapped.append(f"model.decoder.layers.{layer}.self_attn.*_proj.{kind}")
            continue
        out[f"decoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unmapped:
        raise CheckpointError(f"Hugging Face weights: keys with no oddetr counterpart: {first_keys(sorted(unmapped))}")
    heads = overrides["dec_layers"] + (1 if overrides["two_stage"] else 0)
    for prefix in ("class_heads", "bbox_heads"):
        shared = {k[len(f"{prefix}.0."):]: v for k, v in out.items() if k.startswith(f"{prefix}.0.")}
        for i in range(1, heads):
            if not any(k.startswith(f"{prefix}.{i}.") for k in out):
                out.update({f"{prefix}.{i}.{suffix}": v for suffix, v in shared.items()})
    fix_proposal_projection(out)
    return overrides, out


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """A ``.safetensors`` file as CPU tensors (the ``safetensors`` package)."""
    return load_file(str(path), device="cpu")


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", torch_load_tensors)):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(reader(directory / shard))
            return state
    if (directory / "model.safetensors").is_file():
        return read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return torch_load_tensors(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin beside config.json")


def load_hf_pretrained(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], int, list[str]]:
    """A local Hugging Face Deformable-DETR directory -> (overrides, oddetr state dict, num_classes, class names).

    Reads ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` (sharded too); never the hub
    and never transformers. Class names come from ``id2label`` (``class_<i>`` where missing).
    """
    directory = Path(directory).expanduser()
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file}: unreadable JSON ({err})") from None
    try:
        weights = _read_hf_weights(directory)
    except CheckpointError:
        raise
    except Exception as err:  # a damaged file fails anywhere in the reader
        raise CheckpointError(f"{directory}: unreadable weights ({type(err).__name__}: {err})") from None
    overrides, state = convert_hf_deformable_detr(weights, cfg)
    if "class_heads.0.weight" not in state:
        raise CheckpointError(f"{directory}: no class head (class_embed.0) in the weights")
    num_classes = int(state["class_heads.0.weight"].shape[0])
    id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
    names = [id2label.get(i, f"class_{i}") for i in range(num_classes)]
    return overrides, state, num_classes, names
