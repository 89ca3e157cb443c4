"""Hugging Face Deformable-DETR weights: output parity and fine-tuning from a converted directory.

A small random-initialised ``DeformableDetrForObjectDetection`` (every zero-initialised tensor and
the frozen BatchNorm statistics made random, so that each one matters) is saved with
``save_pretrained`` and read back with :func:`oddetr.models.convert.load_hf_pretrained`, which needs
neither the hub nor transformers. Both models then see the same images.

Measured here: every layer's logits and boxes agree bit for bit (max abs diff 0.0) at d_model=128
with a timm or a Hugging Face ResNet-18 backbone, with and without padding (two-stage: 1e-7 where both
pick the same proposals, see its test). Below d_model=128 the
only difference is the input projections' GroupNorm: oddetr uses min(32, d/4) groups, transformers
(and the original code) 32; with that one attribute aligned, d_model=64 agrees bit for bit too.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from oddetr.config import resolve_config  # noqa: E402
from oddetr.engine.init_weights import load_init_weights  # noqa: E402
from oddetr.engine.trainer import Trainer  # noqa: E402
from oddetr.errors import ConfigError  # noqa: E402
from oddetr.models.convert import (  # noqa: E402
    load_hf_pretrained,
    overrides_as_keys,
)
from oddetr.models.detector import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
NUM_LABELS = 5


def _hf_model(d_model: int, backbone: str, two_stage: bool = False, num_labels: int = NUM_LABELS) -> torch.nn.Module:
    if backbone == "timm":
        kwargs = dict(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False)
    else:  # transformers' own ResNet: the same network as torchvision's resnet18, other key names
        kwargs = dict(use_timm_backbone=False, backbone_config=transformers.ResNetConfig(
            layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
            out_features=["stage2", "stage3", "stage4"]))
    config = transformers.DeformableDetrConfig(
        d_model=d_model, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=4, decoder_attention_heads=4, num_queries=6, num_feature_levels=4,
        two_stage_num_proposals=6, with_box_refine=True, two_stage=two_stage, num_labels=num_labels, **kwargs)
    torch.manual_seed(0)
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 or "sampling_offsets" in name or "attention_weights" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model


def _save(model, directory: Path, legacy_names: bool = True) -> Path:
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        model.save_pretrained(directory, save_original_format=legacy_names)
    elif not legacy_names:
        pytest.skip("this transformers writes one key layout only")
    else:
        model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_timm(tmp_path_factory):
    model = _hf_model(128, "timm")
    return model, _save(model, tmp_path_factory.mktemp("hf_timm"))


def _ours(directory: Path, absent: tuple[str, ...] = ()):
    """oddetr's model for the directory; ``absent``: key prefixes transformers has no tensors for."""
    overrides, state, num_classes, names = load_hf_pretrained(directory)
    cfg = resolve_config(overrides=[*overrides_as_keys(overrides), "model.backbone.norm=frozen_bn", "device=cpu"])
    model = build_model(cfg.model, num_classes).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and [k for k in missing if not k.startswith(absent)] == [], (missing, unexpected)
    return model, overrides, names


def _inputs():
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 80, generator=gen)
    padded = torch.ones(2, 64, 80, dtype=torch.long)
    padded[1, 40:, :] = 0  # the second image is smaller: padded at the bottom and right
    padded[1, :, 56:] = 0
    return images, {"unpadded": torch.ones_like(padded), "padded": padded}


def _max_diffs(hf_model, ours) -> dict[str, float]:
    images, masks = _inputs()
    diffs = {}
    with torch.no_grad():
        for label, pixel_mask in masks.items():
            theirs = hf_model(pixel_values=images, pixel_mask=pixel_mask)
            out = ours(images, ~pixel_mask.bool())
            diffs[f"{label} logits"] = (theirs.logits - out.pred_logits).abs().max().item()
            diffs[f"{label} boxes"] = (theirs.pred_boxes - out.pred_boxes).abs().max().item()
            diffs[f"{label} hidden (all layers)"] = (
                theirs.intermediate_hidden_states.transpose(0, 1) - out.main.hidden).abs().max().item()
    return diffs


def test_parity_with_transformers_timm_backbone(hf_timm):
    hf_model, directory = hf_timm
    ours, overrides, names = _ours(directory)
    assert overrides["d_model"] == 128 and overrides["box_refine"] and not overrides["two_stage"]
    assert names == [f"LABEL_{i}" for i in range(NUM_LABELS)]
    diffs = _max_diffs(hf_model, ours)
    assert max(diffs.values()) <= TOL, diffs


def test_parity_with_transformers_resnet_backbone(tmp_path):
    hf_model = _hf_model(128, "hf-resnet")
    ours, overrides, _ = _ours(_save(hf_model, tmp_path / "hf"))
    assert overrides["backbone"] == {"name": "resnet18"}
    diffs = _max_diffs(hf_model, ours)
    assert max(diffs.values()) <= TOL, diffs


