"""What the matching instability is made of: swaps between near-duplicate queries, or new queries.

    python benchmarks/convergence.py --part headline --variants baseline OD-DETR --seeds 0 1 2 \\
        --runs runs/conv train.keep_checkpoints=16        # keep every epoch's checkpoint
    python benchmarks/instability_split.py \\
        --runs baseline=runs/conv/headline/deformable-detr-tiny/baseline/seed0,... \\
               OD-DETR=runs/conv/headline/deformable-detr-tiny/OD-DETR/seed0,...

DN-DETR's instability IS(e) counts the probe GTs whose Hungarian-matched query changed since the last
epoch (METHOD.md). For every run's ``epoch_*.pt`` this re-runs the trainer's probe (the same probe images,
batches and matcher, on the student unless ``--weights teacher``) and splits each change in two
(:func:`oddetr.evaluation.instability.split_instability`):

- *swap*: the GT moved to a query that was already a near-duplicate of its old one (a *rival*: IoU >= 0.5
  with the GT, probability of its class >= ``--min-ratio`` times the matched query's), or its old query
  still is one. Matching picked another of two queries that predict the same box;
- *new*: anything else, the query that predicts the GT changed.

Also ``dup``: the fraction of GTs that have a rival. Each row is the mean over the runs of a name, then over
epochs 2..E; the last column compares with the first name. The re-computed IS is checked against the run's
own ``metrics.jsonl`` (largest difference printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.utils.data import Subset

from oddetr.data.collate import collate_detection
from oddetr.engine.data import build_dataset
from oddetr.engine.inference import load_checkpoint_model
from oddetr.evaluation.instability import (
    AssignmentMap,
    RivalMap,
    assignment_map,
    instability,
    rival_queries,
    select_probe_indices,
    split_instability,
)
from oddetr.losses.matcher import HungarianMatcher


@torch.no_grad()
def probe_epoch(checkpoint: Path, weights: str, min_iou: float, min_ratio: float) -> tuple[AssignmentMap, RivalMap]:
    """The probe's GT -> matched query map and each GT's rivals, for one checkpoint (learned-query models)."""
    # the model as the trainer's probe ran it: batch norms not folded (folding moves the float rounding)
    loaded = load_checkpoint_model(checkpoint, weights=weights, config_overrides={"eval": {"fuse_norms": False}})
    cfg, model = loaded.config, loaded.model
    base = build_dataset(cfg, "train", train=False)
    probe = Subset(base, select_probe_indices(len(base), cfg.train.instability_probe, cfg.seed))
    lc = cfg.loss
    matcher = HungarianMatcher(lc.cost_class, lc.cost_bbox, lc.cost_giou, lc.focal_alpha, lc.focal_gamma)
    matches: AssignmentMap = {}
    rivals: RivalMap = {}
    items = [probe[i] for i in range(len(probe))]
    for start in range(0, len(items), cfg.eval.batch_size):
        images, masks, targets = collate_detection(items[start:start + cfg.eval.batch_size])
        out = model(images, masks)
        if out.query_positions is not None:
            raise SystemExit(f"{checkpoint}: two-stage models are not supported here (queries keyed by position)")
        indices = matcher(out.pred_logits, out.pred_boxes, targets, context="instability probe")
        ids = [int(t["image_id"]) for t in targets]
        matches.update(assignment_map(ids, indices))
        probs = out.pred_logits.sigmoid()
        for b, (t, (q, g)) in enumerate(zip(targets, indices)):
            rivals.update(rival_queries(ids[b], probs[b], out.pred_boxes[b], t["boxes"], t["labels"], q, g,
                                        min_iou=min_iou, min_ratio=min_ratio))
    return matches, rivals


def split_run(run: Path, weights: str, min_iou: float, min_ratio: float) -> tuple[dict[int, dict[str, float]], float]:
    """Per epoch (from the second): IS, swap, new, dup; and the largest |IS - the run's logged IS|."""
    checkpoints = sorted(run.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if len(checkpoints) < 2:
        raise SystemExit(f"{run}: needs epoch_*.pt of at least 2 epochs (train with train.keep_checkpoints=E)")
    logged = {}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if f"{weights}/instability" in record:
                logged[int(record["epoch"])] = record[f"{weights}/instability"]
    rows, previous, worst = {}, None, 0.0
    for path in checkpoints:
        epoch = int(path.stem.split("_")[1])
        current = probe_epoch(path, weights, min_iou, min_ratio)
        if previous is not None:
            swap, new = split_instability(previous[0], current[0], previous[1], current[1])
            value = instability(previous[0], current[0])
            dup = sum(1 for k in current[0] if current[1].get(k)) / max(1, len(current[0]))
            rows[epoch] = {"IS": value, "swap": swap, "new": new, "dup": dup}
            if epoch in logged:
                worst = max(worst, abs(value - logged[epoch]))
        previous = current
    return rows, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR[,DIR...]",
                        help="a name and its run folders (seeds); the first name is the reference")
    parser.add_argument("--weights", choices=["student", "teacher"], default="student")
    parser.add_argument("--min-iou", type=float, default=0.5)
    parser.add_argument("--min-ratio", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    per_name: dict[str, dict[int, dict[str, float]]] = {}
    for spec in args.runs:
        name, _, dirs = spec.partition("=")
        if not dirs:
            raise SystemExit(f"--runs {spec!r}: expected NAME=DIR[,DIR...]")
        runs = []
        for d in dirs.split(","):
            rows, worst = split_run(Path(d), args.weights, args.min_iou, args.min_ratio)
            print(f"{name}: {d}: {len(rows)} epochs, re-computed IS within {worst:.1e} of metrics.jsonl", flush=True)
            runs.append(rows)
        epochs = sorted(set.intersection(*(set(r) for r in runs)))
        per_name[name] = {e: {k: statistics.mean(r[e][k] for r in runs) for k in ("IS", "swap", "new", "dup")}
                          for e in epochs}

    keys = ("IS", "swap", "new", "dup")
    print(f"\n{args.weights}, rivals: IoU >= {args.min_iou}, probability >= {args.min_ratio} x the matched query's")
    print("| name | epoch | IS | swap | new | dup |\n|---|---|---|---|---|---|")
    for name, rows in per_name.items():
        for e, r in rows.items():
            print(f"| {name} | {e} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    reference = next(iter(per_name))
    print("\nmean over epochs (each name's epochs shared with the reference)")
    print("| name | IS | swap | new | dup | IS / swap / new against " + reference + " |\n|---|---|---|---|---|---|")
    for name, rows in per_name.items():
        shared = [e for e in rows if e in per_name[reference]]
        mean = {k: statistics.mean(rows[e][k] for e in shared) for k in keys}
        ref = {k: statistics.mean(per_name[reference][e][k] for e in shared) for k in keys}
        ratios = " / ".join(f"{mean[k] / ref[k]:.2f}x" if ref[k] else "n/a" for k in ("IS", "swap", "new"))
        print(f"| {name} | " + " | ".join(f"{mean[k]:.3f}" for k in keys) + f" | {ratios} |")


if __name__ == "__main__":
    main()
