"""What a bf16 teacher pass saves: baseline, OD-DETR and OD-DETR with ``distill.teacher_amp=bf16`` steps,
interleaved in one process (median of ``--steps`` after ``--warmup`` warm-up steps, wall time).

    OMP_NUM_THREADS=1 python benchmarks/teacher_precision.py                       # deformable-detr-tiny, 128 px, batch 8
    OMP_NUM_THREADS=1 python benchmarks/teacher_precision.py --preset deformable-detr-r50 --size 256 --batch 4 \\
        --override model.backbone.name=resnet18 model.backbone.trainable_layers=0 model.d_model=128 ...

bf16 is fast on CPUs with bf16 units (AVX512-BF16 / AMX) and on GPUs; elsewhere it can be slower.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_common import add_step_arguments, build_step, random_batch

CASES = {"baseline": (False, []), "OD-DETR": (True, []),
         "OD-DETR, bf16 teacher": (True, ["distill.teacher_amp=bf16"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, masks, targets = random_batch(args.batch, args.size, args.boxes, args.classes)
    steps = {name: build_step(args.preset, distill, args.classes, [*args.override, *keys])[0]
             for name, (distill, keys) in CASES.items()}
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step(images, masks, targets, True, f"{name} step {i}")
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["baseline"])
    print(f"{args.preset} @ {args.size} px, batch {args.batch}, {args.threads} thread(s); median of {args.steps} "
          f"interleaved steps after {args.warmup} warm-up")
    print("| case | step s | / baseline |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
