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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from oddetr.config import Config
from oddetr.distill.ema import EmaTeacher
from oddetr.distill.groups import AuxGroup, aux_group, prediction_group, select_aux_queries
from oddetr.distill.losses import prediction_distillation_losses
from oddetr.distill.two_stage import main_group_teacher_assignments
from oddetr.losses.criterion import SetCriterion, union_unmatched
from oddetr.losses.matcher import Assignment
from oddetr.models.outputs import DetectorOutput, QueryGroup


@dataclass
class DistillPlan:
    """What the teacher's pass produced for one batch."""

    teacher: DetectorOutput
    groups: list[QueryGroup] = field(default_factory=list)
    aux: list[AuxGroup] = field(default_factory=list)
    teacher_assignments: list[Assignment] | None = None  # per decoder layer, on the teacher's main group


class OnlineDistiller:
    """Owns the EMA teacher and turns its pass into student groups and distillation losses."""

    def __init__(self, student: nn.Module, cfg: Config, criterion: SetCriterion) -> None:
        self.cfg = cfg.distill
        self.model_cfg = cfg.model
        self.criterion = criterion
        self.teacher = EmaTeacher(student, cfg.distill.ema_decay, cfg.distill.ema_tau)
        warmup = cfg.distill.warmup_steps
        self.warmup_steps = int(cfg.distill.ema_tau) if warmup < 0 else warmup
        # two-stage models pick their main queries per image: MD on the main group maps the teacher's
        # matching through shared encoder positions (distill.two_stage), and runs on the PD group too
        self.md_on_main = self.cfg.md
        self.md_on_pd = self.cfg.md and (cfg.model.two_stage or self.cfg.pd)
        self.uses_pd_group = self.cfg.pd or self.md_on_pd
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

    def update(self, student: nn.Module) -> float:
        return self.teacher.update(student)

    # ------------------------------------------------------------------ teacher pass

    @torch.no_grad()
    def prepare(self, images: torch.Tensor, masks: torch.Tensor, targets: Sequence[dict]) -> DistillPlan:
        """Run the teacher and build the student's extra groups for this batch."""
        t_out = self.teacher.model(images, masks)
        plan = DistillPlan(teacher=t_out)
        if self.uses_pd_group:
            plan.groups.append(prediction_group(t_out.initial))
        if self.cfg.md:
            plan.teacher_assignments = self.criterion.match_layers(t_out.main.logits, t_out.main.boxes, targets,
                                                                   context="teacher")
        if self.cfg.aux:
            plan.aux = self._aux_groups(t_out, targets)
            plan.groups.extend(a.group for a in plan.aux)
        return plan

    def aux_stages(self) -> list[int]:
        stages = self.cfg.aux_stages
        return list(range(self.model_cfg.dec_layers)) if stages is None else list(stages)

    def _aux_groups(self, t_out: DetectorOutput, targets: Sequence[dict]) -> list[AuxGroup]:
        stages = self.aux_stages()
        selections = [select_aux_queries(t_out.main.logits[s], t_out.main.boxes[s], targets, self.criterion.matcher,
                                         self.cfg.aux_k) for s in stages]
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
        if self.md_on_main:
            main_assign = main_group_teacher_assignments(teacher_assign, plan.teacher, out)
            boxes = [union_unmatched(s, t, self.cfg.md_box) for s, t in zip(student_assignments, main_assign)]
            losses.update(crit.group_losses("md", out.main.logits, out.main.boxes, targets, student_assignments,
                                            num_boxes, cls_loss="qfl", extra_cls=main_assign, extra_box=boxes))
        if self.md_on_pd:
            pd_out = extras["pd"]
            own = crit.match_layers(pd_out.logits, pd_out.boxes, targets, context="pd group")
            boxes = [union_unmatched(s, t, self.cfg.md_box) for s, t in zip(own, teacher_assign)]
            losses.update(crit.group_losses("mdpd", pd_out.logits, pd_out.boxes, targets, own, num_boxes,
                                            cls_loss="qfl", extra_cls=teacher_assign, extra_box=boxes))
        if self.cfg.pd:
            layers = crit.layer_indices(out.main.logits.shape[0])
            losses.update(prediction_distillation_losses(extras["pd"], plan.teacher.main, num_boxes, layers,
                                                         crit.cfg.qfl_beta))
        for aux in plan.aux:
            group_out = extras[aux.group.name]
            num_layers = group_out.logits.shape[0]
            losses.update(crit.group_losses(aux.group.name, group_out.logits, group_out.boxes, targets,
                                            [aux.assignment] * num_layers, num_boxes * self.cfg.aux_k))
        return losses

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state)
