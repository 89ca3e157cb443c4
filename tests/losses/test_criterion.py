"""Criterion: focal / QFL / L1 / GIoU values against formulas, MD targets and loss weighting by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from oddetr.config import LossConfig
from oddetr.errors import TrainingError
from oddetr.losses.criterion import (
    BatchGts,
    SetCriterion,
    classification_targets,
    pair_index,
    quality_focal_loss,
    set_losses,
    summarize_losses,
    union_unmatched,
)


def _t(*values):
    return torch.tensor(values, dtype=torch.int64)


def _problem(seed=0, b=2, q=5, c=3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, q, c, generator=gen) * 2
    cxcy = torch.rand(b, q, 2, generator=gen) * 0.6 + 0.2
    boxes = torch.cat([cxcy, torch.rand(b, q, 2, generator=gen) * 0.3 + 0.05], -1)
    targets = [
        {"labels": _t(2, 0), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]])},
        {"labels": _t(1), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
    ]
    assignment = [(_t(3, 0), _t(0, 1)), (_t(4), _t(0))]
    return logits, boxes, targets, assignment


def _focal_by_hand(logits, onehot, alpha=0.25, gamma=2.0):
    """Sum of -alpha_t (1 - p_t)^gamma log p_t in float64."""
    x, y = logits.double(), onehot.double()
    p = x.sigmoid()
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    return float((-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).sum())


def test_set_losses_focal_equals_sigmoid_focal_loss_on_one_hot_targets():
    logits, boxes, targets, assignment = _problem()
    onehot = torch.zeros_like(logits)
    for b, (qs, gs) in enumerate(assignment):
        for q, g in zip(qs.tolist(), gs.tolist()):
            onehot[b, q, targets[b]["labels"][g]] = 1.0
    assert onehot.sum() == 3
    num_boxes = 3.0
    out = set_losses(logits, boxes, targets, [assignment], assignment, num_boxes, "focal", 0.25, 2.0)
    expected = sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_boxes
    assert float(out["cls"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(out["cls"]) == pytest.approx(_focal_by_hand(logits, onehot) / num_boxes, rel=1e-5)
    # and with other alpha / gamma
    out = set_losses(logits, boxes, targets, [assignment], assignment, num_boxes, "focal", 0.5, 1.0)
    assert float(out["cls"]) == pytest.approx(_focal_by_hand(logits, onehot, 0.5, 1.0) / num_boxes, rel=1e-5)


def test_quality_focal_loss_formula():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 4, generator=gen) * 3
    y = torch.rand(2, 7, 4, generator=gen)
    y[0, 0] = 0.0
    y[1, 1] = 1.0
    for beta in (2.0, 1.0):
        p = logits.double().sigmoid()
        yd = y.double()
        expected = -((yd - p).abs() ** beta * (yd * torch.log(p) + (1 - yd) * torch.log(1 - p))).sum()
        assert float(quality_focal_loss(logits, y, beta)) == pytest.approx(float(expected), rel=1e-5)
    # one-hot targets: QFL with beta = gamma is focal loss without alpha (alpha = 0.5 times 2)
    onehot = (y > 0.5).float()
    assert float(quality_focal_loss(logits, onehot, 2.0)) == pytest.approx(
        2 * float(sigmoid_focal_loss(logits, onehot, alpha=0.5, gamma=2.0, reduction="sum")), rel=1e-5)


def test_qfl_gradient_is_zero_at_the_target():
    y = torch.tensor([0.2, 0.7, 0.0, 1.0])
    logits = torch.logit(y.clamp(1e-4, 1 - 1e-4)).requires_grad_(True)
    quality_focal_loss(logits, y).backward()
    assert logits.grad.abs().max() < 1e-6


def test_l1_and_giou_on_a_hand_case():
    # pair 1: pred xyxy (0.4, 0.4, 0.6, 0.6), GT (0.5, 0.4, 0.7, 0.6): L1 0.1, IoU 1/3, hull = union -> GIoU 1/3
    # pair 2: pred (0.1, 0.1, 0.3, 0.3), GT (0.7, 0.7, 0.9, 0.9): L1 1.2, IoU 0, hull 0.64, union 0.08 -> -0.875
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 2)
    targets = [{"labels": _t(0, 1), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]])}]
    assignment = [(_t(0, 1), _t(0, 1))]
    out = set_losses(logits, boxes, targets, [assignment], assignment, num_boxes=2.0)
    assert float(out["l1"]) == pytest.approx((0.1 + 1.2) / 2, abs=1e-6)
    assert float(out["giou"]) == pytest.approx(((1 - 1 / 3) + (1 + 0.875)) / 2, abs=1e-5)
    # no pairs: zero box losses that still backpropagate
    boxes.requires_grad_(True)
    empty = [(_t(), _t())]
    out = set_losses(logits, boxes, targets, [empty], empty, num_boxes=1.0)
    assert float(out["l1"].detach()) == 0.0 and float(out["giou"].detach()) == 0.0
    out["l1"].backward()
    assert boxes.grad is not None


def _xyxy_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_md_soft_targets_on_a_hand_made_case():
    """Query 0: student match GT a (class 1), teacher match GT b (class 2) -> two soft labels."""
    # pred 0 xyxy (0.3, 0.3, 0.5, 0.5); GT a (0.3, 0.3, 0.5, 0.6); GT b (0.4, 0.3, 0.6, 0.5)
    boxes = torch.tensor([[[0.4, 0.4, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1], [0.2, 0.8, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 4)
    targets = [{"labels": _t(1, 2, 1), "boxes": torch.tensor([[0.4, 0.45, 0.2, 0.3], [0.5, 0.4, 0.2, 0.2],
                                                            [0.8, 0.8, 0.1, 0.1]])}]
    student = [(_t(0, 1), _t(0, 2))]
    teacher = [(_t(0, 2), _t(1, 2))]
    iou_a = _xyxy_iou((0.3, 0.3, 0.5, 0.5), (0.3, 0.3, 0.5, 0.6))
    iou_b = _xyxy_iou((0.3, 0.3, 0.5, 0.5), (0.4, 0.3, 0.6, 0.5))
    assert iou_a == pytest.approx(2 / 3) and iou_b == pytest.approx(1 / 3)
    iou_c = _xyxy_iou((0.15, 0.75, 0.25, 0.85), (0.75, 0.75, 0.85, 0.85))  # query 2 vs GT c: disjoint
    expected = torch.zeros(1, 3, 4)
    expected[0, 0, 1] = iou_a
    expected[0, 0, 2] = iou_b
    expected[0, 1, 1] = 1.0  # query 1 sits exactly on GT c
    expected[0, 2, 1] = iou_c
    y = classification_targets(logits, boxes, targets, [student, teacher], soft=True)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # same class from both matchings: the max of the two IoUs
    targets[0]["labels"] = _t(1, 1, 1)
    y = classification_targets(logits, boxes, targets, [student, teacher], soft=True)
    assert float(y[0, 0, 1]) == pytest.approx(iou_a, abs=1e-5) and float(y[0, 0].sum()) == pytest.approx(iou_a, abs=1e-5)
    # hard targets: 1 at each matched class
    targets[0]["labels"] = _t(1, 2, 1)
    y = classification_targets(logits, boxes, targets, [student, teacher], soft=False)
    assert y[0, 0].tolist() == [0.0, 1.0, 1.0, 0.0] and y[0, 1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert y[0, 2].tolist() == [0.0, 1.0, 0.0, 0.0]
    # QFL through set_losses uses exactly these targets
    logits = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
    y = classification_targets(logits, boxes, targets, [student, teacher], soft=True)
    out = set_losses(logits, boxes, targets, [student, teacher], student, 2.0, "qfl", qfl_beta=2.0)
    assert float(out["cls"]) == pytest.approx(float(quality_focal_loss(logits, y, 2.0)) / 2.0, rel=1e-6)


def test_union_unmatched_modes():
    student = [(_t(0, 2), _t(0, 1)), (_t(1), _t(0))]
    # image 0: teacher pairs (1, 0) on a query the student left free, (2, 0) differing from the
    # student's (2, 1), and (0, 0) identical to the student's pair
    teacher = [(_t(0, 1, 2), _t(0, 0, 0)), (_t(1), _t(0))]
    assert union_unmatched(student, teacher, "none") is student

    only = union_unmatched(student, teacher, "unmatched_only")
    assert [(q.tolist(), g.tolist()) for q, g in only] == [([0, 2, 1], [0, 1, 0]), ([1], [0])]

    every = union_unmatched(student, teacher, "all")
    assert [(q.tolist(), g.tolist()) for q, g in every] == [([0, 2, 1, 2], [0, 1, 0, 0]), ([1], [0])]

    with pytest.raises(ValueError):
        union_unmatched(student, teacher, "bogus")


def test_total_applies_term_and_group_weights():
    criterion = SetCriterion(LossConfig())  # cls 1, L1 5, GIoU 2
    losses = {
        "main/cls/l0": torch.tensor(1.0), "main/l1/l0": torch.tensor(2.0), "main/giou/l0": torch.tensor(3.0),
        "main/cls/l1": torch.tensor(0.5),
        "aux0/cls/l0": torch.tensor(10.0), "aux1/l1/l1": torch.tensor(100.0),
        "pd/giou/l0": torch.tensor(7.0), "enc/l1/l0": torch.tensor(0.25),
    }
    main = 1 * 1 + 2 * 5 + 3 * 2 + 0.5 * 1
    enc = 0.25 * 5
    assert float(criterion.total(losses)) == pytest.approx(main + 10 + 500 + 14 + enc)
    weights = {"aux": 0.5, "pd": 2.0}
    assert float(criterion.total(losses, weights)) == pytest.approx(main + 0.5 * (10 + 500) + 2 * 14 + enc)
    # a group's own weight wins over its family's
    weights = {"aux": 0.5, "aux1": 3.0, "pd": 0.0}
    assert float(criterion.total(losses, weights)) == pytest.approx(main + 0.5 * 10 + 3 * 500 + enc)
    # custom term weights
    criterion = SetCriterion(LossConfig(cls_weight=2.0, l1_weight=1.0, giou_weight=0.0))
    assert float(criterion.total({"main/cls/l0": torch.tensor(1.0), "main/l1/l0": torch.tensor(2.0),
                                  "main/giou/l0": torch.tensor(3.0)})) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        criterion.total({"main/giou/l0": torch.tensor(1.0)})


def test_group_losses_keys_layers_and_summary():
    logits, boxes, targets, assignment = _problem()
    logits_l, boxes_l = torch.stack([logits, logits * 0.5]), torch.stack([boxes, boxes])
    criterion = SetCriterion(LossConfig())
    out = criterion.group_losses("main", logits_l, boxes_l, targets, [assignment, assignment], 3.0)
    assert sorted(out) == sorted(f"main/{t}/l{i}" for t in ("cls", "l1", "giou") for i in (0, 1))
    single = set_losses(logits, boxes, targets, [assignment], assignment, 3.0)
    for term in ("cls", "l1", "giou"):
        assert float(out[f"main/{term}/l0"]) == pytest.approx(float(single[term]))
    summary = summarize_losses(out)
    assert summary["main/l1"] == pytest.approx(2 * float(single["l1"]))
    criterion = SetCriterion(LossConfig(aux_layers=False))
    out = criterion.group_losses("main", logits_l, boxes_l, targets, [assignment, assignment], 3.0)
    assert sorted(out) == ["main/cls/l1", "main/giou/l1", "main/l1/l1"]


def _random_assignment(gen, num_queries, targets):
    """Per image a one-to-one random (query, GT) assignment over all of its GTs (possibly none)."""
    out = []
    for t in targets:
        g = len(t["labels"])
        out.append((torch.randperm(num_queries, generator=gen)[:g].sort().values, torch.randperm(g, generator=gen)))
    return out


@pytest.mark.parametrize("cls_loss", ["focal", "qfl", "varifocal"])
@pytest.mark.parametrize("aux_layers", [True, False])
def test_group_losses_of_all_layers_at_once_equal_each_layer_alone(cls_loss, aux_layers):
    """Oracle: :func:`set_losses` on one layer (itself checked against torchvision's focal loss and GIoU
    above), layer by layer, with per-layer assignments, extra positives, extra box pairs, teacher boxes
    as soft-target sources, an image without GTs and a layer without pairs; values and gradients."""
    gen = torch.Generator().manual_seed(5)
    layers, b, q, c = 3, 3, 6, 4
    targets = [{"labels": torch.randint(0, c, (g,), generator=gen),
                "boxes": torch.cat([torch.rand(g, 2, generator=gen) * 0.6 + 0.2,
                                    torch.rand(g, 2, generator=gen) * 0.3 + 0.05], 1)} for g in (3, 0, 2)]
    logits = (torch.randn(layers, b, q, c, generator=gen) * 2).requires_grad_()
    boxes = torch.cat([torch.rand(layers, b, q, 2, generator=gen) * 0.6 + 0.2,
                       torch.rand(layers, b, q, 2, generator=gen) * 0.3 + 0.05], -1).requires_grad_()
    teacher_boxes = boxes.detach() + 0.03 * torch.randn(layers, b, q, 4, generator=gen)
    own = [_random_assignment(gen, q, targets) for _ in range(layers)]
    own[1] = [(_t(), _t()) for _ in targets]  # a layer where the student matched nothing
    teacher = [_random_assignment(gen, q, targets) for _ in range(layers)]
    boxes_pairs = [union_unmatched(s, t, "unmatched_only") for s, t in zip(own, teacher)]
    criterion = SetCriterion(LossConfig(aux_layers=aux_layers))
    out = criterion.group_losses("md", logits, boxes, targets, own, 2.5, cls_loss=cls_loss, extra_cls=teacher,
                                 extra_box=boxes_pairs, extra_cls_boxes=[boxes, teacher_boxes])
    supervised = range(layers) if aux_layers else [layers - 1]
    assert sorted(out) == sorted(f"md/{t}/l{i}" for t in ("cls", "l1", "giou") for i in supervised)
    grads = torch.autograd.grad(sum(out.values()), [logits, boxes])
    expected = {}
    for i in supervised:
        one = set_losses(logits[i], boxes[i], targets, [own[i], teacher[i]], boxes_pairs[i], 2.5, cls_loss,
                         cls_box_sources=[None, [boxes[i], teacher_boxes[i]]])
        expected.update({f"md/{term}/l{i}": value for term, value in one.items()})
    expected_grads = torch.autograd.grad(sum(expected.values()), [logits, boxes])
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(out[f"md/l1/l{layers - 1}"].detach()) > 0
    assert not aux_layers or float(out["md/giou/l1"].detach()) > 0


def test_pair_index_lists_every_pair_with_its_layer_image_and_batch_gt_row():
    gen = torch.Generator().manual_seed(2)
    targets = [{"labels": _t(*range(g)), "boxes": torch.rand(g, 4, generator=gen)} for g in (2, 0, 3)]
    per_layer = [_random_assignment(gen, 7, targets) for _ in range(3)]
    gts = BatchGts.of(targets)
    index = pair_index(per_layer, gts.offsets, torch.device("cpu"))
    expected = [(layer, b, int(q), int(g) + gts.offsets[b]) for layer, assignment in enumerate(per_layer)
                for b, (qs, gs) in enumerate(assignment) for q, g in zip(qs, gs)]
    assert index.dtype == torch.int64 and [tuple(col) for col in index.t().tolist()] == expected
    assert gts.offsets == [0, 2, 2, 5] and len(gts.labels) == len(gts.boxes) == 5
    assert pair_index([[(_t(), _t())] * 3], gts.offsets, torch.device("cpu")).shape == (4, 0)


def test_summarize_losses_sums_layers_and_passes_the_total_through():
    losses = {"main/cls/l0": torch.tensor(1.0), "main/cls/l1": torch.tensor(2.0), "pd/l1/l0": torch.tensor(0.5),
              "loss": torch.tensor(7.0)}
    assert summarize_losses(losses) == {"main/cls": 3.0, "pd/l1": 0.5, "loss": 7.0}


def test_match_layers_context_names_the_layer():
    logits = torch.zeros(2, 1, 3, 2)
    logits[1, 0, 1, 0] = math.nan
    boxes = torch.full((2, 1, 3, 4), 0.3)
    targets = [{"labels": _t(0), "boxes": torch.tensor([[0.3, 0.3, 0.3, 0.3]])}]
    with pytest.raises(TrainingError, match="epoch 1 step 2 decoder layer 1"):
        SetCriterion(LossConfig()).match_layers(logits, boxes, targets, context="epoch 1 step 2")
