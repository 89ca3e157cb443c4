"""Weights from other DETR codebases as an oddetr :class:`~oddetr.models.detector.DeformableDETR` state dict.

- :mod:`.rules`: the renaming rules from the official key layouts to oddetr's;
- :mod:`.hf`: Hugging Face transformers ``DeformableDetrForObjectDetection`` directories;
- :mod:`.official`: fundamentalvision/Deformable-DETR and IDEA-Research/DINO ``.pth`` checkpoints;
- :mod:`.adapt`: architecture checks against a config, ``model.*`` keys, another class count.

Nothing is ever downloaded; files are read with ``torch.load(weights_only=True)`` or ``safetensors``.
Every converter returns ``overrides``: the architecture the weights were trained with, shaped like
:class:`~oddetr.config.ModelConfig` (``{"d_model": 256, "backbone": {"name": "resnet50"}, ...}``), which
:func:`check_architecture` compares with a config.
"""

from oddetr.models.convert.adapt import (
    ARCH_KEYS,
    adapt_num_classes,
    check_architecture,
    class_dependent_keys,
    overrides_as_keys,
)
from oddetr.models.convert.hf import (
    convert_hf_deformable_detr,
    hf_overrides,
    load_hf_pretrained,
    read_safetensors,
)
from oddetr.models.convert.official import (
    convert_official_deformable_detr,
    convert_official_dino,
    read_official_checkpoint,
    to_official_layout,
)
from oddetr.models.convert.rules import swap_xy_blocks

__all__ = [
    "ARCH_KEYS", "adapt_num_classes", "check_architecture", "class_dependent_keys", "convert_hf_deformable_detr",
    "convert_official_deformable_detr", "convert_official_dino", "hf_overrides", "load_hf_pretrained",
    "overrides_as_keys", "read_official_checkpoint", "read_safetensors", "swap_xy_blocks", "to_official_layout",
]
