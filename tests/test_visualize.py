"""draw_detections draws boxes and captions and leaves the rest of the image alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from oddetr.visualize import class_color, draw_detections


def _gray(w: int = 128, h: int = 96) -> Image.Image:
    return Image.new("RGB", (w, h), (128, 128, 128))


def test_draws_box_edge_and_leaves_far_pixels() -> None:
    img = _gray()
    out = draw_detections(img, torch.tensor([[40.0, 40.0, 80.0, 70.0]]), ["cat"], torch.tensor([0.87]))
    assert out.size == img.size and out is not img
    a, b = np.asarray(img), np.asarray(out)
    assert (a == 128).all()  # input untouched
    edge = b[55, 40]  # left edge of the box, below the caption
    assert tuple(edge) == class_color("cat")
    assert (b[60, 60] == 128).all()  # box interior
    assert (b[90, 5] == 128).all() and (b[5, 120] == 128).all()  # far away
    assert (b[30:40, 40:80] != 128).any()  # caption above the box


def test_threshold_and_inputs() -> None:
    img = _gray()
    boxes = np.array([[10, 10, 50, 50], [60, 20, 100, 80]], dtype=np.float32)
    out = np.asarray(draw_detections(img, boxes, ["a", "b"], [0.2, 0.9], score_threshold=0.5))
    assert (out[30, 10] == 128).all()  # low-score box not drawn
    assert tuple(out[60, 60]) == class_color("b")
    # nothing to draw: identical pixels
    empty = draw_detections(img, torch.zeros(0, 4), [], torch.zeros(0))
    assert np.array_equal(np.asarray(empty), np.asarray(img))
    gray_l = Image.new("L", (64, 64), 0)
    assert draw_detections(gray_l, [[1, 1, 30, 30]], ["x"], [1.0]).mode == "RGB"
    with pytest.raises(ValueError):
        draw_detections(img, boxes, ["a"], [0.2, 0.9])


def test_class_color_deterministic_and_distinct() -> None:
    assert class_color("person") == class_color("person")
    assert class_color("person") != class_color("car")
    assert all(0 <= c <= 255 for c in class_color("dog"))