def test_two_stage_parity_with_one_class(tmp_path):
    """Two-stage weights map too (encoder output, proposal heads, the proposal-embedding projection).

    Outputs agree where both pick the same top-K proposals: with one class (oddetr ranks proposals by
    their best class score, transformers and the original code by class 0's) and no padding
    (oddetr never picks padded positions).
    """
    hf_model = _hf_model(128, "timm", two_stage=True, num_labels=1)
    ours, overrides, _ = _ours(_save(hf_model, tmp_path / "hf"), absent=("position_head.",))
    assert overrides["two_stage"] and overrides["num_queries"] == 6
    images, masks = _inputs()
    with torch.no_grad():
        theirs = hf_model(pixel_values=images, pixel_mask=masks["unpadded"])
        out = ours(images, ~masks["unpadded"].bool())
    diffs = {"proposal logits": (theirs.enc_outputs_class - out.encoder.logits).abs().max().item(),
             "proposal boxes": (theirs.enc_outputs_coord_logits.sigmoid() - out.encoder.boxes).abs().max().item(),
             "logits": (theirs.logits - out.pred_logits).abs().max().item(),
             "boxes": (theirs.pred_boxes - out.pred_boxes).abs().max().item()}
    assert max(diffs.values()) <= TOL, diffs


def test_below_d128_only_the_group_norm_differs(tmp_path):
    hf_model = _hf_model(64, "timm")
    ours, _, _ = _ours(_save(hf_model, tmp_path / "hf"))
    assert {proj[1].num_groups for proj in ours.input_proj} == {16}  # oddetr: min(32, d / 4)
    assert max(_max_diffs(hf_model, ours).values()) > 1e-2
    for proj in ours.input_proj:
        proj[1].num_groups = 32  # transformers' (and the original code's) group count
    diffs = _max_diffs(hf_model, ours)
    assert max(diffs.values()) <= TOL, diffs


def test_transformers_5_key_layout_reads_the_same(hf_timm, tmp_path):
    hf_model, legacy_dir = hf_timm
    new_dir = _save(hf_model, tmp_path / "hf5", legacy_names=False)
    keys = json.loads((new_dir / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (new_dir / "model.safetensors").read_bytes()[:8], "little")])
    assert any(k.startswith("model.backbone.model.") for k in keys)  # really the other layout
    _, legacy, _, _ = load_hf_pretrained(legacy_dir)
    _, new, _, _ = load_hf_pretrained(new_dir)
    assert legacy.keys() == new.keys()
    assert all(torch.equal(legacy[k], new[k]) for k in legacy)


def test_other_architecture_in_config_is_a_one_line_config_error(hf_timm, tiny_config):
    cfg = tiny_config("model.backbone.name=resnet18", "model.backbone.norm=frozen_bn")  # d_model=32 etc.
    model = build_model(cfg.model, 3)
    with pytest.raises(ConfigError) as err:
        load_init_weights(model, hf_timm[1], cfg.model)
    message = str(err.value)
    assert "\n" not in message and "model.d_model=128" in message and "model.num_queries=6" in message


def test_fine_tune_from_hf_directory_with_other_class_count(hf_timm, coco_data, tiny_keys, tmp_path):
    directory = hf_timm[1]
    overrides, loaded, num_source_classes, _ = load_hf_pretrained(directory)
    data = coco_data("coco", num_images=4)  # 3 classes, not the directory's 5
    cfg = resolve_config(overrides=tiny_keys(
        *data.keys(), *overrides_as_keys(overrides), "model.backbone.norm=frozen_bn",
        f"model.init_weights={directory}", f"output={tmp_path / 'run'}", "train.epochs=1",
        "train.max_steps_per_epoch=1", "train.keep_checkpoints=0"))
    trainer = Trainer(cfg)
    assert trainer.num_classes == 3 != num_source_classes
    state = trainer.model.state_dict()
    heads = sorted(k for k in state if k.startswith("class_heads."))
    assert all(state[k].shape[0] == 3 for k in heads)
    others = [k for k in state if k not in heads]
    assert sorted(others) == sorted(k for k in loaded if k not in heads)
    assert [k for k in others if not torch.equal(state[k], loaded[k])] == []
    report = json.loads((tmp_path / "run" / "init_weights.json").read_text())
    assert report["format"] == "hf" and sorted(report["reinitialised"]) == heads and report["kept_init"] == []

    before = {k: v.clone() for k, v in state.items()}
    stats = trainer.train_one_epoch()
    assert trainer.step == 1 and torch.isfinite(torch.tensor(stats["train/loss"]))
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in heads)
    assert any(not torch.equal(before[k], after[k]) for k in others if k.startswith("decoder."))


def test_oddetr_weights_converts_a_hf_directory_to_a_checkpoint(hf_timm, tmp_path, capsys):
    """``oddetr weights DIR output=FILE``: the checkpoint ``eval`` / ``predict`` load gives transformers' outputs."""
    from oddetr.cli import main
    from oddetr.engine.inference import load_checkpoint_model

    hf_model, directory = hf_timm
    capsys.readouterr()
    assert main(["weights", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    _, state, _, _ = load_hf_pretrained(directory)
    assert lines[1] == "format: hf (Hugging Face Deformable-DETR directory)"
    assert lines[2] == f"tensors: {len(state)} ({sum(t.numel() for t in state.values()):,} values)"
    assert lines[3].startswith(f"classes: {NUM_LABELS} (LABEL_0, LABEL_1")
    assert "model.d_model=128" in lines[-1].split() and "model.backbone.name=resnet18" in lines[-1].split()
    out = tmp_path / "converted.pt"
    assert main(["weights", str(directory), f"output={out}"]) == 0
    loaded = load_checkpoint_model(out)
    assert loaded.class_names == [f"LABEL_{i}" for i in range(NUM_LABELS)]
    diffs = _max_diffs(hf_model, loaded.model)
    assert max(diffs.values()) <= TOL, diffs
