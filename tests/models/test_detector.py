"""The detector: output shapes, head initialisation, trainable parameters, query-group isolation,
and post-processing against a brute-force sort."""

from __future__ import annotations

import math

import pytest
import torch

from oddetr.box_ops import cxcywh_to_xyxy
from oddetr.losses.criterion import SetCriterion
from oddetr.losses.detection import detection_losses
from oddetr.models import transformer
from oddetr.models.detector import build_model
from oddetr.models.outputs import QueryGroup
from oddetr.models.postprocess import postprocess
from oddetr.models.transformer import group_attention_mask

NUM_CLASSES = 3
D = 32  # tiny_config's d_model
L = 2  # decoder layers
Q = 10  # queries
pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[1, 48:, :] = True  # the second image is padded at the bottom
    masks[1, :, 40:] = True
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.4, 0.3, 0.3]])},
    ]
    return images, masks, targets


def _model(tiny_config, *extra: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(*extra)
    return build_model(cfg.model, NUM_CLASSES), cfg


def _randomise_zero_inits(model) -> None:
    """Give zero-initialised weights (box head output, deformable offsets) random values, so that
    every input can influence every output in the isolation tests."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_forward_shapes_learned_queries(tiny_config):
    model, cfg = _model(tiny_config)
    assert cfg.model.box_refine and not cfg.model.two_stage
    images, masks, _ = _batch()
    out = model(images, masks)
    assert out.main.logits.shape == (L, 2, Q, NUM_CLASSES)
    assert out.main.boxes.shape == (L, 2, Q, 4)
    assert out.main.hidden.shape == (L, 2, Q, D)
    assert [tuple(r.shape) for r in out.main.references] == [(2, Q, 2)] + [(2, Q, 4)] * L
    assert ((out.main.boxes >= 0) & (out.main.boxes <= 1)).all()
    assert out.pred_logits.shape == (2, Q, NUM_CLASSES) and torch.equal(out.pred_boxes, out.main.boxes[-1])
    assert out.encoder is None and out.extra == [] and out.query_positions is None
    assert out.initial.content.shape == out.initial.position.shape == (2, Q, D)
    assert out.initial.reference.shape == (2, Q, 2)
    # box refinement: one head per layer, distinct modules
    assert len({id(h) for h in model.class_heads}) == L and len({id(h) for h in model.bbox_heads}) == L


def test_forward_shapes_two_stage(tiny_config):
    model, _ = _model(tiny_config, "model.two_stage=true")
    images, masks, _ = _batch()
    out = model(images, masks)
    memory_len = sum(math.ceil(64 / s) ** 2 for s in (8, 16, 32))  # 3 levels: 8x8 + 4x4 + 2x2
    assert out.encoder is not None
    assert out.encoder.logits.shape == (2, memory_len, NUM_CLASSES)
    assert out.encoder.boxes.shape == (2, memory_len, 4)
    assert out.encoder.topk.shape == (2, Q)
    # each main query's encoder position, its identity for MD and the instability metric
    assert out.query_positions.dtype == torch.int64 and torch.equal(out.query_positions, out.encoder.topk)
    assert out.main.logits.shape == (L, 2, Q, NUM_CLASSES)
    assert [tuple(r.shape) for r in out.main.references] == [(2, Q, 4)] * (L + 1)
    # the main group's initial references are the chosen proposals' boxes
    chosen = torch.gather(out.encoder.boxes, 1, out.encoder.topk[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(out.initial.reference, chosen)
    # padded positions are never chosen
    padded = torch.cat([m.flatten(1) for m in _level_masks(masks)], 1)
    assert not padded.gather(1, out.encoder.topk).any()


def _level_masks(masks):
    from oddetr.models.backbone import downsample_mask

    return [downsample_mask(masks, (math.ceil(64 / s), math.ceil(64 / s))) for s in (8, 16, 32)]


def test_without_box_refine_the_heads_are_one_shared_module(tiny_config):
    model, _ = _model(tiny_config, "model.box_refine=false")
    assert all(h is model.class_heads[0] for h in model.class_heads)
    assert all(h is model.bbox_heads[0] for h in model.bbox_heads)
    # named_parameters de-duplicates: one class head and one box head worth of parameters
    names = [n for n, _ in model.named_parameters() if n.startswith(("class_heads", "bbox_heads"))]
    assert all(n.startswith(("class_heads.0.", "bbox_heads.0.")) for n in names)
    images, masks, _ = _batch()
    out = model(images, masks)
    assert out.main.boxes.shape == (L, 2, Q, 4)
    # boxes without refinement: w, h start at sigmoid(-2)
    torch.testing.assert_close(out.main.boxes[0, ..., 2:], torch.full((2, Q, 2), 1 / (1 + math.exp(2))))


@pytest.mark.parametrize("extra", [(), ("model.box_refine=false",), ("model.two_stage=true",)])
def test_head_initialisation(tiny_config, extra):
    model, _ = _model(tiny_config, *extra)
    for head in model.class_heads:
        torch.testing.assert_close(head.bias, torch.full((NUM_CLASSES,), -math.log(99.0)))
        assert float(head.bias[0].detach().sigmoid()) == pytest.approx(0.01)
    for head in model.bbox_heads:
        last = head.layers[-1]
        assert torch.count_nonzero(last.weight) == 0
        assert torch.count_nonzero(last.bias[:2]) == 0
        if "model.box_refine=false" in extra:
            assert last.bias[2:].tolist() == [-2.0, -2.0]
        else:
            assert torch.count_nonzero(last.bias) == 0


def _detection_backward(model, cfg, extra_groups=()):
    images, masks, targets = _batch()
    criterion = SetCriterion(cfg.loss)
    out = model(images, masks, extra_groups=extra_groups)
    losses, _ = detection_losses(criterion, out, targets, num_boxes=3.0)
    for group in out.extra:  # extra groups: a fixed target per query, every layer
        fixed = [(torch.arange(2), torch.tensor([0, 1])), (torch.arange(1), torch.tensor([0]))]
        losses.update(criterion.group_losses(group.name, group.logits, group.boxes, targets,
                                             [fixed] * group.logits.shape[0], 3.0))
    criterion.total(losses).backward()


@pytest.mark.parametrize("trainable_layers", [5, 3])
def test_every_parameter_meant_to_train_trains(tiny_config, trainable_layers):
    model, cfg = _model(tiny_config, f"model.backbone.trainable_layers={trainable_layers}")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if trainable_layers == 5:
        assert frozen == set()
    else:
        expected = {n for n, _ in model.named_parameters()
                    if n.startswith(("backbone.body.conv1.", "backbone.body.bn1.", "backbone.body.layer1."))}
        assert expected and frozen == expected
    assert any(n.startswith("backbone.body.layer2.") for n, p in model.named_parameters() if p.requires_grad)

    # Step 1: every trainable parameter is in the loss graph. (Some get an exactly zero gradient at
    # initialisation, by design: the box MLPs' hidden layers sit behind a zeroed output layer, and
    # the level embedding only steers the deformable offsets / weights, zero-initialised.)
    _detection_backward(model, cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None] == []
    # Step 2 (after one optimiser step): every trainable parameter gets a non-zero gradient.
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    optimizer.step()
    optimizer.zero_grad()
    _detection_backward(model, cfg)
    assert [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_two_stage_parameters_train_with_an_anchor_group(tiny_config):
    """Two-stage: the position head serves groups without positional queries (AUX of two-stage models)."""
    model, cfg = _model(tiny_config, "model.two_stage=true")
    gen = torch.Generator().manual_seed(0)
    aux = QueryGroup(torch.randn(2, 2, D, generator=gen), None, torch.rand(2, 2, 4, generator=gen) * 0.4 + 0.3,
                     "aux0")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(list(model.parameters()))
    _detection_backward(model, cfg, [aux])
    assert [n for n, p in trainable.items() if p.grad is None] == []
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    optimizer.step()
    optimizer.zero_grad()
    _detection_backward(model, cfg, [aux])
    assert [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_group_attention_mask_block_structure():
    mask = group_attention_mask([2, 3], torch.device("cpu"))
    expected = torch.tensor([
        [0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
    ], dtype=torch.bool)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    assert group_attention_mask([4], torch.device("cpu")) is None
    mask = group_attention_mask([1, 2, 1], torch.device("cpu"))
    assert torch.equal(~mask, torch.block_diag(torch.ones(1, 1), torch.ones(2, 2), torch.ones(1, 1)).bool())


def _groups(seed: int, b: int = 2):
    gen = torch.Generator().manual_seed(seed)

    def make(n, name):
        return QueryGroup(torch.randn(b, n, D, generator=gen), torch.randn(b, n, D, generator=gen),
                          torch.rand(b, n, 4, generator=gen) * 0.5 + 0.25, name)

    return make(3, "pd"), make(4, "aux0")


def _decode_twice(model):
    """Decode [main, extra1, extra2] twice; only extra2's content and reference change."""
    images, masks, _ = _batch()
    with torch.no_grad():
        memory = model.encode(images, masks)
        main, _ = model.initial_queries(memory)
        extra1, extra2_a = _groups(1)
        _, extra2_b = _groups(2)
        assert not torch.equal(extra2_a.content, extra2_b.content)
        assert not torch.equal(extra2_a.reference, extra2_b.reference)
        run_a = model.decode(memory, [main, extra1, extra2_a])
        run_b = model.decode(memory, [main, extra1, extra2_b])
        alone = model.decode(memory, [main])
    return run_a, run_b, alone


@pytest.mark.parametrize("extra", [(), ("model.two_stage=true",)])
def test_no_leakage_between_query_groups(tiny_config, extra):
    model, _ = _model(tiny_config, *extra)
    _randomise_zero_inits(model)
    model.eval()
    run_a, run_b, alone = _decode_twice(model)
    for i in (0, 1):  # main and extra1 are bit-identical
        for key in ("logits", "boxes", "hidden"):
            assert torch.equal(getattr(run_a[i], key), getattr(run_b[i], key)), (run_a[i].name, key)
        assert all(torch.equal(x, y) for x, y in zip(run_a[i].references, run_b[i].references))
    assert not torch.equal(run_a[2].logits, run_b[2].logits)  # extra2 itself did change
    # Inference with the main group alone equals the main slice of the run with extra groups to
    # 1e-5. It is not bit-identical (measured max difference ~1e-6 on CPU): the concatenated query
    # axis changes the matrix shapes, hence the BLAS summation order.
    for key in ("logits", "boxes", "hidden"):
        torch.testing.assert_close(getattr(alone[0], key), getattr(run_a[0], key), atol=1e-5, rtol=1e-5)


def test_isolation_test_detects_a_missing_mask(tiny_config, monkeypatch):
    """The no-leakage check has teeth: with all groups attended to as one, the main group changes."""
    model, _ = _model(tiny_config)
    _randomise_zero_inits(model)
    model.eval()
    monkeypatch.setattr(transformer, "attention_blocks", lambda sizes: [(1, sum(sizes))])  # one group: no isolation
    run_a, run_b, _ = _decode_twice(model)
    assert not torch.equal(run_a[0].logits, run_b[0].logits)


def _brute_force_topk(logits, boxes, size, k):
    h, w = size
    rows = []
    for q in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            rows.append((float(torch.sigmoid(logits[q, c])), q, c))
    rows.sort(key=lambda r: -r[0])
    out = []
    for score, q, c in rows[:k]:
        cx, cy, bw, bh = boxes[q].tolist()
        box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        box = [min(max(v, 0.0), lim) for v, lim in zip(box, (w, h, w, h))]
        out.append((score, c, box))
    return out


@pytest.mark.parametrize("k", [5, 100])
def test_postprocess_topk_against_brute_force(k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 3, generator=gen) * 3
    boxes = torch.rand(2, 7, 4, generator=gen)  # some boxes cross the image border: clipped
    sizes = torch.tensor([[48, 64], [100, 30]])
    dets = postprocess(logits, boxes, sizes, max_detections=k)
    assert len(dets) == 2
    for b in range(2):
        expected = _brute_force_topk(logits[b], boxes[b], sizes[b].tolist(), k)
        assert len(dets[b]["scores"]) == min(k, 7 * 3)
        assert dets[b]["labels"].dtype == torch.int64
        assert dets[b]["scores"].tolist() == pytest.approx([e[0] for e in expected], abs=1e-6)
        assert dets[b]["labels"].tolist() == [e[1] for e in expected]
        torch.testing.assert_close(dets[b]["boxes"], torch.tensor([e[2] for e in expected]), atol=1e-4, rtol=1e-5)
    # boxes inside the image are just scaled xyxy
    inside = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])
    det = postprocess(torch.zeros(1, 1, 1), inside, torch.tensor([[50, 200]]))[0]
    torch.testing.assert_close(det["boxes"], cxcywh_to_xyxy(inside[0]) * torch.tensor([200.0, 50.0, 200.0, 50.0]))
