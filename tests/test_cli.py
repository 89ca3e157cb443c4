"""The ``oddetr`` CLI end to end on tiny datasets: train (COCO, VOC), eval, predict, --resume,
refusing to clobber a run directory, and the ``python -m oddetr`` entry point.

Runs use the tiny model with a MobileNetV3-small backbone (12 MB checkpoints instead of ResNet-18's
135 MB, so a run takes about a second) and one intra-op thread.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from oddetr.cli import main
from oddetr.config import config_from_dict
from oddetr.engine.checkpoint import safe_load

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _keys(tiny_keys, *extra):
    return tiny_keys("model.backbone.name=mobilenet_v3_small", "data.flip=false", *extra)


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory, coco_writer, tiny_keys):
    """One finished 1-epoch COCO training run: (dataset, run directory). Tests copy it before changing it."""
    root = tmp_path_factory.mktemp("cli")
    data = coco_writer(root / "coco", num_images=4, seed=1)
    run = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["train", *_keys(tiny_keys, *data.keys(), "train.epochs=1", f"output={run}")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return data, run


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_run_dir(run: Path, epochs: int) -> list[dict]:
    assert (run / "config.yaml").is_file()
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert Path(cfg.output) == run and cfg.train.epochs == epochs
    records = _metrics(run)
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for record in records:
        for key in METRICS:
            value = record[f"student/{key}"]
            assert value == -1.0 or 0.0 <= value <= 1.0, (key, value)
        assert math.isfinite(record["train/loss"])
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    for name in ("last.pt", "best.pt"):
        assert (run / name).is_file(), name
    last = safe_load(run / "last.pt")
    assert last["epoch"] == epochs
    return records


def test_train_coco_writes_the_run_directory(coco_run, tiny_keys):
    data, run = coco_run
    records = _check_run_dir(run, epochs=1)
    assert records[0]["step"] == 2  # 4 images, batch 2
    # TensorBoard holds the same epoch scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    ap = acc.Scalars("student/AP")
    assert [e.step for e in ap] == [1] and ap[0].value == pytest.approx(records[0]["student/AP"], abs=1e-6)
    best = safe_load(run / "best.pt")
    assert best["best"] == pytest.approx(records[0]["student/AP"])
    assert best["classes"]["names"] == ["red", "green", "blue"]


def test_train_voc(tmp_path, voc_data, tiny_keys, capsys):
    voc = voc_data(num_images=4)
    run = tmp_path / "run"
    assert main(["train", *_keys(tiny_keys, *voc.keys(), "train.epochs=1", f"output={run}")]) == 0
    records = _check_run_dir(run, epochs=1)
    assert records[0]["step"] == 2
    assert safe_load(run / "last.pt")["num_classes"] == 20  # the VOC label space
    out = capsys.readouterr().out
    assert "run directory" in out and "student" in out


def test_eval_prints_one_json_line_equal_to_the_training_metrics(coco_run, capsys, monkeypatch):
    from oddetr.engine import cpu_memory

    data, run = coco_run
    capsys.readouterr()
    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    assert main(["eval", f"checkpoint={run / 'last.pt'}", *data.keys(("val",))]) == 0
    assert calls == [1]  # on a CPU, eval keeps freed memory as training does (train.keep_freed_memory)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    result = json.loads(lines[-1])
    assert list(result) == METRICS
    for value in result.values():
        assert value == -1.0 or 0.0 <= value <= 1.0
    # the same weights on the same images: the numbers logged at the end of the epoch
    record = _metrics(run)[-1]
    for key in METRICS:
        assert result[key] == pytest.approx(record[f"student/{key}"], abs=1e-9)


def test_predict_writes_pngs_and_coco_results(coco_run, tmp_path):
    data, run = coco_run
    out = tmp_path / "pred"
    assert main(["predict", f"checkpoint={run / 'last.pt'}", f"images={data.images}", f"output={out}",
                 "score_threshold=0"]) == 0
    inputs = sorted(p.name for p in data.images.glob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == inputs
    for name in inputs:
        with Image.open(out / name) as drawn, Image.open(data.images / name) as original:
            assert drawn.size == original.size
    detections = json.loads((out / "detections.json").read_text())
    assert isinstance(detections, list)
    # threshold 0: the top min(100, queries x classes) = 30 detections of every image
    assert len(detections) == len(inputs) * 30
    for det in detections:
        assert {"image_id", "category_id", "bbox", "score"} <= set(det)
        assert det["category_id"] in (1, 2, 3) and 0.0 <= det["score"] <= 1.0
        x, y, w, h = det["bbox"]
        assert 0 <= x <= x + w <= 64 and 0 <= y <= y + h <= 64
    assert {d["image_id"] for d in detections} == set(inputs)  # the file names (no annotations=FILE given)
    # the default threshold keeps a subset
    out2 = tmp_path / "pred2"
    assert main(["predict", f"checkpoint={run / 'last.pt'}", f"images={data.images}", f"output={out2}"]) == 0
    assert len(json.loads((out2 / "detections.json").read_text())) <= len(detections)


def test_resume_continues_to_the_next_epoch_exactly(coco_run, tmp_path, tiny_keys):
    data, run = coco_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    assert main(["train", "--resume", f"output={resumed}", "train.epochs=2"]) == 0
    records = _check_run_dir(resumed, epochs=2)
    assert records[0] == _metrics(run)[0]  # epoch 1 untouched
    assert records[1]["step"] == 4
    # the same two epochs in one go give the same numbers (model, optimiser, schedule, RNG restored)
    straight = tmp_path / "straight"
    assert main(["train", *_keys(tiny_keys, *data.keys(), "train.epochs=2", f"output={straight}")]) == 0
    reference = _metrics(straight)[1]
    for key in ("train/loss", *[f"student/{k}" for k in METRICS]):
        assert records[1][key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refuses_a_non_empty_output_unless_overwrite(coco_run, tmp_path, tiny_keys, capsys, stderr_lines):
    data, run = coco_run
    target = tmp_path / "existing"
    shutil.copytree(run, target)
    before = _hashes(target)
    capsys.readouterr()
    args = ["train", *_keys(tiny_keys, *data.keys(), "train.epochs=1", f"output={target}")]
    assert main(args) != 0
    err = stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("oddetr train: error:"), err
    assert str(target) in err[0] and "--resume" in err[0] and "overwrite=true" in err[0]
    assert _hashes(target) == before
    # overwrite=true replaces the run
    assert main([*args, "overwrite=true"]) == 0
    records = _check_run_dir(target, epochs=1)
    assert len(records) == 1
    assert not (target / "epoch_002.pt").exists()


def test_python_dash_m_entry_point(tmp_path, coco_data, tiny_keys):
    data = coco_data(num_images=2)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "oddetr", "train", *_keys(tiny_keys, *data.keys(), "train.epochs=1", f"output={run}")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "last.pt").is_file() and len(_metrics(run)) == 1
    assert "run directory" in proc.stdout


def test_console_script_and_exit_codes():
    """The installed ``oddetr`` script runs; a non-zero return of main() is the process's exit code."""
    script = Path(sys.executable).parent / "oddetr"
    if not script.is_file():
        pytest.skip(f"no console script beside {sys.executable} (package not pip-installed here)")
    proc = subprocess.run([str(script), "presets"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deformable-detr-r50" in proc.stdout.split()
    proc = subprocess.run([sys.executable, "-m", "oddetr"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage" in (proc.stdout + proc.stderr).lower()
