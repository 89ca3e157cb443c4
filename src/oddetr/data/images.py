"""Image loading: the one place where image files are opened and decoded."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from oddetr.errors import DataError

__all__ = ["load_image", "read_image_size"]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _where(path: str | Path, image_id: int | None) -> str:
    return f"{path}" if image_id is None else f"{path} (image id {image_id})"


def load_image(path: str | Path, image_id: int | None = None) -> Image.Image:
    """Open and fully decode an image file as an RGB PIL image.

    The full decode (``img.load()``) makes truncated or corrupt files fail here, with a one-line
    ``DataError`` naming the file and the image id, rather than later inside a transform.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as err:  # any decoder failure is a data problem, whatever PIL raises
        raise DataError(f"corrupt or unreadable image {_where(path, image_id)}: {_one_line(err)}") from err


def read_image_size(path: str | Path, image_id: int | None = None) -> tuple[int, int]:
    """Return ``(width, height)`` from the image header only (no decode)."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as err:
        raise DataError(f"corrupt or unreadable image {_where(path, image_id)}: {_one_line(err)}") from err
