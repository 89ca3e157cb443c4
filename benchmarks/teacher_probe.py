"""Why does the EMA teacher trail or lead its student? Evaluate the three models a run's ``last.pt`` implies.

    python benchmarks/teacher_probe.py runs/convergence/headline/deformable-detr-tiny/OD-DETR/seed*

For each OD-DETR run directory: the student, the teacher as trained (its BatchNorm statistics are the EMA
of the student's), and the same teacher weights with the student's BatchNorm statistics copied in (what
the teacher was before the buffers were averaged). Each is evaluated on the run's validation split, so a
gap between the last two columns is what the buffer rule alone is worth at those weights.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from oddetr.engine.data import build_dataset, make_loader
from oddetr.engine.evaluate import evaluate
from oddetr.engine.inference import load_checkpoint_model


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    rows = [(run, probe(run)) for run in args.runs]
    names = list(rows[0][1])
    print("| run | " + " | ".join(f"{n} AP" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for run, aps in rows:
        print(f"| {run} | " + " | ".join(f"{aps[n]:.4f}" for n in names) + " |")


if __name__ == "__main__":
    main()
