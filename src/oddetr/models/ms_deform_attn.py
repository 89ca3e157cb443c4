"""Multi-scale deformable attention (Deformable-DETR), pure PyTorch.

The fast path, :func:`multi_scale_deformable_attention`, samples every level with
``F.grid_sample`` and works on CPU and GPU alike (no custom CUDA op to build).
:func:`ms_deform_attn_reference` is a naive explicit loop used as the test oracle.

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
        value = value.to(compute_dtype)
        grids = 2.0 * sampling_locations.to(compute_dtype) - 1.0  # (B, Q, H, L, P, 2)
        # Layout: points before queries, (B*H, ..., P, Q), so that the weighted sum over P runs along
        # contiguous rows of Q values (1.3x faster forward on CPU than (.., Q, P), bit-identical).
        # (B, Q, H, L, P) -> (B*H, L, 1, P, Q)
        weights = attention_weights.to(compute_dtype).permute(0, 2, 3, 4, 1).reshape(
            b * n_heads, n_levels, 1, n_points, q)

        # each level's samples are weighted and summed as they come: no (B*H, Dh, L*P, Q) concatenation
        # (1.5x faster forward + backward on CPU than concatenating the levels first)
        out = None
        for level, (h, w), value_l in zip(
            range(n_levels), shapes, value.split([h * w for h, w in shapes], 1)
        ):
            # (B, h*w, H, Dh) -> (B*H, Dh, h, w)
            value_l = value_l.flatten(2).transpose(1, 2).reshape(b * n_heads, dh, h, w)
            # (B, Q, H, P, 2) -> (B*H, P, Q, 2)
            grid_l = grids[:, :, :, level].permute(0, 2, 3, 1, 4).reshape(b * n_heads, n_points, q, 2)
            # (B*H, Dh, P, Q), weighted sum over P -> (B*H, Dh, Q)
            sampled = bilinear_grid_sample(value_l, grid_l)
            # without a graph, weighted in place: one (B*H, Dh, P, Q) buffer less per level (0.7x time)
            weighted = sampled * weights[:, level] if sampled.requires_grad else sampled.mul_(weights[:, level])
            term = weighted.sum(2)
            out = term if out is None else out + term
        out = out.view(b, n_heads * dh, q).transpose(1, 2).contiguous()
    return out.to(out_dtype)


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
