"""DETR transforms: flips, resizes and crops move boxes exactly like the pixels (manual oracles)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from oddetr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionTransform,
    RandomSizeCrop,
    build_transforms,
    shortest_side_size,
)

BOXES = torch.tensor([[2.0, 3.0, 12.0, 9.0], [30.0, 10.0, 38.0, 30.0], [0.0, 0.0, 40.0, 32.0]])


def _boxes(h: int, w: int, boxes: torch.Tensor = BOXES) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(h, w))


def _coordinate_image(h: int, w: int) -> Image.Image:
    """Red channel = x, green = y: any crop or flip can be read back from the pixels."""
    xs = torch.arange(w).expand(h, w)
    ys = torch.arange(h)[:, None].expand(h, w)
    return Image.fromarray(torch.stack([xs, ys, torch.zeros_like(xs)], -1).to(torch.uint8).numpy(), "RGB")


def _denormalise(image: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255).round()


def test_train_flip_maps_x_to_width_minus_x():
    transform = build_transforms(True, scales=[32], max_size=1000, crop=False)
    labels = torch.tensor([0, 1, 2])
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        image, boxes, out_labels = transform(_coordinate_image(32, 40), _boxes(32, 40), labels)
        assert image.shape == (3, 32, 40) and image.dtype == torch.float32
        assert torch.equal(out_labels, labels)
        flipped = _denormalise(image)[0, 0, 0].item() == 39  # top-left pixel came from x = W - 1
        seen.add(flipped)
        expected = BOXES[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([40, 0, 40, 0])
        torch.testing.assert_close(boxes.as_subclass(torch.Tensor), expected if flipped else BOXES)
    assert seen == {True, False}


def test_eval_resize_sizes_and_boxes():
    # (h, w) = (32, 40): shorter side to 64 -> 64 x 80, under max_size 100
    image, boxes, _ = build_transforms(False, [48, 64], 100)(
        _coordinate_image(32, 40), _boxes(32, 40), torch.arange(3)
    )
    assert image.shape == (3, 64, 80)
    torch.testing.assert_close(boxes.as_subclass(torch.Tensor), BOXES * 2)
    # longer side capped: 32 x 40 -> shorter 64 would make 80 > 70, so scale = 70 / 40
    image, boxes, _ = build_transforms(False, [64], 70)(
        _coordinate_image(32, 40), _boxes(32, 40), torch.arange(3)
    )
    assert image.shape == (3, 56, 70)
    torch.testing.assert_close(boxes.as_subclass(torch.Tensor), BOXES * 70 / 40)
    # max_size equal to the size is allowed (square images at full size)
    image, _, _ = build_transforms(False, [64], 64)(
        _coordinate_image(32, 32), _boxes(32, 32), torch.arange(3)
    )
    assert image.shape == (3, 64, 64)


@pytest.mark.parametrize(
    ("h", "w", "size", "max_size", "expected"),
    [(480, 640, 128, None, (128, 171)), (100, 300, 50, 120, (40, 120))],
)
def test_shortest_side_size(h, w, size, max_size, expected):
    assert shortest_side_size(h, w, size, max_size) == expected


def test_random_size_crop_moves_clips_and_drops_boxes_with_labels():
    pipeline = DetectionTransform(
        v2.Compose(
            [v2.ToImage(), RandomSizeCrop(20, 28), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
        )
    )
    labels = torch.tensor([5, 6, 7])
    for seed in range(10):
        torch.manual_seed(seed)
        image, boxes, out_labels = pipeline(_coordinate_image(32, 40), _boxes(32, 40), labels)
        h, w = image.shape[-2:]
        assert 20 <= h <= 28 and 20 <= w <= 28
        left, top = int(image[0, 0, 0]), int(image[1, 0, 0])  # the crop's origin, read from the pixels
        shifted = BOXES - torch.tensor([left, top, left, top])
        clipped = torch.stack(
            [
                shifted[:, 0].clamp(0, w),
                shifted[:, 1].clamp(0, h),
                shifted[:, 2].clamp(0, w),
                shifted[:, 3].clamp(0, h),
            ],
            1,
        )
        keep = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
        torch.testing.assert_close(boxes.as_subclass(torch.Tensor), clipped[keep])
        assert torch.equal(out_labels, labels[keep])


def test_train_pipeline_with_crop_gives_valid_sizes_and_boxes():
    transform = build_transforms(
        True, scales=[48, 56, 64], max_size=80, crop_scales=[40, 48], crop_min=24, crop_max=40
    )
    for seed in range(20):
        torch.manual_seed(seed)
        image, boxes, labels = transform(_coordinate_image(32, 40), _boxes(32, 40), torch.arange(3))
        h, w = image.shape[-2:]
        assert min(h, w) in (48, 56, 64) or max(h, w) <= 80
        assert max(h, w) <= 80
        assert len(boxes) == len(labels) >= 1  # the full-image box always survives
        b = boxes.as_subclass(torch.Tensor)
        assert (
            (b[:, 2:] > b[:, :2]).all()
            and (b >= 0).all()
            and (b[:, 0::2] <= w).all()
            and (b[:, 1::2] <= h).all()
        )
        assert tuple(boxes.canvas_size) == (h, w)
