"""labels.png and train_batch.png: boxes land where they should, bars are as tall as the counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from oddetr.data.preview import plot_labels, plot_train_batch
from oddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oddetr.visualize import class_color

GREY = 128


def _grey_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two grey images, 32x48 (h x w) and 48x40, padded to (2, 3, 48, 48), with their padding masks."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    images = torch.zeros(2, 3, 48, 48)
    masks = torch.ones(2, 48, 48, dtype=torch.bool)
    for k, (h, w) in enumerate([(32, 48), (48, 40)]):
        images[k, :, :h, :w] = (GREY / 255 - mean) / std
        masks[k, :h, :w] = False
    return images, masks


def _colour_mask(pixels: np.ndarray, colour: tuple[int, int, int], tol: int = 0) -> np.ndarray:
    return (np.abs(pixels[..., :3].astype(int) - np.array(colour)) <= tol).all(-1)


def test_train_batch_draws_the_boxes_where_they_are(tmp_path):
    images, masks = _grey_batch()
    # image 0 (w 48, h 32): one "ship" box xyxy [8, 8, 24, 24] -> cxcywh / (w, h, w, h)
    box = torch.tensor([[16 / 48, 16 / 32, 16 / 48, 16 / 32]])
    targets = [{"boxes": box, "labels": torch.tensor([1]), "image_id": 7, "size": torch.tensor([32, 48])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 8,
                "size": torch.tensor([48, 40])}]
    path = plot_train_batch(images, masks, targets, ["plane", "ship"], tmp_path / "batch.png", tile=240)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    scale, off = 240 / 48, 4  # tiles are scaled to 240 px and start 4 px from the sheet's corner
    x0, y0, x1, y1 = (off + v * scale for v in (8, 8, 24, 24))
    ship = _colour_mask(pixels, class_color("ship"))
    inside = ship[int(y0):int(y1) + 1, int(x0):int(x1) + 1]
    for edge in (inside[:, :2], inside[:, -2:], inside[:2], inside[-2:]):  # 2 px outline on all four sides
        assert edge.mean() > 0.95
    assert _colour_mask(pixels[int(y0) + 10:int(y1) - 10, int(x0) + 10:int(x1) - 10], (GREY,) * 3, 1).all()
    outside = ship.copy()
    outside[int(y0) - 20:int(y1) + 2, int(x0) - 2:int(x1) + 80] = False  # the box and its caption
    assert not outside.any()  # no other ship box drawn, nothing on image 8
    # image 0 is 32 px tall inside a 48 px batch: its bottom third is padding, drawn dark
    assert _colour_mask(pixels[off + 40 * 5:off + 47 * 5, off + 5:off + 200], (40, 40, 40)).all()
    assert not _colour_mask(pixels[off + 5:off + 30 * 5, off + 5:off + 7], (40, 40, 40)).any()


def test_labels_png_bars_follow_the_counts(tmp_path):
    labels = np.array([0, 0, 0, 1])
    arrays = {"labels": labels, "wh_resized": np.array([[10.0, 12], [20, 20], [30, 15], [5, 5]]),
              "centres": np.array([[0.2, 0.2], [0.5, 0.5], [0.8, 0.3], [0.1, 0.9]])}
    path = plot_labels(arrays, ["plane", "ship"], tmp_path / "labels.png", image_size=64, finest_stride=8)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300
    plane = _colour_mask(pixels, class_color("plane"), 1).sum()
    ship = _colour_mask(pixels, class_color("ship"), 1).sum()
    assert ship > 500 and plane / ship == pytest.approx(3.0, rel=0.1)


def test_plots_of_an_empty_split(tmp_path):
    arrays = {"labels": np.zeros(0, np.int64), "wh_resized": np.zeros((0, 2)), "centres": np.zeros((0, 2))}
    assert plot_labels(arrays, ["plane"], tmp_path / "labels.png", 64, 8).is_file()
