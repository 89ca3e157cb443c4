"""Multi-scale deformable attention: fast grid_sample path vs the naive oracle, and the module."""

import pytest
import torch

from oddetr.models.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_reference,
    multi_scale_deformable_attention,
)

SHAPES = torch.tensor([[5, 7], [3, 4]], dtype=torch.int64)


def _random_case(dtype=torch.float64, b=2, q=3, heads=2, dh=4, points=2, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    levels = shapes.shape[0]
    value = torch.randn(b, s, heads, dh, generator=g, dtype=dtype)
    loc = torch.rand(b, q, heads, levels, points, 2, generator=g, dtype=dtype) * 1.2 - 0.1  # [-0.1, 1.1]
    weights = torch.rand(b, q, heads, levels, points, generator=g, dtype=dtype)
    return value, loc, weights


def _assert_matches_reference(attention, shapes=SHAPES):
    """``attention(value, shapes, locations, weights)`` on a random float64 case gives the naive oracle's
    output (1e-10) and gradients w.r.t. all three inputs (rtol 1e-8); returns its output."""
    value, loc, weights = _random_case()
    inputs = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    inputs_ref = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    out = attention(inputs[0], shapes, inputs[1], inputs[2])
    out_ref = ms_deform_attn_reference(inputs_ref[0], SHAPES, inputs_ref[1], inputs_ref[2])
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-10)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    grads_ref = torch.autograd.grad(out_ref, inputs_ref, grad_out)
    for name, g, gr in zip(("value", "sampling_locations", "attention_weights"), grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-10, msg=f"gradient w.r.t. {name}")
    return out


def test_fast_path_matches_reference_values_and_grads():
    out = _assert_matches_reference(multi_scale_deformable_attention)
    assert out.shape == (2, 3, 2 * 4)
    assert out.dtype == torch.float64


def test_pixel_centre_convention_and_zero_padding():
    # one level 2x3, one head, one channel: sampling at pixel centres returns the pixel values
    shapes = [(2, 3)]
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)
    centres = [((j + 0.5) / 3, (i + 0.5) / 2) for i in range(2) for j in range(3)]
    loc = torch.tensor(centres, dtype=torch.float64).view(1, 6, 1, 1, 1, 2)
    w = torch.ones(1, 6, 1, 1, 1, dtype=torch.float64)
    out = multi_scale_deformable_attention(value, shapes, loc, w)
    torch.testing.assert_close(out.flatten(), value.flatten())
    # far outside the map reads zero; on the top border (y=0) half of the edge pixel (zero padding);
    # halfway between two pixel centres the mean of the two
    loc = torch.tensor([[5.0, 5.0], [1.5 / 3, 0.0], [1.0 / 3, 0.75]], dtype=torch.float64)
    out = multi_scale_deformable_attention(value, shapes, loc.view(1, 3, 1, 1, 1, 2), w[:, :3])
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.5, 3.5], dtype=torch.float64))


def test_gradcheck_fast_path():
    shapes = torch.tensor([[3, 2], [2, 2]])
    value, loc, weights = _random_case(b=1, q=2, heads=1, dh=2, points=1, shapes=shapes, seed=1)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, weights))
    assert torch.autograd.gradcheck(
        lambda v, lo, w: multi_scale_deformable_attention(v, shapes, lo, w), inputs, eps=1e-6, atol=1e-5
    )


