"""Plots of a run's metrics.jsonl and of benchmark curves (matplotlib, no display needed).

Figures are built with the object-oriented ``matplotlib.figure.Figure`` API, which
renders PNGs through Agg without pyplot, so no global backend is switched and nothing
is ever shown on screen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from oddetr.errors import DataError

__all__ = ["DEFAULT_KEY_GROUPS", "plot_curves", "plot_metrics", "read_metrics"]

#: Plot name -> ``fnmatch`` patterns of metric keys (an exact key is a pattern too).
DEFAULT_KEY_GROUPS: dict[str, list[str]] = {
    "ap": ["*/AP", "*/AP50"],
    "instability": ["*instability*"],
    "loss": ["train/loss"],
}


def read_metrics(metrics_jsonl: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (one JSON object per line; blank lines skipped).

    Raises:
        DataError: the file is missing, or a line is not a JSON object.
    """
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise DataError(f"metrics file not found: {path}")
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one key over the records that hold a finite number for it."""
    xs: list[float] = []
    ys: list[float] = []
    for i, record in enumerate(records):
        value = record.get(key)
        if _is_number(value):
            epoch = record.get("epoch", i)
            xs.append(float(epoch) if _is_number(epoch) else float(i))
            ys.append(float(value))
    return xs, ys


def plot_metrics(
    metrics_jsonl: str | Path,
    out_dir: str | Path,
    keys_groups: Mapping[str, Sequence[str]] | None = None,
) -> list[Path]:
    """One PNG per group of metric keys of a run, against epoch.

    Args:
        metrics_jsonl: the run's metrics file: one JSON object per line with ``"epoch"`` and
            numeric keys such as ``"student/AP"``, ``"teacher/instability"``, ``"train/loss"``.
            Records missing a key (e.g. epochs without evaluation) are skipped for that key;
            a record without ``"epoch"`` uses its line position.
        out_dir: where ``<group>.png`` files are written (created if needed).
        keys_groups: plot name -> ``fnmatch`` patterns of keys; default
            :data:`DEFAULT_KEY_GROUPS` (keys ending in ``/AP`` or ``/AP50``; keys containing
            ``instability``; ``train/loss``).

    Returns:
        Paths of the PNGs written, in group order; a group whose patterns match no numeric
        key is skipped (no file).
    """
    groups = DEFAULT_KEY_GROUPS if keys_groups is None else keys_groups
    records = read_metrics(metrics_jsonl)
    keys: list[str] = []
    for record in records:
        for key, value in record.items():
            if key != "epoch" and key not in keys and _is_number(value):
                keys.append(key)
    out = Path(out_dir)
    written: list[Path] = []
    for name, patterns in groups.items():
        matched = [k for k in keys if any(fnmatchcase(k, p) for p in patterns)]
        if not matched:
            continue
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        for key in matched:
            xs, ys = _series(records, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
    title: str,
    ylabel: str,
    out_path: str | Path,
    xlabel: str = "epoch",
) -> Path:
    """Mean curves with optional ±std bands (benchmark plots), written as a PNG.

    Args:
        curves: label -> ``(x, mean, std)``; ``std`` may be ``None`` (no band). The three
            sequences of one curve must have equal length.
        title, ylabel, xlabel: axis text.
        out_path: the PNG to write (parent directories are created).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: a curve's sequences differ in length.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, (x, mean, std) in curves.items():
        if len(x) != len(mean) or (std is not None and len(std) != len(x)):
            raise ValueError(f"curve {label!r}: x, mean and std must have the same length")
        (line,) = ax.plot(list(x), list(mean), label=label)
        if std is not None:
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            ax.fill_between(list(x), lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
