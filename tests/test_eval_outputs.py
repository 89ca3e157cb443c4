"""Custom VOC classes through the CLI, ``oddetr eval``'s output folder, ``predict``'s image ids and
``oddetr weights``.

Oracles: ``results.json`` re-scored by faster-coco-eval and pycocotools against the annotation file; per-class
AP against COCO evaluation restricted to that one category; a converted checkpoint's weights against the
original's.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from faster_coco_eval import COCO, COCOeval_faster

from oddetr.cli import main
from oddetr.engine.checkpoint import safe_load
from oddetr.engine.inference import load_checkpoint_model

pytestmark = pytest.mark.usefixtures("one_thread")
# image ids 101.., category ids 5 / 9 / 12: results.json must carry the file's ids, not positions
CAT_IDS = {1: 5, 2: 9, 3: 12}


def _keys(tiny_keys, *extra):
    return tiny_keys("model.backbone.name=mobilenet_v3_small", "data.flip=false", *extra)


def _renumber(data: dict) -> None:
    for img in data["images"]:
        img["id"] += 100
    for ann in data["annotations"]:
        ann["image_id"] += 100
        ann["category_id"] = CAT_IDS[ann["category_id"]]
    for cat in data["categories"]:
        cat["id"] = CAT_IDS[cat["id"]]


def _one_class(data: dict) -> None:
    _renumber(data)
    data["categories"] = data["categories"][:1]
    for ann in data["annotations"]:
        ann["category_id"] = data["categories"][0]["id"]


# four quick epochs at a high constant lr, evaluated once: enough for an AP above 0 (a real comparison)
FAST = ["train.epochs=4", "train.warmup_steps=0", "train.lr=2e-3", "train.schedule=step", "train.eval_every=4"]


def _train(run: Path, tiny_keys, data_keys: list[str], *extra: str) -> Path:
    assert main(["train", *_keys(tiny_keys, *data_keys, *FAST, f"output={run}", *extra)]) == 0
    return run


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory, coco_writer, tiny_keys):
    root = tmp_path_factory.mktemp("evalout")
    data = coco_writer(root / "coco", num_images=4, seed=3, edit=_renumber)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _train(root / "run", tiny_keys, data.keys())
    finally:
        torch.set_num_threads(threads)
    return data, run


def _eval(capsys, *args: str) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def _rescore(annotations: Path, results: Path, cat_ids: list[int] | None = None) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        ev = COCOeval_faster(gt, gt.loadRes(str(results)), iouType="bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_results_json_rescored_gives_the_printed_ap(coco_run, capsys):
    data, run = coco_run
    metrics, err = _eval(capsys, f"checkpoint={run / 'last.pt'}", *data.keys(("val",)))
    out = run / "eval" / "last"  # the default folder
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "per_class.json", "pr_curve.png", "results.json"]
    assert (out / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["AP"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results and {d["image_id"] for d in results} == {101, 102, 103, 104}
    assert {d["category_id"] for d in results} <= set(CAT_IDS.values())
    assert _rescore(data.annotations, out / "results.json") == pytest.approx(metrics["AP"], abs=1e-12)
    # pycocotools, the reference implementation, agrees too
    from pycocotools.coco import COCO as PyCOCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = PyCOCO(str(data.annotations))
        ev = COCOeval(gt, gt.loadRes(str(out / "results.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(metrics["AP"], abs=1e-9)
    # per class: COCO evaluation restricted to that category; the table lists every class
    rows = json.loads((out / "per_class.json").read_text())
    assert [(r["class"], r["category_id"]) for r in rows] == [("red", 5), ("green", 9), ("blue", 12)]
    for r in rows:
        assert r["num_gt"] == sum(a["category_id"] == r["category_id"] for a in data.data["annotations"])
        expected = _rescore(data.annotations, out / "results.json", [r["category_id"]]) if r["num_gt"] else -1.0
        assert r["AP"] == pytest.approx(expected, abs=1e-12), r
        assert any(line.split()[:3] == [r["class"], str(r["category_id"]), str(r["num_gt"])] for line in err.splitlines())
    with_gt = [r["AP"] for r in rows if r["num_gt"]]
    assert np.mean(with_gt) == pytest.approx(metrics["AP"], abs=1e-12)
    assert json.loads((out / "eval.json").read_text())["metrics"]["AP"] == metrics["AP"]


def test_one_class_set_per_class_ap_equals_the_overall_ap(tmp_path, coco_data, tiny_keys, capsys):
    data = coco_data(num_images=3, seed=4, edit=_one_class)
    run = _train(tmp_path / "run", tiny_keys, data.keys())
    metrics, _ = _eval(capsys, f"checkpoint={run / 'last.pt'}", f"output={tmp_path / 'ev'}")
    (row,) = json.loads((tmp_path / "ev" / "per_class.json").read_text())
    assert row["class"] == "red" and row["num_gt"] == len(data.data["annotations"])
    assert metrics["AP"] > 0
    assert row["AP"] == metrics["AP"] and row["AP50"] == metrics["AP50"] and row["AP75"] == metrics["AP75"]


def test_eval_never_overwrites_another_evaluation(coco_run, tmp_path, capsys, stderr_lines):
    data, run = coco_run
    out = tmp_path / "ev"
    _eval(capsys, f"checkpoint={run / 'last.pt'}", f"output={out}")
    before = (out / "results.json").read_bytes()
    _eval(capsys, f"checkpoint={run / 'last.pt'}", f"output={out}")  # the same evaluation again: refreshed
    assert main(["eval", f"checkpoint={run / 'best.pt'}", f"output={out}"]) == 2
    err = stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(out) in err[0] and "overwrite=true" in err[0] and "last.pt" in err[0]
    assert (out / "results.json").read_bytes() == before
    _eval(capsys, f"checkpoint={run / 'best.pt'}", f"output={out}", "overwrite=true")
    assert json.loads((out / "eval.json").read_text())["checkpoint"].endswith("best.pt")


def test_predict_writes_dataset_image_ids_given_annotations(coco_run, tmp_path):
    data, run = coco_run
    args = ["predict", f"checkpoint={run / 'last.pt'}", f"images={data.images}", "score_threshold=0"]
    assert main([*args, f"output={tmp_path / 'a'}", f"annotations={data.annotations}"]) == 0
    with_ids = json.loads((tmp_path / "a" / "detections.json").read_text())
    id_of = {img["file_name"]: img["id"] for img in data.data["images"]}
    assert with_ids and all(d["image_id"] == id_of[d["file_name"]] for d in with_ids)
    assert {d["category_id"] for d in with_ids} <= set(CAT_IDS.values())
    assert main([*args, f"output={tmp_path / 'b'}"]) == 0
    by_name = json.loads((tmp_path / "b" / "detections.json").read_text())
    assert [d["image_id"] for d in by_name] == [d["file_name"] for d in with_ids]


def test_custom_voc_classes_train_eval_predict(tmp_path, voc_writer, tiny_keys, capsys):
    voc = voc_writer(tmp_path / "voc", num_images=4, seed=5, names={1: "Tree", 2: "Car", 3: "Tree"})
    run = _train(tmp_path / "run", tiny_keys, voc.keys())
    state = safe_load(run / "last.pt")
    assert state["classes"]["names"] == ["Car", "Tree"] and state["num_classes"] == 2
    metrics, err = _eval(capsys, f"checkpoint={run / 'last.pt'}")
    rows = json.loads((run / "eval" / "last" / "per_class.json").read_text())
    assert [r["class"] for r in rows] == ["Car", "Tree"]
    assert sum(r["num_gt"] for r in rows) == sum(len(scene) for scene in voc.scenes)
    assert "Tree" in err and "Car" in err and 0.0 <= metrics["AP"] <= 1.0
    assert main(["predict", f"checkpoint={run / 'last.pt'}", f"images={voc.root / 'JPEGImages'}",
                 f"output={tmp_path / 'pred'}", "score_threshold=0"]) == 0
    dets = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert {d["image_id"] for d in dets} == {p.name for p in (voc.root / "JPEGImages").iterdir()}
    assert {d["category_id"] for d in dets} <= {1, 2}


def test_unknown_class_in_validation_names_the_file(tmp_path, voc_writer, tiny_keys, capsys, stderr_lines):
    train = voc_writer(tmp_path / "train", num_images=2, seed=6, names={1: "Tree", 2: "Car", 3: "Car"})
    val = voc_writer(tmp_path / "val", num_images=2, seed=7, names={1: "Tree", 2: "Bus", 3: "Bus"})
    xml = next(p for p in sorted((val.root / "Annotations").iterdir()) if "Bus" in p.read_text())
    capsys.readouterr()
    args = ["train", *_keys(tiny_keys, *train.keys(("train",)), *val.keys(("val",)), f"output={tmp_path / 'run'}")]
    assert main(args) == 2
    err = stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(xml) in err[0] and "'Bus'" in err[0] and "['Car', 'Tree']" in err[0], err


def test_weights_inspects_and_converts_a_checkpoint(coco_run, tmp_path, capsys):
    data, run = coco_run
    capsys.readouterr()
    assert main(["weights", str(run / "last.pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    checkpoint = safe_load(run / "last.pt")
    # an OD-DETR run (the default) converts to its EMA teacher's weights, a baseline run to the student's
    state = checkpoint["teacher"]["model"] if checkpoint.get("teacher") else checkpoint["model"]
    assert lines[1].startswith("format: oddetr (oddetr checkpoint, epoch 4")
    assert lines[2] == f"tensors: {len(state)} ({sum(t.numel() for t in state.values()):,} values)"
    assert lines[3] == "classes: 3 (red, green, blue)"
    assert "model.d_model=32" in lines[-1].split() and "model.num_queries=10" in lines[-1].split()
    out = tmp_path / "converted.pt"
    assert main(["weights", str(run / "last.pt"), f"output={out}"]) == 0
    loaded = load_checkpoint_model(out, config_overrides={"eval": {"fuse_norms": False}})  # the weights as saved
    assert loaded.class_names == ["red", "green", "blue"] and loaded.label_to_cat_id == [5, 9, 12]
    converted = loaded.model.state_dict()
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    assert main(["weights", str(tmp_path / "missing.pt")]) == 2


def test_init_weights_module_is_a_shim(coco_run, capsys):
    from oddetr.engine.init_weights import main as shim

    _, run = coco_run
    capsys.readouterr()
    assert shim([str(run / "last.pt")]) == 0
    assert "format: oddetr" in capsys.readouterr().out

