"""Multi-scale deformable attention (Deformable-DETR), pure PyTorch.

The fast path, :func:`multi_scale_deformable_attention`, samples every level with
``F.grid_sample`` and works on CPU and GPU alike (no custom CUDA op to build).
:func:`ms_deform_attn_reference` is a naive explicit loop used as the test oracle.
On a CPU in eager mode the fast path runs as :class:`_SampleAndWeigh`, an autograd Function with a
hand-written backward that allocates fewer large buffers; GPUs, ``torch.compile`` and export run the
same computation as plain ops (:func:`_sample_and_weigh_traceable`).

Conventions shared by both functions:

- ``value``: (B, S, H, Dh), the levels flattened one after the other, each row-major,
  so ``S = sum(h_l * w_l)``.
- ``spatial_shapes``: (L, 2) int64 ``(h_l, w_l)`` (a tensor or a sequence of pairs).
- ``sampling_locations``: (B, Q, H, L, P, 2) normalised ``(x, y)``; pixel ``(i, j)`` of a
  level has its centre at ``((j + 0.5) / w, (i + 0.5) / h)`` (``align_corners=False``),
  and locations outside the map read zeros (bilinear with zero padding).
- ``attention_weights``: (B, Q, H, L, P).
- output: (B, Q, H * Dh), heads concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "ms_deform_attn_reference", "multi_scale_deformable_attention"]

SpatialShapes = Tensor | Sequence[Sequence[int]]


# Under ``torch.compile`` Inductor would decompose ``grid_sample`` into gathers, which on CPU ran the
# whole model 1.37x slower than eager; kept as one opaque op that calls ATen's kernels, the compiled
# model ran at 0.67x of eager (docs/RESULTS.md, "torch.compile"). Eager code and export use F.grid_sample.
@torch.library.custom_op("oddetr::bilinear_grid_sample", mutates_args=())
def _opaque_grid_sample(value: Tensor, grid: Tensor) -> Tensor:
    """``F.grid_sample(value, grid)``, bilinear, zero padding, ``align_corners=False``.
    value (N, C, h, w), grid (N, P, Q, 2) in [-1, 1] -> (N, C, P, Q)."""
    return F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@_opaque_grid_sample.register_fake
def _(value: Tensor, grid: Tensor) -> Tensor:
    return value.new_empty(value.shape[0], value.shape[1], grid.shape[1], grid.shape[2])


def _save_grid_sample_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grid_sample_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    value, grid = ctx.saved_tensors
    # interpolation 0 = bilinear, padding 0 = zeros, align_corners False (as in the forward)
    grad_value, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
        grad.contiguous(), value, grid, 0, 0, False, [ctx.needs_input_grad[0], True])
    return grad_value, grad_grid


_opaque_grid_sample.register_autograd(_grid_sample_backward, setup_context=_save_grid_sample_inputs)


def bilinear_grid_sample(value: Tensor, grid: Tensor) -> Tensor:
    """Bilinear ``grid_sample`` (zero padding, ``align_corners=False``): value (N, C, h, w), grid
    (N, P, Q, 2) in [-1, 1] -> (N, C, P, Q). An opaque op while ``torch.compile`` traces (not exports)."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _opaque_grid_sample(value, grid)
    return F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def shapes_as_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """(L, 2) tensor or sequence of ``(h, w)`` -> list of int pairs (one host sync for a GPU tensor).

    Pairs given as Python ints stay as they are (symbolic sizes under ``torch.export`` included).
    """
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def _check_shapes(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, H, Dh), got shape {tuple(value.shape)}")
    total = sum(h * w for h, w in shapes)
    if value.shape[1] != total:
        raise ValueError(f"value has S={value.shape[1]} positions but spatial_shapes sum to {total}")
    b, s, n_heads, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (B, Q, H, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    bq, q, h, n_levels, n_points, _ = sampling_locations.shape
    if bq != b or h != n_heads or n_levels != len(shapes):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} and {len(shapes)} levels"
        )
    if tuple(attention_weights.shape) != (b, q, n_heads, n_levels, n_points):
        raise ValueError(
            f"attention_weights must be {(b, q, n_heads, n_levels, n_points)}, "
            f"got {tuple(attention_weights.shape)}"
        )


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core, ``grid_sample`` implementation.

    Args:
        value: (B, S, H, Dh), levels flattened level by level, row-major within a level.
        spatial_shapes: (L, 2) int64 ``(h_l, w_l)`` per level (tensor or sequence of pairs).
        sampling_locations: (B, Q, H, L, P, 2) normalised ``(x, y)``; ``(0, 0)`` is the top-left
            corner of the map and pixel ``(i, j)``'s centre is ``((j + 0.5) / w, (i + 0.5) / h)``.
            Locations outside ``[0, 1]`` are allowed and read zeros beyond the border.
        attention_weights: (B, Q, H, L, P), typically softmax-normalised over ``L * P``.

    Returns:
        (B, Q, H * Dh) in ``value``'s dtype.

    Precision: half / bfloat16 inputs (e.g. under autocast) are computed in float32 with
    autocast disabled and the result is cast back to ``value.dtype``; float64 stays float64.
    """
    shapes = shapes_as_list(spatial_shapes)
    _check_shapes(value, shapes, sampling_locations, attention_weights)
    out_dtype = value.dtype
    compute_dtype = (
        torch.float64
        if torch.float64 in (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        else torch.float32
    )
    b, _, n_heads, dh = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape

    with torch.autocast(device_type=value.device.type, enabled=False):
        n = b * n_heads
        # Layout: points before queries, (B*H, ..., P, Q), so that the weighted sum over P runs along
        # contiguous rows of Q values (1.3x faster forward on CPU than (.., Q, P)).
        # (B, S, H, Dh) -> (B*H, Dh, S)
        value_t = value.to(compute_dtype).permute(0, 2, 3, 1).reshape(n, dh, -1)
        # (B, Q, H, L, P, 2) in [0, 1] -> (B*H, L, P, Q, 2) in [-1, 1]
        grids = (2.0 * sampling_locations.to(compute_dtype) - 1.0).permute(0, 2, 3, 4, 1, 5).reshape(
            n, n_levels, n_points, q, 2)
        # (B, Q, H, L, P) -> (B*H, L, P, Q)
        weights = attention_weights.to(compute_dtype).permute(0, 2, 3, 4, 1).reshape(n, n_levels, n_points, q)
        # the fused paths avoid fresh CPU buffers; on a GPU (a caching allocator, launch-bound at these
        # sizes) their per-point loops would only add kernels, so it keeps the plain ops
        if (value_t.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export()):
            out = _sample_and_weigh_traceable(value_t, grids, weights, shapes)
        elif torch.is_grad_enabled() and any(t.requires_grad for t in (value_t, grids, weights)):
            out = _SampleAndWeigh.apply(value_t, grids, weights, tuple(shapes))
        else:
            out = _sample_and_weigh(value_t, grids, weights, shapes)[0]
        out = out.view(b, n_heads * dh, q).transpose(1, 2).contiguous()
    return out.to(out_dtype)


def _level_values(value_t: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """(N, Dh, S) -> one (N, Dh, h_l, w_l) map per level."""
    n, dh, _ = value_t.shape
    return [v.reshape(n, dh, h, w) for v, (h, w) in zip(value_t.split([h * w for h, w in shapes], 2), shapes)]


def _sample_and_weigh(value_t: Tensor, grids: Tensor, weights: Tensor, shapes: list[tuple[int, int]]
                      ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The core without a graph: value_t (N, Dh, S), grids (N, L, P, Q, 2) in [-1, 1], weights (N, L, P, Q)
    -> out (N, Dh, Q), and each level's map (N, Dh, h, w) and samples (N, Dh, P, Q) for a backward pass.

    Each point's samples are added into ``out`` in place (no weighted (N, Dh, P, Q) temporary)."""
    n, dh, _ = value_t.shape
    out = value_t.new_zeros(n, dh, grids.shape[3])
    maps = _level_values(value_t, shapes)
    samples = []
    for level, value_l in enumerate(maps):
        sampled = F.grid_sample(value_l, grids[:, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (N, Dh, P, Q)
        for point in range(grids.shape[2]):
            out.addcmul_(sampled[:, :, point], weights[:, level, point].unsqueeze(1))
        samples.append(sampled)
    return out, maps, samples


class _SampleAndWeigh(torch.autograd.Function):
    """:func:`_sample_and_weigh` with a hand-written backward (eager training).

    Autograd's graph of the same ops keeps the weighted product, and its backward allocates the
    product's two gradients and a zero-filled copy of the grids per level: at R50 sizes these
    (N, Dh, P, Q) buffers (45 MB each) are fresh pages every time and cost about a third of a CPU
    training step. This backward allocates one such buffer per level (the samples' gradient, which
    ``grid_sample``'s backward needs) and reduces the weights' gradient point by point.
    """

    @staticmethod
    def forward(ctx, value_t: Tensor, grids: Tensor, weights: Tensor, shapes: tuple[tuple[int, int], ...]) -> Tensor:
        out, maps, samples = _sample_and_weigh(value_t, grids, weights, list(shapes))
        ctx.shapes = shapes
        ctx.save_for_backward(grids, weights, *maps, *samples)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor, Tensor, None]:
        grids, weights, *saved = ctx.saved_tensors
        n_levels = len(ctx.shapes)
        maps, samples = saved[:n_levels], saved[n_levels:]
        need_value = ctx.needs_input_grad[0]
        grad_out = grad_out.unsqueeze(2)  # (N, Dh, 1, Q)
        grad_maps, grad_grids, grad_weights = [], torch.empty_like(grids), torch.empty_like(weights)
        for level, (value_l, sampled) in enumerate(zip(maps, samples)):
            for point in range(grids.shape[2]):  # (N, Dh, Q) . (N, Dh, Q) summed over Dh -> (N, Q)
                grad_weights[:, level, point] = (sampled[:, :, point] * grad_out[:, :, 0]).sum(1)
            grad_sampled = grad_out * weights[:, level].unsqueeze(1)  # (N, Dh, P, Q)
            # interpolation 0 = bilinear, padding 0 = zeros, align_corners False (as in the forward)
            grad_value_l, grad_grids[:, level] = torch.ops.aten.grid_sampler_2d_backward(
                grad_sampled, value_l, grids[:, level], 0, 0, False, [need_value, True])
            if need_value:
                grad_maps.append(grad_value_l.flatten(2))
        grad_value = torch.cat(grad_maps, 2) if need_value else None
        return grad_value, grad_grids, grad_weights, None


def _sample_and_weigh_traceable(value_t: Tensor, grids: Tensor, weights: Tensor,
                                shapes: list[tuple[int, int]]) -> Tensor:
    """:func:`_sample_and_weigh`'s output with plain differentiable ops, for ``torch.compile`` (each
    level's sampling one opaque op) and export (ONNX has no in-place multiply-add)."""
    out = None
    for level, value_l in enumerate(_level_values(value_t, shapes)):
        sampled = bilinear_grid_sample(value_l, grids[:, level])  # (N, Dh, P, Q)
        term = (sampled * weights[:, level].unsqueeze(1)).sum(2)
        out = term if out is None else out + term
    return out


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Naive oracle for :func:`multi_scale_deformable_attention` (same signature and shapes).

    Loops in Python over batch, query, head, level and point and interpolates each sample
    by hand from its 4 neighbouring pixel centres (zero outside the map). Differentiable
    w.r.t. all three float inputs. Very slow: for tests on tiny inputs only.
    """
    shapes = shapes_as_list(spatial_shapes)
    _check_shapes(value, shapes, sampling_locations, attention_weights)
    b, _, n_heads, dh = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)

    rows = []
    for bi in range(b):
        per_query = []
        for qi in range(q):
            per_head = []
            for hi in range(n_heads):
                acc = value.new_zeros(dh)
                for li, (h, w) in enumerate(shapes):
                    for pi in range(n_points):
                        x = sampling_locations[bi, qi, hi, li, pi, 0] * w - 0.5  # pixel coords
                        y = sampling_locations[bi, qi, hi, li, pi, 1] * h - 0.5
                        x0 = math.floor(x.item())
                        y0 = math.floor(y.item())
                        fx = x - x0  # differentiable fractional parts
                        fy = y - y0
                        sample = value.new_zeros(dh)
                        for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                            for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    sample = sample + wy * wx * value[bi, starts[li] + yy * w + xx, hi]
                        acc = acc + attention_weights[bi, qi, hi, li, pi] * sample
                per_head.append(acc)
            per_query.append(torch.cat(per_head))
        rows.append(torch.stack(per_query))
    return torch.stack(rows)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable-DETR).

    Each query predicts, per head, level and point, a sampling offset and an attention
    weight (softmax over ``n_levels * n_points`` per head) and reads the projected value
    maps at the resulting locations.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        assert d_model % n_heads == 0, f"d_model ({d_model}) must be divisible by n_heads ({n_heads})"
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR's initialisation.

        Offsets start on a per-head direction grid (head ``k`` points at angle ``2*pi*k/H``,
        scaled so the larger coordinate is 1, times ``point index + 1``) with zero weights;
        attention logits start at zero (uniform weights); value/output projections are
        xavier-uniform with zero bias.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: SpatialShapes,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from queries to the multi-scale value maps.

        Args:
            query: (B, Q, D) query features (content + positional).
            reference_points: (B, Q, L, 2) normalised ``(x, y)``, offsets scaled by ``1 / (w_l, h_l)``;
                or (B, Q, L, 4) normalised ``(cx, cy, w, h)``, offsets scaled by ``box_wh / (2 * n_points)``.
            value_input: (B, S, D) flattened multi-scale features, ``S = sum(h_l * w_l)``.
            spatial_shapes: (L, 2) int64 ``(h_l, w_l)``.
            value_padding_mask: (B, S) bool, True at padded positions (zeroed in the value), or None.

        Returns:
            (B, Q, D).
        """
        b, q, _ = query.shape
        s = value_input.shape[1]
        shapes = shapes_as_list(spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels in spatial_shapes, got {len(shapes)}")
        if reference_points.shape[:3] != (b, q, self.n_levels):
            raise ValueError(
                f"reference_points must be (B, Q, L, 2|4) = ({b}, {q}, {self.n_levels}, 2|4), "
                f"got {tuple(reference_points.shape)}"
            )

        value = self.value_proj(value_input)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(b, s, self.n_heads, self.d_model // self.n_heads)

        n_heads, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        # (B, Q, H, L*P*2): per head, each level's points' (x, y) offsets
        offsets = self.sampling_offsets(query).view(b, q, n_heads, n_levels * n_points * 2)
        weights = self.attention_weights(query).view(b, q, n_heads, n_levels * n_points)
        weights = weights.softmax(-1).view(b, q, n_heads, n_levels, n_points)

        # The locations are formed in this flat layout, the reference repeated over points once and
        # broadcast over heads only: broadcasting (B, Q, 1, L, 1, 2) against (B, Q, H, L, P, 2) runs an
        # inner loop of 2 elements and cost 10x more on CPU (same values).
        def per_point(ref: Tensor) -> Tensor:  # (B, Q, L, 2) -> (B, Q, 1, L*P*2)
            return ref[:, :, :, None, :].expand(b, q, n_levels, n_points, 2).reshape(b, q, 1, -1)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (w_l, h_l)
            # made on the host and sent without waiting for the device (a GPU sync per layer otherwise)
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype).to(
                offsets.device, non_blocking=True)
            normalizer = normalizer[None, :, None, :].expand(n_heads, n_levels, n_points, 2).reshape(n_heads, -1)
            locations = per_point(reference_points) + offsets / normalizer
        elif reference_points.shape[-1] == 4:
            locations = per_point(reference_points[..., :2]) + offsets / n_points * per_point(
                reference_points[..., 2:]) * 0.5
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
        locations = locations.view(b, q, n_heads, n_levels, n_points, 2)

        out = multi_scale_deformable_attention(value, shapes, locations, weights)
        return self.output_proj(out)
