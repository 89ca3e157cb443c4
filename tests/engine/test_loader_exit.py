"""A process whose DataLoader iterator is still alive at exit exits promptly (no hang, no error).

Our loader workers ignore SIGTERM (a scheduler's SIGTERM must not kill them before the main process
saves); ``multiprocessing`` stops daemonic children at exit with SIGTERM and then waits, so without
``oddetr.engine.data``'s exit hook such a process waited forever. Oracle: the child process's exit
status and time."""

import os
import signal
import subprocess
import sys

import pytest

SCRIPT = """
import torch
from oddetr.engine.data import make_loader

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.zeros(3, 8, 8), {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4),
                                      "image_id": i}

iterator = iter(make_loader(Items(), batch_size=2, shuffle=False, num_workers=2, seed=0))
next(iterator)  # workers running; the iterator stays referenced until the interpreter exits
print("exiting", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers ignore SIGTERM on Linux only")
def test_exit_with_a_live_loader_iterator_does_not_hang():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its loader workers
        proc.communicate()
        pytest.fail("the process did not exit within 90 s of finishing its script (loader workers left alive)")
    assert proc.returncode == 0, err[-2000:]
    assert "exiting" in out
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
