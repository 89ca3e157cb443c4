"""Why does the EMA teacher trail or lead its student? Evaluate the three models a run's ``last.pt`` implies.

    python benchmarks/teacher_probe.py runs/convergence/headline/deformable-detr-tiny/OD-DETR/seed*

For each OD-DETR run directory: the student, the teacher as trained (its BatchNorm statistics are the EMA
of the student's), and the same teacher weights with the student's BatchNorm statistics copied in (what
the teacher was before the buffers were averaged). Each is evaluated on the run's validation split, so a
gap between the last two columns is what the buffer rule alone is worth at those weights.

    python benchmarks/teacher_probe.py --bootstrap 500 RUN_DIR ...

adds how far the teacher - student AP gap could be from sampling alone: the validation images are
resampled with replacement (paired: the same draw for both models), and the gap's mean, 95% interval
and the share of draws where the teacher is at least level are printed per run.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from oddetr.engine.data import build_dataset, make_loader
from oddetr.engine.evaluate import evaluate, gather_detections
from oddetr.engine.inference import load_checkpoint_model
from oddetr.evaluation.coco_eval import evaluate_coco


def probe(run_dir: Path) -> dict[str, float]:
    checkpoint = run_dir / "last.pt"
    student = load_checkpoint_model(checkpoint, "student")
    teacher = load_checkpoint_model(checkpoint, "teacher")
    copied = copy.deepcopy(teacher.model)
    with torch.no_grad():
        s_buffers = dict(student.model.named_buffers())
        for name, buffer in copied.named_buffers():
            buffer.copy_(s_buffers[name])
    cfg = student.config
    val = build_dataset(cfg, "val", train=False)
    loader = make_loader(val, cfg.eval.batch_size, False, 0, cfg.seed)
    device = torch.device("cpu")
    out = {}
    for name, model in (("student", student.model), ("teacher", teacher.model),
                        ("teacher, student's BN statistics", copied)):
        out[name] = evaluate(model, loader, device, val.coco_gt(), val.label_to_cat_id)["AP"]
    return out


def resampled(coco_gt: dict, detections: dict[str, list[dict]], image_ids: list[int]) -> tuple[dict, dict]:
    """The ground truth and each model's detections on ``image_ids`` drawn with replacement: every
    drawn copy of an image becomes its own image (new id), so COCO's metric sees duplicates."""
    by_id = {img["id"]: img for img in coco_gt["images"]}
    anns: dict[int, list[dict]] = {}
    for a in coco_gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    dets = {name: {} for name in detections}
    for name, rows in detections.items():
        for d in rows:
            dets[name].setdefault(d["image_id"], []).append(d)
    gt = {k: v for k, v in coco_gt.items() if k not in ("images", "annotations")}
    gt["images"], gt["annotations"] = [], []
    out = {name: [] for name in detections}
    for new_id, old_id in enumerate(image_ids, start=1):
        gt["images"].append({**by_id[old_id], "id": new_id})
        gt["annotations"].extend({**a, "id": len(gt["annotations"]) + k + 1, "image_id": new_id}
                                 for k, a in enumerate(anns.get(old_id, [])))
        for name in detections:
            out[name].extend({**d, "image_id": new_id} for d in dets[name].get(old_id, []))
    return gt, out


def bootstrap_gap(run_dir: Path, draws: int, seed: int = 0) -> dict[str, float]:
    """Teacher - student AP over ``draws`` paired resamplings of the run's validation images."""
    checkpoint = run_dir / "last.pt"
    models = {name: load_checkpoint_model(checkpoint, name) for name in ("student", "teacher")}
    cfg = models["student"].config
    val = build_dataset(cfg, "val", train=False)
    loader = make_loader(val, cfg.eval.batch_size, False, 0, cfg.seed)
    coco_gt = val.coco_gt()
    detections = {name: gather_detections(m.model, loader, torch.device("cpu"), val.label_to_cat_id)
                  for name, m in models.items()}
    full = {name: evaluate_coco(coco_gt, d)["AP"] for name, d in detections.items()}
    ids = [img["id"] for img in coco_gt["images"]]
    g = torch.Generator().manual_seed(seed)
    gaps = []
    for _ in range(draws):
        draw = [ids[i] for i in torch.randint(len(ids), (len(ids),), generator=g).tolist()]
        gt, dets = resampled(coco_gt, detections, draw)
        gaps.append(evaluate_coco(gt, dets["teacher"])["AP"] - evaluate_coco(gt, dets["student"])["AP"])
    gaps_t = torch.tensor(gaps)
    lo, hi = torch.quantile(gaps_t, torch.tensor([0.025, 0.975], dtype=gaps_t.dtype)).tolist()
    return {"student": full["student"], "teacher": full["teacher"], "gap": full["teacher"] - full["student"],
            "gap_lo": lo, "gap_hi": hi, "teacher_level_or_ahead": (gaps_t >= 0).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--bootstrap", type=int, default=0, help="paired resamplings of the teacher - student gap")
    args = parser.parse_args()
    if args.bootstrap:
        print("| run | student AP | teacher AP | teacher - student | 95% interval (resampled images) | "
              "share of draws teacher >= student |")
        print("|---|---|---|---|---|---|")
        for run in args.runs:
            r = bootstrap_gap(run, args.bootstrap)
            print(f"| {run} | {r['student']:.4f} | {r['teacher']:.4f} | {r['gap']:+.4f} | "
                  f"[{r['gap_lo']:+.4f}, {r['gap_hi']:+.4f}] | {r['teacher_level_or_ahead']:.2f} |", flush=True)
        return
    rows = [(run, probe(run)) for run in args.runs]
    names = list(rows[0][1])
    print("| run | " + " | ".join(f"{n} AP" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for run, aps in rows:
        print(f"| {run} | " + " | ".join(f"{aps[n]:.4f}" for n in names) + " |")


if __name__ == "__main__":
    main()
