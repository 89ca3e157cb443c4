"""Checkpoints: atomic writes (temporary file, fsync, rename) and safe loads (weights only)."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oddetr.errors import CheckpointError


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
