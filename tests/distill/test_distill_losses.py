"""QFL, matching-distillation targets and prediction-distillation losses against explicit formulas."""

from __future__ import annotations

import pytest
import torch
from distill_testutils import fixed_targets, images_and_masks, one_thread, random_boxes, tiny_setup
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from oddetr.config import LossConfig
from oddetr.distill.losses import prediction_distillation_losses
from oddetr.losses.criterion import SetCriterion, quality_focal_loss, union_unmatched
from oddetr.models.outputs import GroupOutput


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_thread():
        yield


def _qfl_reference(logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """-|y - p|^β [y log p + (1 - y) log(1 - p)], summed, in float64."""
    x, y = logits.double(), y.double()
    p = torch.sigmoid(x)
    return (-(y - p).abs() ** beta * (y * torch.log(p) + (1 - y) * torch.log1p(-p))).sum()


def _xyxy(b: torch.Tensor) -> torch.Tensor:
    return box_convert(b.double(), "cxcywh", "xyxy")


# ---------------------------------------------------------------------------------------- QFL


@pytest.mark.parametrize("beta", [2.0, 1.5, 0.5])
def test_quality_focal_loss_matches_formula(beta):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 5, generator=g) * 3
    y = torch.rand(4, 7, 5, generator=g)
    y[0] = 0.0  # negatives
    y[1, :, 0] = 1.0  # hard positives
    y[2, ::2] = 0.0
    got = quality_focal_loss(logits, y, beta)
    assert got.shape == ()
    torch.testing.assert_close(got.double(), _qfl_reference(logits, y, beta), rtol=1e-5, atol=1e-6)


def test_quality_focal_loss_special_cases():
    # y = p: zero loss whatever the entropy; y = 0 / 1: a focal-style term
    logits = torch.tensor([-2.0, 0.0, 1.5])
    assert float(quality_focal_loss(logits, logits.sigmoid(), 2.0)) == pytest.approx(0.0, abs=1e-12)
    x = torch.tensor([0.3])
    p = torch.sigmoid(x.double())
    torch.testing.assert_close(quality_focal_loss(x, torch.zeros(1), 2.0).double(), (p**2 * -torch.log1p(-p)).sum())
    torch.testing.assert_close(quality_focal_loss(x, torch.ones(1), 2.0).double(), ((1 - p) ** 2 * -torch.log(p)).sum())
    # gradient flows to the logits only
    x = torch.randn(6, requires_grad=True)
    quality_focal_loss(x, torch.rand(6), 2.0).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------- MD


def _md_case():
    """One image, 5 queries, 3 classes; GT a (class 0), b (class 2), c (class 0)."""
    targets = [{"labels": torch.tensor([0, 2, 0]),
                "boxes": torch.tensor([[0.30, 0.30, 0.20, 0.20], [0.60, 0.60, 0.30, 0.30],
                                       [0.35, 0.32, 0.25, 0.20]]),
                "image_id": 7}]
    boxes = torch.tensor([[[0.31, 0.29, 0.22, 0.18],   # q0
                           [0.45, 0.45, 0.40, 0.40],   # q1: overlaps a and b
                           [0.80, 0.20, 0.10, 0.10],   # q2: nothing
                           [0.58, 0.62, 0.28, 0.33],   # q3
                           [0.33, 0.31, 0.24, 0.20]]])  # q4: overlaps a and c
    logits = torch.tensor([[[0.5, -1.0, -2.0], [0.1, 0.2, -0.3], [-3.0, -2.5, -4.0],
                            [-1.0, 0.0, 1.2], [-2.0, -2.0, -1.5]]])
    return logits, boxes, targets


def _iou(box: torch.Tensor, gt: torch.Tensor) -> float:
    return float(box_iou(_xyxy(box[None]), _xyxy(gt[None]))[0, 0])


