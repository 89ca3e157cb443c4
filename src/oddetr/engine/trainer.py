"""The training loop: read it top to bottom in :meth:`Trainer.fit`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from oddetr.config import Config
from oddetr.distill.distiller import OnlineDistiller
from oddetr.engine import distributed as dist
from oddetr.engine.checkpoint import (
    EpochProgress,
    TrainState,
    safe_load,
    save_run_checkpoints,
    seed_everything,
)
from oddetr.engine.compiled import compile_detector
from oddetr.engine.cpu_memory import keep_freed_memory_on_cpu
from oddetr.engine.data import build_dataset, check_same_categories, make_loader
from oddetr.engine.device import resolve_device  # re-exported: older code imports it from here
from oddetr.engine.evaluate import evaluate, move_batch, probe_assignment
from oddetr.engine.init_weights import load_init_weights
from oddetr.engine.optim import build_optimizer, build_scheduler
from oddetr.engine.preemption import Preempted, StopOnSigterm
from oddetr.engine.run_dir import MetricsLogger, prepare_run_dir, write_config
from oddetr.engine.run_start import announce_run
from oddetr.engine.sampler import EpochSampler, SeededSamples
from oddetr.engine.step import GuardedStep
from oddetr.errors import ConfigError, DataError, TrainingError
from oddetr.evaluation.instability import instability, select_probe_indices
from oddetr.evaluation.plots import plot_metrics
from oddetr.losses.criterion import SetCriterion
from oddetr.models.detector import build_model

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class Trainer:
    """Builds data, model, optimiser (and the OD-DETR distiller) from a config and trains."""

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        keep_freed_memory_on_cpu(self.device, cfg.train.keep_freed_memory)
        dist.init_distributed(self.device)
        self.is_main = dist.is_main_process()
        seed_everything(cfg.seed + dist.rank())
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.run_dir = Path(cfg.output)
        if self.is_main:
            prepare_run_dir(self.run_dir, resume, cfg.overwrite)
            write_config(self.run_dir, cfg.to_dict())
        dist.barrier()

        # ---- data
        self.train_set = build_dataset(cfg, "train", train=True)
        self.val_set = build_dataset(cfg, "val", train=False)
        check_same_categories(self.train_set, self.val_set)
        if len(self.train_set) == 0:
            raise DataError("the training set has no images")
        probe_base = build_dataset(cfg, "train", train=False)
        probe = Subset(probe_base, select_probe_indices(len(probe_base), cfg.train.instability_probe, cfg.seed))
        world, rank = dist.world_size(), dist.rank()
        # augmentation seeded per sample from (seed, epoch, position): the same with any number of workers,
        # and a run resumed mid-epoch draws what the uninterrupted run would have
        self.train_sampler = EpochSampler(len(self.train_set), True, cfg.seed, rank, world, sample_seeds=True)
        workers = cfg.data.num_workers
        self.train_loader = make_loader(SeededSamples(self.train_set), cfg.train.batch_size, False, workers,
                                        cfg.seed, sampler=self.train_sampler)
        self.val_loader = make_loader(self.val_set, cfg.eval.batch_size, False, workers, cfg.seed,
                                      sampler=EpochSampler(len(self.val_set), False, 0, rank, world))
        self.probe_loader = make_loader(probe, cfg.eval.batch_size, False, 0, cfg.seed,
                                        sampler=EpochSampler(len(probe), False, 0, rank, world))

        # ---- model, losses, optimiser
        num_classes = cfg.model.num_classes or self.train_set.num_classes
        if num_classes < self.train_set.num_classes:
            raise ConfigError(f"model.num_classes={num_classes} is smaller than the {self.train_set.num_classes} "
                              "categories of the training data")
        self.num_classes = num_classes
        self.model = build_model(cfg.model, num_classes).to(self.device)
        if self.is_main:  # run header, dataset summary (stderr, RUN/dataset.json), RUN/plots/labels.png, train_batch.png
            announce_run(cfg, self.run_dir, self.train_set, self.val_set, min(self.model.backbone.strides),
                         self.device, dist.world_size())
        if cfg.model.init_weights and not resume:  # converted / earlier weights; class heads fit num_classes
            load_init_weights(self.model, cfg.model.init_weights, cfg.model,
                              self.run_dir if self.is_main else None)
        self.criterion = SetCriterion(cfg.loss)
        self.optimizer = build_optimizer(self.model, cfg)
        batches = len(self.train_loader)
        if cfg.train.max_steps_per_epoch:
            batches = min(batches, cfg.train.max_steps_per_epoch)
        self.batches_per_epoch = batches
        self.steps_per_epoch = max(1, batches // cfg.train.grad_accum)
        self.scheduler = build_scheduler(self.optimizer, self.steps_per_epoch, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.ddp = None
        if dist.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        # after DDP, which broadcasts rank 0's weights: every rank's teacher starts from the same student
        total_steps = self.steps_per_epoch * cfg.train.epochs
        self.distiller = OnlineDistiller(self.model, cfg, self.criterion, total_steps) \
            if cfg.distill.enabled else None
        if cfg.compile:  # after the teacher's copy of the eager student
            compile_detector(self.model, cfg.compile_backend, "the student")
            if self.distiller is not None:
                compile_detector(self.distiller.teacher.model, cfg.compile_backend, "the EMA teacher")
        if self.distiller is not None and self.is_main:
            t = self.distiller.teacher
            print(f"OD-DETR: EMA teacher m = {t.decay:.6g}, tau = {t.tau:g} (horizon {1 / (1 - t.decay):.0f} of "
                  f"{total_steps} optimiser steps); distillation weights ramp in over "
                  f"{self.distiller.warmup_steps} steps", file=sys.stderr, flush=True)

        # ---- state: what a checkpoint holds, and the guarded step that moves it
        meta = {"config": cfg.to_dict(), "num_classes": num_classes,
                "classes": {"names": list(self.train_set.class_names),
                            "label_to_cat_id": [int(c) for c in self.train_set.label_to_cat_id],
                            "categories": list(self.train_set.categories)}}
        self.state = TrainState(self.model, self.optimizer, self.scheduler, self.scaler, self.distiller, meta)
        self.stepper = GuardedStep(self.state, self.ddp, self.criterion, cfg.train, self.device)
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main)
        self.stop = StopOnSigterm()  # entered (the handler installed) by fit()
        self.last_mid_save = -1  # the step of the last mid-epoch checkpoint
        if resume:
            self.state.load_state_dict(safe_load(self.run_dir / "last.pt"), self.run_dir / "last.pt", cfg.seed)
            self.logger.truncate_after(self.state.epoch, self.state.step)

    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return self.state.step

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train for ``train.epochs``; return the last epoch's metrics record.

        Raises :class:`Preempted` after saving ``last.pt`` when SIGTERM arrives (``--resume`` continues).
        """
        record: dict[str, Any] = {}
        state = self.state
        with self.stop:
            try:
                while state.epoch < self.cfg.train.epochs:
                    train_stats = self.train_one_epoch()
                    state.epoch += 1
                    # each rank's BatchNorm statistics (student, and the teacher's copies) follow its own batches:
                    # evaluate and save rank 0's everywhere, so that ranks agree and a resumed run continues exactly
                    dist.broadcast_buffers(self.model)
                    if self.distiller is not None:
                        dist.broadcast_buffers(self.distiller.teacher.model)
                    record = {"epoch": state.epoch, "step": state.step, **train_stats}
                    if state.epoch % self.cfg.train.eval_every == 0 or state.epoch == self.cfg.train.epochs:
                        record.update(self.evaluate_all())
                    # instability compares consecutive epochs (METHOD.md), whatever train.eval_every is
                    record.update(self.probe_instability())
                    self.logger.log_epoch(record)
                    self.save_checkpoints(record)
                    if self.is_main:
                        print_epoch_summary(record, file=sys.stderr)
                        plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
                    if state.epoch < self.cfg.train.epochs and self.stop.agreed(self.device):
                        raise self.preempted()
            finally:
                self.logger.close()
        return record

    def train_one_epoch(self) -> dict[str, float]:
        """One pass over the training set (from where a mid-epoch checkpoint left it); the epoch's stats."""
        cfg, state = self.cfg.train, self.state
        progress = state.progress  # all zero unless resumed mid-epoch
        self.train_sampler.set_epoch(state.epoch, start=progress.batches * cfg.batch_size)
        self.stepper.net.train()
        state.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter() - progress.elapsed
        bar = tqdm(total=self.batches_per_epoch, initial=progress.batches, disable=not self.is_main, leave=False,
                   desc=f"epoch {state.epoch + 1}/{self.cfg.train.epochs}", dynamic_ncols=True, file=sys.stderr)
        with bar:  # closed on errors too, so that the CLI's one-line error starts its own line
            for i, batch in enumerate(self.train_loader, start=progress.batches):
                if i >= self.batches_per_epoch:
                    break
                images, masks, targets = move_batch(*batch, self.device)
                step, lr = state.step, state.optimizer.param_groups[-1]["lr"]
                window_end = (i + 1) % cfg.grad_accum == 0
                result = self.stepper(images, masks, targets, window_end,
                                      f"epoch {state.epoch + 1} step {step} batch {i}")
                progress.add(result.finite, result.losses, images.shape[0])
                if progress.consecutive >= cfg.max_nonfinite_steps:
                    raise TrainingError(
                        f"training stopped at epoch {state.epoch + 1} step {state.step}: {progress.consecutive} "
                        f"non-finite steps in a row ({self.stepper.last_nonfinite}); the last good checkpoint is "
                        f"{self.run_dir / 'last.pt'}")
                if result.finite:
                    speed = progress.images * dist.world_size() / max(time.perf_counter() - start, 1e-9)
                    self.log_step(bar, step, lr, result.losses["loss"], speed)
                bar.update(1)
                if window_end and i + 1 < self.batches_per_epoch and self.save_mid_epoch(start):
                    raise self.preempted()
        state.progress = EpochProgress()
        return self.epoch_stats(progress, time.perf_counter() - start)

    def log_step(self, bar: tqdm, step: int, lr: float, loss: float, images_per_s: float) -> None:
        """A finite batch: ``steps.jsonl`` (``train.log_steps``), TensorBoard every 20 steps, the progress bar."""
        if self.cfg.train.log_steps:  # every rank takes part in the mean; rank 0 writes it
            mean_loss = dist.all_reduce_sum(loss, self.device) / dist.world_size()
            self.logger.log_step_record({"epoch": self.state.epoch + 1, "step": step, "loss": mean_loss, "lr": lr})
        if self.is_main and self.state.step % 20 == 0:
            self.logger.log_step(self.state.step, {"loss": loss, "lr": lr})
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")

    def save_mid_epoch(self, start: float) -> bool:
        """After an optimiser step: save ``last.pt`` every ``train.checkpoint_every`` steps or on SIGTERM.

        True if training must stop (SIGTERM; the checkpoint is written).
        """
        every, state = self.cfg.train.checkpoint_every, self.state
        stop = self.stop.agreed(self.device)
        if stop or (every > 0 and state.step % every == 0 and state.step != self.last_mid_save):
            state.progress.elapsed = time.perf_counter() - start
            self.save_checkpoints(None)
            self.last_mid_save = state.step
        return stop

    def preempted(self) -> Preempted:
        s = self.state
        where = f"epoch {s.epoch + 1} batch {s.progress.batches}" if s.progress.batches else f"the end of epoch {s.epoch}"
        return Preempted(f"stopped by SIGTERM at {where} (step {s.step}); saved {self.run_dir / 'last.pt'}; "
                         f"continue with: oddetr train --resume output={self.run_dir}")

    def epoch_stats(self, progress: EpochProgress, elapsed: float) -> dict[str, float]:
        """Means over the epoch's finite batches (and ranks), learning rate, throughput, skipped batches."""
        self.state.nonfinite_total += progress.nonfinite
        stats = {f"train/{k}": v / max(progress.count, 1) for k, v in progress.totals.items()}
        stats = dist.all_reduce_mean_dict(stats, self.device)
        stats.update({
            "train/lr": self.optimizer.param_groups[-1]["lr"],
            "train/images_per_s": dist.all_reduce_sum(progress.images, self.device) / max(elapsed, 1e-9),
            "train/nonfinite_steps": progress.nonfinite,
            "time/epoch_s": elapsed,
        })
        if self.distiller is not None:
            stats["distill/ramp"] = self.distiller.ramp()
            stats["distill/ema_step"] = self.distiller.teacher.step
        return stats

    # ------------------------------------------------------------------ evaluation

    def evaluated_models(self) -> dict[str, nn.Module]:
        models = {"student": self.model}
        if self.distiller is not None:
            models["teacher"] = self.distiller.teacher.model
        return models

    def evaluate_all(self) -> dict[str, float]:
        """COCO metrics on the validation set for the student (and the teacher)."""
        out: dict[str, float] = {}
        coco_gt = self.val_set.coco_gt()
        for name, model in self.evaluated_models().items():
            was_training = model.training
            metrics = evaluate(model, self.val_loader, self.device, coco_gt, self.val_set.label_to_cat_id,
                               self.cfg.eval.max_detections, self.cfg.train.amp)
            out.update({f"{name}/{k}": v for k, v in metrics.items() if k in METRIC_KEYS})
            model.train(was_training)
        return out

    def probe_instability(self) -> dict[str, float]:
        """Matching instability since the previous epoch (from the second epoch on) for the student (and the
        teacher): the fraction of the probe set's GT boxes whose matched query changed."""
        out: dict[str, float] = {}
        for name, model in self.evaluated_models().items():
            was_training = model.training
            current = probe_assignment(model, self.probe_loader, self.criterion.matcher, self.device)
            previous = self.state.previous_assignment.get(name)
            if previous is not None:
                out[f"{name}/instability"] = instability(previous, current)
            self.state.previous_assignment[name] = current
            model.train(was_training)
        return out

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoints(self, record: dict[str, Any] | None) -> None:
        """``last.pt`` (full state), ``best.pt`` (weights) if AP improved, ``epoch_N.pt`` (a link) if kept.

        ``record`` None: a mid-epoch checkpoint, ``last.pt`` only. Collective under DDP.
        """
        state, cfg = self.state, self.cfg.train
        key = ("teacher" if self.distiller else "student") + "/AP"
        improved = record is not None and key in record and record[key] > state.best
        if improved:
            state.best = record[key]
        full = state.state_dict()  # gathers every rank's RNG streams and epoch progress
        weights = state.weights() if improved and cfg.save_best else None
        if self.is_main:
            save_run_checkpoints(self.run_dir, full, weights, state.epoch if record is not None else None,
                                 cfg.keep_checkpoints)
        dist.barrier()


