"""Branch finished runs at an epoch and continue them with other settings: a probe of what the end of a
schedule does.

    python benchmarks/branch_runs.py --runs runs/convergence/pretrained/dab-deformable-detr-tiny/OD-DETR/seed* \\
        --epoch 14 --out runs/branch-end14 --jobs 2 --threads 1 distill.end_epoch=14

Each run must have kept ``epoch_<N>.pt`` (``train.keep_checkpoints``). Its directory is copied to
``OUT/<seed dir name>`` with ``last.pt`` = ``epoch_<N>.pt`` and the later records left for ``--resume`` to
drop, then ``oddetr train --resume`` continues it to the run's ``train.epochs`` with the given overrides.
As ``--resume`` is bit-identical to an uninterrupted run, the branch is the run that would have had those
overrides from the start, if they change nothing before epoch N + 1 (as ``distill.end_epoch=N`` does).
The last lines compare each branch's final student and teacher AP with its original run's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from convergence import run_cli

from oddetr.evaluation.plots import read_metrics


def last_record(run: Path) -> dict:
    return read_metrics(run / "metrics.jsonl")[-1]


def branch(run: Path, epoch: int, out: Path, overrides: list[str], threads: int) -> Path:
    source = run / f"epoch_{epoch:03d}.pt"
    if not source.is_file():
        raise SystemExit(f"{source} not found: train the run with train.keep_checkpoints covering epoch {epoch}")
    target = out / run.name
    if target.exists():
        raise SystemExit(f"{target} exists: choose another --out")
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("*.pt"))
    shutil.copy2(source, target / "last.pt")
    run_cli([sys.executable, "-m", "oddetr", "train", "--resume", f"output={target}", *overrides], threads,
            f"branch of {run}")
    (target / "branch.json").write_text(json.dumps({"from": str(run), "epoch": epoch, "overrides": overrides}))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished run directories")
    parser.add_argument("--epoch", type=int, required=True, help="branch from this epoch's checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="key=value for the continued part")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        branches = list(pool.map(lambda r: branch(r, args.epoch, args.out, args.overrides, args.threads), args.runs))
    print(f"branched at epoch {args.epoch} with {' '.join(args.overrides)}")
    print("| run | original student / teacher AP | branch student / teacher AP | branch - original (student) |")
    print("|---|---|---|---|")
    gains = []
    for run, b in zip(args.runs, branches):
        a, c = last_record(run), last_record(b)
        gains.append(c["student/AP"] - a["student/AP"])
        print(f"| {run} | {a['student/AP']:.4f} / {a.get('teacher/AP', float('nan')):.4f} | "
              f"{c['student/AP']:.4f} / {c.get('teacher/AP', float('nan')):.4f} | {100 * gains[-1]:+.2f} AP |")
    spread = f" ± {100 * statistics.stdev(gains):.2f}" if len(gains) > 1 else ""
    print(f"mean branch - original (student): {100 * statistics.mean(gains):+.2f}{spread} AP over {len(gains)} runs")


if __name__ == "__main__":
    main()
