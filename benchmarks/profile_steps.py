"""Where a training step spends its time: ``torch.profiler`` over baseline and OD-DETR steps, by phase.

(Not ``profile.py``: run as a script, that name would shadow the standard library's ``profile``, which
torch imports through ``cProfile``.)

    OMP_NUM_THREADS=1 python benchmarks/profile_steps.py                          # deformable-detr-tiny, 128 px, batch 8
    python benchmarks/profile_steps.py --preset deformable-detr-r50 --size 512 --batch 2 --steps 2

A step is the trainer's own :class:`~oddetr.engine.step.GuardedStep` (teacher pass if distilling,
student forward, Hungarian matching, losses, backward, clip + AdamW, EMA) on one fixed batch of random
images with ``--boxes`` random boxes each; data loading is not part of it (the trainer's loader runs in
worker processes). The phases are the ``oddetr.*`` ``record_function`` scopes placed in the code
(:mod:`oddetr.profiling`); a phase's time excludes the phases nested in it, which are listed below it
(``teacher/decoder`` is the teacher pass's decoder). Both cases run in this one process, their steps
interleaved, so a loaded machine slows both alike; the table gives the median over steps.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from oddetr.config import resolve_config
from oddetr.distill.distiller import OnlineDistiller
from oddetr.engine.checkpoint import TrainState
from oddetr.engine.optim import build_optimizer, build_scheduler
from oddetr.engine.step import GuardedStep
from oddetr.losses.criterion import SetCriterion
from oddetr.models.detector import build_model
from oddetr.profiling import PREFIX


def random_batch(batch: int, size: int, boxes: int, num_classes: int, seed: int = 0):
    """(images (B, 3, S, S), masks (B, S, S), targets with ``boxes`` cxcywh boxes each)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    targets = []
    for i in range(batch):
        xy = torch.rand(boxes, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(boxes, 2, generator=g) * 0.2 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (boxes,), generator=g),
                        "boxes": torch.cat([xy, wh], 1), "image_id": i})
    return images, masks, targets


def build_step(preset: str, distill: bool, num_classes: int, overrides: list[str] = ()) -> GuardedStep:
    """The trainer's step for ``preset`` (random init), distillation on or off."""
    torch.manual_seed(0)
    cfg = resolve_config(overrides=[f"model={preset}", f"distill.enabled={str(distill).lower()}", *overrides])
    model = build_model(cfg.model, num_classes).train()
    criterion = SetCriterion(cfg.loss)
    distiller = OnlineDistiller(model, cfg, criterion) if distill else None
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, 1000, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainState(model, optimizer, scheduler, scaler, distiller, {})
    return GuardedStep(state, None, criterion, cfg.train, torch.device("cpu"))


def phase_times(prof: profile) -> dict[str, float]:
    """Self time (s) per phase path, e.g. ``teacher/decoder``; ``other`` = step time outside any phase."""
    total: dict[str, float] = defaultdict(float)
    child: dict[str, float] = defaultdict(float)
    step_time = 0.0
    for ev in prof.events():
        if ev.name == PREFIX + "step":
            step_time += ev.time_range.elapsed_us() / 1e6
        if not ev.name.startswith(PREFIX) or ev.name == PREFIX + "step":
            continue
        names, parent = [ev.name[len(PREFIX):]], ev.cpu_parent
        while parent is not None:
            if parent.name.startswith(PREFIX) and parent.name != PREFIX + "step":
                names.append(parent.name[len(PREFIX):])
            parent = parent.cpu_parent
        path = "/".join(reversed(names))
        elapsed = ev.time_range.elapsed_us() / 1e6
        total[path] += elapsed
        if len(names) > 1:
            child["/".join(reversed(names[1:]))] += elapsed
        else:
            child[""] += elapsed
    out = {path: total[path] - child.get(path, 0.0) for path in total}
    out["other"] = step_time - child.get("", 0.0)
    out["step"] = step_time
    return out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cases = {"baseline": build_step(args.preset, False, args.classes, args.override),
             "OD-DETR": build_step(args.preset, True, args.classes, args.override)}
    images, masks, targets = random_batch(args.batch, args.size, args.boxes, args.classes)
    for _ in range(args.warmup):
        for step in cases.values():
            step(images, masks, targets, True, "warm-up")
    per_step: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for i in range(args.steps):
        for name, step in cases.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with torch.profiler.record_function(PREFIX + "step"):
                    step(images, masks, targets, True, f"step {i}")
            per_step[name].append(phase_times(prof))
    medians = {name: {k: statistics.median(s.get(k, 0.0) for s in steps) for k in set().union(*steps)}
               for name, steps in per_step.items()}
    print(f"{args.preset} @ {args.size} px, batch {args.batch}, {args.boxes} boxes/image, "
          f"{torch.get_num_threads()} thread(s); median of {args.steps} profiled steps (interleaved) after "
          f"{args.warmup} warm-up")
    order = sorted(set().union(*medians.values()) - {"step"}, key=lambda k: (k == "other", k))
    base, od = medians["baseline"], medians["OD-DETR"]
    print("| phase | baseline s | OD-DETR s |")
    print("|---|---|---|")
    for key in order:
        print(f"| {key} | {base.get(key, 0.0):.3f} | {od.get(key, 0.0):.3f} |")
    print(f"| **step** | **{base['step']:.3f}** | **{od['step']:.3f}** |")
    print(f"OD-DETR / baseline step: {od['step'] / base['step']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deformable-detr-tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=10)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--override", nargs="*", default=[], help="config overrides, key=value")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