def test_cpu_fused_paths_equal_the_plain_ops(monkeypatch):
    # on CPU the core runs as a fused autograd Function (training) or an in-place loop (no graph); the
    # plain ops that compile, export and GPUs use must give the same values and gradients
    value, loc, weights = _random_case(points=3)

    def run(**flags):
        inputs = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
        out = multi_scale_deformable_attention(inputs[0], SHAPES, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        with torch.no_grad():
            no_graph = multi_scale_deformable_attention(value, SHAPES, loc, weights)
        return out.detach(), grads, no_graph

    fused = run()
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)  # selects the plain ops
    plain = run()
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(fused[2], plain[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(fused[0], fused[2], rtol=0, atol=0)  # with and without a graph: identical
    for g, gp in zip(fused[1], plain[1]):
        torch.testing.assert_close(g, gp, rtol=1e-10, atol=1e-12)

def test_float32_and_low_precision_inputs():
    value, loc, weights = _random_case()
    ref = multi_scale_deformable_attention(value, SHAPES, loc, weights)
    out32 = multi_scale_deformable_attention(value.float(), SHAPES, loc.float(), weights.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    out_bf16 = multi_scale_deformable_attention(value.bfloat16(), SHAPES, loc.float(), weights.float())
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.double(), ref, rtol=2e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = multi_scale_deformable_attention(value.float(), SHAPES, loc.float(), weights.float())
    assert out_ac.dtype == torch.float32
    torch.testing.assert_close(out_ac, out32)


def test_shape_mismatch_raises():
    value, loc, weights = _random_case()
    with pytest.raises(ValueError, match="spatial_shapes"):
        multi_scale_deformable_attention(value[:, :-1], SHAPES, loc, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        multi_scale_deformable_attention(value, SHAPES, loc, weights[..., :1])


def _module_inputs(d=32, levels=2, b=2, q=5, shapes=((6, 8), (3, 4)), seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes_t = torch.tensor(shapes, dtype=torch.int64)
    s = int((shapes_t[:, 0] * shapes_t[:, 1]).sum())
    query = torch.randn(b, q, d, generator=g)
    value = torch.randn(b, s, d, generator=g)
    return query, value, shapes_t


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_shapes_and_gradients(ref_dim):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    query, value, shapes = _module_inputs()
    ref = torch.rand(2, 5, 2, ref_dim)
    out = attn(query, ref, value, shapes)
    assert out.shape == (2, 5, 32)
    out.sum().backward()
    # every parameter gets a gradient (sampling offsets / attention weights start at zero weight)
    for name, p in attn.named_parameters():
        assert p.grad is not None, name


def test_module_padding_mask_ignores_padded_values():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    with torch.no_grad():  # non-trivial offsets and weights so the padded area is actually sampled
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    query, value, shapes = _module_inputs()
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    # level 0 is 6x8: pad the right half of image 0; level 1 (3x4) right half too
    pad0 = torch.zeros(6, 8, dtype=torch.bool)
    pad0[:, 4:] = True
    pad1 = torch.zeros(3, 4, dtype=torch.bool)
    pad1[:, 2:] = True
    mask[0] = torch.cat([pad0.flatten(), pad1.flatten()])
    ref = torch.rand(2, 5, 2, 2)
    out = attn(query, ref, value, shapes, mask)
    changed = value.clone()
    changed[mask] = torch.randn(int(mask.sum()), 32) * 100
    out2 = attn(query, ref, changed, shapes, mask)
    torch.testing.assert_close(out, out2)
    # without the mask the change is visible, so the test is not vacuous
    assert not torch.allclose(attn(query, ref, value, shapes), attn(query, ref, changed, shapes))


def test_module_initialisation():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    assert torch.all(attn.sampling_offsets.weight == 0)
    assert torch.all(attn.attention_weights.weight == 0) and torch.all(attn.attention_weights.bias == 0)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 along +y; point k is scaled by k + 1, same on every level
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 1, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[:, 0], bias[:, 1])
    assert torch.all(attn.value_proj.bias == 0) and torch.all(attn.output_proj.bias == 0)
    with pytest.raises(AssertionError):
        MSDeformAttn(d_model=30, n_heads=4)


def test_module_matches_manual_sampling_locations():
    # with 2-d references the module samples at ref + offset / (w_l, h_l)
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).double()
    query, value, shapes = _module_inputs(d=8, q=2)
    query, value = query.double(), value.double()
    ref = torch.rand(2, 2, 2, 2, dtype=torch.float64)
    out = attn(query, ref, value, shapes)
    offsets = attn.sampling_offsets(query).view(2, 2, 2, 2, 2, 2)
    norm = torch.tensor([[8.0, 6.0], [4.0, 3.0]], dtype=torch.float64)
    loc = ref[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
    weights = attn.attention_weights(query).view(2, 2, 2, 4).softmax(-1).view(2, 2, 2, 2, 2)
    v = attn.value_proj(value).view(2, -1, 2, 4)
    expected = attn.output_proj(ms_deform_attn_reference(v, shapes, loc, weights))
    torch.testing.assert_close(out, expected)


def test_compiled_path_uses_the_opaque_op_with_reference_values_and_grads():
    # under torch.compile the sampling is one opaque op (oddetr::bilinear_grid_sample) whose backward
    # calls ATen's grid_sample backward; it must give the naive oracle's values and gradients
    from torch._dynamo.testing import CompileCounterWithBackend

    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(multi_scale_deformable_attention, backend=backend, fullgraph=True)
    # the detector passes the level shapes as (h, w) pairs, not a tensor (no data-dependent sizes)
    _assert_matches_reference(compiled, SHAPES.tolist())
    assert backend.frame_count == 1
    graph_ops = {str(node.target) for graph in backend.graphs for node in graph.graph.nodes}
    assert "oddetr.bilinear_grid_sample.default" in graph_ops
    assert not any("grid_sampler" in op for op in graph_ops)


def test_opaque_grid_sample_op_registration():
    from oddetr.models.ms_deform_attn import _opaque_grid_sample

    g = torch.Generator().manual_seed(1)
    value = torch.randn(2, 3, 5, 6, generator=g, requires_grad=True)
    grid = (torch.rand(2, 4, 3, 2, generator=g) * 2.4 - 1.2).requires_grad_(True)
    torch.library.opcheck(_opaque_grid_sample, (value, grid))
