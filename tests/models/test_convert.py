"""Official Deformable-DETR / DINO checkpoints, oddetr checkpoints as init weights, class-count adaptation.

The official layouts are made from random oddetr models with the inverse mapping
(:func:`~oddetr.models.convert.to_official_layout`), saved as the official code saves them
(``{"model": ..., "args": argparse.Namespace}``), then read and converted back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from oddetr.engine.init_weights import load_init_weights, read_init_weights
from oddetr.errors import CheckpointError, ConfigError
from oddetr.models.convert import (
    adapt_num_classes,
    check_architecture,
    convert_official_deformable_detr,
    convert_official_dino,
    overrides_as_keys,
    read_official_checkpoint,
    swap_xy_blocks,
    to_official_layout,
)
from oddetr.models.detector import build_model

NUM_CLASSES = 3


def _model(tiny_config, *extra: str, seed: int = 0, num_classes: int = NUM_CLASSES):
    torch.manual_seed(seed)
    cfg = tiny_config("model.backbone.norm=frozen_bn", *extra)
    return build_model(cfg.model, num_classes), cfg


def _save_official(path: Path, state: dict, cfg) -> Path:
    m = cfg.model
    args = argparse.Namespace(nheads=m.nheads, enc_n_points=m.enc_points, dec_n_points=m.dec_points,
                              num_queries=m.num_queries, backbone=m.backbone.name, lr=2e-4, with_box_refine=m.box_refine)
    torch.save({"model": state, "args": args, "epoch": 49}, path)
    return path


def _assert_same(converted: dict, model, absent: tuple[str, ...] = ()) -> None:
    """``converted`` holds every tensor of ``model`` (except keys starting with ``absent``), equal."""
    own = {k: v for k, v in model.state_dict().items()
           if not k.endswith("num_batches_tracked") and not k.startswith(absent)}
    assert sorted(converted) == sorted(own)
    assert [k for k in own if not torch.equal(converted[k], own[k])] == []


@pytest.mark.parametrize("extra", [(), ("model.two_stage=true",), ("model.box_refine=false",)],
                         ids=["box-refine", "two-stage", "plain"])
def test_official_deformable_detr_round_trip(tiny_config, tmp_path, extra):
    model, cfg = _model(tiny_config, *extra)
    state = to_official_layout(model.state_dict(), box_refine=cfg.model.box_refine)
    assert "transformer.decoder.layers.0.norm3.weight" in state and "backbone.0.body.conv1.weight" in state
    assert ("transformer.decoder.bbox_embed.0.layers.0.weight" in state) == cfg.model.box_refine
    path = _save_official(tmp_path / "checkpoint.pth", state, cfg)

    # two-stage oddetr models also derive positional queries for AUX groups: no official counterpart
    absent = ("position_head.",) if cfg.model.two_stage else ()
    overrides, converted, unmapped = convert_official_deformable_detr(read_official_checkpoint(path))
    assert unmapped == []
    _assert_same(converted, model, absent)
    check_architecture(cfg.model, overrides, str(path))  # the same architecture: no error
    assert overrides["backbone"] == {"name": "resnet18"} and overrides["two_stage"] == cfg.model.two_stage

    fresh, _ = _model(tiny_config, *extra, seed=1)
    report = load_init_weights(fresh, path, cfg.model)
    assert report.format == "deformable-detr" and report.reinitialised == []
    assert report.kept_init == sorted(k for k in model.state_dict() if k.startswith(absent))
    _assert_same({k: v for k, v in fresh.state_dict().items() if not k.startswith(absent)}, model, absent)


def test_proposal_projection_columns_follow_the_sine_order():
    # the official code embeds proposals as (x, y, w, h), oddetr as (y, x, w, h)
    weight = torch.arange(2 * 8, dtype=torch.float32).view(2, 8)
    swapped = swap_xy_blocks(weight)
    assert swapped[0].tolist() == [2, 3, 0, 1, 4, 5, 6, 7]
    assert torch.equal(swap_xy_blocks(swapped), weight)


def test_official_dino_maps_what_the_model_has(tiny_config, tmp_path):
    model, cfg = _model(tiny_config, "model.arch=dino", "model.two_stage=true", "model.dn_queries=10",
                        "model.look_forward_twice=true")
    state = to_official_layout(model.state_dict(), dino=True)
    assert "transformer.enc_out_class_embed.weight" in state and "transformer.tgt_embed.weight" in state
    d = cfg.model.d_model
    state["transformer.decoder.norm.weight"] = torch.ones(d)  # DINO's final decoder norm: oddetr has none
    state["transformer.decoder.norm.bias"] = torch.zeros(d)
    state["label_enc.weight"] = torch.cat([state["label_enc.weight"], torch.randn(1, d)])  # num_classes + 1 rows
    path = _save_official(tmp_path / "dino.pth", state, cfg)

    overrides, converted, unmapped = convert_official_dino(read_official_checkpoint(path))
    assert sorted(unmapped) == ["transformer.decoder.norm.bias", "transformer.decoder.norm.weight"]
    assert overrides["arch"] == "dino" and overrides["num_queries"] == cfg.model.num_queries
    _assert_same(converted, model)

    fresh, _ = _model(tiny_config, "model.arch=dino", "model.two_stage=true", "model.dn_queries=10", seed=1)
    report = load_init_weights(fresh, path, cfg.model)
    assert report.format == "dino" and sorted(report.unmapped) == sorted(unmapped)
    _assert_same(fresh.state_dict(), model)
    # without denoising queries the label embedding has no place: reported, not loaded
    plain, plain_cfg = _model(tiny_config, "model.arch=dino", "model.two_stage=true")
    report = load_init_weights(plain, path, plain_cfg.model)
    assert "label_embed.weight" in report.unmapped


def test_oddetr_checkpoint_as_init_weights_prefers_the_teacher(tiny_config, tmp_path):
    student, cfg = _model(tiny_config, seed=0)
    teacher, _ = _model(tiny_config, seed=1)
    path = tmp_path / "last.pt"
    torch.save({"format": "oddetr-checkpoint-v1", "config": cfg.to_dict(), "num_classes": NUM_CLASSES,
                "classes": {"names": ["a", "b", "c"]}, "model": student.state_dict(),
                "teacher": {"model": teacher.state_dict(), "step": 3}}, path)
    fmt, overrides, _, _, names = read_init_weights(path)
    assert fmt == "oddetr" and names == ["a", "b", "c"] and overrides["d_model"] == cfg.model.d_model
    fresh, _ = _model(tiny_config, seed=2, num_classes=5)
    report = load_init_weights(fresh, path, cfg.model)
    assert sorted(report.reinitialised) == sorted(k for k in fresh.state_dict() if k.startswith("class_heads."))
    state = fresh.state_dict()
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items() if not k.startswith("class_heads."))
    assert state["class_heads.0.weight"].shape[0] == 5


def test_adapt_num_classes_drops_only_class_dependent_tensors():
    state = {"class_heads.0.weight": torch.zeros(91, 8), "class_heads.0.bias": torch.zeros(91),
             "label_embed.weight": torch.zeros(91, 8), "bbox_heads.0.layers.0.weight": torch.zeros(8, 8),
             "level_embed": torch.zeros(4, 8)}
    kept, dropped = adapt_num_classes(state, 3)
    assert sorted(dropped) == ["class_heads.0.bias", "class_heads.0.weight", "label_embed.weight"]
    assert sorted(kept) == ["bbox_heads.0.layers.0.weight", "level_embed"]
    same, none = adapt_num_classes(state, 91)
    assert none == [] and same.keys() == state.keys()


def test_errors_are_one_line(tiny_config, tmp_path):
    model, cfg = _model(tiny_config)
    with pytest.raises(CheckpointError, match="not found") as err:
        load_init_weights(model, tmp_path / "missing.pth", cfg.model)
    assert "\n" not in str(err.value)

    state = to_official_layout(model.state_dict())
    state["transformer.some_new_module.weight"] = torch.zeros(2)
    path = _save_official(tmp_path / "odd.pth", state, cfg)
    with pytest.raises(CheckpointError, match="no oddetr counterpart.*some_new_module"):
        load_init_weights(model, path, cfg.model)

    state = to_official_layout(model.state_dict())
    path = _save_official(tmp_path / "ok.pth", state, cfg)
    other = tiny_config("model.backbone.norm=frozen_bn", "model.dec_layers=3", "model.num_queries=20").model
    with pytest.raises(ConfigError) as err:
        load_init_weights(model, path, other)
    assert "\n" not in str(err.value)
    assert "set model.dec_layers=2 model.num_queries=10" in str(err.value)

    torch.save({"model": {"fc.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Hugging Face, Deformable-DETR, DINO or oddetr"):
        load_init_weights(model, tmp_path / "other.pth", cfg.model)


def test_overrides_as_keys_are_config_overrides():
    keys = overrides_as_keys({"d_model": 256, "two_stage": False, "backbone": {"name": "resnet50"}})
    assert keys == ["model.d_model=256", "model.two_stage=false", "model.backbone.name=resnet50"]


def test_command_prints_the_matching_config_keys(tiny_config, tmp_path, capsys):
    from oddetr.engine.init_weights import main

    model, cfg = _model(tiny_config)
    path = _save_official(tmp_path / "checkpoint.pth", to_official_layout(model.state_dict()), cfg)
    assert main([str(path)]) == 0
    keys = capsys.readouterr().out.split()
    assert "model.d_model=32" in keys and "model.num_queries=10" in keys and "model.backbone.name=resnet18" in keys
    assert main([str(tmp_path / "missing")]) == 2


def test_hf_config_of_transformers_4_checkpoints():
    from oddetr.models.convert import hf_overrides

    # the config.json of SenseTime/deformable-detr-with-box-refine, as transformers 4.x wrote it
    config = {"model_type": "deformable_detr", "d_model": 256, "encoder_layers": 6, "decoder_layers": 6,
              "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_ffn_dim": 1024,
              "decoder_ffn_dim": 1024, "num_feature_levels": 4, "encoder_n_points": 4, "decoder_n_points": 4,
              "num_queries": 300, "with_box_refine": True, "two_stage": False, "two_stage_num_proposals": 300,
              "backbone": "resnet50", "use_timm_backbone": True, "backbone_config": None, "dilation": False,
              "position_embedding_type": "sine", "activation_function": "relu"}
    overrides = hf_overrides(config)
    assert overrides_as_keys(overrides) == [
        "model.arch=deformable-detr", "model.d_model=256", "model.nheads=8", "model.enc_layers=6",
        "model.dec_layers=6", "model.dim_feedforward=1024", "model.num_feature_levels=4", "model.enc_points=4",
        "model.dec_points=4", "model.num_queries=300", "model.box_refine=true", "model.two_stage=false",
        "model.backbone.name=resnet50"]
    assert hf_overrides({**config, "two_stage": True, "two_stage_num_proposals": 100})["num_queries"] == 100
    for change, words in (({"position_embedding_type": "learned"}, "sine"), ({"dilation": True}, "DC5"),
                          ({"decoder_attention_heads": 4}, "heads"), ({"model_type": "detr"}, "model_type")):
        with pytest.raises(ConfigError, match=words):
            hf_overrides({**config, **change})


def test_weights_command_converts_an_official_dino_checkpoint(tiny_config, tmp_path, capsys):
    """``oddetr weights X.pth output=FILE``: an oddetr checkpoint holding exactly the original model's tensors."""
    from oddetr.cli import main
    from oddetr.engine.inference import load_checkpoint_model

    model, cfg = _model(tiny_config, "model.arch=dino", "model.two_stage=true", "model.dn_queries=10",
                        "model.look_forward_twice=true")
    path = _save_official(tmp_path / "dino.pth", to_official_layout(model.state_dict(), dino=True), cfg)
    capsys.readouterr()
    assert main(["weights", str(path), f"output={tmp_path / 'dino.pt'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "format: dino (IDEA-Research/DINO checkpoint)" and lines[3] == f"classes: {NUM_CLASSES}"
    loaded = load_checkpoint_model(tmp_path / "dino.pt", config_overrides={"eval": {"fuse_norms": False}})  # as saved
    assert loaded.config.model.arch == "dino" and loaded.class_names == ["class_0", "class_1", "class_2"]
    _assert_same(loaded.model.state_dict(), model)
