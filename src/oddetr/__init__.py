"""oddetr: DETR-family detectors with OD-DETR online distillation."""

__version__ = "0.1.0"
