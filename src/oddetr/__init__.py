"""oddetr: DETR-family detectors with OD-DETR online distillation.

``oddetr.Detector`` and ``oddetr.train`` are imported on first use (PEP 562), so that
``import oddetr`` stays light (no torch import until the API is touched).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Detections", "Detector", "__version__", "train"]

if TYPE_CHECKING:
    from oddetr.api import Detections, Detector, train

_LAZY = {"Detector": "oddetr.api", "Detections": "oddetr.api", "train": "oddetr.api"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'oddetr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
