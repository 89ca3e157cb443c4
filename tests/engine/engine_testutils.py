"""Helpers shared by the engine tests: tiny training runs on the synthetic set, JSONL and state comparisons.

The model keys come from ``tests/conftest.py`` (the ``tiny_keys`` fixture); these add the data and
the few keys that keep a run directory small (MobileNetV3-small: 16 MB checkpoints instead of 180 MB).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# small checkpoints, no epoch_*.pt / best.pt copies unless a test asks for them
FAST_KEYS = ["model.backbone.name=mobilenet_v3_small", "train.keep_checkpoints=0", "train.save_best=false"]


def synthetic_keys(root: Path, num_train: int = 8, num_val: int = 4, image_size: int = 64,
                   max_objects: int = 4) -> list[str]:
    """Overrides for the embedded synthetic shapes set, generated once under ``root``."""
    return [f"data.synthetic.root={root}", f"data.synthetic.num_train={num_train}",
            f"data.synthetic.num_val={num_val}", f"data.synthetic.image_size={image_size}",
            f"data.synthetic.max_objects={max_objects}"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_timing_key(key: str) -> bool:
    """Keys that measure wall-clock time, the only ones allowed to differ between equal runs."""
    return key.startswith("time/") or key == "train/images_per_s"


def without_timing(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not is_timing_key(k)}


def unequal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors are not bit-identical (or that only one of the two state dicts has)."""
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in a or k not in b or not torch.equal(a[k], b[k])]


def assert_same_training_state(a: dict, b: dict, epoch: int, step: int) -> None:
    """Two ``last.pt`` states at the same (epoch, step) with bit-identical student, EMA teacher (and its
    step counter), optimiser state and scheduler."""
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (epoch, step)
    assert unequal_tensors(a["model"], b["model"]) == []
    assert a["teacher"]["step"] == b["teacher"]["step"] == step
    assert unequal_tensors(a["teacher"]["model"], b["teacher"]["model"]) == []
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    assert all(unequal_tensors(opt_a[i], opt_b[i]) == [] for i in opt_a)
    assert a["scheduler"] == b["scheduler"]


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
