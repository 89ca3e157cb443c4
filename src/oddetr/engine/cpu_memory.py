"""Keep freed memory inside the process on CPU runs (glibc ``malloc`` settings).

A CPU training step allocates and frees tensors of tens of megabytes. glibc's ``malloc`` serves
blocks above its mmap threshold with fresh ``mmap`` pages and returns freed heap tops to the system,
so every step page-faults those buffers back in: at the R50 config of ``benchmarks/vs_hf.py`` that
was about 40% of a step (docs/RESULTS.md). :func:`keep_freed_memory` sets ``malloc`` to serve every
block from the heap and to keep freed memory for reuse, as jemalloc or tcmalloc would. The process's
resident memory then stays at its peak instead of shrinking between steps.

Inference gains too: run alone in a process, the tiny config of ``benchmarks/vs_hf.py`` page-faulted
about 90-210 MiB per forward pass with the system's settings (R50: 1.4 GiB). :func:`keep_freed_memory_on_cpu` is what
the trainer, ``oddetr eval``/``predict`` and :class:`oddetr.api.Detector` call (config key
``train.keep_freed_memory``).
"""

from __future__ import annotations

import ctypes
import sys

import torch

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# never return the heap's free top to the system (mallopt takes an int: the largest it accepts)
TRIM_THRESHOLD = 2**31 - 1
# grow the heap in 64 MiB steps
TOP_PAD = 64 * 2**20

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc ``malloc`` to keep freed memory (no mmap-served blocks, no heap trimming) for the rest
    of this process and the processes it forks. Returns True if set (now or before), False where the
    C library is not glibc (macOS, Windows, musl), which leaves allocation as it was."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    return _applied


def keep_freed_memory_on_cpu(device: torch.device, enabled: bool) -> bool:
    """:func:`keep_freed_memory` when ``device`` is a CPU and ``enabled`` (``train.keep_freed_memory``);
    returns whether the setting is in force."""
    return device.type == "cpu" and enabled and keep_freed_memory()
