"""``loss.extra_groups``: the "extra group, no teacher" control (detached copies of the main queries)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distill"))
from distill_testutils import fixed_targets, images_and_masks, one_thread, tiny_config, tiny_model  # noqa: E402

from oddetr.engine.step import compute_losses  # noqa: E402
from oddetr.losses.criterion import SetCriterion  # noqa: E402


@pytest.mark.parametrize("preset", ["deformable-detr-tiny", "dino-tiny"])
def test_copy_group_sees_the_main_queries_and_trains_only_the_decoder(preset):
    with one_thread():
        cfg = tiny_config(f"model={preset}", "distill.enabled=false", "loss.extra_groups=1", "model.dn_queries=0")
        model = tiny_model(cfg)
        model.train()
        criterion = SetCriterion(cfg.loss)
        images, masks = images_and_masks()
        losses, total = compute_losses(model, criterion, None, images, masks, fixed_targets(), 4.0)
        copy_keys = sorted(k for k in losses if k.startswith("copy0/"))
        assert copy_keys == sorted(k.replace("main/", "copy0/") for k in losses if k.startswith("main/"))
        # the same queries through the same decoder, matched by their own Hungarian step: the same losses
        for key in copy_keys:
            torch.testing.assert_close(losses[key], losses[key.replace("copy0/", "main/")], rtol=1e-5, atol=1e-6)
        # the copies are detached: they train the decoder and heads, never the queries that made them
        query_params = [p for n, p in model.named_parameters() if n.startswith(("query_embed", "content_embed"))]
        decoder_params = list(model.decoder.parameters())
        copy_total = sum(losses[k] for k in copy_keys)
        grads = torch.autograd.grad(copy_total, query_params + decoder_params, allow_unused=True)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[: len(query_params)])
        assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads[len(query_params):])
        assert torch.isfinite(total)
