"""``oddetr train | eval | predict | export``: parse, build, call the engine. Errors print one line."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from oddetr import __version__
from oddetr.errors import ConfigError, OddetrError

USAGE = """oddetr COMMAND [--config FILE] [key=value ...]

commands:
  train     train a detector (default: deformable-detr-tiny on the embedded synthetic dataset)
  eval      evaluate a checkpoint: oddetr eval checkpoint=FILE [data.val.* keys]
  predict   draw and save detections: oddetr predict checkpoint=FILE images=DIR_OR_FILE output=DIR
  export    oddetr export checkpoint=FILE format=onnx|torchscript|export output=FILE [image_size=H,W]
  presets   list the built-in presets

examples:
  oddetr train model=deformable-detr-tiny train.epochs=10 output=runs/tiny
  oddetr train distill.enabled=true output=runs/od-detr
  oddetr train data.train.images=DIR data.train.annotations=FILE data.val.images=DIR data.val.annotations=FILE
  oddetr train data.train.format=voc data.train.root=VOC2007 data.train.split=trainval \\
               data.val.format=voc data.val.root=VOC2007 data.val.split=test
  oddetr train --resume output=runs/tiny
"""

# keys that belong to a command, not to the training config
COMMAND_KEYS = {
    "eval": {"checkpoint", "weights"},
    "predict": {"checkpoint", "weights", "images", "output", "score_threshold"},
    "export": {"checkpoint", "weights", "format", "output", "image_size"},
}


def _split_command_keys(command: str, overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    own, rest = {}, []
    for item in overrides:
        key = item.split("=", 1)[0]
        if key in COMMAND_KEYS.get(command, set()):
            own[key] = item.split("=", 1)[1] if "=" in item else ""
        else:
            rest.append(item)
    return own, rest


def _require(own: dict[str, str], key: str, command: str) -> str:
    if not own.get(key):
        raise ConfigError(f"oddetr {command} needs {key}=...")
    return own[key]


def cmd_train(args: argparse.Namespace) -> int:
    from oddetr.config import parse_overrides, resolve_config
    from oddetr.engine import distributed as dist
    from oddetr.engine.run_dir import read_run_config
    from oddetr.engine.trainer import Trainer, format_ap_table

    base = None
    if args.resume:
        output = parse_overrides(args.overrides).get("output")
        if output is None:
            raise ConfigError("--resume needs output=DIR naming the run to continue")
        base = read_run_config(Path(str(output)))
    cfg = resolve_config(args.config, args.overrides, base=base)
    try:
        trainer = Trainer(cfg, resume=args.resume)
        record = trainer.fit()
    finally:
        dist.cleanup()  # under torchrun: leave the process group cleanly, on errors too
    if trainer.is_main:
        print(format_ap_table(record))
        print(f"run directory: {trainer.run_dir}")
    return 0


def _eval_overrides(rest: list[str]) -> dict:
    from oddetr.config import parse_overrides

    return parse_overrides(rest)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from oddetr.engine.data import build_dataset, make_loader
    from oddetr.engine.evaluate import evaluate
    from oddetr.engine.inference import load_checkpoint_model
    from oddetr.engine.trainer import METRIC_KEYS, resolve_device

    own, rest = _split_command_keys("eval", args.overrides)
    path = _require(own, "checkpoint", "eval")
    overrides = _eval_overrides(rest)
    loaded = load_checkpoint_model(path, own.get("weights", "auto"), config_overrides=overrides)
    cfg = loaded.config
    device = resolve_device(cfg.device)
    loaded.model.to(device)
    dataset = build_dataset(cfg, "val", train=False)
    _check_classes(dataset, loaded)
    loader = make_loader(dataset, cfg.eval.batch_size, False, cfg.data.num_workers, cfg.seed)
    with torch.no_grad():
        metrics = evaluate(loaded.model, loader, device, dataset.coco_gt(), loaded.label_to_cat_id,
                           cfg.eval.max_detections, cfg.train.amp)
    print(f"evaluated {loaded.weights} weights of {path} (epoch {loaded.epoch}) on {len(dataset)} images",
          file=sys.stderr)
    print(json.dumps({k: metrics[k] for k in METRIC_KEYS}))
    return 0


def _check_classes(dataset, loaded) -> None:
    names = list(dataset.class_names)
    if names != loaded.class_names[: len(names)] or len(names) > len(loaded.class_names):
        raise ConfigError(f"the data's classes {names} differ from the checkpoint's {loaded.class_names}")


def cmd_predict(args: argparse.Namespace) -> int:
    from oddetr.api import Detector

    own, rest = _split_command_keys("predict", args.overrides)
    path = _require(own, "checkpoint", "predict")
    images = _require(own, "images", "predict")
    output = _require(own, "output", "predict")
    try:
        threshold = float(own.get("score_threshold", "0.3"))
    except ValueError:
        raise ConfigError(f"config key 'score_threshold' got {own['score_threshold']!r}, expected a number") from None
    detector = Detector.from_checkpoint(path, own.get("weights", "auto"), overrides=_eval_overrides(rest))
    written = detector.predict_files(images, output, threshold)
    print(f"wrote {len(written)} images and {Path(output) / 'detections.json'} "
          f"({detector.weights} weights)", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import yaml

    from oddetr.api import Detector

    own, rest = _split_command_keys("export", args.overrides)
    path = _require(own, "checkpoint", "export")
    output = _require(own, "output", "export")
    size = yaml.safe_load(own["image_size"]) if own.get("image_size") else None
    detector = Detector.from_checkpoint(path, own.get("weights", "auto"), device="cpu",
                                        overrides=_eval_overrides(rest))
    written = detector.export(output, own.get("format", "onnx"), size)
    print(f"wrote {written} ({own.get('format', 'onnx')}, {detector.weights} weights)", file=sys.stderr)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from oddetr.config import preset_names

    print("\n".join(preset_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oddetr", usage=USAGE, add_help=True)
    parser.add_argument("--version", action="version", version=f"oddetr {__version__}")
    sub = parser.add_subparsers(dest="command")
    for name, func in (("train", cmd_train), ("eval", cmd_eval), ("predict", cmd_predict), ("export", cmd_export),
                       ("presets", cmd_presets)):
        p = sub.add_parser(name)
        p.add_argument("--config", default=None, help="YAML config file (may name a preset with 'base:')")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue the run in output=DIR")
        p.add_argument("overrides", nargs="*", help="key=value overrides")
        p.set_defaults(func=func)
    return parser


def _one_line(err: BaseException) -> str:
    """The user-facing line of an error (DataLoader workers wrap messages in a traceback)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    for prefix in ("oddetr.errors.", ""):
        for cls in ("DataError: ", "ConfigError: ", "CheckpointError: ", "TrainingError: ", "OddetrError: "):
            if last.startswith(prefix + cls):
                return last[len(prefix + cls):]
    return last if len(lines) > 1 and "Traceback" in str(err) else lines[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage()
        return 2
    warnings.filterwarnings("default")
    try:
        return args.func(args)
    except OddetrError as err:
        print(f"oddetr {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"oddetr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