def test_md_soft_targets_at_both_classes_hand_made():
    logits, boxes, targets = _md_case()
    gt = targets[0]["boxes"]
    # student: q1 -> a, q3 -> b, q4 -> c;  teacher: q1 -> b (a different GT, other class), q0 -> a, q4 -> a
    student = [(torch.tensor([1, 3, 4]), torch.tensor([0, 1, 2]))]
    teacher = [(torch.tensor([0, 1, 4]), torch.tensor([0, 1, 0]))]
    num_boxes = 3.0
    criterion = SetCriterion(LossConfig(aux_layers=True))
    box_pairs = union_unmatched(student, teacher, "unmatched_only")
    out = criterion.group_losses("md", logits[None], boxes[None], targets, [student], num_boxes, cls_loss="qfl",
                                 extra_cls=[teacher], extra_box=[box_pairs])
    assert set(out) == {"md/cls/l0", "md/l1/l0", "md/giou/l0"}

    b = boxes[0]
    y = torch.zeros(5, 3, dtype=torch.float64)
    y[1, 0] = _iou(b[1], gt[0])  # student's a
    y[1, 2] = _iou(b[1], gt[1])  # teacher's b: the same query gets a second class
    y[3, 2] = _iou(b[3], gt[1])
    y[0, 0] = _iou(b[0], gt[0])  # teacher only
    y[4, 0] = max(_iou(b[4], gt[2]), _iou(b[4], gt[0]))  # c and a share class 0: max of the IoUs
    assert y[1, 0] > 0.05 and y[1, 2] > 0.05 and _iou(b[4], gt[0]) != _iou(b[4], gt[2])
    expected_cls = _qfl_reference(logits[0], y, 2.0) / num_boxes
    torch.testing.assert_close(out["md/cls/l0"].double(), expected_cls, rtol=1e-5, atol=1e-7)
    # power of the check: overwriting (the teacher's IoU with a) instead of the max would be visible
    y_overwrite = y.clone()
    y_overwrite[4, 0] = _iou(b[4], gt[0])
    assert abs(float(_qfl_reference(logits[0], y_overwrite, 2.0) / num_boxes - expected_cls)) > 1e-2

    # boxes: the student's pairs plus the teacher's pair on q0 (unmatched by the student)
    pairs = [(1, 0), (3, 1), (4, 2), (0, 0)]
    l1 = sum(float((b[q] - gt[g]).abs().sum()) for q, g in pairs)
    giou = sum(1 - float(generalized_box_iou(_xyxy(b[q][None]), _xyxy(gt[g][None]))[0, 0]) for q, g in pairs)
    assert float(out["md/l1/l0"]) == pytest.approx(l1 / num_boxes, rel=1e-5)
    assert float(out["md/giou/l0"]) == pytest.approx(giou / num_boxes, rel=1e-5)

    # the soft target uses the detached box: no gradient from y into the boxes
    boxes_g = boxes[None].clone().requires_grad_()
    out_g = criterion.group_losses("md", logits[None].clone().requires_grad_(), boxes_g, targets, [student], num_boxes, cls_loss="qfl",
                                   extra_cls=[teacher], extra_box=[student])
    out_g["md/cls/l0"].backward()
    assert boxes_g.grad is None or torch.count_nonzero(boxes_g.grad) == 0


