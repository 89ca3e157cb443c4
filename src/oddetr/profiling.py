"""Named ``torch.profiler`` scopes around the phases of a step (``benchmarks/profile.py`` reads them).

Outside a profiler a scope costs a few microseconds; while the model is traced, exported or compiled
it is left out, so exported graphs carry no profiler ops.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.profiler import record_function

PREFIX = "oddetr."


def scope(name: str) -> AbstractContextManager:
    """``with scope("decoder"): ...`` -> a ``record_function("oddetr.decoder")`` scope (or nothing while tracing)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() \
            or torch.onnx.is_in_onnx_export():
        return nullcontext()
    return record_function(PREFIX + name)
