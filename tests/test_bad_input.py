"""Bad input through the CLI: a non-zero exit, exactly one stderr line ``oddetr <cmd>: error: ...``
naming the file / image id / key, and no traceback. Fixable box problems only warn."""

from __future__ import annotations

import os
import warnings

import pytest
import yaml

from oddetr.cli import main
from oddetr.data.coco import CocoDetection

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_args(tiny_keys, tmp_path, *extra):
    return ["train", *tiny_keys("model.backbone.name=mobilenet_v3_small", "data.flip=false", "train.epochs=1",
                                f"output={tmp_path / 'run'}", *extra)]


def _one_error_line(capsys, stderr_lines, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = stderr_lines(err)
    # a run that got as far as its data prints the run header and dataset summary first
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert lines[-1].startswith(f"oddetr {command}: error: "), lines
    return lines[-1]


def test_missing_image_file(tmp_path, coco_data, tiny_keys, capsys, stderr_lines):
    data = coco_data()
    missing = data.path_of(2)
    missing.unlink()
    assert main(_train_args(tiny_keys, tmp_path, *data.keys())) != 0
    line = _one_error_line(capsys, stderr_lines, "train")
    assert str(missing) in line and "image id 2" in line


def _corrupt(path, kind):
    if kind == "random bytes":
        path.write_bytes(os.urandom(800))
    else:  # a PNG cut in half: the header reads, decoding fails
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("kind", ["random bytes", "truncated"])
def test_corrupt_image_stops_training_with_one_line(tmp_path, coco_data, tiny_keys, capsys, stderr_lines,
                                                    kind, workers):
    """The file is only read at __getitem__ time, inside the training loop (and in a worker process)."""
    data = coco_data()
    bad = data.path_of(3)
    _corrupt(bad, kind)
    assert main(_train_args(tiny_keys, tmp_path, *data.keys(), f"data.num_workers={workers}")) != 0
    line = _one_error_line(capsys, stderr_lines, "train")
    assert str(bad) in line and "image id 3" in line
    assert "worker" not in line.lower()


def test_malformed_json(tmp_path, coco_data, tiny_keys, capsys, stderr_lines):
    data = coco_data()
    text = data.annotations.read_text()
    data.annotations.write_text(text[: len(text) // 2])
    assert main(_train_args(tiny_keys, tmp_path, *data.keys())) != 0
    line = _one_error_line(capsys, stderr_lines, "train")
    assert str(data.annotations) in line and "malformed JSON" in line


def _add_box(bbox, image_id=1):
    def edit(d):
        d["annotations"].append({"id": 1000, "image_id": image_id, "category_id": 1, "bbox": bbox,
                                 "area": 1.0, "iscrowd": 0})
    return edit


@pytest.mark.parametrize("bbox,expected", [
    ([5, 5, 0, 10], "dropped 1 boxes"),  # width 0
    ([10, 10, 8, -3], "dropped 1 boxes"),  # negative height
    ([50, 40, 30, 10], "clipped 1 boxes"),  # sticks out on the right of the 64 px image
])
def test_bad_boxes_warn_and_training_proceeds(tmp_path, coco_data, tiny_keys, capsys, bbox, expected):
    data = coco_data(edit=_add_box(bbox))
    with pytest.warns(UserWarning, match=expected) as record:
        assert main(_train_args(tiny_keys, tmp_path, *data.keys())) == 0
    assert any(str(data.annotations) in str(w.message) for w in record)
    assert (tmp_path / "run" / "last.pt").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert "error" not in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gt = CocoDetection(data.images, data.annotations).coco_gt()
    extra = [a for a in gt["annotations"] if a["id"] == 1000]
    if expected.startswith("dropped"):
        assert extra == []
    else:
        assert extra[0]["bbox"] == [50.0, 40.0, 14.0, 10.0]  # clipped to the image


def test_category_id_not_in_categories(tmp_path, coco_data, tiny_keys, capsys, stderr_lines):
    def edit(d):
        d["annotations"][1]["category_id"] = 99
    data = coco_data(edit=edit)
    ann = data.data["annotations"][1]
    assert main(_train_args(tiny_keys, tmp_path, *data.keys())) != 0
    line = _one_error_line(capsys, stderr_lines, "train")
    assert "category_id 99" in line and f"annotation {ann['id']}" in line and f"image id {ann['image_id']}" in line
    assert str(data.annotations) in line


def test_unknown_config_key_suggests_the_right_one(tmp_path, tiny_keys, capsys, stderr_lines):
    assert main(_train_args(tiny_keys, tmp_path, "train.epoch=3")) != 0
    line = _one_error_line(capsys, stderr_lines, "train")
    assert "'train.epoch'" in line and "did you mean 'train.epochs'" in line


def test_wrong_type(tmp_path, tiny_keys, capsys, stderr_lines):
    assert main(_train_args(tiny_keys, tmp_path, "train.epochs=abc")) != 0
    line = _one_error_line(capsys, stderr_lines, "train")
    assert "'train.epochs'" in line and "'abc'" in line and "integer" in line


def test_missing_checkpoint_for_eval(tmp_path, capsys, stderr_lines):
    path = tmp_path / "nope" / "last.pt"
    assert main(["eval", f"checkpoint={path}"]) != 0
    line = _one_error_line(capsys, stderr_lines, "eval")
    assert str(path) in line


def test_corrupt_checkpoint_for_eval(tmp_path, capsys, stderr_lines):
    path = tmp_path / "last.pt"
    path.write_bytes(os.urandom(300))
    assert main(["eval", f"checkpoint={path}"]) != 0
    assert str(path) in _one_error_line(capsys, stderr_lines, "eval")


def test_bad_preset_name(tmp_path, capsys, stderr_lines):
    assert main(["train", "model=deformable-detr-r5O", f"output={tmp_path / 'run'}"]) != 0
    line = _one_error_line(capsys, stderr_lines, "train")
    assert "'deformable-detr-r5O'" in line and "deformable-detr-r50" in line  # lists the available ones


def test_malformed_yaml_config_file(tmp_path, capsys, stderr_lines):
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  epochs: 3\n  lr: [0.1\nmodel: {d_model: 32\n")
    assert main(["train", "--config", str(config), f"output={tmp_path / 'run'}"]) != 0
    line = _one_error_line(capsys, stderr_lines, "train")
    assert str(config) in line and "line" in line
    yaml_ok = tmp_path / "ok.yaml"
    yaml_ok.write_text(yaml.safe_dump({"train": {"epochz": 1}}))
    assert main(["train", "--config", str(yaml_ok), f"output={tmp_path / 'run'}"]) != 0
    assert "train.epochz" in _one_error_line(capsys, stderr_lines, "train")
