"""Convolutional backbones (torchvision ResNets and MobileNets) returning multi-scale feature maps.

Models are built from ``torchvision.models`` with ``weights=None`` (nothing is ever
downloaded); pretrained weights come from a local torchvision state-dict file.

Stages and ``trainable_layers``: a backbone's blocks are grouped by output stride into
five stages, stride 2 (ResNet stem ``conv1``/``bn1``), 4 (``layer1``), 8 (``layer2``),
16 (``layer3``) and 32 (``layer4``); ``trainable_layers=k`` trains the last ``k`` stages
and freezes the others (``requires_grad=False``). For ResNets this is torchvision's
``trainable_layers`` (3: ``layer2..layer4``; 5: everything, stem included). MobileNet
``features`` blocks are grouped the same way by their output stride.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from oddetr.errors import CheckpointError, ConfigError

__all__ = ["BACKBONE_NAMES", "Backbone", "BackbonePrefix", "downsample_mask", "load_torchvision_weights"]

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
MOBILENETS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
BACKBONE_NAMES: tuple[str, ...] = RESNETS + MOBILENETS
NORMS = ("frozen_bn", "bn")
STAGE_STRIDES = (2, 4, 8, 16, 32)
_HEAD_PREFIXES = ("fc", "classifier")  # torchvision classifier keys, ignored when loading weights
_PROBE_SIZE = 64


def _build_torchvision_model(name: str, norm: str) -> nn.Module:
    """Build ``torchvision.models.<name>`` without weights, with frozen or ordinary batch norm."""
    if norm == "frozen_bn":
        # MobileNetV3 uses BN eps=1e-3 (its default norm layer); keep it so pretrained weights match
        norm_layer = (
            partial(FrozenBatchNorm2d, eps=1e-3) if name.startswith("mobilenet_v3") else FrozenBatchNorm2d
        )
        return getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    return getattr(torchvision.models, name)(weights=None)


def _feature_blocks(name: str, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's feature blocks in execution order (classifier / pooling left out)."""
    if name in RESNETS:
        return [(n, m) for n, m in model.named_children() if n not in ("avgpool", "fc")]
    return list(model.features.named_children())


def _is_head_key(key: str) -> bool:
    return key.split(".", 1)[0] in _HEAD_PREFIXES


def _first(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def load_torchvision_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load a local torchvision state-dict file into ``model`` (classifier keys ignored).

    Raises:
        CheckpointError: the file is missing or unreadable, holds no state dict of tensors,
            or has missing / unexpected / wrongly shaped keys (naming the first few).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any read failure means a bad checkpoint for the user
        raise CheckpointError(
            f"{path}: cannot read backbone weights as a torch state dict of tensors ({type(e).__name__})"
        ) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        got = (
            f"a dict with keys {_first(sorted(map(str, state)))}"
            if isinstance(state, Mapping)
            else type(state).__name__
        )
        raise CheckpointError(
            f"{path}: expected a torchvision state dict (name -> tensor) for {name}, got {got}"
        )
    # BatchNorm's step counter is neither needed nor always saved (FrozenBatchNorm2d has none): ignored both ways
    def kept(key: str) -> bool:
        return not key.endswith("num_batches_tracked") and not _is_head_key(key)

    state = {k: v for k, v in state.items() if kept(k)}
    own = {k: v for k, v in model.state_dict().items() if kept(k)}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise CheckpointError(f"{path}: weights do not fit backbone {name}; " + "; ".join(parts))
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
    ]
    if bad:
        raise CheckpointError(f"{path}: weights do not fit backbone {name}; shape mismatch: {_first(bad, 3)}")
    model.load_state_dict(state, strict=False)


@dataclass(frozen=True)
class BackbonePrefix:
    """The first ``blocks`` blocks' output ``x`` (B, C, h, w) and the returned maps among them."""

    blocks: int
    x: Tensor
    outs: tuple[Tensor, ...] = ()


