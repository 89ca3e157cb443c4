"""Weights from other DETR codebases as an oddetr :class:`~oddetr.models.detector.DeformableDETR` state dict.

Sources (nothing is ever downloaded; every file is read with ``weights_only`` / safetensors):

- Hugging Face transformers ``DeformableDetrForObjectDetection`` directories (``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``), in the 4.x key layout (``backbone.conv_encoder``,
  ``fc1``, ``out_proj``) and the 5.x one (``backbone.model``, ``mlp.fc1``, ``o_proj``), with a timm or
  a Hugging Face ResNet backbone. Read without transformers installed.
- fundamentalvision/Deformable-DETR checkpoints (``model`` entry, keys ``backbone.0.body...``,
  ``transformer...``, ``class_embed.N``, ``bbox_embed.N``).
- IDEA-Research/DINO checkpoints: what the oddetr DINO preset has; the rest is reported as unmapped.

Every converter returns ``overrides``: the architecture the weights were trained with, shaped like
:class:`~oddetr.config.ModelConfig` (``{"d_model": 256, "backbone": {"name": "resnet50"}, ...}``),
which :func:`check_architecture` compares with a config.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oddetr.errors import CheckpointError, ConfigError

__all__ = [
    "adapt_num_classes", "check_architecture", "class_dependent_keys", "convert_hf_deformable_detr",
    "convert_official_deformable_detr", "convert_official_dino", "load_hf_pretrained", "overrides_as_keys",
    "read_official_checkpoint", "to_official_layout",
]

# architecture keys compared between a config and the weights (ModelConfig names, backbone nested)
ARCH_KEYS = ("arch", "d_model", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_feature_levels",
             "enc_points", "dec_points", "num_queries", "box_refine", "two_stage", "backbone.name")

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
_OFFICIAL_ALIASES = [
    ("transformer.decoder.class_embed.{i}.", "class_heads.{i}."),
    ("transformer.decoder.bbox_embed.{i}.", "bbox_heads.{i}."),
]

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


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for src, dst in rules:
        regex = re.escape(src).replace(re.escape("{i}"), r"(\d+)")
        m = re.match(regex, key)
        if m:
            return (dst.replace("{i}", m.group(1)) if m.groups() else dst) + key[m.end():]
    return None


def _apply_rules(state: Mapping[str, Tensor], rules, aliases=()) -> tuple[dict[str, Tensor], list[str]]:
    """Rename ``state`` by ``rules``; ``aliases`` name duplicates, used where the main name is absent.

    Returns the renamed dict and the source keys no rule covers (or aliases holding other values).
    """
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    duplicates: dict[str, tuple[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = _rename(key, rules)
        if new is not None:
            out[new] = value
            continue
        new = _rename(key, list(aliases))
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


def _swap_xy_blocks(weight: Tensor) -> Tensor:
    """Proposal-embedding projection: inputs ordered (x, y, w, h) <-> oddetr's (y, x, w, h) sine order.

    weight: (out, 4 * F); swaps the first two column blocks of F (an involution).
    """
    f = weight.shape[1] // 4
    return torch.cat([weight[:, f:2 * f], weight[:, :f], weight[:, 2 * f:]], 1)


def _fix_proposal_projection(state: dict[str, Tensor]) -> None:
    key = "proposal_to_query.0.weight"
    if key in state:
        state[key] = _swap_xy_blocks(state[key])


def _layer_count(state: Mapping[str, Tensor], prefix: str) -> int:
    regex = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def _resnet_name(state: Mapping[str, Tensor], prefix: str) -> str | None:
    """resnet18/34/50/101 from a torchvision-layout backbone state dict (``prefix`` + ``layer3.N.conv3``)."""
    blocks = _layer_count(state, prefix + "layer3.")
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    return {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50",
            (23, True): "resnet101"}.get((blocks, bottleneck))


# ------------------------------------------------------------------ Hugging Face


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
    renamed, unmapped = _apply_rules(rest, _HF_RULES, _HF_ALIASES)
    out.update(renamed)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unmapped.append(f"model.decoder.layers.{layer}.self_attn.*_proj.{kind}")
            continue
        out[f"decoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unmapped:
        raise CheckpointError(f"Hugging Face weights: keys with no oddetr counterpart: {_first(sorted(unmapped))}")
    heads = overrides["dec_layers"] + (1 if overrides["two_stage"] else 0)
    for prefix in ("class_heads", "bbox_heads"):
        shared = {k[len(f"{prefix}.0."):]: v for k, v in out.items() if k.startswith(f"{prefix}.0.")}
        for i in range(1, heads):
            if not any(k.startswith(f"{prefix}.{i}.") for k in out):
                out.update({f"{prefix}.{i}.{suffix}": v for suffix, v in shared.items()})
    _fix_proposal_projection(out)
    return overrides, out


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """A ``.safetensors`` file as tensors (the ``safetensors`` package when installed, else a small reader)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        return _read_safetensors_plain(path)
    return load_file(str(path), device="cpu")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors_plain(path: Path) -> dict[str, Tensor]:
    """The safetensors format without the package: u64 header size, JSON header, little-endian data."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    body = memoryview(data)[8 + size:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                               ("pytorch_model.bin.index.json", _torch_load_tensors)):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(reader(directory / shard))
            return state
    if (directory / "model.safetensors").is_file():
        return _read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _torch_load_tensors(directory / "pytorch_model.bin")
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


# ------------------------------------------------------------------ official checkpoints


def _torch_load_tensors(path: Path) -> dict[str, Any]:
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
    return _torch_load_tensors(path)


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
        "enc_layers": _layer_count(state, "transformer.encoder.layers."),
        "dec_layers": _layer_count(state, "transformer.decoder.layers."),
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
    name = _resnet_name(state, "backbone.0.body.")
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
    out, unmapped = _apply_rules(state, OFFICIAL_RULES, _OFFICIAL_ALIASES)
    _fix_proposal_projection(out)
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
    out, unmapped = _apply_rules(state, rules, _OFFICIAL_ALIASES)
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
    n = _layer_count(state_dict, "decoder.layers.")
    rules = DINO_RULES if dino else OFFICIAL_RULES
    inverse = [(ours, theirs) for theirs, ours in rules]
    if dino:
        inverse = [(f"class_heads.{n}.", "transformer.enc_out_class_embed."),
                   (f"bbox_heads.{n}.", "transformer.enc_out_bbox_embed.")] + inverse
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = _rename(key, inverse)
        if new is None:
            continue
        out[new] = _swap_xy_blocks(value) if key == "proposal_to_query.0.weight" else value
        if (box_refine and new.startswith("bbox_embed.")) or (dino and new.startswith("class_embed.")):
            out["transformer.decoder." + new] = value
    return out


# ------------------------------------------------------------------ fine-tuning helpers


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


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
