"""``oddetr eval``'s output folder: ``eval.json``, ``results.json``, ``per_class.json`` and ``pr_curve.png``.

- ``eval.json``: what was evaluated (checkpoint, weights, epoch, validation data) and the COCO metrics;
- ``results.json``: COCO result dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with the
  dataset's own image and category ids (re-scorable with any COCO evaluator against the ground truth);
- ``per_class.json``: per class ``{"class", "category_id", "num_gt", "AP", "AP50", "AP75"}``;
- ``pr_curve.png``: precision-recall curves per class and their mean.

A folder already holding another evaluation (another checkpoint, weights or data) is refused unless
``overwrite=true``; evaluating the same thing again refreshes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oddetr.errors import ConfigError
from oddetr.evaluation.coco_eval import cocoeval_metrics, run_cocoeval
from oddetr.evaluation.per_class import per_class_ap, plot_pr_curves

EVAL_FILES = ("eval.json", "results.json", "per_class.json", "pr_curve.png")


def default_eval_dir(checkpoint: str | Path) -> Path:
    """``RUN/eval/<checkpoint stem>``: ``runs/a/best.pt`` -> ``runs/a/eval/best``."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / "eval" / checkpoint.stem


def prepare_eval_dir(out: Path, manifest: dict[str, Any], overwrite: bool = False) -> None:
    """Create ``out``; refuse (ConfigError) if it holds an evaluation other than ``manifest``'s."""
    existing = [name for name in EVAL_FILES if (out / name).exists()]
    if existing and not overwrite:
        try:
            previous = json.loads((out / "eval.json").read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or {k: previous.get(k) for k in manifest} != manifest:
            what = previous.get("checkpoint") if isinstance(previous, dict) else f"files {existing}"
            raise ConfigError(f"output={out} already holds another evaluation ({what}); give another output=DIR "
                              "or overwrite=true")
    out.mkdir(parents=True, exist_ok=True)


@dataclass
class EvalReport:
    metrics: dict[str, float]  # METRIC_NAMES
    per_class: list[dict[str, Any]]  # per_class_ap rows
    files: list[Path]


def write_eval_outputs(out: Path, coco_gt: dict[str, Any], detections: list[dict[str, Any]],
                       manifest: dict[str, Any]) -> EvalReport:
    """Score ``detections`` against ``coco_gt`` (faster-coco-eval) and write the four files into ``out``."""
    ev = run_cocoeval(coco_gt, detections)
    metrics = cocoeval_metrics(ev)
    rows = per_class_ap(ev, coco_gt)
    files = [out / name for name in EVAL_FILES]
    files[0].write_text(json.dumps({**manifest, "metrics": metrics}, indent=1))
    files[1].write_text(json.dumps(detections))
    files[2].write_text(json.dumps(rows, indent=1))
    plot_pr_curves(ev, {r["category_id"]: r["class"] for r in rows}, files[3])
    return EvalReport(metrics, rows, files)
