"""Where a step schedule's LR drop leaves OD-DETR's gain: each model's four curves at the drop and at the end.

    python benchmarks/drop_gain.py --drop 14 docs/convergence/pretrained/convergence.json
    python benchmarks/drop_gain.py --drop 14 docs/convergence/pretrained-dab/convergence.json \\
        runs/out-ema/pretrained-dab-dino/convergence.json      # rows from several reports, merged

Reads ``convergence.json`` reports of ``benchmarks/convergence.py`` (rows from several reports are merged, so the
"baseline + EMA" row may come from a later sitting than the baseline and OD-DETR rows). For every model that has
the rows "baseline + EMA" and OD-DETR (and, best, baseline), per seed and as mean ± std over seeds, it prints, in AP points:

- what the drop gives each student: AP at the end minus AP at the last evaluation before the drop;
- each run's averaging lead before the drop: its EMA teacher minus its student (the baseline's EMA is the
  "baseline + EMA" row's teacher, which guides nothing);
- OD-DETR's student gain at the end, against OD-DETR's teacher minus the baseline's EMA before the drop (what the
  distillation adds beyond averaging, read where the LR is still high).

``--over-training`` adds, for every evaluated epoch, the mean over seeds of OD-DETR's student lead over the baseline
and of its teacher's lead over the baseline's EMA (the part of the lead that averaging does not give), with each
run's own EMA lead beside them.

It also checks that the "baseline + EMA" student is the baseline student (an EMA that guides nothing changes
nothing in training): the largest difference over seeds and epochs is printed. Without a baseline row, the
"baseline + EMA" student stands for the baseline (that check is then not made).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from convergence import mean_std

BASE, EMA, OD = "baseline", "baseline + EMA", "OD-DETR"


def merged_curves(reports: list[Path]) -> tuple[dict, list[int]]:
    """``{"model|variant": {"student/AP": [per-seed curve], ...}}`` over all reports, and their seeds (which must
    agree: a row's curves are indexed by seed position)."""
    curves: dict = {}
    seeds: list[int] | None = None
    for path in reports:
        report = json.loads(path.read_text())
        if seeds is not None and report["seeds"] != seeds:
            raise SystemExit(f"{path}: seeds {report['seeds']} differ from {seeds} in the reports before it")
        seeds = report["seeds"]
        curves.update(report["curves"])
    return curves, seeds or []


def at(curve: list[float | None], epoch: int) -> float:
    """AP after ``epoch`` (1-based); raises if that epoch was not evaluated."""
    value = curve[epoch - 1] if epoch <= len(curve) else None
    if value is None:
        raise SystemExit(f"no evaluation at epoch {epoch} (curve of {len(curve)} epochs)")
    return value


def baseline_student(curves: dict, model: str) -> list[list[float | None]]:
    """The baseline's per-seed student curves: its own row, else the "baseline + EMA" row's student."""
    return curves.get(f"{model}|{BASE}", curves[f"{model}|{EMA}"])["student/AP"]


def seed_row(curves: dict, model: str, i: int, drop: int) -> dict[str, float]:
    """One seed's readings, in AP points (x100). ``drop``: the last epoch before the LR drop."""
    base = baseline_student(curves, model)[i]
    ema = curves[f"{model}|{EMA}"]["teacher/AP"][i]
    student = curves[f"{model}|{OD}"]["student/AP"][i]
    teacher = curves[f"{model}|{OD}"]["teacher/AP"][i]
    end = len(base)
    return {k: 100 * v for k, v in {
        "baseline drop gain": at(base, end) - at(base, drop),
        "OD student drop gain": at(student, end) - at(student, drop),
        "baseline EMA - student before drop": at(ema, drop) - at(base, drop),
        "OD teacher - student before drop": at(teacher, drop) - at(student, drop),
        "OD student - baseline at end": at(student, end) - at(base, end),
        "OD teacher - baseline EMA before drop": at(teacher, drop) - at(ema, drop),
        "OD teacher - baseline EMA at end": at(teacher, end) - at(ema, end),
    }.items()}


def ema_student_difference(curves: dict, model: str) -> float:
    """Largest |"baseline + EMA" student AP - baseline student AP| over seeds and evaluated epochs (both rows needed)."""
    pairs = zip(curves[f"{model}|{EMA}"]["student/AP"], curves[f"{model}|{BASE}"]["student/AP"])
    return max((abs(a - b) for ema, base in pairs for a, b in zip(ema, base) if a is not None and b is not None),
               default=float("nan"))


def leads_over_training(curves: dict, model: str) -> list[dict[str, float]]:
    """Per epoch evaluated in every run, the mean over seeds (AP points) of OD-DETR's student minus the baseline,
    its teacher minus the baseline's EMA, and each row's own EMA minus its student; "epoch" is 1-based."""
    base = baseline_student(curves, model)
    ema = curves[f"{model}|{EMA}"]["teacher/AP"]
    student, teacher = (curves[f"{model}|{OD}"][k] for k in ("student/AP", "teacher/AP"))

    def mean_over_seeds(values: list[tuple[float, ...]], f) -> float:
        return 100 * sum(f(*seed) for seed in values) / len(values)

    rows = []
    for e in range(min(len(c) for c in (*base, *ema, *student, *teacher))):
        values = [(b[e], m[e], s[e], t[e]) for b, m, s, t in zip(base, ema, student, teacher)]
        if any(v is None for seed in values for v in seed):
            continue
        rows.append({"epoch": e + 1,
                     "OD student - baseline": mean_over_seeds(values, lambda b, m, s, t: s - b),
                     "OD teacher - baseline EMA": mean_over_seeds(values, lambda b, m, s, t: t - m),
                     "OD teacher - its student": mean_over_seeds(values, lambda b, m, s, t: t - s),
                     "baseline EMA - its student": mean_over_seeds(values, lambda b, m, s, t: m - b)})
    return rows


# (reading, the reading it should equal if a drop gives each run what its own EMA led it by)
PAIRS = [("baseline drop gain", "baseline EMA - student before drop"),
         ("OD student drop gain", "OD teacher - student before drop"),
         ("OD student - baseline at end", "OD teacher - baseline EMA before drop")]


def mean_gap(rows: list[dict[str, float]], pairs: list[tuple[str, str]]) -> float:
    """Mean |a - b| over the rows (seeds) and the given pairs of readings, in AP points."""
    gaps = [abs(r[a] - r[b]) for r in rows for a, b in pairs]
    return sum(gaps) / len(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="convergence.json files")
    parser.add_argument("--drop", type=int, required=True, help="the last epoch before the LR drop")
    parser.add_argument("--over-training", action="store_true",
                        help="also print the mean leads at every evaluated epoch")
    args = parser.parse_args()
    curves, seeds = merged_curves(args.reports)
    models = sorted({key.split("|")[0] for key in curves})
    complete = [m for m in models if all(f"{m}|{v}" in curves for v in (EMA, OD))]
    if not complete:
        raise SystemExit(f"no model has both rows {EMA!r} and {OD!r} in these reports")
    for model in complete:
        rows = [seed_row(curves, model, i, args.drop) for i in range(len(seeds))]
        check = (f"'baseline + EMA' student vs baseline student, largest difference "
                 f"{ema_student_difference(curves, model):.2e} AP" if f"{model}|{BASE}" in curves
                 else "no baseline row: the 'baseline + EMA' student stands for the baseline")
        print(f"\n{model}: AP points, LR drop after epoch {args.drop}; {check}")
        print("| reading | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |")
        print("|---|" + "---|" * (len(seeds) + 1))
        for name in rows[0]:
            values = [r[name] for r in rows]
            mean, std = mean_std(values)
            print(f"| {name} | " + " | ".join(f"{v:+.2f}" for v in values) + f" | {mean:+.2f} ± {std:.2f} |")
        print(f"per run, |drop gain - EMA lead before the drop|: mean {mean_gap(rows, PAIRS[:2]):.2f} AP over "
              f"{2 * len(rows)} runs; |final student gain - teacher lead over the baseline's EMA before the drop|: "
              f"mean {mean_gap(rows, PAIRS[2:]):.2f} AP over {len(rows)} seeds")
        if args.over_training:
            leads = leads_over_training(curves, model)
            if not leads:
                print(f"\n{model}: no epoch was evaluated in every run")
                continue
            names = [k for k in leads[0] if k != "epoch"]
            print(f"\n{model}: mean over {len(seeds)} seeds at each evaluation, AP points")
            print("| epoch | " + " | ".join(names) + " |")
            print("|---|" + "---|" * len(names))
            for row in leads:
                print(f"| {row['epoch']} | " + " | ".join(f"{row[k]:+.2f}" for k in names) + " |")


if __name__ == "__main__":
    main()
