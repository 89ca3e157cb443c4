"""Checkpoints: the train state as one object, atomic writes (temporary file, fsync, rename), safe loads.

Files in a run directory: ``last.pt`` holds :meth:`TrainState.state_dict` (everything a bit-identical
resume needs, also when written in the middle of an epoch); ``best.pt`` holds :meth:`TrainState.weights`
(the weights ``eval`` / ``predict`` / ``model.init_weights`` use, nothing else); ``epoch_<N>.pt``, when
``train.keep_checkpoints > 0``, is a hard link to that epoch's ``last.pt`` (the same bytes are never
written twice).
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oddetr.engine import distributed as dist
from oddetr.errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = "oddetr-checkpoint-v1"


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with torch.save to a temporary file beside ``path``, fsync, then rename.

    A process killed at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets the usual permissions
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``: tensors and plain containers only.

    A file carrying arbitrary pickled objects is refused (its code never runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # the unpickler's notes on pickle protocols: the outcome says it all
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain "
                              f"containers (weights_only load failed: {_reason(err)})") from None
    except Exception as err:  # a damaged file fails anywhere in the unpickler (IndexError, TypeError, ...)
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {_reason(err)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return obj


def _reason(err: BaseException) -> str:
    """The informative line of a torch.load error (not its boilerplate about the weights_only default)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(boilerplate)]
    line = (useful or lines or [type(err).__name__])[0]
    return line.removeprefix("WeightsUnpickler error: ") or type(err).__name__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors / plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` ``epoch_<N>.pt`` files (``last.pt`` and ``best.pt`` are never pruned)."""
    numbered = [f for f in run_dir.glob("epoch_*.pt") if f.stem[len("epoch_"):].isdigit()]
    files = sorted(numbered, key=lambda f: int(f.stem[len("epoch_"):]))  # by number: epoch_1000 after epoch_999
    for old in files[: max(0, len(files) - keep)]:
        old.unlink()


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes another name of ``source``'s bytes (a hard link; a copy where links fail)."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a file system without hard links
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class EpochProgress:
    """One rank's running totals of the epoch in progress (what a mid-epoch checkpoint must carry)."""

    batches: int = 0  # batches of this epoch done (the resumed epoch skips them)
    totals: dict[str, float] = field(default_factory=dict)  # summed loss terms of the finite batches
    count: int = 0  # finite batches
    images: int = 0  # images of the finite batches
    nonfinite: int = 0  # skipped batches
    consecutive: int = 0  # skipped batches in a row, up to now
    elapsed: float = 0.0  # seconds spent in the epoch before the checkpoint

    def add(self, finite: bool, losses: dict[str, float], images: int) -> None:
        """Count one batch: its scalar ``losses`` when finite, a skip otherwise."""
        self.batches += 1
        if not finite:
            self.nonfinite += 1
            self.consecutive += 1
            return
        self.consecutive = 0
        self.count += 1
        self.images += images
        for key, value in losses.items():
            self.totals[key] = self.totals.get(key, 0.0) + value


class TrainState:
    """Everything a resume restores, as one object: the trained modules (by reference) and the counters.

    :meth:`state_dict` is ``last.pt`` and :meth:`weights` is ``best.pt``. Both are collective under
    DDP (call them on every rank): each rank's RNG streams, epoch progress and BatchNorm buffers
    differ, and :meth:`state_dict` gathers them so that every rank continues its own.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: torch.amp.GradScaler, distiller: Any, meta: dict[str, Any]) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.distiller = distiller  # OnlineDistiller or None
        self.meta = meta  # config, num_classes, classes: what rebuilding the model needs
        self.epoch = 0  # completed epochs (= the index of the epoch in progress)
        self.step = 0  # optimiser steps taken
        self.best = -1.0  # best AP so far (the teacher's when distilling)
        self.nonfinite_total = 0  # skipped batches of the completed epochs
        self.previous_assignment: dict[str, dict] = {}  # instability probe: last evaluation's matching
        self.progress = EpochProgress()

    def _rank_state(self) -> dict[str, Any]:
        teacher = self.distiller.teacher.model if self.distiller is not None else None
        return {"rng": rng_state(), "progress": asdict(self.progress),
                "buffers": {"student": _buffers(self.model), "teacher": _buffers(teacher) if teacher else {}}}

    def state_dict(self) -> dict[str, Any]:
        """The full training state (``last.pt``)."""
        ranks = dist.gather_objects(self._rank_state())
        return {
            "format": CHECKPOINT_FORMAT, "contents": "train-state", **self.meta,
            "model": self.model.state_dict(),
            "teacher": self.distiller.state_dict() if self.distiller is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "best": self.best, "nonfinite_total": self.nonfinite_total,
            "previous_assignment": {k: {f"{i}:{g}": q for (i, g), q in v.items()}
                                    for k, v in self.previous_assignment.items()},
            "rng": ranks[0]["rng"],
            "rng_ranks": [r["rng"] for r in ranks],
            "progress_ranks": [r["progress"] for r in ranks],
            "buffer_ranks": [r["buffers"] for r in ranks] if len(ranks) > 1 else None,
        }

    def weights(self) -> dict[str, Any]:
        """What ``eval`` / ``predict`` / ``model.init_weights`` load (``best.pt``): the EMA teacher's weights
        when distilling, else the student's; no optimiser, no second model."""
        holder = "teacher" if self.distiller is not None else "student"
        model = self.distiller.teacher.model if self.distiller is not None else self.model
        return {"format": CHECKPOINT_FORMAT, "contents": "weights", "weights": holder, **self.meta,
                "model": model.state_dict(), "epoch": self.epoch, "step": self.step, "best": self.best}

    def load_state_dict(self, state: dict[str, Any], path: Path, seed: int) -> None:
        """Restore :meth:`state_dict` (``path`` for messages; ``seed`` reseeds ranks the run did not have)."""
        if state.get("contents") == "weights":
            raise ConfigError(f"--resume: {path} holds weights only (a best.pt); resume from a last.pt")
        self.model.load_state_dict(state["model"])
        if self.distiller is not None:
            if not state.get("teacher"):
                raise ConfigError(f"{path} has no EMA teacher; resume it with distill.enabled=false")
            self.distiller.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best, self.nonfinite_total = float(state["best"]), int(state.get("nonfinite_total", 0))
        self.previous_assignment = {
            k: {(int(key.split(":")[0]), int(key.split(":")[1])): q for key, q in v.items()}
            for k, v in state.get("previous_assignment", {}).items()}
        rngs = state.get("rng_ranks") or [state["rng"]]
        progress = state.get("progress_ranks") or [{}] * len(rngs)
        rank, world = dist.rank(), dist.world_size()
        if len(rngs) == world:
            set_rng_state(rngs[rank])
            self.progress = EpochProgress(**progress[rank])
            buffers = state.get("buffer_ranks")
            if buffers:  # this rank's BatchNorm statistics of the epoch in progress
                _load_buffers(self.model, buffers[rank]["student"])
                if self.distiller is not None:
                    _load_buffers(self.distiller.teacher.model, buffers[rank]["teacher"])
        elif progress[0].get("batches", 0):
            raise ConfigError(f"{path} was saved in the middle of an epoch by {len(rngs)} processes; "
                              f"resume it with {len(rngs)} processes, not {world}")
        else:  # another number of processes than the run had: continue rank 0's streams, fresh ones elsewhere
            set_rng_state(state["rng"])
            if rank > 0:
                seed_everything(seed + rank + 1_000_003 * self.epoch)


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.named_buffers()}


@torch.no_grad()
def _load_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, buffer in module.named_buffers():
        buffer.copy_(buffers[name])


def save_run_checkpoints(run_dir: Path, state: dict[str, Any], weights: dict[str, Any] | None,
                         epoch: int | None, keep: int) -> None:
    """Write ``last.pt`` (``state``), ``best.pt`` (``weights``, when given) and link ``epoch_<epoch>.pt``.

    ``epoch`` None: a mid-epoch checkpoint (``last.pt`` only). ``keep``: ``epoch_*.pt`` files kept.
    """
    atomic_save(state, run_dir / "last.pt")
    if epoch is not None and keep > 0:
        link_or_copy(run_dir / "last.pt", run_dir / f"epoch_{epoch:03d}.pt")
        prune_checkpoints(run_dir, keep)
    if weights is not None:
        atomic_save(weights, run_dir / "best.pt")
