"""cast_floating: every floating tensor of a nested output cast, everything else untouched."""

from __future__ import annotations

import torch

from oddetr.models.outputs import DetectorOutput, GroupOutput, QueryGroup, cast_floating


def test_cast_floating_reaches_nested_tensors_and_leaves_integers_alone():
    g = torch.Generator().manual_seed(0)
    main = GroupOutput("main", torch.randn(2, 1, 3, 4, generator=g).bfloat16(), torch.rand(2, 1, 3, 4).bfloat16(),
                       torch.randn(2, 1, 3, 8).bfloat16(), [torch.rand(1, 3, 4).bfloat16() for _ in range(3)])
    initial = QueryGroup(torch.randn(1, 3, 8).bfloat16(), None, torch.rand(1, 3, 4).bfloat16())
    out = DetectorOutput(main, initial, query_positions=torch.tensor([[5, 1, 7]]))
    cast = cast_floating(out, torch.float32)
    tensors = [cast.main.logits, cast.main.boxes, cast.main.hidden, *cast.main.references, cast.initial.content,
               cast.initial.reference]
    originals = [out.main.logits, out.main.boxes, out.main.hidden, *out.main.references, out.initial.content,
                 out.initial.reference]
    for new, old in zip(tensors, originals):
        assert new.dtype == torch.float32 and torch.equal(new, old.float())
    assert cast.initial.position is None and cast.main.name == "main"
    assert cast.query_positions.dtype == torch.int64 and torch.equal(cast.query_positions, out.query_positions)
    assert out.main.logits.dtype == torch.bfloat16  # the input is not modified
