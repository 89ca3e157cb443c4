"""plot_metrics / plot_curves write valid PNGs, and nothing for absent keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from oddetr.errors import DataError
from oddetr.evaluation.plots import plot_curves, plot_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()


def _write_metrics(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_plot_metrics_default_groups(tmp_path: Path) -> None:
    records = []
    for e in range(4):
        r = {"epoch": e, "train/loss": 3.0 - e * 0.5, "train/lr": 1e-4}
        if e % 2 == 1:  # evaluation every other epoch
            r.update({"student/AP": 0.1 * e, "teacher/AP": 0.12 * e, "student/AP50": 0.2 * e})
        if e > 0:
            r.update({"student/instability": 0.5 / e, "teacher/instability": 0.3 / e})
        records.append(r)
    metrics = _write_metrics(tmp_path / "metrics.jsonl", records)
    paths = plot_metrics(metrics, tmp_path / "plots")
    assert [p.name for p in paths] == ["ap.png", "instability.png", "loss.png"]
    for p in paths:
        _assert_png(p)


def test_plot_metrics_skips_groups_without_keys(tmp_path: Path) -> None:
    metrics = _write_metrics(
        tmp_path / "metrics.jsonl", [{"epoch": 0, "train/loss": 1.0}, {"epoch": 1, "train/loss": 0.5}]
    )
    paths = plot_metrics(metrics, tmp_path / "plots")
    assert [p.name for p in paths] == ["loss.png"]
    assert sorted(f.name for f in (tmp_path / "plots").iterdir()) == ["loss.png"]
    assert plot_metrics(metrics, tmp_path / "none", keys_groups={"x": ["nope/*"]}) == []
    assert not (tmp_path / "none").exists()


def test_plot_metrics_custom_groups(tmp_path: Path) -> None:
    metrics = _write_metrics(
        tmp_path / "m.jsonl", [{"epoch": e, "train/lr": 1e-4 * e, "train/loss_giou": 1.0} for e in range(3)]
    )
    paths = plot_metrics(metrics, tmp_path, keys_groups={"lr": ["train/lr"], "giou": ["*giou*"]})
    assert [p.name for p in paths] == ["lr.png", "giou.png"]
    for p in paths:
        _assert_png(p)


def test_plot_metrics_bad_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        plot_metrics(tmp_path / "missing.jsonl", tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 0}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        plot_metrics(bad, tmp_path)


def test_plot_curves(tmp_path: Path) -> None:
    x = [0, 1, 2, 3]
    out = plot_curves(
        {
            "baseline": (x, [0.1, 0.2, 0.25, 0.3], [0.01, 0.02, 0.02, 0.01]),
            "od-detr": (x, [0.15, 0.25, 0.3, 0.35], None),
        },
        title="AP vs epoch",
        ylabel="AP",
        out_path=tmp_path / "sub" / "ap.png",
    )
    assert out == tmp_path / "sub" / "ap.png"
    _assert_png(out)
    with pytest.raises(ValueError):
        plot_curves({"bad": ([0, 1], [0.1], None)}, "t", "y", tmp_path / "bad.png")
