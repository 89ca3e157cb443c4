"""Is inference slower after an OD-DETR training run than after a baseline run, and why?

    OMP_NUM_THREADS=1 python benchmarks/inference_after_training.py --steps 20

Trains two students of one preset in this one process (same seed, same random batch): a baseline
and an OD-DETR run. Then times eval-mode inference (``torch.inference_mode``) of both, interleaved,
median over repeats, so machine load hits both alike, and tests where a gap comes from:

- ``weights swapped``: each model runs the *other* run's weights: a gap that follows the weights is
  in the numbers (e.g. subnormal floats), one that stays with the module is in the objects;
- ``fresh copy``: each run's weights loaded into a newly built model;
- subnormal counts in the weights and in the activations of one forward pass;
- ``flush denormals``: both again with ``torch.set_flush_denormal(True)``.

``--isolated``: each run trains and then times its own inference in its own process (how a user, or
a benchmark with one process per case, sees it), the two kinds alternating for ``--rounds``; besides
the time it reports the minor page faults per inference pass, which machine load does not change, and the CPU time per pass (less
sensitive to load than wall time).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_common import build_step, random_batch

from oddetr.models.detector import build_model


def train(preset: str, distill: bool, steps: int, batch, num_classes: int, overrides: list[str]):
    """A student trained ``steps`` steps on ``batch``, and the distiller (None for the baseline)."""
    step, cfg = build_step(preset, distill, num_classes, overrides)
    model, distiller = step.state.model, step.state.distiller
    for i in range(steps):
        step(*batch, True, f"step {i}")
    return model.eval(), distiller, cfg


def subnormal_count(tensors) -> tuple[int, int]:
    """(subnormal values, all values) over float32 tensors."""
    tiny = torch.finfo(torch.float32).tiny
    sub = total = 0
    for t in tensors:
        if t.dtype == torch.float32:
            sub += int(((t != 0) & (t.abs() < tiny)).sum())
            total += t.numel()
    return sub, total


def activation_subnormals(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> tuple[int, int]:
    """Subnormal values among the outputs of every leaf module in one eval forward pass."""
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o) if torch.is_tensor(o) else None)
             for m in model.modules() if not list(m.children())]
    with torch.inference_mode():
        model(images, masks)
    for h in hooks:
        h.remove()
    return subnormal_count(outs)


def time_interleaved(models: dict[str, torch.nn.Module], images, masks, repeats: int) -> dict[str, float]:
    """Median seconds per eval forward pass of each model, the models' passes interleaved."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():
            m(images, masks)
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(images, masks)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def isolated_case(args: argparse.Namespace, distill: bool) -> dict:
    """Train one run, then time its student's inference in this process; page faults per pass."""
    batch = random_batch(args.batch, args.size, 10, 6)
    model, _, _ = train(args.preset, distill, args.steps, batch, 6, args.override)
    images, masks, _ = batch
    times, cpu, faults = [], [], []
    with torch.inference_mode():
        model(images, masks)
        for _ in range(args.repeats):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0, c0 = time.perf_counter(), time.process_time()
            model(images, masks)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"distill": distill, "infer_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "minflt_per_pass": statistics.median(faults),
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_isolated(args: argparse.Namespace) -> None:
    rows: dict[bool, list[dict]] = {False: [], True: []}
    argv = [a for a in sys.argv[1:] if a != "--isolated"]
    for _ in range(args.rounds):
        for distill in (False, True):
            out = subprocess.run([sys.executable, __file__, *argv, "--case", "on" if distill else "off"],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows[distill].append(r)
            print(f"{'OD-DETR ' if distill else 'baseline'} run: inference {r['infer_s']:.3f} s "
                  f"(CPU time {r['cpu_s']:.3f} s), "
                  f"{r['minflt_per_pass']:.0f} minor page faults per pass, peak RSS {r['maxrss_mb']:.0f} MB", flush=True)
    med = {d: statistics.median(r["infer_s"] for r in rs) for d, rs in rows.items()}
    cpu = {d: statistics.median(r["cpu_s"] for r in rs) for d, rs in rows.items()}
    print(f"inference after OD-DETR / after baseline (own processes, alternating): wall {med[True] / med[False]:.2f}x, "
          f"CPU time {cpu[True] / cpu[False]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deformable-detr-tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--isolated", action="store_true", help="each run in its own process")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--case", choices=["off", "on"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(isolated_case(args, args.case == "on")))
        return
    if args.isolated:
        run_isolated(args)
        return
    batch = random_batch(args.batch, args.size, 10, 6)
    images, masks, _ = batch
    base, _, _ = train(args.preset, False, args.steps, batch, 6, args.override)
    od, distiller, cfg = train(args.preset, True, args.steps, batch, 6, args.override)

    def report(label: str, models: dict[str, torch.nn.Module]) -> None:
        t = time_interleaved(models, images, masks, args.repeats)
        names = list(t)
        print(f"{label}: " + ", ".join(f"{n} {t[n]:.3f} s" for n in names)
              + f"; {names[1]} / {names[0]} = {t[names[1]] / t[names[0]]:.2f}x", flush=True)

    print(f"{args.preset} @ {args.size} px, batch {args.batch}, {args.steps} training steps each, "
          f"{torch.get_num_threads()} thread(s); inference medians of {args.repeats} interleaved passes")
    report("trained models", {"after baseline": base, "after OD-DETR": od})
    report("teacher", {"baseline student": base, "OD-DETR teacher": distiller.teacher.model})
    swap_b, swap_o = copy.deepcopy(base), copy.deepcopy(od)
    swap_b.load_state_dict(od.state_dict())
    swap_o.load_state_dict(base.state_dict())
    report("weights swapped", {"baseline module, OD-DETR weights": swap_b, "OD-DETR module, baseline weights": swap_o})
    fresh_b = build_model(cfg.model, 6).eval()
    fresh_o = build_model(cfg.model, 6).eval()
    fresh_b.load_state_dict(base.state_dict())
    fresh_o.load_state_dict(od.state_dict())
    report("fresh copies", {"baseline weights": fresh_b, "OD-DETR weights": fresh_o})
    for name, m in (("baseline", base), ("OD-DETR", od), ("OD-DETR teacher", distiller.teacher.model)):
        ws, wt = subnormal_count([p.detach() for p in m.parameters()] + list(m.buffers()))
        acts, actt = activation_subnormals(m, images, masks)
        print(f"subnormals, {name}: weights {ws} of {wt}, activations {acts} of {actt}")
    torch.set_flush_denormal(True)
    report("flush denormals", {"after baseline": base, "after OD-DETR": od})


if __name__ == "__main__":
    main()
