"""Query groups of the distiller: no leakage between groups, AUX selection and AUX group contents."""

from __future__ import annotations

import pytest
import torch
from distill_testutils import fixed_targets, images_and_masks, one_thread, random_boxes, tiny_setup
from torchvision.ops import generalized_box_iou

from oddetr.distill.groups import aux_group, prediction_group, select_aux_queries
from oddetr.losses.matcher import HungarianMatcher
from oddetr.models.outputs import QueryGroup


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_thread():
        yield


def _brute_force_cost(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, gt: torch.Tensor,
                      alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """(Q, G) float64: 2 * focal class cost + 5 * L1 + 2 * (-GIoU), each entry computed separately."""
    logits, boxes, gt = logits.double(), boxes.double(), gt.double()
    q, g = boxes.shape[0], gt.shape[0]
    cost = torch.empty(q, g, dtype=torch.float64)

    def xyxy(b):
        return torch.stack([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])

    for i in range(q):
        for j in range(g):
            p = torch.sigmoid(logits[i, labels[j]])
            pos = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
            neg = (1 - alpha) * p**gamma * -torch.log(1 - p + 1e-8)
            l1 = (boxes[i] - gt[j]).abs().sum()
            giou = generalized_box_iou(xyxy(boxes[i])[None], xyxy(gt[j])[None])[0, 0]
            cost[i, j] = 2.0 * (pos - neg) + 5.0 * l1 + 2.0 * (-giou)
    return cost


def _brute_force_topk(cost: torch.Tensor, k: int) -> list[list[int]]:
    out = []
    for j in range(cost.shape[1]):
        order = sorted(range(cost.shape[0]), key=lambda i: float(cost[i, j]))
        # the test is only meaningful without near-ties around the cut
        column = sorted(float(c) for c in cost[:, j])
        assert min(b - a for a, b in zip(column[: k + 1], column[1 : k + 1])) > 1e-4
        out.append(order[:k])
    return out


def test_select_aux_queries_matches_brute_force_top2():
    g = torch.Generator().manual_seed(0)
    bsz, q, c = 3, 10, 4
    logits = torch.randn(bsz, q, c, generator=g) * 2
    boxes = torch.stack([random_boxes(q, g) for _ in range(bsz)])
    targets = [
        {"labels": torch.tensor([0, 3, 3]), "boxes": random_boxes(3, g)},
        {"labels": torch.tensor([2]), "boxes": random_boxes(1, g)},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    chosen = select_aux_queries(logits, boxes, targets, HungarianMatcher(), k=2)
    assert len(chosen) == bsz
    for b in range(2):
        cost = _brute_force_cost(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
        expected = _brute_force_topk(cost, 2)
        assert chosen[b].dtype == torch.long
        assert chosen[b].tolist() == expected
    assert chosen[2].shape == (0, 2)
    # k larger than the number of queries: every query, best first
    few = select_aux_queries(logits[:1, :3], boxes[:1, :3], targets[:1], HungarianMatcher(), k=5)
    cost = _brute_force_cost(logits[0, :3], boxes[0, :3], targets[0]["labels"], targets[0]["boxes"])
    assert few[0].tolist() == [sorted(range(3), key=lambda i, j=j: float(cost[i, j])) for j in range(3)]


@pytest.fixture(scope="module")
def teacher_pass():
    cfg, model, criterion, distiller = tiny_setup()
    images, masks = images_and_masks()
    targets = fixed_targets()
    plan = distiller.prepare(images, masks, targets)
    return cfg, model, criterion, distiller, images, masks, targets, plan


def test_distiller_aux_groups_hold_teacher_state_of_brute_force_selection(teacher_pass):
    cfg, _, _, distiller, _, _, targets, plan = teacher_pass
    t_main, t_init = plan.teacher.main, plan.teacher.initial
    k = cfg.distill.aux_k
    assert k == 2
    assert [a.group.name for a in plan.aux] == ["aux0", "aux1"]
    assert [g.name for g in plan.groups] == ["pd", "aux0", "aux1"]
    max_gt = max(len(t["labels"]) for t in targets)
    for stage, aux in enumerate(plan.aux):
        assert aux.stages == (stage,)
        grp = aux.group
        assert grp.size == k * max_gt
        assert not grp.content.requires_grad and not grp.reference.requires_grad
        for b, tgt in enumerate(targets):
            cost = _brute_force_cost(t_main.logits[stage, b], t_main.boxes[stage, b], tgt["labels"], tgt["boxes"])
            expected = _brute_force_topk(cost, k)
            q_idx, g_idx = aux.assignment[b]
            n = len(tgt["labels"]) * k
            # group index -> GT index, GT-major with k queries per GT
            assert q_idx.tolist() == list(range(n))
            assert g_idx.tolist() == [gt for gt in range(len(tgt["labels"])) for _ in range(k)]
            for slot in range(n):
                query = expected[slot // k][slot % k]
                assert torch.equal(grp.content[b, slot], t_main.hidden[stage, b, query])
                assert torch.equal(grp.reference[b, slot], t_main.references[stage + 1][b, query])
                # learned-query model: the learned positional embedding of that query index
                assert torch.equal(grp.position[b, slot], t_init.position[b, query])
            # padding slots have no target
            assert not set(range(n, grp.size)) & set(q_idx.tolist())
    # the teacher's refined reference after a stage is its detached predicted box there (box refinement)
    assert torch.equal(t_main.references[1], t_main.boxes[0])


def test_aux_group_repeats_a_query_chosen_for_two_gts(teacher_pass):
    _, _, _, _, _, _, _, plan = teacher_pass
    t_main, t_init = plan.teacher.main, plan.teacher.initial
    # image 0: query 3 is among the best two for GT 0 and GT 1; image 1 has one GT (padding after it)
    selections = [[torch.tensor([[3, 5], [3, 1], [0, 3]]), torch.tensor([[2, 4]])]]
    aux = aux_group(t_main, t_init, [1], selections, "aux1", use_learned_position=True)
    grp = aux.group
    assert grp.size == 6
    q0, g0 = aux.assignment[0]
    assert q0.tolist() == [0, 1, 2, 3, 4, 5] and g0.tolist() == [0, 0, 1, 1, 2, 2]
    queries0 = [3, 5, 3, 1, 0, 3]
    for slot, query in enumerate(queries0):
        assert torch.equal(grp.content[0, slot], t_main.hidden[1, 0, query])
        assert torch.equal(grp.reference[0, slot], t_main.references[2][0, query])
    assert torch.equal(grp.content[0, 0], grp.content[0, 2])  # the same query, once per GT
    q1, g1 = aux.assignment[1]
    assert q1.tolist() == [0, 1] and g1.tolist() == [0, 0]
    assert torch.equal(grp.content[1, 1], t_main.hidden[1, 1, 4])
    # image 1's slots 2..5 are padding: no target and neutral content
    assert torch.equal(grp.content[1, 2:], torch.zeros_like(grp.content[1, 2:]))


def test_pooled_aux_group_and_prediction_group(teacher_pass):
    _, _, _, distiller, _, _, targets, plan = teacher_pass
    t_main, t_init = plan.teacher.main, plan.teacher.initial
    stages = [0, 1]
    sel = [select_aux_queries(t_main.logits[s], t_main.boxes[s], targets, distiller.criterion.matcher, 2)
           for s in stages]
    pooled = aux_group(t_main, t_init, stages, sel, "aux", use_learned_position=True)
    q0, g0 = pooled.assignment[0]
    assert pooled.stages == (0, 1)
    assert len(q0) == 2 * 2 * len(targets[0]["labels"])  # k per GT per stage
    slot = 0
    for s in stages:
        for gt in range(len(targets[0]["labels"])):
            for query in sel[s][0][gt].tolist():
                assert int(g0[slot]) == gt
                assert torch.equal(pooled.group.content[0, slot], t_main.hidden[s, 0, query])
                assert torch.equal(pooled.group.reference[0, slot], t_main.references[s + 1][0, query])
                slot += 1
    # PD: the teacher's initial queries exactly as its decoder got them, detached, named "pd"
    pd = plan.groups[0]
    assert pd.name == "pd"
    assert torch.equal(pd.content, t_init.content) and torch.equal(pd.reference, t_init.reference)
    assert torch.equal(pd.position, t_init.position)
    live = QueryGroup(t_init.content.clone().requires_grad_(), t_init.position, t_init.reference, "main")
    assert not prediction_group(live).content.requires_grad


def test_no_leakage_between_groups(teacher_pass):
    _, model, _, _, images, masks, _, plan = teacher_pass
    names = [g.name for g in plan.groups]
    assert names == ["pd", "aux0", "aux1"]
    base = model(images, masks, extra_groups=plan.groups)
    for victim in range(len(plan.groups)):
        g = torch.Generator().manual_seed(victim)
        old = plan.groups[victim]
        new_ref = (old.reference + 0.1 * torch.rand(old.reference.shape, generator=g)).clamp(0.05, 0.95)
        changed = QueryGroup(old.content + torch.randn(old.content.shape, generator=g), old.position, new_ref, old.name)
        groups = list(plan.groups)
        groups[victim] = changed
        out = model(images, masks, extra_groups=groups)
        before = [base.main, *base.extra]
        after = [out.main, *out.extra]
        for i, (a, b) in enumerate(zip(before, after)):
            same = (torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)
                    and torch.equal(a.hidden, b.hidden))
            if i == victim + 1:
                assert not torch.equal(a.logits, b.logits), f"perturbing {names[victim]} changed nothing"
            else:
                assert same, f"perturbing {names[victim]} changed group {a.name}"
    # the main group alone (inference) gives the same predictions as with the extra groups
    alone = model(images, masks)
    torch.testing.assert_close(alone.main.logits, base.main.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.main.boxes, base.main.boxes, rtol=1e-5, atol=1e-5)


def test_aux_groups_with_an_image_without_gt(teacher_pass):
    _, _, _, distiller, images, masks, _, _ = teacher_pass
    targets = fixed_targets()
    targets[1] = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "image_id": 1}
    plan = distiller.prepare(images, masks, targets)
    for aux in plan.aux:
        assert aux.group.size == 2 * 3  # k x the largest GT count
        assert len(aux.assignment[0][0]) == 6
        assert len(aux.assignment[1][0]) == 0 and len(aux.assignment[1][1]) == 0  # all padding
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "image_id": i} for i in range(2)]
    plan = distiller.prepare(images, masks, empty)
    assert all(a.group.size == 1 and all(len(q) == 0 for q, _ in a.assignment) for a in plan.aux)
