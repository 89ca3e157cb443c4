"""Config: presets, override parsing and types, YAML files with ``base:``, validation, round trips."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from oddetr.config import (
    Config,
    config_from_dict,
    load_preset,
    parse_overrides,
    preset_names,
    resolve_config,
)
from oddetr.errors import ConfigError


def test_presets_are_listed_and_load():
    names = preset_names()
    assert {"deformable-detr-r50", "deformable-detr-tiny"} <= set(names)
    for name in names:
        cfg = resolve_config(overrides=[f"model={name}"])
        assert cfg.preset == name


def test_deformable_detr_r50_preset_has_the_paper_settings():
    cfg = resolve_config(overrides=["model=deformable-detr-r50"])
    m = cfg.model
    assert m.arch == "deformable-detr" and m.backbone.name == "resnet50"
    assert (m.num_queries, m.enc_layers, m.dec_layers, m.d_model) == (300, 6, 6, 256)
    assert m.num_feature_levels == 4 and m.box_refine is True and m.two_stage is False
    assert (m.nheads, m.dim_feedforward, m.enc_points, m.dec_points) == (8, 1024, 4, 4)
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.train.lr_drop_epochs == [40]
    assert load_preset("deformable-detr-r50")["model"]["num_queries"] == 300


def test_default_preset_is_the_tiny_one():
    cfg = resolve_config()
    assert cfg.preset == "deformable-detr-tiny"
    assert cfg.model.backbone.name == "resnet18" and cfg.model.backbone.trainable_layers == 5
    assert cfg.model.d_model == 128 and cfg.model.dec_layers == 3


def test_overrides_parse_types():
    parsed = parse_overrides([
        "data.scales=[64, 96]", "model.box_refine=false", "train.lr=0.001", "train.epochs=3",
        "distill.aux_stages=null", "model.backbone.weights=None", "output=runs/x", "model=deformable-detr-r50",
        "distill.enabled=true",
    ])
    assert parsed == {
        "data": {"scales": [64, 96]},
        "model": {"box_refine": False, "backbone": {"weights": None}},
        "train": {"lr": 0.001, "epochs": 3},
        "distill": {"aux_stages": None, "enabled": True},
        "output": "runs/x",
        "preset": "deformable-detr-r50",
    }
    cfg = resolve_config(overrides=[
        "data.scales=[64, 96]", "model.box_refine=false", "train.lr=1e-3", "train.weight_decay=5e-5",
        "distill.aux_stages=[0, 1]", "model.backbone.weights=None", "train.epochs=3", "data.max_size=100",
        "train.clip_grad=1",
    ])
    assert cfg.data.scales == [64, 96] and cfg.model.box_refine is False
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(5e-5)  # YAML 1.1 reads 5e-5 as a string: still a number
    assert cfg.train.clip_grad == 1.0 and isinstance(cfg.train.clip_grad, float)
    assert cfg.distill.aux_stages == [0, 1] and cfg.model.backbone.weights is None
    assert cfg.train.epochs == 3 and cfg.data.max_size == 100
    # None / null / ~ / empty all mean None for an optional field
    for raw in ("None", "null", "~", ""):
        assert resolve_config(overrides=["distill.aux_stages=[1]", f"distill.aux_stages={raw}"]).distill.aux_stages is None
    # a scalar where a list is expected becomes a one-item list
    assert resolve_config(overrides=["data.scales=64"]).data.scales == [64]


@pytest.mark.parametrize("item,key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("model.box_refine=maybe", "model.box_refine"),
    ("train.lr=fast", "train.lr"),
    ("data.scales=[64, x]", "data.scales[1]"),
    ("loss.cls=softmax", "loss.cls"),
    ("train.epochs=true", "train.epochs"),
])
def test_wrong_types_name_the_key(item, key):
    with pytest.raises(ConfigError) as info:
        resolve_config(overrides=[item])
    assert f"'{key}'" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch' \(did you mean 'train\.epochs'\?\)"):
        resolve_config(overrides=["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"'model\.backbone\.nmae'.*'model\.backbone\.name'"):
        resolve_config(overrides=["model.backbone.nmae=resnet18"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.epochs"])


def test_validation_across_fields():
    with pytest.raises(ConfigError, match="divisible"):
        resolve_config(overrides=["model.d_model=30", "model.nheads=4"])
    with pytest.raises(ConfigError, match="train.epochs"):
        resolve_config(overrides=["train.epochs=0"])
    with pytest.raises(ConfigError, match="data.train.annotations"):
        resolve_config(overrides=["data.train.format=coco", "data.train.images=x"])
    with pytest.raises(ConfigError, match="aux_stages"):
        resolve_config(overrides=["model.dec_layers=2", "distill.aux_stages=[2]"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve_config(overrides=["model=nope"])


def test_model_preset_then_overrides():
    cfg = resolve_config(overrides=["model=deformable-detr-r50", "model.num_queries=100"])
    assert cfg.preset == "deformable-detr-r50" and cfg.model.num_queries == 100 and cfg.model.d_model == 256
    # order on the command line does not matter: the preset is the base, keys override it
    cfg = resolve_config(overrides=["model.num_queries=100", "model=deformable-detr-r50"])
    assert cfg.model.num_queries == 100 and cfg.model.d_model == 256


def test_yaml_file_with_base(tmp_path):
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump({"base": "deformable-detr-r50", "model": {"num_queries": 50},
                                    "train": {"epochs": 3, "lr": 1e-4}}))
    cfg = resolve_config(str(file))
    assert cfg.preset == "deformable-detr-r50"
    assert cfg.model.num_queries == 50 and cfg.model.d_model == 256 and cfg.model.enc_layers == 6
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-4)
    # command-line overrides beat the file, and a preset given on the command line beats its base
    cfg = resolve_config(str(file), ["train.epochs=7"])
    assert cfg.train.epochs == 7 and cfg.model.num_queries == 50
    cfg = resolve_config(str(file), ["model=deformable-detr-tiny"])
    assert cfg.preset == "deformable-detr-tiny" and cfg.model.d_model == 128 and cfg.model.num_queries == 50
    # a hand-written exponent without a dot (a string to YAML 1.1) is still a number
    file.write_text("base: deformable-detr-tiny\ntrain:\n  lr: 3e-4\n")
    assert resolve_config(str(file)).train.lr == pytest.approx(3e-4)
    # without base: the default preset
    file.write_text("train:\n  epochs: 2\n")
    cfg = resolve_config(str(file))
    assert cfg.preset == "deformable-detr-tiny" and cfg.train.epochs == 2


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML in .*bad.yaml"):
        resolve_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(str(tmp_path / "missing.yaml"))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(str(listing))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epohcs: 2\n")
    with pytest.raises(ConfigError, match="train.epohcs"):
        resolve_config(str(unknown))


@pytest.mark.parametrize("overrides", [[], ["model=deformable-detr-r50", "distill.enabled=true",
                                              "distill.aux_stages=[0, 2]", "model.backbone.weights=/x/r50.pth"]])
def test_round_trip_through_dict_and_yaml(overrides):
    cfg = resolve_config(overrides=overrides)
    assert isinstance(cfg, Config)
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    # the run directory's config.yaml round trip too
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert dataclasses.asdict(again) == cfg.to_dict()


def test_none_on_the_command_line_selects_a_literal_none_choice() -> None:
    """``train.amp=none`` parses as YAML's null; keys whose choices include "none" take it as that choice."""
    cfg = resolve_config(overrides=["train.amp=none", "distill.teacher_amp=None"])
    assert cfg.train.amp == "none" and cfg.distill.teacher_amp == "none"
    assert resolve_config(overrides=["train.amp=bf16"]).train.amp == "bf16"
    with pytest.raises(ConfigError, match="train.amp"):
        resolve_config(overrides=["train.amp=fp8"])
