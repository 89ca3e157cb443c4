"""Convergence benchmark: baseline vs each OD-DETR part vs full OD-DETR, several seeds, same budget.

    python benchmarks/convergence.py                     # defaults: 6 variants x 3 seeds, tiny model
    python benchmarks/convergence.py --seeds 0 --epochs 4 --out /tmp/conv   # a quick look

Every run trains the same preset on the same synthetic data for the same number of epochs
(and optimiser steps); only the variant's switches differ. Writes into ``--out`` (default
``docs/``): ``convergence.md`` (the table), ``convergence.json`` (every run's per-epoch
metrics), ``convergence_ap.png`` and ``convergence_instability.png``. Runs go in parallel
(``--jobs``), each pinned to ``torch`` threads = cores / jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "baseline": ["distill.enabled=false"],
    "baseline+QFL": ["distill.enabled=false", "loss.cls=qfl"],
    "MD": ["distill.enabled=true", "distill.md=true", "distill.pd=false", "distill.aux=false"],
    "PD": ["distill.enabled=true", "distill.md=false", "distill.pd=true", "distill.aux=false"],
    "AUX": ["distill.enabled=true", "distill.md=false", "distill.pd=false", "distill.aux=true"],
    "OD-DETR": ["distill.enabled=true", "distill.md=true", "distill.pd=true", "distill.aux=true"],
}

# the benchmark's data and schedule: small enough that 18 runs fit in well under 90 min on 2 cores
BENCH_OVERRIDES = [
    "data.synthetic.num_train=256", "data.synthetic.num_val=64", "data.synthetic.image_size=64",
    "data.synthetic.max_objects=6", "data.scales=[56,64,72]", "data.max_size=96",
    "data.num_workers=0", "train.batch_size=8", "train.warmup_steps=30", "train.instability_probe=64",
    "eval.batch_size=32", "train.keep_checkpoints=0", "train.save_best=false",
    "distill.ema_decay=0.98", "distill.ema_tau=30", "distill.warmup_steps=30",
]


def run_one(model: str, variant: str, seed: int, epochs: int, runs_root: Path, threads: int, extra: list[str],
            data_root: str) -> dict:
    run_dir = runs_root / model / variant.replace("+", "_") / f"seed{seed}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs:
        return {"model": model, "variant": variant, "seed": seed, "dir": str(run_dir), "cached": True}
    cmd = [sys.executable, "-m", "oddetr", "train", f"model={model}", f"output={run_dir}", "overwrite=true",
           f"seed={seed}", f"train.epochs={epochs}", f"data.synthetic.root={data_root}", *BENCH_OVERRIDES,
           *VARIANTS[variant], *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {variant} seed {seed} failed:\n{proc.stderr[-2000:]}")
    print(f"done {model:<24} {variant:<13} seed {seed}  {time.time() - t0:6.0f} s", flush=True)
    return {"model": model, "variant": variant, "seed": seed, "dir": str(run_dir), "seconds": time.time() - t0}


def read_metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def epochs_to_reach(curve: list[float], threshold: float) -> int | None:
    for i, v in enumerate(curve):
        if v is not None and v >= threshold:
            return i + 1
    return None


def summarize(runs: list[dict], epochs: int) -> dict:
    """Per (model, variant): mean/std over seeds of final AP, epochs-to-baseline, mean instability."""
    table: dict = {}
    curves: dict = {}
    for r in runs:
        recs = read_metrics(r["dir"])[:epochs]
        key = (r["model"], r["variant"])
        c = curves.setdefault(key, {"student/AP": [], "teacher/AP": [], "student/instability": [],
                                    "teacher/instability": []})
        for name in c:
            c[name].append([rec.get(name) for rec in recs])
    for (model, variant), c in curves.items():
        row = {}
        for who in ("student", "teacher"):
            finals = [curve[-1] for curve in c[f"{who}/AP"] if curve and curve[-1] is not None]
            row[f"{who}_final_ap"] = mean_std(finals)
            inst = [statistics.fmean([v for v in curve if v is not None]) for curve in c[f"{who}/instability"]
                    if any(v is not None for v in curve)]
            row[f"{who}_instability"] = mean_std(inst)
        table[(model, variant)] = row
    for (model, variant), c in curves.items():
        base = table.get((model, "baseline"))
        if base is None:
            continue
        target = base["student_final_ap"][0]
        reach = []
        for who in ("student", "teacher"):
            mean_curve = [statistics.fmean([cv[i] for cv in c[f"{who}/AP"] if cv[i] is not None] or [0.0])
                          for i in range(min(len(cv) for cv in c[f"{who}/AP"]))] if c[f"{who}/AP"][0] else []
            reach.append(epochs_to_reach(mean_curve, target) if mean_curve else None)
        table[(model, variant)]["epochs_to_baseline"] = reach
    return {"table": table, "curves": curves}


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    return "n/a" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def write_report(summary: dict, out: Path, epochs: int, seeds: list[int], command: str, elapsed: float) -> None:
    from oddetr.evaluation.plots import plot_curves

    lines = [f"Command: `{command}`", "",
             f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {epochs} epochs each, wall time {elapsed / 60:.1f} min.",
             "Final AP: mean ± std over seeds at the last epoch. Epochs to baseline: first epoch where the mean "
             "curve reaches the baseline student's final mean AP (student / teacher). Instability: mean over "
             "epochs 2..N of the per-epoch matching instability, then mean ± std over seeds.", "",
             "| model | variant | student AP | teacher AP | epochs to baseline AP (student / teacher) | "
             "student instability | teacher instability |",
             "|---|---|---|---|---|---|---|"]
    for (model, variant), row in summary["table"].items():
        reach = row.get("epochs_to_baseline", [None, None])
        reach_s = " / ".join("—" if r is None else str(r) for r in reach)
        lines.append(f"| {model} | {variant} | {fmt(row['student_final_ap'])} | {fmt(row['teacher_final_ap'])} | "
                     f"{reach_s} | {fmt(row['student_instability'])} | {fmt(row['teacher_instability'])} |")
    (out / "convergence.md").write_text("\n".join(lines) + "\n")
    models = sorted({m for m, _ in summary["curves"]})
    for metric, ylabel in (("AP", "COCO AP (val)"), ("instability", "matching instability")):
        for model in models:
            curves = {}
            for (m, variant), c in summary["curves"].items():
                if m != model:
                    continue
                for who in ("student", "teacher"):
                    runs = [cv for cv in c[f"{who}/{metric}"] if cv]
                    if not runs or all(v is None for v in runs[0]):
                        continue
                    n = min(len(cv) for cv in runs)
                    xs, means, stds = [], [], []
                    for i in range(n):
                        vals = [cv[i] for cv in runs if cv[i] is not None]
                        if vals:
                            xs.append(i + 1)
                            m_, s_ = mean_std(vals)
                            means.append(m_)
                            stds.append(s_)
                    curves[f"{variant} ({who})"] = (xs, means, stds)
            suffix = "" if len(models) == 1 else f"_{model}"
            plot_curves(curves, f"{model}: {metric} per epoch (mean ± std over seeds)", ylabel,
                        out / f"convergence_{metric.lower()}{suffix}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deformable-detr-tiny"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--data-root", default="~/.cache/oddetr/synthetic-bench64")
    parser.add_argument("--runs", default="runs/convergence", help="where the individual runs go (not committed)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = [(m, v, s) for s in args.seeds for m in args.models for v in args.variants]
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda j: run_one(*j, args.epochs, Path(args.runs), threads, args.overrides,
                                               str(Path(args.data_root).expanduser())), jobs))
    elapsed = time.time() - start
    summary = summarize(runs, args.epochs)
    command = "python benchmarks/convergence.py " + " ".join(sys.argv[1:])
    write_report(summary, out, args.epochs, args.seeds, command.strip(), elapsed)
    serial = {f"{m}|{v}": row for (m, v), row in summary["table"].items()}
    curves = {f"{m}|{v}": c for (m, v), c in summary["curves"].items()}
    (out / "convergence.json").write_text(json.dumps({"table": serial, "curves": curves, "runs": runs,
                                                      "epochs": args.epochs, "seeds": args.seeds}, indent=1))
    print((out / "convergence.md").read_text())


if __name__ == "__main__":
    main()
