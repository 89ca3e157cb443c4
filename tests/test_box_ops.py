"""Box conversions and paired overlaps against torchvision.ops."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from oddetr.box_ops import (
    cxcywh_to_xyxy,
    inverse_sigmoid,
    paired_giou,
    paired_iou,
    scale_boxes,
    xyxy_to_cxcywh,
)


def _random_xyxy(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 0.8
    wh = torch.rand(n, 2, generator=gen) * 0.5 + 1e-3
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("seed", range(4))
def test_paired_overlaps_match_torchvision_diagonals(seed):
    a, b = _random_xyxy(64, seed), _random_xyxy(64, seed + 100)
    # identical, nested, touching and disjoint pairs too
    extra_a = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.1, 0.1]])
    extra_b = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.2, 0.3, 0.4, 0.5], [0.2, 0.0, 0.4, 0.2], [0.8, 0.9, 1.0, 1.0]])
    a, b = torch.cat([a, extra_a]), torch.cat([b, extra_b])
    torch.testing.assert_close(paired_iou(a, b), box_iou(a, b).diagonal(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paired_giou(a, b), generalized_box_iou(a, b).diagonal(), atol=1e-5, rtol=1e-5)
    assert (paired_giou(a, b) <= paired_iou(a, b) + 1e-7).all()
    assert paired_iou(a, b)[-4:].tolist() == pytest.approx([1.0, 0.04, 0.0, 0.0], abs=1e-5)  # eps=1e-7 in the union


def test_paired_giou_gradient_is_finite_for_identical_boxes():
    a = _random_xyxy(8, 3).requires_grad_(True)
    paired_giou(a, a.detach().clone()).sum().backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("shape", [(10, 4), (3, 5, 4), (2, 3, 4, 4)])
def test_conversions_match_box_convert_and_round_trip(shape):
    gen = torch.Generator().manual_seed(0)
    cxcywh = torch.rand(*shape, generator=gen)
    xyxy = cxcywh_to_xyxy(cxcywh)
    assert xyxy.shape == cxcywh.shape
    expected = box_convert(cxcywh.reshape(-1, 4), "cxcywh", "xyxy").reshape(shape)
    torch.testing.assert_close(xyxy, expected)
    back = xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(back, box_convert(xyxy.reshape(-1, 4), "xyxy", "cxcywh").reshape(shape))
    torch.testing.assert_close(back, cxcywh, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-6, rtol=1e-6)


def test_hand_conversion():
    assert cxcywh_to_xyxy(torch.tensor([[0.5, 0.4, 0.2, 0.6]]))[0].tolist() == pytest.approx([0.4, 0.1, 0.6, 0.7])
    assert xyxy_to_cxcywh(torch.tensor([[10.0, 20.0, 30.0, 60.0]])).tolist() == [[20.0, 40.0, 20.0, 40.0]]


def test_inverse_sigmoid_and_scale_boxes():
    x = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(inverse_sigmoid(x).sigmoid(), x, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0, -0.5, 1.5]))).all()
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 1.0]], [[1.0, 1.0, 1.0, 1.0]]])
    sizes = torch.tensor([[100, 200], [30, 40]])  # (h, w)
    expected = torch.tensor([[[20.0, 20.0, 100.0, 100.0]], [[40.0, 30.0, 40.0, 30.0]]])
    torch.testing.assert_close(scale_boxes(boxes, sizes), expected)