def test_md_targets_with_focal_are_hard_and_union():
    logits, boxes, targets = _md_case()
    student = [(torch.tensor([1]), torch.tensor([0]))]
    teacher = [(torch.tensor([1]), torch.tensor([1]))]
    out = SetCriterion(LossConfig()).group_losses("m", logits[None], boxes[None], targets, [student], 1.0,
                                                  cls_loss="focal", extra_cls=[teacher])
    y = torch.zeros(5, 3, dtype=torch.float64)
    y[1, 0] = y[1, 2] = 1.0
    p = torch.sigmoid(logits[0].double())
    ce = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
    p_t = p * y + (1 - p) * (1 - y)
    focal = ((0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2).sum()
    torch.testing.assert_close(out["m/cls/l0"].double(), focal, rtol=1e-5, atol=1e-7)


def test_union_unmatched_modes():
    student = [(torch.tensor([1, 3]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    teacher = [(torch.tensor([0, 1, 3]), torch.tensor([0, 1, 1])), (torch.tensor([2]), torch.tensor([0]))]
    as_sets = lambda a: [sorted(zip(q.tolist(), g.tolist())) for q, g in a]  # noqa: E731
    assert as_sets(union_unmatched(student, teacher, "none")) == as_sets(student)
    assert as_sets(union_unmatched(student, teacher, "unmatched_only")) == [[(0, 0), (1, 0), (3, 1)], [(2, 0)]]
    # all: every teacher pair that differs from the student's ((1, 1) is new, (3, 1) is already there)
    assert as_sets(union_unmatched(student, teacher, "all")) == [[(0, 0), (1, 0), (1, 1), (3, 1)], [(2, 0)]]
    with pytest.raises(ValueError):
        union_unmatched(student, teacher, "bogus")


def test_distiller_md_path_uses_teacher_assignments():
    cfg, model, criterion, distiller = tiny_setup("distill.pd=false", "distill.aux=false")
    images, masks = images_and_masks()
    targets = fixed_targets()
    plan = distiller.prepare(images, masks, targets)
    assert plan.groups == [] and len(plan.teacher_assignments) == cfg.model.dec_layers
    out = model(images, masks, extra_groups=plan.groups)
    # a query whose layer-0 box overlaps GT 0 and GT 1 of image 0 (different classes 0 and 2)
    b0 = out.main.boxes[0, 0].detach()
    ious = box_iou(_xyxy(b0), _xyxy(targets[0]["boxes"]))
    both = torch.minimum(ious[:, 0], ious[:, 1])
    q_both = int(both.argmax())
    assert both[q_both] > 0
    o = [i for i in range(cfg.model.num_queries) if i != q_both]  # the other queries
    # hand-crafted assignments per layer: the student and the teacher disagree on image 0
    student = [[(torch.tensor([q_both, o[1], o[4]]), torch.tensor([0, 1, 2])), (torch.tensor([o[3]]), torch.tensor([0]))],
               [(torch.tensor([o[0], o[1], o[4]]), torch.tensor([2, 1, 0])), (torch.tensor([o[3]]), torch.tensor([0]))]]
    teacher = [[(torch.tensor([q_both, o[2], o[5]]), torch.tensor([1, 0, 2])), (torch.tensor([o[6]]), torch.tensor([0]))],
               [(torch.tensor([o[0], o[1], o[6]]), torch.tensor([2, 1, 0])), (torch.tensor([o[3]]), torch.tensor([0]))]]
    plan.teacher_assignments = teacher
    num_boxes = 4.0
    losses = distiller.losses(out, targets, num_boxes, plan, student)
    assert {k.split("/")[0] for k in losses} == {"md"}
    for layer in range(2):
        logits = out.main.logits[layer].detach()
        boxes = out.main.boxes[layer].detach()
        t_boxes = plan.teacher.main.boxes[layer]
        y = torch.zeros(logits.shape, dtype=torch.float64)
        box_pairs = []
        for b, tgt in enumerate(targets):
            own = set(zip(*(t.tolist() for t in student[layer][b])))
            for assign, is_teacher in ((student[layer][b], False), (teacher[layer][b], True)):
                for q, g in zip(*(t.tolist() for t in assign)):
                    c = int(tgt["labels"][g])
                    # a pair only the teacher made: the teacher's box; the student's own: its own box
                    box = t_boxes[b, q] if is_teacher and (q, g) not in own else boxes[b, q]
                    y[b, q, c] = max(float(y[b, q, c]), _iou(box, tgt["boxes"][g]))
            s_q = student[layer][b][0].tolist()
            box_pairs += [(b, q, g) for q, g in zip(*(t.tolist() for t in student[layer][b]))]
            box_pairs += [(b, q, g) for q, g in zip(*(t.tolist() for t in teacher[layer][b])) if q not in s_q]
        cls = _qfl_reference(logits, y, cfg.loss.qfl_beta) / num_boxes
        torch.testing.assert_close(losses[f"md/cls/l{layer}"].double(), cls, rtol=1e-5, atol=1e-7)
        l1 = sum(float((boxes[b, q] - targets[b]["boxes"][g]).abs().sum()) for b, q, g in box_pairs)
        assert float(losses[f"md/l1/l{layer}"].detach()) == pytest.approx(l1 / num_boxes, rel=1e-5)
        if layer == 0:
            # image 0 query q_both carries two classes: student GT 0 (class 0) and teacher GT 1 (class 2)
            assert y[0, q_both, 0] > 0 and y[0, q_both, 2] > 0 and y[0, q_both, 1] == 0
            # 3 student pairs + 2 teacher pairs on unmatched queries on image 0; 1 + 1 on image 1
            assert len(box_pairs) == 7
        else:
            assert len(box_pairs) == 5  # 3 + the teacher's o[6] on image 0; 1 on image 1 (they agree)


# ---------------------------------------------------------------------------------------- PD


def _group(logits: torch.Tensor, boxes: torch.Tensor) -> GroupOutput:
    return GroupOutput("x", logits, boxes, torch.zeros(*boxes.shape[:-1], 1), [])


def _smooth_l1(d: torch.Tensor, beta: float) -> torch.Tensor:
    d = d.abs()
    return torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).sum()


@pytest.mark.parametrize("queries", ["matched", "confident", "matched_or_confident", "all"])
@pytest.mark.parametrize("box_loss", ["smooth_l1", "l2", "l1_giou"])
def test_pd_losses_match_formula_on_random_outputs(queries, box_loss):
    g = torch.Generator().manual_seed(0)
    layers, bsz, n, c = 2, 2, 5, 3
    s_logits, t_logits = torch.randn(layers, bsz, n, c, generator=g), torch.randn(layers, bsz, n, c, generator=g) * 2
    s_boxes = torch.stack([torch.stack([random_boxes(n, g) for _ in range(bsz)]) for _ in range(layers)])
    t_boxes = torch.stack([torch.stack([random_boxes(n, g) for _ in range(bsz)]) for _ in range(layers)])
    # the teacher's matching per layer: (query, GT) pairs per image
    teacher = [[(torch.tensor([1, 3]), torch.tensor([0, 1])), (torch.tensor([4]), torch.tensor([0]))],
               [(torch.tensor([0]), torch.tensor([0])), (torch.tensor([2, 4]), torch.tensor([1, 0]))]]
    num_boxes, threshold, beta = 3.0, 0.6, 0.05
    out = prediction_distillation_losses(_group(s_logits, s_boxes), _group(t_logits, t_boxes), num_boxes, [0, 1],
                                         beta=1.5, teacher_assignments=teacher, box_queries=queries,
                                         box_threshold=threshold, box_loss=box_loss, box_beta=beta)
    terms = ("cls", "l1", "giou") if box_loss == "l1_giou" else ("cls", "l1")
    assert set(out) == {f"pd/{t}/l{i}" for t in terms for i in range(2)}
    for layer in range(layers):
        y = torch.sigmoid(t_logits[layer].double())
        cls = _qfl_reference(s_logits[layer], y, 1.5) / num_boxes
        torch.testing.assert_close(out[f"pd/cls/l{layer}"].double(), cls, rtol=1e-5, atol=1e-7)
        # brute force: which queries get a box term
        chosen = []
        for b in range(bsz):
            matched = set(teacher[layer][b][0].tolist())
            for q in range(n):
                confident = float(y[b, q].max()) >= threshold
                keep = {"matched": q in matched, "confident": confident,
                        "matched_or_confident": q in matched or confident, "all": True}[queries]
                if keep:
                    chosen.append((b, q))
        assert 0 < len(chosen) < bsz * n or queries == "all"
        diff = torch.stack([s_boxes[layer, b, q].double() - t_boxes[layer, b, q].double() for b, q in chosen])
        if box_loss == "smooth_l1":
            l1 = _smooth_l1(diff, beta)
        elif box_loss == "l2":
            l1 = (diff**2).sum()
        else:
            l1 = diff.abs().sum()
            giou = sum(1 - generalized_box_iou(_xyxy(s_boxes[layer, b, q][None]), _xyxy(t_boxes[layer, b, q][None]))[0, 0]
                       for b, q in chosen)
            torch.testing.assert_close(out[f"pd/giou/l{layer}"].double(), giou / len(chosen), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[f"pd/l1/l{layer}"].double(), l1 / len(chosen), rtol=1e-5, atol=1e-7)
    # teacher outputs are targets: no gradient reaches them
    t_req = t_logits.clone().requires_grad_()
    s_req = s_logits.clone().requires_grad_()
    sum(prediction_distillation_losses(_group(s_req, s_boxes), _group(t_req, t_boxes), 1.0, [1],
                                       teacher_assignments=teacher, box_queries=queries).values()).backward()
    assert t_req.grad is None and s_req.grad is not None
    assert torch.count_nonzero(s_req.grad[0]) == 0 and torch.count_nonzero(s_req.grad[1]) > 0


def test_pd_box_gradient_fades_as_the_student_reaches_the_teacher():
    """At a student-teacher gap of 1e-6 the PD box gradient is < 1e-3 of the main box loss's gradient
    (the old L1 + GIoU term on every query kept a gradient of constant size, about 6)."""
    g = torch.Generator().manual_seed(3)
    bsz, n = 2, 10
    teacher_boxes = torch.stack([random_boxes(n, g) for _ in range(bsz)])
    gap = 1e-6 * torch.sign(torch.randn(bsz, n, 4, generator=g))
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": random_boxes(3, g)},
               {"labels": torch.tensor([1, 1]), "boxes": random_boxes(2, g)}]
    matched = [(torch.tensor([0, 4, 7]), torch.tensor([0, 1, 2])), (torch.tensor([2, 5]), torch.tensor([0, 1]))]
    t_logits = torch.randn(1, bsz, n, 3, generator=g)
    crit = SetCriterion(LossConfig())

    def box_grad(loss_fn) -> float:
        boxes = (teacher_boxes + gap).double().clone().requires_grad_()
        loss_fn(boxes).backward()
        return float(boxes.grad.norm())

    def weighted(losses: dict) -> torch.Tensor:
        return sum(v * crit.term_weights[k.split("/")[1]] for k, v in losses.items() if "/cls/" not in k)

    main = box_grad(lambda b: weighted(crit.group_losses("main", t_logits.double(), b[None], targets, [matched], 5.0)))
    for loss in ("smooth_l1", "l2"):
        pd = box_grad(lambda b, loss=loss: weighted(prediction_distillation_losses(
            _group(t_logits.double(), b[None]), _group(t_logits, teacher_boxes[None]), 5.0, [0],
            teacher_assignments=[matched], box_queries="all", box_loss=loss)))
        assert pd < 1e-3 * main, (loss, pd, main)
    # the constant-size term this replaces: its gradient does not fade
    old = box_grad(lambda b: weighted(prediction_distillation_losses(
        _group(t_logits.double(), b[None]), _group(t_logits, teacher_boxes[None]), 5.0, [0],
        teacher_assignments=[matched], box_queries="all", box_loss="l1_giou")))
    assert old > 0.1 * main


def _randomise_box_heads(model):
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for head in model.bbox_heads:
            last = head.layers[-1]
            last.weight.copy_(0.05 * torch.randn(last.weight.shape, generator=g))


def test_pd_loss_is_zero_when_student_is_teacher():
    cfg, model, criterion, distiller = tiny_setup("model.backbone.norm=frozen_bn", "distill.aux=false",
                                                  "distill.md=false")
    assert cfg.model.dropout == 0.0 and distiller.teacher.step == 0
    _randomise_box_heads(model)  # boxes depend on the hidden state, not only on the reference
    _randomise_box_heads(distiller.teacher.model)  # same generator seed: identical weights
    images, masks = images_and_masks()
    targets = fixed_targets()
    plan = distiller.prepare(images, masks, targets)
    assert [g.name for g in plan.groups] == ["pd"]
    out = model(images, masks, extra_groups=plan.groups)
    pd_out = out.extra[0]
    layers = criterion.layer_indices(cfg.model.dec_layers)
    losses = prediction_distillation_losses(pd_out, plan.teacher.main, 4.0, layers, cfg.loss.qfl_beta,
                                            teacher_assignments=plan.teacher_assignments, box_loss="l1_giou")
    assert set(losses) == {f"pd/{t}/l{i}" for t in ("cls", "l1", "giou") for i in layers}
    for layer in layers:
        # the student's outputs on the teacher's queries are the teacher's outputs
        torch.testing.assert_close(pd_out.logits[layer], plan.teacher.main.logits[layer], rtol=1e-5, atol=1e-5)
        y = plan.teacher.main.logits[layer].sigmoid()
        cls = _qfl_reference(pd_out.logits[layer].detach(), y, cfg.loss.qfl_beta) / 4.0
        torch.testing.assert_close(losses[f"pd/cls/l{layer}"].double(), cls, rtol=1e-4, atol=1e-12)
        assert float(losses[f"pd/cls/l{layer}"].detach()) < 1e-9  # |y - p|^2 ~ 0
        assert abs(float(losses[f"pd/l1/l{layer}"].detach())) < 1e-5
        assert abs(float(losses[f"pd/giou/l{layer}"].detach())) < 1e-5
    # the boxes are non-trivial (not the reference copied through)
    assert not torch.allclose(pd_out.boxes[-1][..., :2], plan.groups[0].reference, atol=1e-3)

    # perturb the student's weights: PD is no longer zero
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in (*model.class_heads.parameters(), *model.bbox_heads.parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    out = model(images, masks, extra_groups=plan.groups)
    losses = prediction_distillation_losses(out.extra[0], plan.teacher.main, 4.0, layers, cfg.loss.qfl_beta,
                                            teacher_assignments=plan.teacher_assignments, box_loss="l1_giou")
    for layer in layers:
        y = plan.teacher.main.logits[layer].sigmoid()
        cls = _qfl_reference(out.extra[0].logits[layer].detach(), y, cfg.loss.qfl_beta) / 4.0
        torch.testing.assert_close(losses[f"pd/cls/l{layer}"].double(), cls, rtol=1e-5, atol=1e-9)
        assert float(losses[f"pd/cls/l{layer}"].detach()) > 1e-3
        assert float(losses[f"pd/l1/l{layer}"].detach()) > 1e-3
        assert float(losses[f"pd/giou/l{layer}"].detach()) > 1e-3


# ---------------------------------------------------------------------------------------- MD target source


@pytest.mark.parametrize("source", ["teacher", "student", "max"])
def test_md_teacher_only_pair_takes_the_chosen_box(source):
    """A pair only the teacher made takes IoU(teacher box, GT), IoU(student box, GT) or the larger."""
    logits, boxes, targets = _md_case()
    gt = targets[0]["boxes"]
    teacher_boxes = boxes.clone()
    teacher_boxes[0, 2] = torch.tensor([0.59, 0.61, 0.30, 0.31])  # the teacher's q2 sits on b; the student's does not
    teacher_boxes[0, 3] = torch.tensor([0.50, 0.50, 0.50, 0.50])  # worse than the student's q3 on b
    student = [(torch.tensor([3]), torch.tensor([1]))]
    teacher = [(torch.tensor([2, 3]), torch.tensor([1, 1]))]  # q2 -> b teacher only; q3 -> b shared
    cfg, _, criterion, distiller = tiny_setup(f"distill.md_target_box={source}")
    group = GroupOutput("main", logits[None], boxes[None], torch.zeros(1, 1, 5, 1), [])
    losses = distiller._md_losses("md", group, [student], [teacher], teacher_boxes[None], targets, 1.0)
    y = torch.zeros(5, 3, dtype=torch.float64)
    y[3, 2] = _iou(boxes[0, 3], gt[1])  # the shared pair is the student's own: its own box
    s_iou, t_iou = _iou(boxes[0, 2], gt[1]), _iou(teacher_boxes[0, 2], gt[1])
    y[2, 2] = {"teacher": t_iou, "student": s_iou, "max": max(s_iou, t_iou)}[source]
    assert t_iou > 0.8 and s_iou == 0.0
    torch.testing.assert_close(losses["md/cls/l0"].double(), _qfl_reference(logits[0], y, cfg.loss.qfl_beta),
                               rtol=1e-5, atol=1e-7)


def test_md_teacher_pairs_replace_the_students_own():
    """distill.md_pairs=teacher: the teacher's pairs are the positives (its box's IoU), the student's own pair
    survives only for a GT the teacher's pairs leave out, and boxes regress on exactly those pairs."""
    logits, boxes, targets = _md_case()
    gt, b = targets[0]["boxes"], boxes[0]
    teacher_boxes = boxes.clone()
    teacher_boxes[0, 2] = torch.tensor([0.59, 0.61, 0.30, 0.31])  # the teacher's q2 sits on b
    student = [(torch.tensor([3, 0]), torch.tensor([1, 0]))]  # q3 -> b (the teacher prefers q2), q0 -> a
    teacher = [(torch.tensor([2, 4]), torch.tensor([1, 2]))]  # q2 -> b, q4 -> c; a left to the student
    cfg, _, criterion, distiller = tiny_setup("distill.md_pairs=teacher")
    group = GroupOutput("main", logits[None], boxes[None], torch.zeros(1, 1, 5, 1), [])
    losses = distiller._md_losses("md", group, [student], [teacher], teacher_boxes[None], targets, 3.0)
    y = torch.zeros(5, 3, dtype=torch.float64)
    y[2, 2] = _iou(teacher_boxes[0, 2], gt[1])
    y[4, 0] = _iou(teacher_boxes[0, 4], gt[2])
    y[0, 0] = _iou(b[0], gt[0])  # the student's own pair: a has no teacher pair
    assert y[2, 2] > 0.8 and y[0, 0] > 0.5 and _iou(b[3], gt[1]) > 0.5  # q3 would be a positive under union
    torch.testing.assert_close(losses["md/cls/l0"].double(), _qfl_reference(logits[0], y, cfg.loss.qfl_beta) / 3.0,
                               rtol=1e-5, atol=1e-7)
    pairs = [(0, 0), (2, 1), (4, 2)]
    l1 = sum(float((b[q] - gt[g]).abs().sum()) for q, g in pairs)
    assert float(losses["md/l1/l0"]) == pytest.approx(l1 / 3.0, rel=1e-5)
    union = tiny_setup()[3]._md_losses("md", group, [student], [teacher], teacher_boxes[None], targets, 3.0)
    assert abs(float(union["md/cls/l0"]) - float(losses["md/cls/l0"])) > 1e-2


def test_varifocal_loss_matches_formula():
    from oddetr.losses.criterion import varifocal_loss

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 4, generator=g) * 2
    y = torch.rand(3, 6, 4, generator=g)
    y[y < 0.6] = 0.0
    p = torch.sigmoid(logits.double())
    q = y.double()
    expected = torch.where(q > 0, -q * (q * torch.log(p) + (1 - q) * torch.log1p(-p)),
                           -0.75 * p**2 * torch.log1p(-p)).sum()
    torch.testing.assert_close(varifocal_loss(logits, y).double(), expected, rtol=1e-5, atol=1e-6)
    assert (y > 0).any() and (y == 0).any()


def test_teacher_only_pairs_drops_shared_pairs():
    from oddetr.losses.criterion import teacher_only_pairs

    student = [(torch.tensor([1, 3]), torch.tensor([0, 1])), (torch.tensor([], dtype=torch.long),) * 2]
    teacher = [(torch.tensor([0, 1, 3]), torch.tensor([0, 1, 1])), (torch.tensor([2]), torch.tensor([0]))]
    got = [sorted(zip(q.tolist(), g.tolist())) for q, g in teacher_only_pairs(student, teacher)]
    assert got == [[(0, 0), (1, 1)], [(2, 0)]]
