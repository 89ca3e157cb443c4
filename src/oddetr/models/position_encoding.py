"""Sine positional encodings: for feature maps (DETR / Deformable-DETR) and for boxes (DAB-DETR).

Both use the DETR frequency layout: for ``n`` features per coordinate ``c`` (already scaled),
feature ``2i`` is ``sin(c / T**(2i/n))`` and feature ``2i+1`` is ``cos(c / T**(2i/n))``
(sin and cos interleaved, each frequency used by one sin/cos pair).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "sine_embed"]


def _sine(coords: Tensor, num_feats: int, temperature: float) -> Tensor:
    """coords: (...) already scaled -> (..., num_feats) interleaved sin/cos."""
    dim_t = torch.arange(num_feats, dtype=coords.dtype, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-d sine embedding of a padded feature map, computed from the padding mask.

    Positions count valid (non-padded) pixels cumulatively along y and x, so the embedding
    of a valid pixel depends only on the valid area (bottom/right padding, as DETR pads).
    With ``normalize`` (Deformable-DETR's setting), the count ``c`` of pixel ``k`` (1-based)
    along an axis with ``n`` valid pixels becomes ``(c + offset) / (n + 1e-6) * scale``,
    i.e. pixel centres ``(k - 0.5) / n * 2*pi`` with the default ``offset=-0.5``.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = -0.5,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = 1e-6

    def forward(self, mask: Tensor) -> Tensor:
        """mask: (B, H, W) bool, True at padded pixels -> (B, 2 * num_pos_feats, H, W) float32.

        Channels ``[:num_pos_feats]`` encode y, ``[num_pos_feats:]`` encode x.
        """
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        pos_y = _sine(y, self.num_pos_feats, self.temperature)  # (B, H, W, F)
        pos_x = _sine(x, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2).contiguous()


def sine_embed(coords: Tensor, num_feats_per_coord: int = 128, temperature: float = 10000) -> Tensor:
    """Sine embedding of normalised points or boxes, as DAB-DETR's ``gen_sineembed_for_position``.

    Each coordinate ``c`` in [0, 1] is scaled by ``2*pi`` and embedded with interleaved sin/cos
    (module docstring). Output order puts y before x: for ``k == 2`` (x, y) gives ``(y, x)``;
    for ``k == 4`` (cx, cy, w, h) gives ``(y, x, w, h)``; further coordinates keep their order.

    Args:
        coords: (..., k) normalised coordinates, e.g. reference points (B, Q, 2) or boxes (B, Q, 4) cxcywh.
        num_feats_per_coord: features per coordinate (even).
        temperature: frequency base ``T``.

    Returns:
        (..., k * num_feats_per_coord), in ``coords``' dtype promoted to at least float32.
    """
    if num_feats_per_coord % 2:
        raise ValueError(f"num_feats_per_coord must be even, got {num_feats_per_coord}")
    coords = coords.to(torch.promote_types(coords.dtype, torch.float32))
    k = coords.shape[-1]
    order = [1, 0, *range(2, k)] if k >= 2 else [0]
    parts = [_sine(coords[..., i] * (2 * math.pi), num_feats_per_coord, temperature) for i in order]
    return torch.cat(parts, dim=-1)
