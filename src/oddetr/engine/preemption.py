"""SIGTERM (what SLURM, Kubernetes and cloud schedulers send before killing a job): finish the step, save, stop.

The handler only sets a flag; the training loop looks at it after each optimiser step, writes
``last.pt`` (atomically, with the position in the epoch) and raises :class:`Preempted`, which
``oddetr train`` turns into one line on stderr and exit status :data:`PREEMPTED_EXIT`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch

from oddetr.engine import distributed as dist

# 128 + SIGTERM, the status of a process ended by SIGTERM: not success, so that schedulers that restart
# failed or preempted jobs (SLURM --requeue, Kubernetes restartPolicy, AWS Batch retries) restart it
PREEMPTED_EXIT = 128 + signal.SIGTERM


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint that ``--resume`` continues from."""


class StopOnSigterm:
    """``with StopOnSigterm() as stop:`` ... ``if stop.agreed(device):`` save and stop.

    Installs the handler only in the main thread (Python delivers signals there; elsewhere, e.g. a
    notebook's worker thread, SIGTERM keeps its default action) and restores the previous one on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def agreed(self, device: torch.device) -> bool:
        """True if any rank got SIGTERM (collective under DDP: every rank stops after the same step)."""
        return not dist.all_true(not self.requested, device)
