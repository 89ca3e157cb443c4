"""DN-DETR's matching instability (METHOD.md, "Training stability metric").

At the end of every epoch the final decoder layer's main-group predictions on a fixed
probe set are Hungarian-matched to the GT, and :func:`assignment_map` records which query
each GT box got. ``IS(e)`` = :func:`instability` of the maps of epochs ``e-1`` and ``e``:
the fraction of GT boxes whose query changed. :func:`select_probe_indices` picks the probe
set once, by seed.

A two-stage model's main queries are its top-K encoder proposals in score order, so a query's
index says little about which proposal it is (a small change of scores reorders them); its
identity is its encoder position. :func:`positions_of_queries` turns the matcher's query indices
into those positions before :func:`assignment_map` records them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import box_iou

from oddetr.box_ops import cxcywh_to_xyxy
from oddetr.errors import ConfigError

__all__ = ["assignment_map", "instability", "positions_of_queries", "rival_queries", "select_probe_indices",
           "split_instability"]

AssignmentMap = dict[tuple[int, int], int]


def assignment_map(
    image_ids: Sequence[int], indices: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> AssignmentMap:
    """Which query each GT box was matched to.

    Args:
        image_ids: one id per image of the batch (dataset index or COCO image id; it only
            has to be stable across epochs).
        indices: per image, the Hungarian matcher's ``(query_idx, gt_idx)`` LongTensors,
            both ``(K_i,)``, pairing query ``query_idx[k]`` with GT ``gt_idx[k]`` (GT index
            in that image's target order).

    Returns:
        ``{(image_id, gt_index): query_index}``; merge batches with ``dict.update``.

    Raises:
        ValueError: lengths disagree, or a GT index appears twice in one image.
    """
    if len(image_ids) != len(indices):
        raise ValueError(f"assignment_map: {len(image_ids)} image ids but {len(indices)} index pairs")
    out: AssignmentMap = {}
    for image_id, (query_idx, gt_idx) in zip(image_ids, indices):
        queries = torch.as_tensor(query_idx).reshape(-1).tolist()
        gts = torch.as_tensor(gt_idx).reshape(-1).tolist()
        if len(queries) != len(gts):
            raise ValueError(f"image {image_id}: {len(queries)} query indices but {len(gts)} GT indices")
        for q, g in zip(queries, gts):
            key = (int(image_id), int(g))
            if key in out:
                raise ValueError(f"image {image_id}: GT {g} is matched twice")
            out[key] = int(q)
    return out


def positions_of_queries(
    indices: Sequence[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Replace each matched query index by its encoder position (two-stage models).

    Args:
        indices: per image, ``(query_idx, gt_idx)`` LongTensors, both ``(K_i,)``.
        positions: ``(B, Q)`` int64, the encoder position of every main query
            (:attr:`DetectorOutput.query_positions`).

    Returns:
        per image, ``(position, gt_idx)``, the same pairs keyed by position, on the CPU.
    """
    if len(indices) != positions.shape[0]:
        raise ValueError(f"positions_of_queries: {len(indices)} images but positions of shape {tuple(positions.shape)}")
    positions = positions.detach().cpu()
    return [(positions[b, torch.as_tensor(q).cpu().long()], torch.as_tensor(g).cpu())
            for b, (q, g) in enumerate(indices)]


def instability(previous: Mapping[tuple[int, int], int], current: Mapping[tuple[int, int], int]) -> float:
    """Fraction of GT boxes (keys in both maps) whose matched query changed; 0.0 if none shared."""
    common = previous.keys() & current.keys()
    if not common:
        return 0.0
    changed = sum(previous[k] != current[k] for k in common)
    return changed / len(common)


RivalMap = dict[tuple[int, int], frozenset[int]]


def rival_queries(image_id: int, probs: torch.Tensor, boxes: torch.Tensor, gt_boxes: torch.Tensor,
                  gt_labels: torch.Tensor, query_idx: torch.Tensor, gt_idx: torch.Tensor, min_iou: float = 0.5,
                  min_ratio: float = 0.8) -> RivalMap:
    """Each matched GT's *rivals*: the other queries that predict it about as well as its matched query.

    A query r is a rival for GT g (matched to query q) when its box overlaps g with IoU >= ``min_iou``
    and its probability of g's class is >= ``min_ratio`` times q's. Hungarian matching may pick any of
    them next epoch with no change in what the model has learned (near-duplicate detections).

    Args:
        probs: (Q, C) class probabilities of one image's main queries; boxes: (Q, 4) cxcywh.
        gt_boxes: (G, 4) cxcywh; gt_labels: (G,) int64.
        query_idx, gt_idx: the matcher's pairs for this image, both (K,).

    Returns:
        ``{(image_id, gt_index): frozenset of rival query indices}`` for every matched GT.
    """
    iou = box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(gt_boxes.float()))  # (Q, G)
    out: RivalMap = {}
    for q, g in zip(torch.as_tensor(query_idx).tolist(), torch.as_tensor(gt_idx).tolist()):
        p = probs[:, int(gt_labels[g])]
        good = (iou[:, g] >= min_iou) & (p >= min_ratio * p[q])
        good[q] = False
        out[(int(image_id), int(g))] = frozenset(good.nonzero().flatten().tolist())
    return out


def split_instability(previous: Mapping[tuple[int, int], int], current: Mapping[tuple[int, int], int],
                      previous_rivals: Mapping[tuple[int, int], frozenset[int]],
                      current_rivals: Mapping[tuple[int, int], frozenset[int]]) -> tuple[float, float]:
    """:func:`instability` split in two: ``(swap, new)``, which add up to it.

    A changed GT is a *swap* when its new query was already a rival at the previous epoch or its old
    query is still a rival now (matching chose between near-duplicates), and *new* otherwise (the
    query that predicts it changed). Each is a fraction of the GT boxes in both maps.
    """
    common = previous.keys() & current.keys()
    if not common:
        return 0.0, 0.0
    changed = [k for k in common if previous[k] != current[k]]
    swaps = sum(current[k] in previous_rivals.get(k, ()) or previous[k] in current_rivals.get(k, ()) for k in changed)
    return swaps / len(common), (len(changed) - swaps) / len(common)


def select_probe_indices(dataset_len: int, max_images: int = 256, seed: int = 0) -> list[int]:
    """A fixed probe subset of dataset indices: sorted, ``min(dataset_len, max_images)`` long.

    The whole dataset when it is small enough; otherwise a uniform sample drawn with a
    private ``random.Random(seed)`` (global RNG state is neither used nor changed), so the
    same ``(dataset_len, max_images, seed)`` always gives the same subset.

    Raises:
        ConfigError: a negative ``dataset_len`` or a ``max_images`` below 1.
    """
    if dataset_len < 0:
        raise ConfigError(f"select_probe_indices: dataset_len must be >= 0, got {dataset_len}")
    if max_images < 1:
        raise ConfigError(f"stability probe size (max_images) must be >= 1, got {max_images}")
    if dataset_len <= max_images:
        return list(range(dataset_len))
    return sorted(random.Random(seed).sample(range(dataset_len), max_images))
