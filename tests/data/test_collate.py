"""collate_detection: zero padding at the bottom/right and a mask that is True exactly on padding."""

from __future__ import annotations

import pytest
import torch

from oddetr.data import collate_detection


def test_padding_and_masks():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 6, 3)
    targets = [{"image_id": 1}, {"image_id": 2}]
    images, masks, out_targets = collate_detection([(a, targets[0]), (b, targets[1])])
    assert images.shape == (2, 3, 6, 5) and images.dtype == torch.float32
    assert masks.shape == (2, 6, 5) and masks.dtype == torch.bool
    assert out_targets == targets
    assert torch.equal(images[0, :, :4, :5], a) and torch.equal(images[1, :, :6, :3], b)
    assert images[0, :, 4:].abs().sum() == 0 and images[1, :, :, 3:].abs().sum() == 0
    expected = torch.ones(2, 6, 5, dtype=torch.bool)
    expected[0, :4, :5] = False
    expected[1, :6, :3] = False
    assert torch.equal(masks, expected)


def test_same_sizes_have_no_padding():
    images, masks, _ = collate_detection([(torch.ones(3, 2, 2), {}), (torch.ones(3, 2, 2), {})])
    assert images.shape == (2, 3, 2, 2) and not masks.any()


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError):
        collate_detection([])