def print_epoch_summary(record: dict[str, Any], file=sys.stderr) -> None:
    parts = [f"epoch {record['epoch']}", f"loss {record.get('train/loss', float('nan')):.4f}"]
    for name in ("student", "teacher"):
        if f"{name}/AP" in record:
            parts.append(f"{name} AP {record[f'{name}/AP']:.4f} AP50 {record[f'{name}/AP50']:.4f}")
        if f"{name}/instability" in record:
            parts.append(f"{name} IS {record[f'{name}/instability']:.3f}")
    parts.append(f"{record.get('train/images_per_s', 0.0):.1f} img/s")
    print(" | ".join(parts), file=file, flush=True)


def format_ap_table(record: dict[str, Any]) -> str:
    """A fixed-width table of the COCO metrics of the student (and teacher) in ``record``, with the last
    epoch's matching instability (``IS``: fraction of probe GTs whose matched query changed; ``-`` before
    the second evaluation) beside the AP."""
    header = f"{'model':<8}" + "".join(f"{k:>8}" for k in METRIC_KEYS) + f"{'IS':>8}"
    rows = [header]
    for name in ("student", "teacher"):
        if f"{name}/AP" in record:
            inst = record.get(f"{name}/instability")
            rows.append(f"{name:<8}" + "".join(f"{record[f'{name}/{k}']:>8.4f}" for k in METRIC_KEYS)
                        + (f"{inst:>8.4f}" if inst is not None else f"{'-':>8}"))
    return "\n".join(rows)


__all__ = ["Trainer", "format_ap_table", "resolve_device"]
