"""Deformable encoder and decoder; the decoder runs any number of query groups at once.

Groups are concatenated along the query axis. Self-attention runs within each group only (a
query never sees another group's queries; block-diagonal, computed group by group rather than
masked); cross-attention, weights and box refinement are shared. Heads are passed to
:meth:`DeformableDecoder.forward`, never stored on the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oddetr.box_ops import inverse_sigmoid
from oddetr.models.ms_deform_attn import MSDeformAttn, SpatialShapes, shapes_as_list
from oddetr.models.outputs import GroupOutput, Memory, QueryGroup


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity()`` at p = 0: in training mode a zero-rate dropout still
    copies its input (an extra pass over every FFN activation, forward and backward)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class FeedForward(nn.Module):
    """Post-norm FFN block: x + dropout(W2 relu(W1 x)), then LayerNorm. x: (B, N, d)."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        # (a Sequential for its state-dict keys net.0 / net.3; forward below applies it step by step)
        self.net = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.ReLU(), dropout_layer(dropout),
                                 nn.Linear(dim_feedforward, d_model))
        self.dropout = dropout_layer(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear1, _, dropout, linear2 = self.net
        hidden = linear1(x)  # (B, N, F)
        # In place only where no graph is recorded: on a graph, an in-place ReLU of the linear layer's
        # (viewed) output makes autograd copy the whole (B, N, F) activation back through the view
        # (CopySlices), 1.2x slower forward + backward on CPU; without a graph it saves a pass.
        hidden = torch.relu_(hidden) if not hidden.requires_grad else torch.relu(hidden)
        return self.norm(x + self.dropout(linear2(dropout(hidden))))


class EncoderLayer(nn.Module):
    """Multi-scale deformable self-attention over all feature positions, then an FFN."""

    def __init__(self, d_model: int, nheads: int, n_levels: int, n_points: int, dim_feedforward: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, nheads, n_points)
        self.dropout = dropout_layer(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, spatial_shapes: SpatialShapes,
                padding_mask: torch.Tensor) -> torch.Tensor:
        """src, pos: (B, S, d); reference: (B, S, L, 2) -> (B, S, d)."""
        attn = self.self_attn(src + pos, reference, src, spatial_shapes, padding_mask)
        return self.ffn(self.norm(src + self.dropout(attn)))


def encoder_reference_points(spatial_shapes: SpatialShapes, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, normalised by the valid area, seen from every level.

    spatial_shapes: (L, 2) tensor or L pairs (h, w); valid_ratios: (B, L, 2) -> (B, S, L, 2) normalised (x, y).
    """
    points = []
    for lvl, (h, w) in enumerate(shapes_as_list(spatial_shapes)):
        # arange, not linspace: the same values, and sizes may stay symbolic under torch.export
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        y = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        x = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((x, y), -1))
    ref = torch.cat(points, 1)
    return ref[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: SpatialShapes,
                valid_ratios: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """src, pos: (B, S, d) -> (B, S, d)."""
        reference = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference, spatial_shapes, padding_mask)
        return src


class DecoderLayer(nn.Module):
    """Self-attention within groups, deformable cross-attention into the memory, FFN (post-norm)."""

    def __init__(self, d_model: int, nheads: int, n_levels: int, n_points: int, dim_feedforward: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.dropout1 = dropout_layer(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, nheads, n_points)
        self.dropout2 = dropout_layer(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)

    def forward(self, tgt: torch.Tensor, pos: torch.Tensor, reference_chunks: list[torch.Tensor],
                memory: Memory, group_sizes: list[int]) -> torch.Tensor:
        """tgt, pos: (B, Q, d); reference_chunks: consecutive (B, Q_i, L, 2|4) summing to Q;
        group_sizes: queries per group, summing to Q (self-attention stays within a group) -> (B, Q, d)."""
        attn = grouped_self_attention(self.self_attn, tgt + pos, tgt, group_sizes)
        tgt = self.norm1(tgt + self.dropout1(attn))
        query = tgt + pos
        outs, start = [], 0
        for ref in reference_chunks:
            end = start + ref.shape[1]
            outs.append(self.cross_attn(query[:, start:end], ref, memory.memory, memory.spatial_shapes,
                                        memory.padding_mask))
            start = end
        cross = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.ffn(tgt)


def attention_blocks(sizes: list[int]) -> list[tuple[int, int]]:
    """Runs of neighbouring groups of equal size, as (number of groups, queries per group).

    Each run's groups are attended to as one batch of independent sequences, e.g.
    [100, 100, 20, 20, 20] -> [(2, 100), (3, 20)].
    """
    blocks: list[tuple[int, int]] = []
    for n in sizes:
        if blocks and blocks[-1][1] == n:
            blocks[-1] = (blocks[-1][0] + 1, n)
        else:
            blocks.append((1, n))
    return blocks


def grouped_self_attention(attn: nn.MultiheadAttention, qk_input: torch.Tensor, value_input: torch.Tensor,
                           group_sizes: list[int]) -> torch.Tensor:
    """``attn``'s multi-head attention (its weights, dropout and scaling) with every query attending only
    to the queries of its own group: the same function as ``attn(qk_input, qk_input, value_input,
    attn_mask=group_attention_mask(group_sizes))``, without the masked (Q, Q) score matrix.

    Neighbouring groups of equal size are stacked as extra sequences of one batched attention
    (see :func:`attention_blocks`), so the work is sum_g Q_g^2 rather than Q^2: with OD-DETR's PD and
    AUX groups beside the main ones (e.g. 100 + 100 + 3 x 20 queries) that is 3.2x less.

    qk_input: (B, Q, d) queries and keys before projection (content + position);
    value_input: (B, Q, d); group_sizes: summing to Q -> (B, Q, d).
    """
    b, total, d = value_input.shape
    if sum(group_sizes) != total:
        raise ValueError(f"group sizes {group_sizes} do not sum to the {total} queries")
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    qk = F.linear(qk_input, weight[:2 * d], None if bias is None else bias[:2 * d])  # (B, Q, 2d)
    v = F.linear(value_input, weight[2 * d:], None if bias is None else bias[2 * d:])  # (B, Q, d)
    dropout = attn.dropout if attn.training else 0.0
    outs, start = [], 0
    for count, n in attention_blocks(group_sizes):
        end = start + count * n
        # (B, count, n, 2, H, Dh) -> (2, B, count, H, n, Dh): one attention per (image, group, head)
        qk_run = qk[:, start:end].reshape(b, count, n, 2, heads, d // heads).permute(3, 0, 1, 4, 2, 5)
        v_run = v[:, start:end].reshape(b, count, n, heads, d // heads).transpose(2, 3)
        q_run, k_run = (t.reshape(b * count, heads, n, d // heads) for t in qk_run)
        out = F.scaled_dot_product_attention(q_run, k_run, v_run.reshape(b * count, heads, n, d // heads),
                                             dropout_p=dropout)  # (B * count, H, n, Dh)
        outs.append(out.reshape(b, count, heads, n, d // heads).transpose(2, 3).reshape(b, end - start, d))
        start = end
    return attn.out_proj(outs[0] if len(outs) == 1 else torch.cat(outs, 1))


def group_attention_mask(sizes: list[int], device: torch.device) -> torch.Tensor | None:
    """Block-diagonal self-attention mask (what :func:`grouped_self_attention` computes without it).
    sizes: queries per group -> (Q, Q) bool, True = blocked; None for a single group."""
    if len(sizes) <= 1:
        return None
    total = sum(sizes)
    mask = torch.ones(total, total, dtype=torch.bool, device=device)
    start = 0
    for n in sizes:
        mask[start:start + n, start:start + n] = False
        start += n
    return mask


def refine_boxes(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Box prediction from a head's delta and the layer's reference.

    delta: (B, Q, 4); reference: (B, Q, 4) cxcywh or (B, Q, 2) points -> (B, Q, 4) cxcywh in [0, 1].
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    xy = delta[..., :2] + inverse_sigmoid(reference)
    return torch.cat([xy, delta[..., 2:]], -1).sigmoid()


class DeformableDecoder(nn.Module):
    """Runs concatenated query groups through the decoder layers, predicting at every layer."""

    def __init__(self, num_layers: int, box_refine: bool, look_forward_twice: bool = False, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.box_refine = box_refine
        self.look_forward_twice = look_forward_twice

    def forward(self, groups: list[QueryGroup], memory: Memory, class_heads: nn.ModuleList,
                bbox_heads: nn.ModuleList, position_head: nn.Module | None = None) -> list[GroupOutput]:
        """Decode ``groups`` (main first) against ``memory``.

        class_heads / bbox_heads: one per decoder layer (the same module repeated when shared).
        position_head: maps a (B, G, 2|4) reference to (B, G, d) positional queries, for groups
        whose ``position`` is None (recomputed every layer from the refined reference).

        With box refinement, layer l's reference is layer l-1's box, detached. With
        ``look_forward_twice`` (DINO), layer l's *predicted* box is refined from layer l-1's box
        before detaching, so layer l's box loss also trains layer l-1's box head.

        Neighbouring groups of the same kind (reference dimension, positional query given or not)
        are processed together, so many small groups (denoising) cost little.
        """
        sizes = [g.size for g in groups]
        tgt = torch.cat([g.content for g in groups], 1)
        for g in groups:
            if g.position is None and position_head is None:
                raise ValueError(f"query group '{g.name}' has no positional query and the model has no position head")
        refs = [g.reference for g in groups]  # per group, (B, G, 2|4)
        undetached = list(refs)  # look-forward-twice: previous layer's refined boxes, with gradient
        ratios = memory.valid_ratios
        all_logits, all_boxes, all_hidden = [], [], []
        all_refs: list[list[torch.Tensor]] = [[r] for r in refs]
        for lvl, layer in enumerate(self.layers):
            runs = _runs(groups, refs)
            run_refs = [_cat(refs[a:b]) for a, b in runs]
            pos = _cat([self._position(groups[a:b], r, position_head) for (a, b), r in zip(runs, run_refs)])
            chunks = _merge_chunks([_scale_reference(r, ratios) for r in run_refs])
            tgt = layer(tgt, pos, chunks, memory, sizes)
            all_logits.append(class_heads[lvl](tgt))
            delta = bbox_heads[lvl](tgt)
            lft = self.look_forward_twice and self.box_refine and lvl > 0
            boxes, start = [], 0
            for (a, b), ref in zip(runs, run_refs):
                end = start + ref.shape[1]
                refined = refine_boxes(delta[:, start:end], ref)
                boxes.append(refine_boxes(delta[:, start:end], _cat(undetached[a:b])) if lft else refined)
                if self.box_refine:
                    parts = refined.split(sizes[a:b], 1)
                    undetached[a:b] = parts
                    refs[a:b] = [p.detach() for p in parts]
                start = end
            for gi in range(len(groups)):
                all_refs[gi].append(refs[gi])
            all_boxes.append(_cat(boxes))
            all_hidden.append(tgt)
        logits = torch.stack(all_logits)
        boxes = torch.stack(all_boxes)
        hidden = torch.stack(all_hidden)
        outputs = []
        for g, (s, e), store in zip(groups, _spans(sizes), all_refs):
            outputs.append(GroupOutput(g.name, logits[:, :, s:e], boxes[:, :, s:e], hidden[:, :, s:e], store))
        return outputs

    @staticmethod
    def _position(groups: list[QueryGroup], reference: torch.Tensor, position_head: nn.Module | None) -> torch.Tensor:
        """Positional queries of neighbouring groups that all give one or all derive them from ``reference``."""
        if groups[0].position is not None:
            return _cat([g.position for g in groups])
        return position_head(reference)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 1)


def _runs(groups: list[QueryGroup], refs: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Maximal ranges [a, b) of neighbouring groups with the same reference dimension whose
    positional queries are all given or all derived."""
    runs: list[tuple[int, int]] = []
    key = None
    for i, (g, r) in enumerate(zip(groups, refs)):
        k = (r.shape[-1], g.position is None)
        if k == key:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
            key = k
    return runs


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for n in sizes:
        spans.append((start, start + n))
        start += n
    return spans


def _scale_reference(reference: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
    """(B, G, 2|4) normalised to the valid image -> (B, G, L, 2|4) normalised to each padded level."""
    if reference.shape[-1] == 4:
        ratios = torch.cat([valid_ratios, valid_ratios], -1)
    else:
        ratios = valid_ratios
    return reference[:, :, None] * ratios[:, None]


def _merge_chunks(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate neighbouring reference chunks that have the same last dimension."""
    merged = [chunks[0]]
    for chunk in chunks[1:]:
        if chunk.shape[-1] == merged[-1].shape[-1]:
            merged[-1] = torch.cat([merged[-1], chunk], 1)
        else:
            merged.append(chunk)
    return merged
