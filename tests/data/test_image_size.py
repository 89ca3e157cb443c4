"""``data.image_size``: presets set it, the other sizes follow it in the preset's ratio unless set, and it
reaches the training and evaluation transforms (sizes read off real batches) and checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from oddetr.config import config_from_dict, eval_image_size, resolve_config
from oddetr.engine.data import build_dataset, make_loader
from oddetr.engine.inference import load_checkpoint_model
from oddetr.errors import ConfigError
from oddetr.models.detector import build_model


@pytest.mark.parametrize("preset,size", [
    ("deformable-detr-r50", 800), ("dab-deformable-detr-r50", 800), ("dino-4scale-r50", 800),
    ("deformable-detr-tiny", 128), ("dab-deformable-detr-tiny", 128), ("dino-tiny", 128),
])
def test_presets_set_the_image_size(preset, size):
    cfg = resolve_config(overrides=[f"model={preset}"])
    assert cfg.data.image_size == size and max(cfg.data.scales) <= cfg.data.max_size
    assert eval_image_size(cfg) == (size, cfg.data.max_size)


def test_image_size_scales_the_preset_sizes_in_ratio():
    tiny = resolve_config().data  # [112..144], 192, crops [96, 112, 128] 80..128 at 128
    d = resolve_config(overrides=["data.image_size=320"]).data
    assert d.image_size == 320
    assert d.scales == [round(s * 2.5) for s in tiny.scales] == [280, 300, 320, 340, 360]
    assert d.max_size == 480 and d.crop_scales == [240, 280, 320] and (d.crop_min, d.crop_max) == (200, 320)
    r50 = resolve_config(overrides=["model=deformable-detr-r50", "data.image_size=400"]).data
    assert r50.scales[0] == 240 and r50.scales[-1] == 400 and r50.max_size == round(1333 / 2)
    # keys set explicitly win over the derived ones
    d = resolve_config(overrides=["data.image_size=320", "data.max_size=320", "data.scales=[300, 320]"]).data
    assert (d.image_size, d.scales, d.max_size, d.crop_min) == (320, [300, 320], 320, 200)
    # experts who only set the scales: evaluation at max(scales) as before the key existed
    d = resolve_config(overrides=["data.scales=[48, 64]"]).data
    assert (d.image_size, d.scales, d.max_size) == (64, [48, 64], 192)


def test_image_size_from_a_config_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: deformable-detr-tiny\ndata:\n  image_size: 256\n")
    d = resolve_config(str(path)).data
    assert d.image_size == 256 and d.scales == [224, 240, 256, 272, 288] and d.max_size == 384


def test_saved_configs_without_the_key_evaluate_at_max_scales():
    saved = resolve_config(overrides=["data.scales=[48, 64]"]).to_dict()
    del saved["data"]["image_size"]
    assert config_from_dict(saved).data.image_size == 64


@pytest.mark.parametrize("item", ["data.image_size=0", "data.image_size=-8", "data.image_size=big"])
def test_bad_image_size_is_one_config_error(item):
    with pytest.raises(ConfigError, match="data.image_size"):
        resolve_config(overrides=[item])


def _coco(root: Path, sizes: list[tuple[int, int]]) -> list[str]:
    """Images of the given (w, h) with one centred box each; ``data.train/val`` keys for them."""
    (root / "images").mkdir(parents=True)
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for k, (w, h) in enumerate(sizes, start=1):
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / "images" / f"{k}.png")
        data["images"].append({"id": k, "file_name": f"{k}.png", "width": w, "height": h})
        data["annotations"].append({"id": k, "image_id": k, "category_id": 1, "iscrowd": 0, "area": 1.0,
                                    "bbox": [w / 4, h / 4, w / 2, h / 2]})
    (root / "ann.json").write_text(json.dumps(data))
    return [f"data.{s}.{key}={value}" for s in ("train", "val")
            for key, value in (("images", root / "images"), ("annotations", root / "ann.json"))]


def test_image_size_reaches_train_and_eval_batches(tmp_path):
    # landscape and portrait images of shorter side 100; image_size=40 -> train scales [35..45], cap 60
    keys = _coco(tmp_path, [(150, 100), (100, 130), (100, 100), (200, 100)])
    cfg = resolve_config(overrides=[*keys, "data.image_size=40", "data.num_workers=0", "train.batch_size=4"])
    assert cfg.data.scales == [35, 38, 40, 42, 45] and cfg.data.max_size == 60 and not cfg.data.crop
    torch.manual_seed(0)
    train = build_dataset(cfg, "train", train=True)
    seen = set()
    for _ in range(6):
        _, _, targets = next(iter(make_loader(train, 4, True, 0, 0)))
        for t in targets:
            h, w = t["size"].tolist()
            assert max(h, w) <= 60
            if max(h, w) < 60:  # not capped by max_size: the shorter side is one of the scales
                assert min(h, w) in cfg.data.scales
            seen.add(min(h, w))
    assert len(seen) > 2  # multi-scale around 40
    images, _, targets = next(iter(make_loader(build_dataset(cfg, "val", train=False), 4, False, 0, 0)))
    sizes = [tuple(t["size"].tolist()) for t in targets]
    assert sizes == [(40, 60), (52, 40), (40, 40), (30, 60)]  # 200x100 is capped: longer side 60
    assert images.shape[-2:] == (52, 60)


def test_checkpoint_size_is_used_unless_overridden(tmp_path, tiny_config):
    cfg = tiny_config("data.image_size=64", "model.backbone.name=mobilenet_v3_small")
    assert (cfg.data.scales, cfg.data.max_size) == ([64], 64)
    model = build_model(cfg.model, 3)
    state = {"format": "oddetr-checkpoint-v1", "config": cfg.to_dict(), "num_classes": 3, "epoch": 1,
             "model": model.state_dict(), "teacher": None,
             "classes": {"names": ["a", "b", "c"], "label_to_cat_id": [1, 2, 3], "categories": []}}
    torch.save(state, tmp_path / "ck.pt")
    loaded = load_checkpoint_model(tmp_path / "ck.pt")
    assert eval_image_size(loaded.config) == (64, 64)
    loaded = load_checkpoint_model(tmp_path / "ck.pt", config_overrides={"data": {"image_size": 32}})
    assert eval_image_size(loaded.config) == (32, 32) and loaded.config.data.scales == [32]
