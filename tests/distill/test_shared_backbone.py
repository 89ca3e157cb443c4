"""The backbone's frozen first blocks run once per OD-DETR step and feed the teacher and the student.

Oracle: the same step with the sharing switched off (each model runs its whole backbone), which
must give bit-identical losses, gradients and teacher outputs.
"""

from __future__ import annotations

import pytest
import torch
from distill_testutils import fixed_targets, images_and_masks, tiny_setup

from oddetr.engine import step as step_module
from oddetr.engine.step import compute_losses
from oddetr.models.backbone import Backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("trainable,norm,expected", [
    (0, "frozen_bn", 8),  # conv1 bn1 relu maxpool layer1..layer4: everything
    (3, "frozen_bn", 5),  # stem and layer1
    (5, "frozen_bn", 0),
    # conv1 only: BatchNorm's batch statistics differ between train (student) and eval (teacher)
    (0, "bn", 1),
])
def test_frozen_blocks_are_those_without_trainable_parameters_or_batch_statistics(trainable, norm, expected):
    backbone = Backbone("resnet18", (8, 16, 32), trainable_layers=trainable, norm=norm)
    assert backbone.frozen_blocks() == expected
    images = images_and_masks(2, 64)[0]
    prefix = backbone.frozen_prefix(images)
    assert (prefix is None) == (expected == 0)
    if prefix is not None:
        assert prefix.blocks == expected
        full = backbone(images)
        for a, b in zip(backbone(images, prefix), full, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("trainable", [0, 3])
def test_shared_prefix_step_equals_unshared_step(trainable, monkeypatch):
    overrides = (f"model.backbone.trainable_layers={trainable}", "model.backbone.norm=frozen_bn")
    images, masks = images_and_masks(2, 64)
    results = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(step_module, "shared_backbone_prefix", lambda model, images: None)
        _, model, criterion, distiller = tiny_setup(*overrides)
        model.train()
        assert (step_module.shared_backbone_prefix(model, images) is not None) == share
        losses, total = compute_losses(model, criterion, distiller, images, masks, fixed_targets(), 4.0)
        total.backward()
        teacher = distiller.teacher.model(images, masks)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((losses, total.detach(), grads, teacher.main.logits))
    (l1, t1, g1, o1), (l2, t2, g2, o2) = results
    assert l1.keys() == l2.keys() and all(torch.equal(l1[k], l2[k]) for k in l1)
    assert torch.equal(t1, t2) and torch.equal(o1, o2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
