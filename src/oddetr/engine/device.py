"""Pick the torch device from the ``device`` config key (shared by training and inference)."""

from __future__ import annotations

import torch

from oddetr.engine import distributed as dist
from oddetr.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` (this rank's GPU if CUDA is available, else CPU), ``cpu`` or ``cuda[:N]``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'device' got {name!r}, expected auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda requested but CUDA is not available")
    return device
