"""Where a training step spends its time: ``torch.profiler`` over baseline and OD-DETR steps, by phase.

(Not ``profile.py``: run as a script, that name would shadow the standard library's ``profile``, which
torch imports through ``cProfile``.)

    OMP_NUM_THREADS=1 python benchmarks/profile_steps.py                          # deformable-detr-tiny, 128 px, batch 8
    python benchmarks/profile_steps.py --preset deformable-detr-r50 --size 512 --batch 2 --steps 2
    python benchmarks/profile_steps.py --vs-hf-config tiny --threads 2    # the model and batch of vs_hf.py's tiny

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
from bench_common import add_step_arguments, build_step, random_batch
from torch.profiler import ProfilerActivity, profile

from oddetr.profiling import PREFIX


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


def apply_vs_hf_config(args: argparse.Namespace) -> None:
    """``--vs-hf-config NAME``: the model, batch and overrides of that config of ``benchmarks/vs_hf.py``."""
    import vs_hf

    c = vs_hf.CONFIGS[args.vs_hf_config]
    args.preset = vs_hf.PRESET.split("=", 1)[1]
    args.size, args.batch, args.boxes, args.classes = c["size"], c["batch"], vs_hf.BOXES, vs_hf.NUM_CLASSES
    args.override = [*vs_hf.oddetr_overrides(c), *args.override]


def run(args: argparse.Namespace) -> None:
    if args.vs_hf_config:
        apply_vs_hf_config(args)
    torch.set_num_threads(args.threads)
    cases = {"baseline": build_step(args.preset, False, args.classes, args.override)[0],
             "OD-DETR": build_step(args.preset, True, args.classes, args.override)[0]}
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
    add_step_arguments(parser)
    parser.add_argument("--vs-hf-config", choices=["tiny", "r50"],
                        help="profile that config of benchmarks/vs_hf.py (sets preset, size, batch, boxes, classes)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
