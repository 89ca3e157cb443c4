"""Evaluation: COCO box AP (faster-coco-eval), matching instability, and plots."""

from oddetr.evaluation.coco_eval import (
    METRIC_NAMES,
    CocoEvaluator,
    detections_from_predictions,
    evaluate_coco,
)
from oddetr.evaluation.instability import assignment_map, instability, select_probe_indices
from oddetr.evaluation.plots import DEFAULT_KEY_GROUPS, plot_curves, plot_metrics, read_metrics

__all__ = [
    "DEFAULT_KEY_GROUPS",
    "METRIC_NAMES",
    "CocoEvaluator",
    "assignment_map",
    "detections_from_predictions",
    "evaluate_coco",
    "instability",
    "plot_curves",
    "plot_metrics",
    "read_metrics",
    "select_probe_indices",
]
