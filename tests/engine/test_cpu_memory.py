"""keep_freed_memory: large buffers come from malloc's heap and stay there once freed.

Oracle: glibc's own accounting (``mallinfo2``: bytes in mmap-served blocks, free bytes held in the
heap). Each case runs in its own interpreter, since malloc settings are process-wide."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, json, sys, torch
from oddetr.engine.cpu_memory import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
buffer = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB
alive = libc.mallinfo2()
del buffer
freed = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped_alive": alive.hblkhd, "free_in_heap_after": freed.fordblks}))
"""
MIB = 2**20


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True)
    if out.returncode != 0 and "mallinfo2" in out.stderr:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_large_buffers_come_from_the_heap_and_stay_there():
    system, kept = _run("system"), _run("keep")
    # the system's settings serve a 64 MiB buffer with mmap and unmap it when freed
    assert system["mmapped_alive"] >= 64 * MIB
    assert system["free_in_heap_after"] < 64 * MIB
    # kept: served from the heap, and the freed 64 MiB stays in it for the next step
    assert kept["applied"] is True
    assert kept["mmapped_alive"] < 64 * MIB
    assert kept["free_in_heap_after"] >= 64 * MIB


@pytest.mark.parametrize("enabled", [True, False])
def test_inference_entry_points_keep_freed_memory_on_cpu_as_configured(monkeypatch, enabled):
    """The Python API's Detector (and so ``oddetr predict``) follows ``train.keep_freed_memory`` on a CPU,
    as the trainer does (``oddetr eval``: tests/test_cli.py); a GPU device never changes malloc."""
    import torch

    from oddetr.api import Detector
    from oddetr.engine import cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    small = {"d_model": 32, "enc_layers": 1, "dec_layers": 1, "num_queries": 5, "dim_feedforward": 32,
             "train.keep_freed_memory": enabled}
    Detector.from_preset("deformable-detr-tiny", num_classes=2, device="cpu", **small)
    assert calls == ([1] if enabled else [])
    assert cpu_memory.keep_freed_memory_on_cpu(torch.device("cuda"), True) is False
    assert calls == ([1] if enabled else [])
