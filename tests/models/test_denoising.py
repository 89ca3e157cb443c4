"""DINO's contrastive denoising: noise bounds, label flips, group layout and padding, the DN
attention mask, the DN losses with fixed targets, and DN being training-only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oddetr.box_ops import cxcywh_to_xyxy, paired_iou
from oddetr.losses.criterion import SetCriterion
from oddetr.losses.detection import denoising_losses, detection_losses
from oddetr.models.denoising import build_denoising_groups, noise_boxes
from oddetr.models.detector import build_model
from oddetr.models.outputs import DetectorOutput, GroupOutput
from oddetr.models.transformer import group_attention_mask

D = 16
NUM_CLASSES = 10
pytestmark = pytest.mark.usefixtures("one_thread")


def _central_targets(counts, seed=0):
    """Boxes centred in [0.35, 0.65] with sides in [0.05, 0.2]: no noise up to 2x half a side
    reaches the image border, so nothing is clipped."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=gen) * 0.3 + 0.35
        size = torch.rand(n, 2, generator=gen) * 0.15 + 0.05
        out.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen), "boxes": torch.cat([centre, size], -1)})
    return out


def _embedding():
    torch.manual_seed(0)
    return nn.Embedding(NUM_CLASSES, D)


def _corner_offsets(noised, gt):
    """|corner shift| / half side, per corner: (M, 4)."""
    half = (gt[:, 2:] / 2).repeat(1, 2)
    return (cxcywh_to_xyxy(noised) - cxcywh_to_xyxy(gt)).abs() / half


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_positive_and_negative_box_noise_bounds(scale):
    targets = _central_targets([40, 25])
    gen = torch.Generator().manual_seed(1)
    groups, meta = build_denoising_groups(targets, NUM_CLASSES, _embedding(), num_dn_queries=200,
                                          label_noise_ratio=0.5, box_noise_scale=scale, generator=gen)
    boxes = torch.cat([g.reference for g in groups], 1)  # (B, N, 4)
    pos_rel, neg_rel = [], []
    for b, tgt in enumerate(targets):
        q, g = meta.assignment[b]
        pos_rel.append(_corner_offsets(boxes[b, q], tgt["boxes"][g]))
        if scale < 0.5:  # corners shift < 2 * scale * half < half: they never cross, each one is comparable
            neg_rel.append(_corner_offsets(boxes[b, q + meta.pad], tgt["boxes"][g]))
    pos_rel = torch.cat(pos_rel)
    assert pos_rel.max() <= scale + 1e-4
    assert pos_rel.max() > 0.8 * scale  # the bound is used, not just respected
    if neg_rel:
        neg_rel = torch.cat(neg_rel)
        assert neg_rel.min() >= scale - 1e-4 and neg_rel.max() <= 2 * scale + 1e-4
        assert neg_rel.max() > 1.8 * scale
    # every noised box is a valid box inside the image
    valid = meta.valid
    xyxy = cxcywh_to_xyxy(boxes[valid])
    assert (xyxy >= 0).all() and (xyxy <= 1).all() and (boxes[valid][:, 2:] >= 0).all()


def test_negatives_are_farther_than_positives_at_default_noise():
    gen = torch.Generator().manual_seed(0)
    gt = _central_targets([500])[0]["boxes"]
    pos = noise_boxes(gt, 1.0, negative=False, generator=gen)
    neg = noise_boxes(gt, 1.0, negative=True, generator=gen)
    assert _corner_offsets(pos, gt).max() <= 1.0 + 1e-4
    # a negative's corners may cross (and are re-ordered), so compare overlap on average
    iou_pos = paired_iou(cxcywh_to_xyxy(pos), cxcywh_to_xyxy(gt))
    iou_neg = paired_iou(cxcywh_to_xyxy(neg), cxcywh_to_xyxy(gt))
    assert float(iou_pos.mean()) > float(iou_neg.mean()) + 0.15
    assert (neg[:, 2:] >= 0).all()
    assert torch.equal(noise_boxes(gt, 0.0, negative=True), gt)  # no box noise at scale 0


