"""OD-DETR online distillation: the EMA teacher's pass, the student's extra groups, the losses.

Per training step::

    plan = distiller.prepare(images, masks, targets)          # teacher pass, no grad
    out = student(images, masks, extra_groups=plan.groups)     # one student pass
    losses = distiller.losses(out, targets, num_boxes, plan, student_assignments)
    weights = distiller.group_weights()                        # warm-up ramp applied here
    ...optimiser step...
    distiller.update(student)                                  # EMA step
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from oddetr.config import Config
from oddetr.distill.ema import EmaTeacher, batch_statistics, ema_schedule
from oddetr.distill.groups import AuxGroup, aux_group, prediction_group, select_aux_queries
from oddetr.distill.losses import prediction_distillation_losses
from oddetr.distill.two_stage import main_group_teacher_assignments, main_group_teacher_boxes
from oddetr.losses.criterion import SetCriterion, gts_left_to_student, teacher_only_pairs, union_unmatched
from oddetr.losses.matcher import Assignment
from oddetr.models.backbone import BackbonePrefix
from oddetr.models.outputs import DetectorOutput, GroupOutput, QueryGroup, cast_floating
from oddetr.profiling import scope


@dataclass
class DistillPlan:
    """What the teacher's pass produced for one batch."""

    teacher: DetectorOutput
    groups: list[QueryGroup] = field(default_factory=list)
    aux: list[AuxGroup] = field(default_factory=list)
    teacher_assignments: list[Assignment] | None = None  # per decoder layer, on the teacher's main group


