"""Entry point the DDP test starts under torchrun: ``oddetr.cli.main`` (what ``python -m oddetr`` runs), plus

- ``ODDETR_TEST_NAN_CALLS=3,5``: the guarded step's ``compute_losses`` returns a NaN total on those calls
  (1-based), on rank ``ODDETR_TEST_NAN_RANK`` (default 1) only;
- ``ODDETR_TEST_DUMP=DIR``: after ``fit``, each rank writes ``DIR/rank<R>.json`` with its epoch record and
  SHA-256 digests of its student's and teacher's state dicts (rank 1 writes no files of its own).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from oddetr.cli import main
from oddetr.engine import distributed as dist
from oddetr.engine import step as step_module
from oddetr.engine import trainer as trainer_module


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().flatten().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def install() -> None:
    nan_calls = {int(c) for c in os.environ.get("ODDETR_TEST_NAN_CALLS", "").split(",") if c}
    nan_rank = int(os.environ.get("ODDETR_TEST_NAN_RANK", "1"))
    real_losses, real_fit = step_module.compute_losses, trainer_module.Trainer.fit
    calls = [0]

    def compute_losses(*args, **kwargs):
        calls[0] += 1
        losses, total = real_losses(*args, **kwargs)
        if dist.rank() == nan_rank and calls[0] in nan_calls:
            total = total * float("nan")
        return losses, total

    def fit(self):
        record = real_fit(self)
        out = os.environ.get("ODDETR_TEST_DUMP")
        if out:
            teacher = self.distiller.teacher.model if self.distiller is not None else None
            info = {"record": record, "calls": calls[0], "student": digest(self.model),
                    "teacher": digest(teacher) if teacher is not None else None}
            with open(os.path.join(out, f"rank{dist.rank()}.json"), "w") as fh:
                json.dump(info, fh)
        return record

    step_module.compute_losses = compute_losses
    trainer_module.Trainer.fit = fit


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