def test_label_flip_fraction():
    targets = _central_targets([50, 50])
    gen = torch.Generator().manual_seed(2)
    _, meta = build_denoising_groups(targets, NUM_CLASSES, _embedding(), num_dn_queries=1000,
                                     label_noise_ratio=0.5, generator=gen)
    assert meta.num_groups == 20
    changed, total = 0, 0
    for b, tgt in enumerate(targets):
        q, g = meta.assignment[b]
        for idx in (q, q + meta.pad):  # positives and their negatives
            changed += int((meta.labels[b, idx] != tgt["labels"][g]).sum())
            total += len(idx)
    # a label is resampled with probability 0.5 / 2, and lands on another class 9 times in 10
    assert total == 4000
    assert changed / total == pytest.approx(0.25 * 0.9, abs=0.03)
    _, clean = build_denoising_groups(targets, NUM_CLASSES, _embedding(), num_dn_queries=1000,
                                      label_noise_ratio=0.0, generator=gen)
    for b, tgt in enumerate(targets):
        q, g = clean.assignment[b]
        assert torch.equal(clean.labels[b, q], tgt["labels"][g])


def test_group_sizes_padding_and_content():
    targets = _central_targets([3, 1, 0])
    emb = _embedding()
    groups, meta = build_denoising_groups(targets, NUM_CLASSES, emb, num_dn_queries=10, generator=torch.Generator())
    # DINO's rule: 10 // max GT count (3) = 3 groups of 2 * 3 queries (positives, then negatives)
    assert meta.num_groups == 3 and meta.pad == 3 and meta.group_size == 6
    assert [g.name for g in groups] == meta.names == ["dn0", "dn1", "dn2"]
    for g in groups:
        assert g.content.shape == (3, 6, D) and g.reference.shape == (3, 6, 4) and g.position is None
    # positive slots: GT j at slot k * 6 + j, its negative at k * 6 + 3 + j
    q0, g0 = meta.assignment[0]
    assert q0.tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14] and g0.tolist() == [0, 1, 2] * 3
    q1, g1 = meta.assignment[1]
    assert q1.tolist() == [0, 6, 12] and g1.tolist() == [0, 0, 0]
    assert len(meta.assignment[2][0]) == 0
    expected_valid = torch.zeros(3, 18, dtype=torch.bool)
    for k in range(3):
        expected_valid[0, k * 6:(k + 1) * 6] = True
        expected_valid[1, [k * 6, k * 6 + 3]] = True
    assert torch.equal(meta.valid, expected_valid)
    assert torch.equal(meta.positive.sum(1), torch.tensor([9, 3, 0]))
    content = torch.cat([g.content for g in groups], 1)
    assert (content[~meta.valid] == 0).all()
    assert (meta.labels[~meta.valid] == -1).all()
    torch.testing.assert_close(content[meta.valid], emb(meta.labels[meta.valid]))
    assert content.requires_grad  # the label embedding learns


def test_batch_without_boxes_keeps_the_label_embedding_in_the_graph():
    emb = _embedding()
    groups, meta = build_denoising_groups(_central_targets([0, 0]), NUM_CLASSES, emb, num_dn_queries=100)
    assert meta.num_groups == 1 and len(groups) == 1 and groups[0].size == 2
    assert not meta.valid.any() and all(len(q) == 0 for q, _ in meta.assignment)
    groups[0].content.sum().backward()
    assert emb.weight.grad is not None and not emb.weight.grad.any()


def test_attention_mask_blocks_main_from_dn_and_dn_groups_from_each_other():
    sizes = [5, 4, 4, 4]  # main, dn0, dn1, dn2
    mask = group_attention_mask(sizes, torch.device("cpu"))
    main, dn = slice(0, 5), [slice(5 + 4 * k, 9 + 4 * k) for k in range(3)]
    assert mask[main, 5:].all() and mask[5:, main].all()  # matching queries never see DN ones
    assert not mask[main, main].any()
    for i, a in enumerate(dn):
        assert not mask[a, a].any()  # positives and negatives of one group see each other
        for j, b in enumerate(dn):
            if i != j:
                assert mask[a, b].all()


