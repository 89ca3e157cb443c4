"""The training loop: read it top to bottom in :meth:`Trainer.fit`."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from oddetr.config import Config
from oddetr.distill.distiller import OnlineDistiller
from oddetr.engine import distributed as dist
from oddetr.engine.checkpoint import atomic_save, prune_checkpoints, rng_state, safe_load, set_rng_state
from oddetr.engine.data import build_dataset, check_same_categories, make_loader
from oddetr.engine.device import resolve_device  # re-exported: older code imports it from here
from oddetr.engine.evaluate import evaluate, move_batch, probe_assignment
from oddetr.engine.init_weights import load_init_weights
from oddetr.engine.optim import build_optimizer, build_scheduler
from oddetr.engine.run_dir import MetricsLogger, prepare_run_dir, write_config
from oddetr.engine.sampler import EpochSampler
from oddetr.engine.step import compute_losses
from oddetr.errors import ConfigError, DataError, TrainingError
from oddetr.evaluation.instability import instability, select_probe_indices
from oddetr.evaluation.plots import plot_metrics
from oddetr.losses.criterion import SetCriterion, summarize_losses
from oddetr.models.detector import build_model

CHECKPOINT_FORMAT = "oddetr-checkpoint-v1"
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds data, model, optimiser (and the OD-DETR distiller) from a config and trains."""

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
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
        self.train_sampler = EpochSampler(len(self.train_set), True, cfg.seed, rank, world)
        workers = cfg.data.num_workers
        self.train_loader = make_loader(self.train_set, cfg.train.batch_size, False, workers, cfg.seed,
                                        sampler=self.train_sampler)
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
        self.distiller = OnlineDistiller(self.model, cfg, self.criterion) if cfg.distill.enabled else None

        # ---- state
        self.epoch = 0
        self.step = 0
        self.best = -1.0
        self.nonfinite_total = 0
        self.last_nonfinite = ""
        self.previous_assignment: dict[str, dict] = {}
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main)
        if resume:
            self.load_checkpoint(self.run_dir / "last.pt")
            self.logger.truncate_after(self.epoch)

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train for ``train.epochs``; return the last epoch's metrics record."""
        record: dict[str, Any] = {}
        try:
            while self.epoch < self.cfg.train.epochs:
                train_stats = self.train_one_epoch()
                self.epoch += 1
                # each rank's BatchNorm statistics (student, and the teacher's copies) follow its own batches:
                # evaluate and save rank 0's everywhere, so that ranks agree and a resumed run continues exactly
                dist.broadcast_buffers(self.model)
                if self.distiller is not None:
                    dist.broadcast_buffers(self.distiller.teacher.model)
                record = {"epoch": self.epoch, "step": self.step, **train_stats}
                if self.epoch % self.cfg.train.eval_every == 0 or self.epoch == self.cfg.train.epochs:
                    record.update(self.evaluate_all())
                self.logger.log_epoch(record)
                self.save_checkpoints(record)
                if self.is_main:
                    print_epoch_summary(record, file=sys.stderr)
                    plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
        finally:
            self.logger.close()
        return record

    def train_one_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        model = self.ddp or self.model
        model.train()
        self.train_sampler.set_epoch(self.epoch)
        self.train_loader.generator.manual_seed(cfg.seed * 1009 + self.epoch)
        totals: dict[str, float] = {}
        count = images = nonfinite = consecutive = 0
        start = time.perf_counter()
        bar = tqdm(total=self.batches_per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                   disable=not self.is_main, leave=False, dynamic_ncols=True, file=sys.stderr)
        self.optimizer.zero_grad(set_to_none=True)
        try:  # close the bar on errors too, so that the CLI's one-line error starts its own line
            for i, batch in enumerate(self.train_loader):
                if i >= self.batches_per_epoch:
                    break
                images_b, masks, targets = move_batch(*batch, self.device)
                step_index, lr = self.step, self.optimizer.param_groups[-1]["lr"]
                # the forward pass updates BatchNorm statistics: a skipped step must not keep them
                buffers = [b.detach().clone() for b in self.model.buffers()]
                ok, losses, total = self.forward_losses(model, images_b, masks, targets, i)
                if ok:
                    self.scaler.scale(total / cfg.train.grad_accum).backward()
                    if (i + 1) % cfg.train.grad_accum == 0:
                        ok = self.optimizer_step()
                if not ok:
                    nonfinite += 1
                    consecutive += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for b, saved in zip(self.model.buffers(), buffers):
                            b.copy_(saved)
                    if consecutive >= cfg.train.max_nonfinite_steps:
                        raise TrainingError(
                            f"training stopped at epoch {self.epoch + 1} step {self.step}: {consecutive} non-finite "
                            f"steps in a row ({self.last_nonfinite}); the last good checkpoint is "
                            f"{self.run_dir / 'last.pt'}")
                    bar.update(1)
                    continue
                consecutive = 0
                count += 1
                images += images_b.shape[0]
                for key, value in summarize_losses(losses).items():
                    totals[key] = totals.get(key, 0.0) + value
                totals["loss"] = totals.get("loss", 0.0) + float(total.detach())
                if cfg.train.log_steps:  # every rank takes part in the mean; rank 0 writes it
                    mean_loss = dist.all_reduce_sum(float(total.detach()), self.device) / dist.world_size()
                    self.logger.log_step_record({"epoch": self.epoch + 1, "step": step_index, "loss": mean_loss,
                                                 "lr": lr})
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(total.detach()):.3f}", lr=f"{lr:.2e}",
                                img_s=f"{images * dist.world_size() / max(elapsed, 1e-9):.1f}")
                bar.update(1)
                if self.is_main and self.step % 20 == 0:
                    self.logger.log_step(self.step, {"loss": float(total.detach()), "lr": lr})
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        self.nonfinite_total += nonfinite
        stats = {f"train/{k}": v / max(count, 1) for k, v in totals.items()}
        stats = dist.all_reduce_mean_dict(stats, self.device)
        stats.update({
            "train/lr": self.optimizer.param_groups[-1]["lr"],
            "train/images_per_s": dist.all_reduce_sum(images, self.device) / max(elapsed, 1e-9),
            "train/nonfinite_steps": nonfinite,
            "time/epoch_s": elapsed,
        })
        if self.distiller is not None:
            stats["distill/ramp"] = self.distiller.ramp()
            stats["distill/ema_step"] = self.distiller.teacher.step
        return stats

    def forward_losses(self, model, images, masks, targets, batch_index):
        """One forward pass (teacher, then student) -> (finite?, loss dict, weighted total)."""
        cfg = self.cfg
        context = f"epoch {self.epoch + 1} step {self.step} batch {batch_index}"
        n_boxes = sum(len(t["labels"]) for t in targets)
        num_boxes = max(dist.all_reduce_sum(n_boxes, self.device) / dist.world_size(), 1.0)
        try:
            losses, total = compute_losses(model, self.criterion, self.distiller, images, masks, targets, num_boxes,
                                           cfg.train.amp, context)
        except TrainingError as err:  # non-finite matching cost
            self.last_nonfinite = str(err)
            losses, total = {}, None
        else:
            if not torch.isfinite(total):
                self.last_nonfinite = f"non-finite loss at {context}"
        finite = total is not None and bool(torch.isfinite(total))
        # ranks skip together: one rank leaving out backward() would leave DDP's gradient all-reduce hanging
        if not dist.all_true(finite, self.device):
            if finite:
                self.last_nonfinite = f"non-finite loss on another rank at {context}"
            return False, losses, total
        return True, losses, total

    def optimizer_step(self) -> bool:
        """Clip, step, schedule, EMA. False (and nothing changes) if the gradients are not finite."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.train.clip_grad if self.cfg.train.clip_grad > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not torch.isfinite(norm):
            self.last_nonfinite = f"non-finite gradient norm at epoch {self.epoch + 1} step {self.step}"
            self.scaler.update()
            return self.scaler.is_enabled()  # fp16: the scaler skipped the step and lowered its scale
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.distiller is not None:
            self.distiller.update(self.model)
        return True

    # ------------------------------------------------------------------ evaluation

    def evaluate_all(self) -> dict[str, float]:
        """COCO metrics and instability for the student (and the teacher)."""
        models = {"student": self.model}
        if self.distiller is not None:
            models["teacher"] = self.distiller.teacher.model
        out: dict[str, float] = {}
        coco_gt = self.val_set.coco_gt()
        for name, model in models.items():
            was_training = model.training
            metrics = evaluate(model, self.val_loader, self.device, coco_gt, self.val_set.label_to_cat_id,
                               self.cfg.eval.max_detections, self.cfg.train.amp)
            out.update({f"{name}/{k}": v for k, v in metrics.items() if k in METRIC_KEYS})
            current = probe_assignment(model, self.probe_loader, self.criterion.matcher, self.device)
            previous = self.previous_assignment.get(name)
            if previous is not None:
                out[f"{name}/instability"] = instability(previous, current)
            self.previous_assignment[name] = current
            model.train(was_training)
        return out

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
            "classes": {"names": list(self.train_set.class_names),
                        "label_to_cat_id": [int(c) for c in self.train_set.label_to_cat_id],
                        "categories": list(self.train_set.categories)},
            "model": self.model.state_dict(),
            "teacher": self.distiller.state_dict() if self.distiller else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "nonfinite_total": self.nonfinite_total,
            "previous_assignment": {k: {f"{i}:{g}": q for (i, g), q in v.items()}
                                    for k, v in self.previous_assignment.items()},
            "rng": rng_state(),
        }

    def save_checkpoints(self, record: dict[str, Any]) -> None:
        # every rank's RNG streams (augmentation, dropout), so that a resumed run continues each of them
        rank_rngs = dist.gather_objects(rng_state()) if dist.is_distributed() else None
        if not self.is_main:
            dist.barrier()
            return
        state = self.checkpoint_state()
        if rank_rngs is not None:
            state["rng_ranks"] = rank_rngs
        key = ("teacher" if self.distiller else "student") + "/AP"
        improved = key in record and record[key] > self.best
        if improved:
            self.best = record[key]
            state["best"] = self.best
        if self.cfg.train.keep_checkpoints > 0:
            atomic_save(state, self.run_dir / f"epoch_{self.epoch:03d}.pt")
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        if improved and self.cfg.train.save_best:
            atomic_save(state, self.run_dir / "best.pt")
        atomic_save(state, self.run_dir / "last.pt")
        dist.barrier()

    def load_checkpoint(self, path: Path) -> None:
        state = safe_load(path)
        self.model.load_state_dict(state["model"])
        if self.distiller is not None:
            if not state.get("teacher"):
                raise ConfigError(f"{path} has no EMA teacher; resume it with distill.enabled=false")
            self.distiller.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best = float(state["best"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.previous_assignment = {
            k: {(int(key.split(":")[0]), int(key.split(":")[1])): q for key, q in v.items()}
            for k, v in state.get("previous_assignment", {}).items()}
        rank_rngs = state.get("rng_ranks") or [state["rng"]]
        if len(rank_rngs) == dist.world_size():
            set_rng_state(rank_rngs[dist.rank()])
        else:  # another number of processes than the run had: continue rank 0's streams, fresh ones elsewhere
            set_rng_state(state["rng"])
            if dist.rank() > 0:
                seed_everything(self.cfg.seed + dist.rank() + 1_000_003 * self.epoch)


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
    """A fixed-width table of the COCO metrics of the student (and teacher) in ``record``."""
    header = f"{'model':<8}" + "".join(f"{k:>8}" for k in METRIC_KEYS)
    rows = [header]
    for name in ("student", "teacher"):
        if f"{name}/AP" in record:
            rows.append(f"{name:<8}" + "".join(f"{record[f'{name}/{k}']:>8.4f}" for k in METRIC_KEYS))
    return "\n".join(rows)


__all__ = ["Trainer", "format_ap_table", "resolve_device"]