class Backbone(nn.Module):
    """A torchvision CNN returning the last block output at each requested stride.

    Attributes:
        num_channels: channels of each returned map, in ``return_strides`` order.
        strides: the strides of the returned maps (= ``return_strides``).
    """

    def __init__(
        self,
        name: str,
        return_strides: Sequence[int] = (8, 16, 32),
        weights: str | Path | None = None,
        trainable_layers: int = 3,
        norm: str = "frozen_bn",
    ) -> None:
        """
        Args:
            name: one of ``BACKBONE_NAMES``.
            return_strides: strictly increasing strides among 2, 4, 8, 16, 32.
            weights: path to a local torchvision state-dict file (e.g. ``resnet50-0676ba61.pth``)
                or None for random initialisation.
            trainable_layers: 0..5, how many of the last stages train (see the module docstring).
            norm: ``"frozen_bn"`` (torchvision ``FrozenBatchNorm2d``, the DETR default) or ``"bn"``
                (ordinary ``BatchNorm2d``; its running statistics update in train mode even in
                frozen stages).

        Raises:
            ConfigError: unknown name or norm, bad strides or trainable_layers.
            CheckpointError: see :func:`load_torchvision_weights`.
        """
        super().__init__()
        if name not in BACKBONE_NAMES:
            raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}")
        if norm not in NORMS:
            raise ConfigError(f"unknown backbone norm {norm!r}; valid: {', '.join(NORMS)}")
        if not (isinstance(trainable_layers, int) and 0 <= trainable_layers <= len(STAGE_STRIDES)):
            raise ConfigError(f"backbone trainable_layers must be an int in 0..5, got {trainable_layers!r}")
        return_strides = [int(s) for s in return_strides]
        if (
            not return_strides
            or any(s not in STAGE_STRIDES for s in return_strides)
            or any(a >= b for a, b in zip(return_strides, return_strides[1:]))
        ):
            raise ConfigError(
                f"backbone return_strides must be strictly increasing values from {STAGE_STRIDES}, "
                f"got {tuple(return_strides)}"
            )

        model = _build_torchvision_model(name, norm)
        if weights is not None:
            load_torchvision_weights(model, weights, name)
        blocks = _feature_blocks(name, model)
        block_strides, block_channels = _probe(blocks)

        # the last block at each requested stride is returned
        return_names: list[str] = []
        self.num_channels: list[int] = []
        for stride in return_strides:
            idx = max(i for i, s in enumerate(block_strides) if s == stride)
            return_names.append(blocks[idx][0])
            self.num_channels.append(block_channels[idx])
        self.strides: list[int] = list(return_strides)
        self.name = name
        self._return_names = return_names
        last = max(i for i, (n, _) in enumerate(blocks) if n in return_names)
        self.body = nn.ModuleDict(blocks[: last + 1])

        first_trainable_stride = (
            STAGE_STRIDES[len(STAGE_STRIDES) - trainable_layers] if trainable_layers else None
        )
        for (_, block), stride in zip(self.body.items(), block_strides):
            train = first_trainable_stride is not None and stride >= first_trainable_stride
            for p in block.parameters():
                p.requires_grad_(train)
        # Channels-last (NHWC) weights and inputs: oneDNN's convolutions and pooling run faster so on
        # CPU, forward and backward (ResNet-18 at 256 px: 0.78x frozen, 0.9x trained; docs/RESULTS.md)
        self.body.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor, prefix: BackbonePrefix | None = None) -> list[Tensor]:
        """images: (B, 3, H, W) normalised -> one (B, C_l, ~H/s_l, ~W/s_l) map per stride ``s_l``.

        ``prefix``: the output of the first blocks for these images (:meth:`frozen_prefix`), to go on from.
        """
        outs: list[Tensor] = [] if prefix is None else list(prefix.outs)
        x = _channels_last(images) if prefix is None else prefix.x
        start = 0 if prefix is None else prefix.blocks
        for i, (name, block) in enumerate(self.body.items()):
            if i < start:
                continue
            x = block(x)
            if name in self._return_names:
                outs.append(x)
        return outs

    def fuse_norms(self) -> int:
        """Fold every batch norm into the convolution before it, for inference; returns how many.

        In eval mode a batch norm (``FrozenBatchNorm2d``, or ``BatchNorm2d`` with its running
        statistics) is a per-channel affine map, so ``conv -> norm`` equals one convolution with
        scaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``); the norm becomes
        ``nn.Identity``. Outputs change by float rounding only, and the pass skips one read and write
        of every normalised feature map. The torchvision backbones here register each norm right
        after the convolution that feeds it (``convK``/``bnK``, ``downsample``, ``Conv2dNormActivation``),
        which is the pattern matched. Irreversible: the state dict loses the norms' keys, so fuse
        only a model loaded for evaluation, prediction or export, never one that trains or saves.

        Raises:
            RuntimeError: a ``BatchNorm2d`` is in train mode (it would normalise by batch statistics).
        """
        fused = 0
        for parent in self.body.modules():
            names = list(parent._modules)
            for conv_name, norm_name in zip(names, names[1:]):
                conv, norm = parent._modules[conv_name], parent._modules[norm_name]
                if not (isinstance(conv, nn.Conv2d) and isinstance(norm, (FrozenBatchNorm2d, nn.BatchNorm2d))):
                    continue
                if norm.training and isinstance(norm, nn.BatchNorm2d):
                    raise RuntimeError("fuse_norms needs the backbone in eval mode (BatchNorm2d in train mode)")
                weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                    norm.eps, norm.weight, norm.bias)
                conv.weight = nn.Parameter(weight.detach().contiguous(memory_format=torch.channels_last),
                                           requires_grad=False)
                conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
                parent._modules[norm_name] = nn.Identity()
                fused += 1
        return fused

    def frozen_blocks(self) -> int:
        """How many leading blocks compute a fixed function: no trainable parameter and no batch
        statistics (``BatchNorm2d``, which differs between train and eval mode). A frozen EMA teacher
        and its student compute the same output there (the EMA of a constant is that constant)."""
        n = 0
        for block in self.body.values():
            if any(p.requires_grad for p in block.parameters()) or \
                    any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules()):
                break
            n += 1
        return n

    @torch.no_grad()
    def frozen_prefix(self, images: Tensor) -> BackbonePrefix | None:
        """The output of the :meth:`frozen_blocks` for images (B, 3, H, W); None if there are none."""
        n = self.frozen_blocks()
        if n == 0:
            return None
        x, outs = _channels_last(images), []
        for name, block in list(self.body.items())[:n]:
            x = block(x)
            if name in self._return_names:
                outs.append(x)
        return BackbonePrefix(n, x, tuple(outs))


def _channels_last(images: Tensor) -> Tensor:
    """(B, C, H, W) in channels-last memory order (the same tensor if it already is)."""
    return images.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def _probe(blocks: list[tuple[str, nn.Module]]) -> tuple[list[int], list[int]]:
    """Output stride and channels of each block, measured with one small dummy forward pass."""
    modes = [m.training for _, m in blocks]
    strides, channels = [], []
    x = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE)
    try:
        for _, m in blocks:
            m.eval()
            x = m(x)
            strides.append(_PROBE_SIZE // x.shape[-1])
            channels.append(x.shape[1])
    finally:
        for (_, m), mode in zip(blocks, modes):
            m.train(mode)
    return strides, channels


def downsample_mask(mask: Tensor, size: tuple[int, int] | Sequence[int]) -> Tensor:
    """Resize a padding mask with nearest interpolation, as DETR does.

    Args:
        mask: (B, H, W) bool, True at padded pixels.
        size: target ``(h, w)``.

    Returns:
        (B, h, w) bool.
    """
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].bool()
