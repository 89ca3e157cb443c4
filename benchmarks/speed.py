"""Training-step time and peak memory of a preset, with distillation off and on.

    python benchmarks/speed.py                        # deformable-detr-r50 @ 800 px and -tiny @ 128 px, CPU
    python benchmarks/speed.py --presets deformable-detr-tiny --steps 20 --distill both
    python benchmarks/speed.py --device cuda

Each (preset, distill) case runs in a fresh subprocess so peak memory is its own: peak RSS
(``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on GPU. A step is a full training
step (teacher pass if distilling, student forward, Hungarian matching, losses, backward, clip,
AdamW, EMA update) on random images with 10 random boxes each.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DEFAULT_SIZES = {"deformable-detr-r50": 800, "deformable-detr-tiny": 128}


def run_case(preset: str, size: int, batch: int, steps: int, warmup: int, distill: bool, device: str) -> dict:
    import torch

    from oddetr.config import resolve_config
    from oddetr.distill.distiller import OnlineDistiller
    from oddetr.engine.optim import build_optimizer
    from oddetr.engine.step import compute_losses
    from oddetr.losses.criterion import SetCriterion
    from oddetr.models.detector import build_model

    torch.manual_seed(0)
    cfg = resolve_config(overrides=[f"model={preset}", f"distill.enabled={str(distill).lower()}"])
    dev = torch.device(device)
    model = build_model(cfg.model, 80 if "r50" in preset else 6).to(dev).train()
    criterion = SetCriterion(cfg.loss)
    distiller = OnlineDistiller(model, cfg, criterion, total_steps=1000) if distill else None
    optimizer = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(dev)
    masks = torch.zeros(batch, size, size, dtype=torch.bool, device=dev)
    targets = []
    for i in range(batch):
        xy = torch.rand(10, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(10, 2, generator=g) * 0.2 + 0.05
        targets.append({"labels": torch.randint(0, model.num_classes, (10,), generator=g).to(dev),
                        "boxes": torch.cat([xy, wh], 1).to(dev), "image_id": i})
    params = [p for grp in optimizer.param_groups for p in grp["params"]]
    times = []
    for step in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, total = compute_losses(model, criterion, distiller, images, masks, targets, float(10 * batch))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        if distiller is not None:
            distiller.update(model)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times.sort()
    return {"preset": preset, "image_size": size, "batch": batch, "distill": distill, "device": device,
            "threads": torch.get_num_threads(), "steps": steps,
            "step_s_median": times[len(times) // 2], "step_s_mean": sum(times) / len(times),
            "peak_memory_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--size", type=int, default=0, help="image side (0: 800 for r50, 128 for tiny)")
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: 1 for r50, 8 for tiny)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: 3 for r50, 20 for tiny)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--distill", choices=["off", "on", "both"], default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        c = json.loads(args.case)
        print(json.dumps(run_case(**c)))
        return
    rows = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.distill]
    for preset in args.presets:
        big = "r50" in preset
        size = args.size or DEFAULT_SIZES.get(preset, 800 if big else 128)
        batch = args.batch or (1 if big else 8)
        steps = args.steps or (3 if big else 20)
        for distill in modes:
            case = dict(preset=preset, size=size, batch=batch, steps=steps, warmup=args.warmup, distill=distill,
                        device=args.device)
            out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{preset:<24} {size:>4}px batch {batch:<2} distill={'on ' if distill else 'off'} "
                  f"step {r['step_s_median']:.3f} s (median of {steps})  peak memory {r['peak_memory_mb']:.0f} MB",
                  flush=True)
    for preset in args.presets:
        pair = [r for r in rows if r["preset"] == preset]
        if len(pair) == 2:
            off, on = pair
            print(f"{preset}: OD-DETR / baseline step time {on['step_s_median'] / off['step_s_median']:.2f}x, "
                  f"peak memory {on['peak_memory_mb'] / off['peak_memory_mb']:.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
