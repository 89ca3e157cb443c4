"""DAB-Deformable-DETR and DINO as presets of the one detector: anchors refined layer by layer,
DINO's mixed query selection, the look-forward-twice gradient path, OD-DETR on all three
architectures (one training step each, and one CLI run of DINO)."""

from __future__ import annotations

import math

import pytest
import torch

from oddetr.cli import main
from oddetr.config import resolve_config
from oddetr.distill.distiller import OnlineDistiller
from oddetr.engine.step import compute_losses
from oddetr.errors import ConfigError
from oddetr.losses.criterion import SetCriterion
from oddetr.models.detector import build_model, encoder_output_proposals
from oddetr.models.position_encoding import sine_embed

NUM_CLASSES = 3
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tiny_config, preset, *extra, seed=0):
    cfg = tiny_config(f"model={preset}", "model.dropout=0.0", *extra)
    torch.manual_seed(seed)
    return build_model(cfg.model, NUM_CLASSES), cfg


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[1, 48:, :] = True
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]]),
         "image_id": 0},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.3, 0.3]]), "image_id": 1},
    ]
    return images, masks, targets


def _randomise_box_heads(model):
    """The box heads' last layers start at zero (refined box = reference); give them values."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for head in model.bbox_heads:
            for p in head.layers[-1].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_presets_and_arch_checks():
    dab = resolve_config(overrides=["model=dab-deformable-detr-r50"]).model
    assert (dab.arch, dab.num_queries, dab.enc_layers, dab.dec_layers, dab.d_model, dab.num_feature_levels) == \
        ("dab-deformable-detr", 300, 6, 6, 256, 4)
    assert dab.box_refine and not dab.two_stage
    cfg = resolve_config(overrides=["model=dino-4scale-r50"])
    dino = cfg.model
    assert (dino.arch, dino.num_queries, dino.dn_queries, dino.dim_feedforward) == ("dino", 900, 100, 2048)
    assert dino.two_stage and dino.box_refine and dino.look_forward_twice
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.lr_drop_epochs) == (1e-4, 12, [11])
    assert (cfg.loss.cost_class, cfg.loss.cost_bbox, cfg.loss.cost_giou) == (2.0, 5.0, 2.0)
    tiny = resolve_config(overrides=["model=dino-tiny"]).model
    assert tiny.num_queries == 50 and 0 < tiny.dn_queries <= 30 and tiny.d_model == 128
    assert resolve_config(overrides=["model=dab-deformable-detr-tiny"]).model.d_model == 128
    with pytest.raises(ConfigError, match="model.arch=dino needs model.two_stage=true"):
        resolve_config(overrides=["model=dino-tiny", "model.two_stage=false"])
    with pytest.raises(ConfigError, match="model.dn_queries"):
        resolve_config(overrides=["model=dino-tiny", "model.dn_queries=-1"])


def test_dab_anchors_refine_layer_by_layer_and_positions_follow(tiny_config):
    model, cfg = _model(tiny_config, "dab-deformable-detr-tiny")
    assert model.query_embed is None and model.reference_points is None and model.proposal_to_query is None
    q, d = cfg.model.num_queries, cfg.model.d_model
    assert model.anchor_embed.weight.shape == (q, 4) and model.content_embed.weight.shape == (q, d)
    anchors = model.anchor_embed.weight.detach().sigmoid()
    assert anchors[:, :2].std(0).min() > 0.15  # spread over the image
    _randomise_box_heads(model)
    calls = []
    model.position_head.register_forward_hook(lambda mod, inp, out: calls.append((inp[0].detach(), out.detach())))
    images, masks, targets = _batch()
    out = model(images, masks, targets=targets)
    assert out.initial.position is None and out.encoder is None and out.dn == []
    torch.testing.assert_close(out.initial.reference, anchors[None].expand(2, -1, -1))
    torch.testing.assert_close(out.initial.content, model.content_embed.weight[None].expand(2, -1, -1))
    refs = out.main.references
    assert len(refs) == cfg.model.dec_layers + 1 and all(r.shape == (2, q, 4) for r in refs)
    for lvl in range(cfg.model.dec_layers):
        assert not torch.allclose(refs[lvl + 1], refs[lvl])  # every layer moves the anchors
        torch.testing.assert_close(refs[lvl + 1], out.main.boxes[lvl].detach())
    # one positional query per layer, from that layer's anchors; they change between layers
    assert len(calls) == cfg.model.dec_layers
    for lvl, (inp, _) in enumerate(calls):  # the MLP's input: the sine embedding of the anchors
        torch.testing.assert_close(inp, sine_embed(refs[lvl], d // 2))
    assert not torch.allclose(calls[0][1], calls[1][1])
    # the anchors and the content queries learn
    out.main.boxes[-1].sum().backward()
    assert model.anchor_embed.weight.grad.abs().sum() > 0 and model.content_embed.weight.grad.abs().sum() > 0


def test_dino_mixed_query_selection(tiny_config):
    model, cfg = _model(tiny_config, "dino-tiny")
    assert model.proposal_to_query is None and model.content_embed is not None
    images, masks, _ = _batch()
    memory = model.encode(images, masks)
    initial, proposals = model.initial_queries(memory)
    k = cfg.model.num_queries
    d = cfg.model.d_model
    assert initial.content.shape == (2, k, d) and initial.reference.shape == (2, k, 4) and initial.position is None
    # content: the learned embedding, the same for every image
    torch.testing.assert_close(initial.content[0], model.content_embed.weight[:k])
    torch.testing.assert_close(initial.content[1], model.content_embed.weight[:k])
    # reference: the top-k proposals by best class score (padded positions excluded), detached
    assert not initial.reference.requires_grad
    _, _, invalid = encoder_output_proposals(memory)
    scores = proposals.logits.detach().max(-1).values.masked_fill(invalid[..., 0], float("-inf"))
    for b in range(2):
        expected = scores[b].argsort(descending=True)[:k]
        assert set(proposals.topk[b].tolist()) == set(expected.tolist())
        torch.testing.assert_close(initial.reference[b], proposals.boxes[b, proposals.topk[b]].detach())


@pytest.mark.parametrize("lft", [True, False])
def test_look_forward_twice_gradient_path(tiny_config, lft):
    model, cfg = _model(tiny_config, "dino-tiny", f"model.look_forward_twice={str(lft).lower()}")
    assert model.decoder.look_forward_twice is lft
    _randomise_box_heads(model)
    images, masks, _ = _batch()
    out = model(images, masks)
    out.main.boxes[1].sum().backward()  # a loss on layer 1's boxes only
    prev = [p.grad for p in model.bbox_heads[0].parameters()]
    own = [p.grad for p in model.bbox_heads[1].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in own)
    if lft:
        assert all(g is not None for g in prev) and sum(float(g.abs().sum()) for g in prev) > 0
    else:
        assert all(g is None or not g.any() for g in prev)


@pytest.mark.parametrize("preset", ["deformable-detr-tiny", "dab-deformable-detr-tiny", "dino-tiny"])
def test_od_detr_training_step_on_every_arch(tiny_config, preset):
    cfg = tiny_config(f"model={preset}", "model.dropout=0.0", "distill.enabled=true", "model.num_queries=8")
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES)
    model.train()
    criterion = SetCriterion(cfg.loss)
    distiller = OnlineDistiller(model, cfg, criterion, total_steps=900)
    images, masks, targets = _batch()
    plan = distiller.prepare(images, masks, targets)
    dino = cfg.model.arch == "dino"
    assert distiller.md_on_main  # two-stage (DINO): through shared encoder positions
    assert distiller.learned_positions is (cfg.model.arch == "deformable-detr")
    aux = [g for g in plan.groups if g.name.startswith("aux")]
    assert aux and all((g.position is None) is (cfg.model.arch != "deformable-detr") for g in aux)
    losses, total = compute_losses(model, criterion, distiller, images, masks, targets, num_boxes=3.0)
    groups = {k.split("/")[0] for k in losses}
    assert {"main", "md", "pd", "mdpd", "aux0", "aux1"} <= groups
    assert ("dn" in groups) is dino and ("enc" in groups) is dino
    assert math.isfinite(float(total.detach()))
    total.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n in trainable if dict(model.named_parameters())[n].grad is None] == []
    # the teacher never builds denoising groups
    assert plan.teacher.dn == []


def test_cli_trains_dino_with_distillation(tmp_path, tiny_keys):
    args = tiny_keys("model=dino-tiny", "model.backbone.name=mobilenet_v3_small", "model.num_queries=8",
                     "model.dn_queries=6", "distill.enabled=true", "train.epochs=1", "train.max_steps_per_epoch=2",
                     "data.flip=false", "data.synthetic.num_train=8", "data.synthetic.num_val=4",
                     "data.synthetic.image_size=64", f"data.synthetic.root={tmp_path / 'synthetic'}",
                     f"output={tmp_path / 'run'}")
    assert main(["train", *args]) == 0
    assert (tmp_path / "run" / "last.pt").is_file()
