"""Batching images of different sizes: zero padding at the bottom/right plus a padding mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate_detection"]


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Pad a list of ``(image (3, H_i, W_i), target)`` into one batch.

    Returns ``images`` (B, 3, H_max, W_max) float with zeros bottom/right of each image, ``masks``
    (B, H_max, W_max) bool, True on padding, and the targets as a list (boxes stay normalised to each
    image's own unpadded ``size``).
    """
    if len(batch) == 0:
        raise ValueError("collate_detection got an empty batch")
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    height = max(img.shape[-2] for img in images)
    width = max(img.shape[-1] for img in images)
    channels = images[0].shape[0]
    out = images[0].new_zeros((len(images), channels, height, width))
    masks = torch.ones((len(images), height, width), dtype=torch.bool)
    for k, img in enumerate(images):
        h, w = img.shape[-2:]
        out[k, :, :h, :w].copy_(img)
        masks[k, :h, :w] = False
    return out, masks, targets