class OnlineDistiller:
    """Owns the EMA teacher and turns its pass into student groups and distillation losses."""

    def __init__(self, student: nn.Module, cfg: Config, criterion: SetCriterion,
                 total_steps: int | None = None) -> None:
        """total_steps: the run's optimiser steps, for ``distill.ema_decay`` / ``ema_tau`` left unset
        (they then follow ``distill.ema_horizon``)."""
        self.cfg = cfg.distill
        self.model_cfg = cfg.model
        self.criterion = criterion
        d = cfg.distill
        decay, tau = ema_schedule(d.ema_decay, d.ema_tau, d.ema_horizon, total_steps)
        self.teacher = EmaTeacher(student, decay, tau)
        warmup = cfg.distill.warmup_steps
        self.warmup_steps = round(tau) if warmup < 0 else warmup
        # two-stage models pick their main queries per image: MD on the main group maps the teacher's
        # matching through shared encoder positions (distill.two_stage), and runs on the PD group too
        self.md_on_main = self.cfg.md
        self.md_on_pd = self.cfg.md and self.cfg.md_on_pd and (cfg.model.two_stage or self.cfg.pd)
        self.uses_pd_group = self.cfg.pd or self.md_on_pd
        # the teacher's own matching: for MD, and for choosing the queries PD regresses boxes on
        self.needs_teacher_matching = self.cfg.md or (self.cfg.pd and self.cfg.pd_box_queries.startswith("matched"))
        # AUX queries reuse the teacher's learned positional queries only where the model has them
        # (Deformable-DETR); DAB anchors and two-stage / DINO queries derive them from the reference
        self.learned_positions = cfg.model.arch == "deformable-detr" and not cfg.model.two_stage

    # ------------------------------------------------------------------ schedule

    def ramp(self) -> float:
        """Linear 0 -> 1 over ``distill.warmup_steps`` optimiser steps."""
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, self.teacher.step / self.warmup_steps)

    def group_weights(self) -> dict[str, float]:
        """Multipliers per loss group (applied by :meth:`SetCriterion.total`)."""
        r = self.ramp()
        md = min(1.0, self.cfg.md_weight * r)
        weights = {"pd": self.cfg.pd_weight * r, "aux": self.cfg.aux_weight * r, "mdpd": self.cfg.md_weight * r}
        if self.md_on_main:
            # the main group's loss moves from the student's own matching to MD's as the ramp rises
            weights["main"] = 1.0 - md
            weights["md"] = md
        return weights

    def guides(self, epoch_index: int) -> bool:
        """Whether the teacher guides the student in the epoch of 0-based index ``epoch_index``
        (``distill.end_epoch``; the EMA update goes on either way)."""
        return self.cfg.end_epoch <= 0 or epoch_index < self.cfg.end_epoch

    def update(self, student: nn.Module) -> float:
        return self.teacher.update(student)

    # ------------------------------------------------------------------ teacher pass

    @torch.no_grad()
    def prepare(self, images: torch.Tensor, masks: torch.Tensor, targets: Sequence[dict],
                backbone_prefix: BackbonePrefix | None = None) -> DistillPlan:
        """Run the teacher and build the student's extra groups for this batch.

        backbone_prefix: the student's frozen first backbone blocks run on ``images``: the teacher's
        copies of them are the same function (an EMA of constants), so it goes on from there.
        """
        with self._teacher_pass_context(images.device):
            t_out = self.teacher.model(images, masks, backbone_prefix=backbone_prefix)
        if self.cfg.teacher_amp != "none":
            t_out = cast_floating(t_out, torch.float32)
        plan = DistillPlan(teacher=t_out)
        if self.uses_pd_group:
            plan.groups.append(prediction_group(t_out.initial))
        # the teacher's matching and the AUX selection rank queries by the same costs: computed once
        costs = None
        if self.needs_teacher_matching or self.cfg.aux:
            costs = self.criterion.matcher.batch_costs(t_out.main.logits, t_out.main.boxes, targets)
        if self.needs_teacher_matching:
            plan.teacher_assignments = self.criterion.match_layers(t_out.main.logits, t_out.main.boxes, targets,
                                                                   context="teacher", costs=costs)
        if self.cfg.aux:
            plan.aux = self._aux_groups(t_out, targets, costs)
            plan.groups.extend(a.group for a in plan.aux)
        return plan

    def _teacher_pass_context(self, device: torch.device) -> contextlib.ExitStack:
        """BatchNorm on batch statistics (``distill.teacher_bn=batch``) and autocast (``distill.teacher_amp``)
        for the teacher's guiding pass, as configured."""
        stack = contextlib.ExitStack()
        if self.cfg.teacher_bn == "batch":
            stack.enter_context(batch_statistics(self.teacher.model))
        if self.cfg.teacher_amp != "none":
            dtype = torch.bfloat16 if self.cfg.teacher_amp == "bf16" else torch.float16
            stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        return stack

    def aux_stages(self) -> list[int]:
        stages = self.cfg.aux_stages
        return list(range(self.model_cfg.dec_layers)) if stages is None else list(stages)

    def _aux_groups(self, t_out: DetectorOutput, targets: Sequence[dict], costs: torch.Tensor) -> list[AuxGroup]:
        """costs: (L, B, Q, sum G) the teacher's matching costs of every decoder layer."""
        stages = self.aux_stages()
        with scope("aux_select"):
            selections = [select_aux_queries(t_out.main.logits[s], t_out.main.boxes[s], targets, self.criterion.matcher,
                                             self.cfg.aux_k, costs[s]) for s in stages]
        if self.cfg.aux_pooled:
            return [aux_group(t_out.main, t_out.initial, stages, selections, "aux", self.learned_positions)]
        return [aux_group(t_out.main, t_out.initial, [s], [sel], f"aux{s}", self.learned_positions)
                for s, sel in zip(stages, selections)]

    # ------------------------------------------------------------------ losses

    def losses(self, out: DetectorOutput, targets: Sequence[dict], num_boxes: float, plan: DistillPlan,
               student_assignments: list[Assignment]) -> dict[str, torch.Tensor]:
        """Unweighted distillation terms: ``md/*``, ``mdpd/*``, ``pd/*``, ``aux{stage}/*``."""
        crit = self.criterion
        extras = {g.name: g for g in out.extra}
        losses: dict[str, torch.Tensor] = {}
        teacher_assign = plan.teacher_assignments
        teacher_boxes = plan.teacher.main.boxes  # (L, B, Q, 4), index-aligned with the main and PD queries
        if self.md_on_main:
            # two-stage: the teacher's pairs and boxes in the student's main-query indices (shared positions)
            main_assign = main_group_teacher_assignments(teacher_assign, plan.teacher, out)
            main_boxes = main_group_teacher_boxes(teacher_boxes, plan.teacher, out)
            losses.update(self._md_losses("md", out.main, student_assignments, main_assign, main_boxes,
                                          targets, num_boxes))
        if self.md_on_pd:
            pd_out = extras["pd"]
            own = crit.match_layers(pd_out.logits, pd_out.boxes, targets, context="pd group")
            losses.update(self._md_losses("mdpd", pd_out, own, teacher_assign, teacher_boxes, targets, num_boxes))
        if self.cfg.pd:
            layers = crit.layer_indices(out.main.logits.shape[0])
            c = self.cfg
            losses.update(prediction_distillation_losses(
                extras["pd"], plan.teacher.main, num_boxes, layers, crit.cfg.qfl_beta,
                teacher_assignments=teacher_assign, box_queries=c.pd_box_queries, box_threshold=c.pd_box_threshold,
                box_loss=c.pd_box_loss, box_beta=c.pd_box_beta))
        for aux in plan.aux:
            group_out = extras[aux.group.name]
            num_layers = group_out.logits.shape[0]
            losses.update(crit.group_losses(aux.group.name, group_out.logits, group_out.boxes, targets,
                                            [aux.assignment] * num_layers, num_boxes * self.cfg.aux_k))
        return losses

    def _md_losses(self, prefix: str, group: GroupOutput, own: list[Assignment], teacher: list[Assignment],
                   teacher_boxes: torch.Tensor, targets: Sequence[dict], num_boxes: float) -> dict[str, torch.Tensor]:
        """MD on one group whose queries correspond to the teacher's index-for-index.

        Positives (``distill.md_pairs=union``): the student's own pairs (soft target: IoU of its own box)
        and, per layer, the pairs only the teacher made (soft target: IoU of the box
        ``distill.md_target_box`` picks; teacher_boxes: (L, B, Q, 4)). Boxes regress per ``distill.md_box``.
        ``md_pairs=teacher``: the teacher's pairs are the positives (soft target and box as for the
        teacher-only pairs above), plus the student's own pair of any GT the teacher's pairs leave out
        (two-stage queries with no counterpart); boxes regress on the same pairs.
        """
        if self.cfg.md_pairs == "teacher":
            own = [gts_left_to_student(s, t) for s, t in zip(own, teacher)]
            teacher_only = teacher
            box_pairs = [[(torch.cat([sq, tq]), torch.cat([sg, tg])) for (sq, sg), (tq, tg) in zip(s, t)]
                         for s, t in zip(own, teacher)]
        else:
            teacher_only = [teacher_only_pairs(s, t) for s, t in zip(own, teacher)]
            box_pairs = [union_unmatched(s, t, self.cfg.md_box) for s, t in zip(own, teacher)]
        source = self.cfg.md_target_box
        sources = [group.boxes] if source == "student" else [teacher_boxes] if source == "teacher" else \
            [group.boxes, teacher_boxes]
        return self.criterion.group_losses(prefix, group.logits, group.boxes, targets, own, num_boxes,
                                           cls_loss=self.cfg.md_cls_loss, extra_cls=teacher_only,
                                           extra_box=box_pairs, extra_cls_boxes=sources)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state)
