"""Checkpoints: a kill during a save leaves the old file; loads never run pickled code; pruning by epoch."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from oddetr.cli import main
from oddetr.engine.checkpoint import atomic_save, prune_checkpoints, safe_load
from oddetr.engine.run_dir import prepare_run_dir
from oddetr.errors import CheckpointError

# ---------------------------------------------------------------------------------------------- atomic save

SAVER = textwrap.dedent("""
    import sys
    import torch
    from oddetr.engine.checkpoint import atomic_save
    state = {"model": {"w": torch.full((50_000_000,), 7.0)}, "epoch": 2}  # 200 MB of float32
    print("ready", flush=True)
    while True:
        atomic_save(state, sys.argv[1])
""")


def test_sigkill_during_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    old = {"model": {"w": torch.arange(10.0)}, "epoch": 1}
    atomic_save(old, path)
    before = path.read_bytes()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 120
        partial: list[Path] = []
        while time.monotonic() < deadline:  # kill once the temporary file has data in it: mid-write
            partial = [p for p in tmp_path.glob(".last.pt.*.tmp") if p.stat().st_size > 1 << 20]
            if partial:
                break
            assert proc.poll() is None, "the saving process ended on its own"
            time.sleep(0.001)
        assert partial, "the temporary file never appeared"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    # what the kill left: the old checkpoint untouched, the new one half-written under a hidden name
    assert path.read_bytes() == before
    loaded = safe_load(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], old["model"]["w"])
    leftovers = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < 200_000_000
    with pytest.raises(CheckpointError):
        safe_load(leftovers[0])

    # resuming the run directory clears the leftover; the checkpoint stays
    prepare_run_dir(tmp_path, resume=True, overwrite=False)
    assert list(tmp_path.glob(".*.tmp")) == [] and path.read_bytes() == before


def test_atomic_save_replaces_and_uses_the_usual_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_save({"a": torch.zeros(2)}, path)
    atomic_save({"a": torch.ones(2)}, path)
    assert torch.equal(safe_load(path)["a"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


class Unsaveable:
    def __reduce__(self):
        raise RuntimeError("this object cannot be saved")


def test_atomic_save_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, path)
    with pytest.raises(RuntimeError, match="cannot be saved"):
        atomic_save({"epoch": 2, "bad": Unsaveable()}, path)
    assert safe_load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_prune_keeps_the_newest_epochs_by_number(tmp_path: Path) -> None:
    for epoch in (1, 2, 3, 998, 999, 1000):
        atomic_save({"epoch": epoch}, tmp_path / f"epoch_{epoch:03d}.pt")
    for name in ("last.pt", "best.pt", "epoch_final.pt"):
        atomic_save({}, tmp_path / name)
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "epoch_1000.pt", "epoch_999.pt", "epoch_final.pt", "last.pt"]
    prune_checkpoints(tmp_path, 5)  # fewer than keep: nothing goes
    assert len(list(tmp_path.glob("epoch_*.pt"))) == 3


def test_training_keeps_the_newest_k_epoch_checkpoints(tmp_path: Path, tiny_keys, capsys) -> None:
    run = tmp_path / "run"
    keys = tiny_keys("model.backbone.name=mobilenet_v3_small", "data.synthetic.num_train=4",
                     "data.synthetic.num_val=2", "data.synthetic.image_size=64", "data.synthetic.max_objects=3",
                     f"data.synthetic.root={tmp_path / 'synthetic'}", "train.max_steps_per_epoch=1",
                     "train.instability_probe=2", "train.epochs=3", "train.keep_checkpoints=2",
                     "train.save_best=false", f"output={run}")
    assert main(["train", *keys]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in run.glob("*.pt")) == ["epoch_002.pt", "epoch_003.pt", "last.pt"]
    assert safe_load(run / "epoch_003.pt")["epoch"] == 3


# ---------------------------------------------------------------------------------------------- safe load


class RunsCode:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        safe_load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path, writer: str, capsys, stderr_lines) -> None:
    marker = tmp_path / "MARKER"
    payload = {"format": "oddetr-checkpoint-v1", "model": {"w": torch.ones(2)}, "config": RunsCode(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    message = _one_line_error(path)
    assert message.startswith(f"refusing to load {path}")
    assert "weights_only" in message and "set to `False`" not in message  # no advice to load it unsafely
    assert not marker.exists()

    capsys.readouterr()
    assert main(["eval", f"checkpoint={path}"]) != 0
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("oddetr eval: error: refusing to load") and str(path) in lines[0]
    assert not marker.exists()


def test_truncated_and_damaged_checkpoints_give_one_line_errors(tmp_path: Path, capsys, stderr_lines) -> None:
    good = tmp_path / "good.pt"
    atomic_save({"model": {"w": torch.arange(1000.0)}, "epoch": 3}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    for cut in (0, 10, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        bad.write_bytes(data[:cut])
        assert "corrupt or unreadable checkpoint" in _one_line_error(bad)
    bad.write_bytes(b"not a checkpoint at all")
    _one_line_error(bad)
    torch.save([1, 2, 3], bad)  # loadable, but not a checkpoint dict
    assert "does not hold a dict" in _one_line_error(bad)
    # damaged bytes in the pickle stream (torch does not check the zip CRCs): never a traceback, whatever
    # the unpickler trips over (KeyError, IndexError, UnicodeDecodeError, ... besides UnpicklingError)
    rng = random.Random(0)
    refused = 0
    for _ in range(300):
        damaged = bytearray(data)
        for _ in range(5):
            damaged[rng.randrange(40, 400)] = rng.randrange(256)
        bad.write_bytes(bytes(damaged))
        try:
            safe_load(bad)
        except CheckpointError as err:
            assert "\n" not in str(err)
            refused += 1
    assert refused > 250
    _one_line_error(tmp_path / "missing.pt")

    bad.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["eval", f"checkpoint={bad}"]) != 0
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "corrupt or unreadable checkpoint" in lines[0]
