"""The one DETR-family detector: Deformable-DETR with switches.

``model.arch`` picks the query initialiser (:mod:`oddetr.models.query_init`):

- ``deformable-detr``: learned queries + reference points, or top-K encoder proposals
  (``two_stage``); optional iterative box refinement (``box_refine``)
- ``dab-deformable-detr``: learned content + learned 4-d anchor boxes, positional queries from
  the anchors' sine embedding (``position_head``) every layer, anchors refined layer by layer
- ``dino``: two-stage proposals with mixed query selection (proposal boxes as references,
  learned content), ``look_forward_twice`` and contrastive denoising (``dn_queries``)

It meets the small protocol every base model shares (DESIGN.md):

- :meth:`encode` images -> :class:`Memory`
- :meth:`initial_queries` memory -> the main :class:`QueryGroup` (+ two-stage proposals)
- :meth:`decode` memory, groups -> one :class:`GroupOutput` per group

Training with extra groups, the teacher pass and plain inference are compositions of these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from oddetr.box_ops import inverse_sigmoid
from oddetr.config import ModelConfig
from oddetr.errors import ConfigError
from oddetr.models.backbone import Backbone, BackbonePrefix, downsample_mask
from oddetr.models.denoising import build_denoising_groups
from oddetr.models.heads import MLP, make_box_head, make_class_head, repeat_head
from oddetr.models.ms_deform_attn import MSDeformAttn
from oddetr.models.outputs import (
    DenoisingMeta,
    DetectorOutput,
    EncoderProposals,
    GroupOutput,
    Memory,
    QueryGroup,
)
from oddetr.models.position_encoding import PositionEmbeddingSine, sine_embed
from oddetr.models.query_init import anchor_queries, init_anchor_boxes, mixed_queries, select_proposals
from oddetr.models.transformer import DeformableDecoder, DeformableEncoder
from oddetr.profiling import scope


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class DeformableDETR(nn.Module):
    """Deformable-DETR, DAB-Deformable-DETR and DINO (``cfg.arch``), one class.

    Inputs: images (B, 3, H, W) normalised; masks (B, H, W) bool, True on padding.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError("num_classes must be positive")
        if cfg.arch == "dino" and not cfg.two_stage:
            raise ConfigError("model.arch=dino needs model.two_stage=true")
        if cfg.arch == "dab-deformable-detr" and cfg.two_stage:
            raise ConfigError("model.arch=dab-deformable-detr needs model.two_stage=false")
        self.cfg = cfg
        self.num_classes = num_classes
        d = cfg.d_model
        n_levels = cfg.num_feature_levels
        strides = (8, 16, 32)[-min(n_levels, 3):]
        self.backbone = Backbone(cfg.backbone.name, return_strides=strides, weights=cfg.backbone.weights,
                                 trainable_layers=cfg.backbone.trainable_layers, norm=cfg.backbone.norm)
        in_channels = list(self.backbone.num_channels)
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), _group_norm(d)) for c in in_channels]
        last = in_channels[-1]
        for _ in range(n_levels - len(in_channels)):
            proj.append(nn.Sequential(nn.Conv2d(last, d, 3, stride=2, padding=1), _group_norm(d)))
            last = d
        self.input_proj = nn.ModuleList(proj)
        self.position_encoding = PositionEmbeddingSine(d // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d))
        layer_kwargs = dict(d_model=d, nheads=cfg.nheads, n_levels=n_levels, dim_feedforward=cfg.dim_feedforward,
                            dropout=cfg.dropout)
        self.encoder = DeformableEncoder(cfg.enc_layers, n_points=cfg.enc_points, **layer_kwargs)
        self.decoder = DeformableDecoder(cfg.dec_layers, box_refine=cfg.box_refine,
                                         look_forward_twice=cfg.look_forward_twice, n_points=cfg.dec_points,
                                         **layer_kwargs)
        # one head per decoder layer (+1 for two-stage proposals); shared without box refinement
        num_heads = cfg.dec_layers + (1 if cfg.two_stage else 0)
        share = not cfg.box_refine
        self.class_heads = repeat_head(make_class_head(d, num_classes), num_heads, share)
        self.bbox_heads = repeat_head(make_box_head(d, cfg.box_refine), num_heads, share)
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d)) if cfg.two_stage else None
        # deformable-detr: learned (position, content) pairs, or queries made from proposals (two-stage)
        self.query_embed = None
        self.reference_points = None
        self.proposal_to_query = None
        # dab-deformable-detr / dino: learned content; dab: learned anchor boxes (logits)
        self.content_embed = None
        self.anchor_embed = None
        if cfg.arch == "deformable-detr":
            if cfg.two_stage:
                self.proposal_to_query = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d))
            else:
                self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)
                self.reference_points = nn.Linear(d, 2)
        else:
            self.content_embed = nn.Embedding(cfg.num_queries, d)
            if cfg.arch == "dab-deformable-detr":
                self.anchor_embed = nn.Embedding(cfg.num_queries, 4)
        # positional query from a reference box, for groups that carry none (AUX groups of
        # two-stage models, DAB / DINO queries, denoising queries)
        derives_positions = cfg.two_stage or cfg.arch != "deformable-detr" or cfg.dn_queries > 0
        self.position_head = MLP(2 * d, d, d, 2) if derives_positions else None
        # contrastive denoising: a query's content is its (noised) label's embedding
        self.label_embed = nn.Embedding(num_classes, d) if cfg.dn_queries > 0 else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for m in module.modules():
                if isinstance(m, MSDeformAttn):
                    m.reset_parameters()
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        nn.init.normal_(self.level_embed)
        if self.reference_points is not None:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        if self.anchor_embed is not None:
            init_anchor_boxes(self.anchor_embed.weight)

    # ------------------------------------------------------------------ protocol

    def encode(self, images: torch.Tensor, masks: torch.Tensor, backbone_prefix: BackbonePrefix | None = None) -> Memory:
        """images: (B, 3, H, W); masks: (B, H, W) True on padding -> encoder memory.

        backbone_prefix: the backbone's frozen first blocks already run on ``images`` (shared with a teacher).
        """
        with scope("backbone"):
            feats = self.backbone(images, backbone_prefix)
        with scope("encoder"):
            return self._encode_features(feats, masks)

    def _encode_features(self, feats: list[torch.Tensor], masks: torch.Tensor) -> Memory:
        """Backbone features (per level (B, C_l, H_l, W_l)); masks: (B, H, W) -> encoder memory."""
        srcs, level_masks = [], []
        for lvl, proj in enumerate(self.input_proj):
            if lvl < len(feats):
                src = proj(feats[lvl])
            else:
                src = proj(feats[-1] if lvl == len(feats) else srcs[-1])
            srcs.append(src)
            level_masks.append(downsample_mask(masks, src.shape[-2:]))
        flat_src, flat_pos, flat_mask, shapes = [], [], [], []
        for lvl, (src, mask) in enumerate(zip(srcs, level_masks)):
            pos = self.position_encoding(mask).to(src.dtype) + self.level_embed[lvl].view(1, -1, 1, 1)
            shapes.append(src.shape[-2:])
            flat_src.append(src.flatten(2).transpose(1, 2))
            flat_pos.append(pos.flatten(2).transpose(1, 2))
            flat_mask.append(mask.flatten(1))
        spatial_shapes = [(h, w) for h, w in shapes]  # Python ints: no host sync, symbolic under torch.export
        valid_ratios = torch.stack([_valid_ratio(m) for m in level_masks], 1)
        src = torch.cat(flat_src, 1)
        pos = torch.cat(flat_pos, 1)
        padding = torch.cat(flat_mask, 1)
        memory = self.encoder(src, pos, spatial_shapes, valid_ratios, padding)
        return Memory(memory, spatial_shapes, valid_ratios, padding)

    def initial_queries(self, memory: Memory) -> tuple[QueryGroup, EncoderProposals | None]:
        """The main group exactly as the decoder receives it at layer 0 (+ two-stage proposals).

        Learned queries: reference (B, Q, 2) points. DAB: reference = sigmoid(anchors) (B, Q, 4),
        position None. Two-stage: reference = the top-K proposal boxes (B, K, 4), detached; DINO's
        content is learned and its position None, Deformable's both come from the proposals.
        """
        bsz = memory.memory.shape[0]
        d = self.cfg.d_model
        if self.anchor_embed is not None:
            return anchor_queries(self.content_embed.weight, self.anchor_embed.weight, bsz), None
        if not self.cfg.two_stage:
            pos, content = self.query_embed.weight.split(d, dim=1)
            pos = pos[None].expand(bsz, -1, -1)
            content = content[None].expand(bsz, -1, -1)
            reference = self.reference_points(pos).sigmoid()
            return QueryGroup(content, pos, reference, "main"), None
        proposals, invalid = self._encoder_proposals(memory)
        topk, reference = select_proposals(proposals, invalid, self.cfg.num_queries)
        proposals.topk = topk
        if self.content_embed is not None:  # DINO: mixed query selection
            return mixed_queries(self.content_embed.weight, reference), proposals
        embed = self.proposal_to_query(sine_embed(reference, d // 2))
        pos, content = embed.split(d, dim=-1)
        return QueryGroup(content, pos, reference, "main"), proposals

    def denoising_groups(self, targets: list[dict]) -> tuple[list[QueryGroup], DenoisingMeta]:
        """DINO's contrastive denoising groups for ``targets`` (``labels`` (G,), ``boxes`` (G, 4) cxcywh)."""
        if self.label_embed is None:
            raise ValueError("this model has no denoising queries (model.dn_queries=0)")
        cfg = self.cfg
        return build_denoising_groups(targets, self.num_classes, self.label_embed, cfg.dn_queries,
                                      cfg.dn_label_noise, cfg.dn_box_noise)

    def decode(self, memory: Memory, groups: list[QueryGroup]) -> list[GroupOutput]:
        """Run the decoder on ``groups`` (main first); per-layer outputs per group."""
        n = self.cfg.dec_layers
        with scope("decoder"):
            return self.decoder(groups, memory, self.class_heads[:n], self.bbox_heads[:n], self._position_from_reference)

    def forward(self, images: torch.Tensor, masks: torch.Tensor,
                extra_groups: Sequence[QueryGroup] | Callable[[QueryGroup], Sequence[QueryGroup]] = (),
                targets: list[dict] | None = None, backbone_prefix: BackbonePrefix | None = None) -> DetectorOutput:
        """images: (B, 3, H, W); masks: (B, H, W) True on padding; extra_groups: decoded with the
        main group (each sees only itself), or a function of this pass's main initial queries that
        returns them (groups derived from the student's own queries); targets: per image ``labels``,
        ``boxes`` cxcywh, used for denoising groups when training with ``model.dn_queries > 0``
        (never in eval mode); backbone_prefix: see :meth:`encode`."""
        memory = self.encode(images, masks, backbone_prefix)
        initial, proposals = self.initial_queries(memory)
        if callable(extra_groups):
            extra_groups = extra_groups(initial)
        groups = [initial, *extra_groups]
        dn_groups: list[QueryGroup] = []
        meta = None
        if self.training and targets is not None and self.label_embed is not None:
            dn_groups, meta = self.denoising_groups(list(targets))
        outs = self.decode(memory, groups + dn_groups)
        n = len(groups)
        return DetectorOutput(main=outs[0], initial=initial, extra=outs[1:n], encoder=proposals, dn=outs[n:],
                              dn_meta=meta, query_positions=None if proposals is None else proposals.topk)

    # ------------------------------------------------------------------ helpers

    def _position_from_reference(self, reference: torch.Tensor) -> torch.Tensor:
        """(B, G, 2|4) -> (B, G, d) positional queries from the sine embedding of the reference."""
        if self.position_head is None:
            raise ValueError("this model derives no positional queries from references")
        if reference.shape[-1] == 2:
            reference = torch.cat([reference, torch.full_like(reference, 0.1)], -1)
        return self.position_head(sine_embed(reference, self.cfg.d_model // 2))

    def _encoder_proposals(self, memory: Memory) -> tuple[EncoderProposals, torch.Tensor]:
        """Per memory position a class score and a box (two-stage Deformable-DETR)."""
        output, anchors, invalid = encoder_output_proposals(memory)
        output = self.enc_output(output)
        head = self.cfg.dec_layers
        logits = self.class_heads[head](output)
        boxes = (self.bbox_heads[head](output) + anchors).sigmoid()
        return EncoderProposals(logits, boxes, topk=torch.empty(0, dtype=torch.long)), invalid


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """mask: (B, h, w) True on padding -> (B, 2) valid fraction (x, y)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)


def encoder_output_proposals(memory: Memory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchor boxes at every memory position, as in two-stage Deformable-DETR.

    Returns the memory with padded / edge positions zeroed (B, S, d), the anchors in logit
    space (B, S, 4) (invalid anchors +inf) and the invalid positions (B, S, 1) bool.
    """
    mem, padding = memory.memory, memory.padding_mask
    bsz = mem.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(memory.spatial_shapes):
        mask = padding[:, start:start + h * w].view(bsz, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=mem.device),
                                torch.arange(w, dtype=torch.float32, device=mem.device), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None].expand(bsz, -1, -1, -1) + 0.5
        scale = torch.stack([valid_w, valid_h], -1).view(bsz, 1, 1, 2).float()
        grid = grid / scale
        wh = torch.full_like(grid, 0.05 * (2.0 ** lvl))
        proposals.append(torch.cat([grid, wh], -1).view(bsz, -1, 4))
        start += h * w
    anchors = torch.cat(proposals, 1)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True)
    anchors = inverse_sigmoid(anchors)
    invalid = padding[..., None] | ~valid
    anchors = anchors.masked_fill(invalid, float("inf"))
    output = mem.masked_fill(invalid, 0.0)
    return output, anchors, invalid


def build_model(cfg: ModelConfig, num_classes: int) -> DeformableDETR:
    """The detector for ``cfg`` (all three architectures are presets of one class)."""
    return DeformableDETR(cfg, num_classes)

