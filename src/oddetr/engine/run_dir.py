"""The run directory: refuse to clobber, write the resolved config, log metrics (JSONL + TensorBoard)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from oddetr.errors import ConfigError


def prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Create ``path``; an existing non-empty one is refused unless resuming or ``overwrite=true``."""
    if resume:
        if not (path / "last.pt").is_file():
            raise ConfigError(f"--resume: no checkpoint {path / 'last.pt'} to resume from")
        for stale in path.glob(".*.pt.*.tmp"):  # half-written checkpoints of a run killed while saving
            stale.unlink()
        return
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output={path} is a file, not a directory")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {path} exists and is not empty; pass --resume to continue "
                              "that run, overwrite=true to replace it, or another output=DIR")
        if not (path / "config.yaml").is_file():  # overwrite=true deletes runs, never other folders
            raise ConfigError(f"overwrite=true: refusing to delete {path}: it is not an oddetr run directory "
                              "(no config.yaml); pick another output=DIR")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def write_config(path: Path, config: dict[str, Any]) -> None:
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def read_run_config(path: Path) -> dict[str, Any]:
    file = path / "config.yaml"
    if not file.is_file():
        raise ConfigError(f"--resume: {file} not found")
    return yaml.safe_load(file.read_text())


class MetricsLogger:
    """Appends one JSON object per epoch to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(path / "tensorboard"))

    def _append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """One JSON object per line; non-finite floats become null (strict JSON)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path / name, "a") as fh:
            fh.write(json.dumps(clean) + "\n")

    def log_epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append_jsonl("metrics.jsonl", record)
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"step/{key}", value, step)

    def log_step_record(self, record: dict[str, Any]) -> None:
        """Append one optimiser step's record (``epoch``, ``step``, ``loss``, ...) to ``steps.jsonl``."""
        if self.enabled:
            self._append_jsonl("steps.jsonl", record)

    def truncate_after(self, epoch: int, step: int | None = None) -> None:
        """On resume, drop records of epochs after the checkpoint's (a run killed mid-way), and step
        records from ``step`` on (the steps a mid-epoch checkpoint does not hold)."""
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "steps.jsonl"):
            file = self.path / name
            if not file.is_file():
                continue
            lines = [ln for ln in file.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if _field(ln, "epoch") <= epoch
                    or (name == "steps.jsonl" and step is not None and _field(ln, "step") < step)]
            file.write_text("".join(ln + "\n" for ln in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _field(line: str, key: str) -> float:
    """``key`` of a JSONL record; a line cut short by a killed run counts as after every epoch and step."""
    try:
        return json.loads(line).get(key, 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf
