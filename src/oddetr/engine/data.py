"""Build datasets and loaders from the config (COCO, VOC, or the embedded synthetic set)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from oddetr.config import Config, DataSplitConfig
from oddetr.data.coco import CocoDetection
from oddetr.data.collate import collate_detection
from oddetr.data.synthetic import generate_synthetic_coco
from oddetr.data.transforms import build_transforms
from oddetr.data.voc import VocDetection, voc_class_names
from oddetr.errors import DataError


def synthetic_paths(cfg: Config) -> dict[str, str]:
    """Generate (once, deterministically) the synthetic COCO dataset and return its paths."""
    s = cfg.data.synthetic
    root = Path(s.root).expanduser()
    return generate_synthetic_coco(root, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size,
                                   seed=s.seed, min_objects=s.min_objects, max_objects=s.max_objects)


def build_dataset(cfg: Config, split: str, train: bool, transforms_on: bool = True,
                  classes: Sequence[str] | None = None) -> Dataset:
    """The ``data.train`` or ``data.val`` dataset; ``train`` picks the augmentation.

    Class names: ``classes`` (e.g. a checkpoint's), else ``data.classes``, else the format's own: COCO's
    categories, VOC's names read from the training split (:func:`training_class_names`), so that the
    validation split has the training split's label space.
    """
    d = cfg.data
    if classes is None:
        classes = d.classes if d.classes is not None or split == "train" else training_class_names(cfg)
    spec: DataSplitConfig = getattr(d, split)
    transforms = build_transforms(train=train, scales=d.scales, max_size=d.max_size, crop=d.crop,
                                  crop_scales=d.crop_scales, crop_min=d.crop_min, crop_max=d.crop_max,
                                  flip=d.flip, eval_size=d.image_size) if transforms_on else \
        build_transforms(train=False, scales=d.scales, max_size=d.max_size, eval_size=d.image_size)
    if spec.format == "synthetic":
        paths = synthetic_paths(cfg)
        return CocoDetection(paths[f"{split}_images"], paths[f"{split}_annotations"], transforms=transforms,
                             classes=classes)
    if spec.format == "coco":
        return CocoDetection(spec.images, spec.annotations, transforms=transforms, classes=classes)
    if spec.format == "voc":
        return VocDetection(spec.root, spec.split, transforms=transforms, classes=classes)
    raise DataError(f"unknown data format {spec.format!r} for data.{split}")


def training_class_names(cfg: Config) -> list[str] | None:
    """``data.classes``, else the class names a VOC training split's objects give; None for COCO / synthetic
    training data (their categories come with the annotation file)."""
    if cfg.data.classes is not None:
        return list(cfg.data.classes)
    train = cfg.data.train
    if train.format == "voc":
        return voc_class_names(train.root, train.split)
    return None


def check_same_categories(train_set: Dataset, val_set: Dataset) -> None:
    """Training and validation must share one label space: the same class names in the same order (each
    split maps its own category ids to the labels)."""
    if train_set.class_names != val_set.class_names:
        raise DataError("data.train and data.val have different categories: "
                        f"{[c['name'] for c in train_set.categories]} vs {[c['name'] for c in val_set.categories]}")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                sampler: torch.utils.data.Sampler | None = None, drop_last: bool = False) -> DataLoader:
    if num_workers > 0:
        _stop_workers_at_exit()
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate_detection,
                      generator=generator, drop_last=drop_last, persistent_workers=False,
                      worker_init_fn=_seed_worker)


_EXIT_HOOK_REGISTERED = False


def _stop_workers_at_exit() -> None:
    """Register (once) :func:`_kill_loader_workers` to run at interpreter exit.

    At exit, ``multiprocessing`` sends SIGTERM to its daemonic children and waits for them. Our loader
    workers ignore SIGTERM (:func:`_seed_worker`), so a worker whose iterator is still referenced then
    (by an exception's traceback after a failed epoch, a preempted run, a notebook variable) would make
    the process wait for it forever. ``atexit`` runs handlers last-registered first, so this one runs
    before ``multiprocessing``'s (registered when torch imported it)."""
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        import atexit

        atexit.register(_kill_loader_workers)
        _EXIT_HOOK_REGISTERED = True


def _kill_loader_workers() -> None:
    """Stop the daemonic child processes still alive before ``multiprocessing``'s exit hook joins them.

    Those that ignore SIGTERM (our loader workers, which hold no state to save) get SIGKILL. The others
    get the SIGTERM ``multiprocessing`` would send them next, sent here so that a loader worker still
    starting cannot escape it: such a worker did not ignore SIGTERM yet when this hook used to look,
    ignored it by the time ``multiprocessing`` sent it, and the process waited for it forever (1 to 3
    exits in 20-30 hung on a loaded 2-core machine). A child that ignores SIGTERM after it is sent
    is killed too."""
    import multiprocessing
    import signal

    children = [c for c in multiprocessing.active_children() if c.daemon]
    if not children:
        return
    # torch's SIGCHLD handler would report each killed worker as a failure: the process is exiting
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        if _ignores_sigterm(child.pid):
            child.kill()
        else:
            child.terminate()
    for child in children:
        child.join(timeout=2)
        if child.is_alive() and _ignores_sigterm(child.pid):
            child.kill()
            child.join(timeout=10)


def _ignores_sigterm(pid: int | None) -> bool:
    """Whether process ``pid`` ignores SIGTERM (Linux: the ``SigIgn`` mask in ``/proc/PID/status``)."""
    import signal

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _seed_worker(worker_id: int) -> None:
    import random
    import signal
    import sys

    import numpy as np

    # a scheduler's SIGTERM reaches every process of the job: the main process saves and then shuts the
    # workers down; a worker dying of it first would fail the batch the checkpoint waits for. (Linux only,
    # where _kill_loader_workers can tell these workers apart at exit: elsewhere SIGTERM keeps its default.)
    if sys.platform.startswith("linux"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