def _dn_output(meta, logits, boxes):
    main = GroupOutput("main", logits[:, :, :1], boxes[:, :, :1], torch.zeros(1), [])
    n = meta.group_size
    dn = [GroupOutput(name, logits[:, :, k * n:(k + 1) * n], boxes[:, :, k * n:(k + 1) * n], torch.zeros(1), [])
          for k, name in enumerate(meta.names)]
    return DetectorOutput(main=main, initial=None, dn=dn, dn_meta=meta)


def test_denoising_losses_use_fixed_targets(tiny_config):
    targets = _central_targets([2, 1])
    _, meta = build_denoising_groups(targets, NUM_CLASSES, _embedding(), num_dn_queries=4)
    assert meta.num_groups == 2
    criterion = SetCriterion(tiny_config().loss)
    layers, n = 2, meta.num_groups * meta.group_size
    logits = torch.full((layers, 2, n, NUM_CLASSES), -12.0)
    boxes = torch.full((layers, 2, n, 4), 0.5)
    for b, tgt in enumerate(targets):  # every positive predicts its GT exactly
        q, g = meta.assignment[b]
        logits[:, b, q, tgt["labels"][g]] = 12.0
        boxes[:, b, q] = tgt["boxes"][g]
    perfect = denoising_losses(criterion, _dn_output(meta, logits, boxes), targets, num_boxes=3.0)
    assert sorted(perfect) == sorted(f"dn/{t}/l{i}" for t in ("cls", "l1", "giou") for i in range(layers))
    assert all(float(v) < 1e-4 for v in perfect.values())
    # a negative that claims its GT's class is penalised (background target)
    q, g = meta.assignment[0]
    logits[:, 0, q[0] + meta.pad, targets[0]["labels"][g[0]]] = 12.0
    wrong = denoising_losses(criterion, _dn_output(meta, logits, boxes), targets, num_boxes=3.0)
    assert float(wrong["dn/cls/l1"]) > 0.5
    # positive boxes off their GT: L1 normalised by num_boxes * num_groups
    boxes2 = boxes.clone()
    boxes2[1, 1, meta.assignment[1][0], 0] += 0.1
    off = denoising_losses(criterion, _dn_output(meta, logits, boxes2), targets, num_boxes=3.0)
    assert float(off["dn/l1/l1"]) == pytest.approx(0.1 * meta.num_groups / (3.0 * meta.num_groups), rel=1e-4)


def _dino(tiny_config, *extra):
    cfg = tiny_config("model=dino-tiny", "model.dn_queries=6", "model.dropout=0.0", *extra)
    torch.manual_seed(0)
    return build_model(cfg.model, 3), cfg


def _batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.3, 0.3]])},
    ]
    return images, masks, targets


def test_denoising_is_training_only_and_does_not_leak_into_the_main_group(tiny_config):
    model, cfg = _dino(tiny_config)
    images, masks, targets = _batch()
    model.train()
    torch.manual_seed(1)
    out = model(images, masks, targets=targets)
    assert out.dn_meta is not None and out.dn_meta.num_groups == 3  # 6 // 2 GTs
    assert [g.name for g in out.dn] == ["dn0", "dn1", "dn2"] and out.extra == []
    assert out.dn[0].logits.shape == (cfg.model.dec_layers, 2, 4, 3)
    # the main group is the same with or without the DN groups (block-diagonal mask)
    plain = model(images, masks)
    assert plain.dn == [] and plain.dn_meta is None
    torch.testing.assert_close(out.main.logits, plain.main.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.main.boxes, plain.main.boxes, atol=1e-5, rtol=1e-5)
    # the DN losses join the detection losses
    losses, _ = detection_losses(SetCriterion(cfg.loss), out, targets, num_boxes=3.0)
    assert {k.split("/")[0] for k in losses} == {"main", "enc", "dn"}
    # eval mode: no DN even with targets
    model.eval()
    evaluated = model(images, masks, targets=targets)
    assert evaluated.dn == [] and evaluated.dn_meta is None
