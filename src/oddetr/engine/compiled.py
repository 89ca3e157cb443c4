"""``torch.compile`` for the detector, as the ``compile`` / ``compile_backend`` config keys ask."""

from __future__ import annotations

import copy
import sys

from torch import nn


def compile_detector(model: nn.Module, backend: str, name: str = "model") -> nn.Module:
    """Compile ``model`` in place (``nn.Module.compile``) and return it.

    Its parameters, buffers, ``state_dict`` keys and checkpoints stay the eager module's, so EMA updates,
    saving, resuming and export see no difference. The deformable attention's sampling stays one opaque
    ATen call under compilation (:func:`oddetr.models.ms_deform_attn.bilinear_grid_sample`). Each new
    input shape and each train/eval switch compiles once more (dynamic shapes after the second size).
    """
    model.compile(backend=backend)
    print(f"torch.compile ({backend}): {name} compiles on its first passes of each mode and image size",
          file=sys.stderr, flush=True)
    return model


def eager_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that runs eagerly. (A copied ``nn.Module.compile`` wrapper would still call
    the *original* module's forward, so every module's compiled call is dropped from the copy.)"""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        module._compiled_call_impl = None
    return copied
