"""Do a two-stage student and its EMA teacher pick the same encoder proposals? (MD on DINO's main queries)

    python benchmarks/two_stage_probe.py --model dino-tiny --steps 0 32 128

Trains a two-stage model with OD-DETR in the headline regime of ``benchmarks/convergence.py`` and, at
each listed optimiser step, runs one fixed batch through a copy of the training-mode student and through
the teacher twice: with its running BatchNorm statistics (``distill.teacher_bn=running``) and with the
batch's (``distill.teacher_bn=batch``). For each teacher it prints the overlap of the two top-K position
sets (|S ∩ T| / K, mean over images), what chance would give (K / number of positions), and the share
of the teacher's last-layer matched pairs that find a student query at the same position (MD can only
use those). The teacher's guidance (matching, AUX, PD) comes from the mode the run's config names.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import HEADLINE  # noqa: E402

from oddetr.config import resolve_config  # noqa: E402
from oddetr.distill.ema import batch_statistics  # noqa: E402
from oddetr.distill.two_stage import map_assignment, student_index_of_teacher  # noqa: E402
from oddetr.engine.evaluate import move_batch  # noqa: E402
from oddetr.engine.trainer import Trainer  # noqa: E402


@torch.no_grad()
def measure(trainer: Trainer, batch) -> dict[str, float]:
    images, masks, targets = batch
    student = copy.deepcopy(trainer.model).train()  # a copy: its forward in train mode moves BN statistics
    s_out = student(images, masks, targets=targets)
    teacher = trainer.distiller.teacher.model
    positions = s_out.query_positions
    row = {}
    for mode in ("running", "batch"):
        if mode == "batch":
            with batch_statistics(teacher):
                t_out = teacher(images, masks)
        else:
            t_out = teacher(images, masks)
        t_pos = t_out.query_positions
        same = (t_pos[:, :, None] == positions[:, None, :]).any(-1).float()  # (B, K)
        row[f"overlap_{mode}"] = same.mean().item()
        assignments = trainer.criterion.match_layers(t_out.main.logits[-1:], t_out.main.boxes[-1:], targets)
        mapped = map_assignment(assignments[0], student_index_of_teacher(t_pos, positions))
        total = sum(len(q) for q, _ in assignments[0])
        row[f"mapped_{mode}"] = sum(len(q) for q, _ in mapped) / max(total, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dino-tiny")
    parser.add_argument("--steps", nargs="+", type=int, default=[0, 32, 128])
    parser.add_argument("--output", default="runs/two_stage_probe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    data_root = Path(f"~/.cache/oddetr/synthetic-bench-{HEADLINE.name}").expanduser()
    cfg = resolve_config(overrides=[f"model={args.model}", f"output={args.output}", "overwrite=true",
                                    f"data.synthetic.root={data_root}", *HEADLINE.overrides(), *args.overrides])
    trainer = Trainer(cfg)
    probe_batch = move_batch(*next(iter(trainer.probe_loader)), trainer.device)
    probe_batch = (probe_batch[0][:8], probe_batch[1][:8], probe_batch[2][:8])
    print(f"{'step':>5} {'overlap running':>16} {'overlap batch':>14} {'mapped running':>15} {'mapped batch':>13}")
    targets_steps = sorted(args.steps)
    trainer.stepper.net.train()
    loader = iter(trainer.train_loader)
    while True:
        if trainer.step in targets_steps:
            r = measure(trainer, probe_batch)
            print(f"{trainer.step:>5} {r['overlap_running']:>16.3f} {r['overlap_batch']:>14.3f} "
                  f"{r['mapped_running']:>15.3f} {r['mapped_batch']:>13.3f}", flush=True)
            targets_steps.remove(trainer.step)
        if not targets_steps:
            break
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(trainer.train_loader)
            batch = next(loader)
        images, masks, targets = move_batch(*batch, trainer.device)
        trainer.stepper(images, masks, targets, True, f"step {trainer.step}")


if __name__ == "__main__":
    main()
