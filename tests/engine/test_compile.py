"""``compile=true``: the trainer, ``oddetr eval`` / ``predict`` and the API run the detector through
``torch.compile``. The oracle is the same run in eager mode (the ``aot_eager`` backend traces the model
as Inductor would, without generating code, so the test stays fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_testutils import FAST_KEYS, read_jsonl, synthetic_keys

from oddetr.api import Detector
from oddetr.cli import main
from oddetr.engine.checkpoint import safe_load
from oddetr.engine.compiled import eager_copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_keys) -> tuple[Path, Path, str]:
    """The same 3-step OD-DETR run, eager and compiled: (eager dir, compiled dir, compiled run's stderr)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("compile")
    keys = tiny_keys(*synthetic_keys(root / "synthetic"), *FAST_KEYS, "distill.enabled=true", "train.epochs=1",
                     "train.max_steps_per_epoch=3", "train.log_steps=true")
    assert main(["train", *keys, f"output={root / 'eager'}"]) == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", *keys, f"output={root / 'compiled'}", "compile=true", "compile_backend=aot_eager"]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was compiled
    return root / "eager", root / "compiled", err.getvalue()


def test_compiled_training_follows_the_eager_run(runs) -> None:
    eager, compiled, err = runs
    assert "torch.compile (aot_eager): the student" in err and "the EMA teacher" in err
    steps_eager, steps_compiled = read_jsonl(eager / "steps.jsonl"), read_jsonl(compiled / "steps.jsonl")
    assert len(steps_eager) == len(steps_compiled) == 3
    for a, b in zip(steps_eager, steps_compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    # the checkpoint is the eager module's: same keys for the student and the EMA teacher
    a, b = safe_load(eager / "last.pt"), safe_load(compiled / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert a["teacher"]["model"].keys() == b["teacher"]["model"].keys()


def test_compiled_detector_predicts_like_the_eager_one_and_exports_eagerly(runs) -> None:
    eager_det = Detector.from_checkpoint(runs[1] / "last.pt", device="cpu")
    compiled_det = Detector.from_checkpoint(runs[1] / "last.pt", device="cpu").compile("aot_eager")
    image = torch.rand(3, 64, 80)
    for a, b in zip(eager_det.predict([image], score_threshold=0.0), compiled_det.predict([image], score_threshold=0.0)):
        torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5)
    # export (and anything else that copies the model) gets an eager copy that runs its own weights
    model = compiled_det.model
    copy = eager_copy(model)
    assert all(m._compiled_call_impl is None for m in copy.modules())
    with torch.no_grad():
        for head in copy.class_heads:
            head.bias += 1.0
        x, mask = torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
        torch.testing.assert_close(copy(x, mask).pred_logits, model(x, mask).pred_logits + 1.0)


def test_an_unknown_compile_backend_is_a_one_line_config_error(tmp_path, tiny_keys, capsys) -> None:
    keys = tiny_keys(*synthetic_keys(tmp_path / "synthetic"), *FAST_KEYS, "compile=true", "compile_backend=nope")
    assert main(["train", *keys, f"output={tmp_path / 'run'}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("compile_backend" in line and "'nope'" in line for line in err)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_predict_command_with_compile_writes_the_eager_detections(runs, tmp_path, capsys) -> None:
    import json

    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 72, 3), dtype=np.uint8)).save(images / f"{i}.png")
    common = [f"checkpoint={runs[1] / 'last.pt'}", f"images={images}", "score_threshold=0.0"]
    assert main(["predict", *common, f"output={tmp_path / 'eager'}"]) == 0
    assert main(["predict", *common, f"output={tmp_path / 'compiled'}", "compile=true",
                 "compile_backend=aot_eager"]) == 0
    assert "torch.compile (aot_eager)" in capsys.readouterr().err
    eager = json.loads((tmp_path / "eager" / "detections.json").read_text())
    compiled = json.loads((tmp_path / "compiled" / "detections.json").read_text())
    assert len(eager) == len(compiled) > 0
    for a, b in zip(eager, compiled):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert b["score"] == pytest.approx(a["score"], rel=1e-4, abs=1e-5)
        assert b["bbox"] == pytest.approx(a["bbox"], rel=1e-4, abs=1e-3)
