"""``oddetr train | eval | predict | export | weights``: parse, build, call the engine. Errors print one line."""

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
  train     train a detector (default: deformable-detr-tiny with OD-DETR on the embedded synthetic dataset)
  eval      evaluate a checkpoint: oddetr eval checkpoint=FILE [data.val.* keys] [output=DIR]
            (writes results.json, per_class.json, pr_curve.png; default DIR: RUN/eval/<checkpoint name>)
  predict   draw and save detections: oddetr predict checkpoint=FILE images=DIR_OR_FILE output=DIR
            [annotations=COCO_JSON: write the dataset's image ids]
  export    oddetr export checkpoint=FILE format=onnx|torchscript|export output=FILE [image_size=H,W]
  weights   inspect weights (oddetr, Hugging Face, Deformable-DETR, DINO): oddetr weights PATH
            [output=FILE: convert them to an oddetr checkpoint for eval / predict / model.init_weights]
  presets   list the built-in presets

examples:
  oddetr train model=deformable-detr-tiny train.epochs=10 output=runs/tiny
  oddetr train distill.enabled=false output=runs/baseline
  oddetr train data.train.images=DIR data.train.annotations=FILE data.val.images=DIR data.val.annotations=FILE
  oddetr train data.train.format=voc data.train.root=VOC2007 data.train.split=trainval \\
               data.val.format=voc data.val.root=VOC2007 data.val.split=test
  oddetr train --resume output=runs/tiny
"""

# keys that belong to a command, not to the training config
COMMAND_KEYS = {
    "eval": {"checkpoint", "weights", "output", "overwrite"},
    "predict": {"checkpoint", "weights", "images", "output", "score_threshold", "annotations"},
    "export": {"checkpoint", "weights", "format", "output", "image_size"},
    "weights": {"output"},
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
    from oddetr.engine.preemption import PREEMPTED_EXIT, Preempted
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
    except Preempted as stop:  # SIGTERM: last.pt saved where the run stopped
        if dist.is_main_process():
            print(f"oddetr train: {stop}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
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
    import dataclasses

    import torch

    from oddetr.engine.compiled import compile_detector
    from oddetr.engine.cpu_memory import keep_freed_memory_on_cpu
    from oddetr.engine.data import build_dataset, make_loader
    from oddetr.engine.eval_report import default_eval_dir, prepare_eval_dir, write_eval_outputs
    from oddetr.engine.evaluate import gather_detections
    from oddetr.engine.inference import load_checkpoint_model
    from oddetr.engine.trainer import METRIC_KEYS, resolve_device
    from oddetr.evaluation.per_class import format_per_class_table

    own, rest = _split_command_keys("eval", args.overrides)
    path = _require(own, "checkpoint", "eval")
    overrides = _eval_overrides(rest)
    loaded = load_checkpoint_model(path, own.get("weights", "auto"), config_overrides=overrides)
    cfg = loaded.config
    out = Path(own["output"]) if own.get("output") else default_eval_dir(path)
    manifest = {"checkpoint": str(Path(path).resolve()), "weights": loaded.weights, "epoch": loaded.epoch,
                "data": dataclasses.asdict(cfg.data.val)}
    prepare_eval_dir(out, manifest, _flag(own, "overwrite"))
    device = resolve_device(cfg.device)
    keep_freed_memory_on_cpu(device, cfg.train.keep_freed_memory)
    loaded.model.to(device)
    if cfg.compile:
        compile_detector(loaded.model, cfg.compile_backend)
    dataset = build_dataset(cfg, "val", train=False, classes=loaded.class_names)  # the checkpoint's label space
    _check_classes(dataset, loaded)
    loader = make_loader(dataset, cfg.eval.batch_size, False, cfg.data.num_workers, cfg.seed)
    with torch.no_grad():
        detections = gather_detections(loaded.model, loader, device, dataset.label_to_cat_id,
                                       cfg.eval.max_detections, cfg.train.amp)
    report = write_eval_outputs(out, dataset.coco_gt(), detections, manifest)
    print(f"evaluated {loaded.weights} weights of {path} (epoch {loaded.epoch}) on {len(dataset)} images",
          file=sys.stderr)
    print(format_per_class_table(report.per_class), file=sys.stderr)
    print(f"wrote {', '.join(f.name for f in report.files)} to {out}", file=sys.stderr)
    print(json.dumps({k: report.metrics[k] for k in METRIC_KEYS}))
    return 0


def _flag(own: dict[str, str], key: str) -> bool:
    value = own.get(key, "false").lower()
    if value not in ("true", "false", ""):
        raise ConfigError(f"config key '{key}' got {own[key]!r}, expected true or false")
    return value in ("true", "")


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
    if detector.config.compile:
        detector.compile()
    written = detector.predict_files(images, output, threshold, own.get("annotations") or None)
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


def cmd_weights(args: argparse.Namespace) -> int:
    from oddetr.engine.weights import convert_weights, format_info, inspect_weights

    own, rest = _split_command_keys("weights", args.overrides)
    if len(rest) != 1 or "=" in rest[0]:
        raise ConfigError("usage: oddetr weights PATH [output=FILE] (PATH: a Hugging Face directory, an official "
                          "Deformable-DETR / DINO .pth or an oddetr checkpoint)")
    if own.get("output"):
        info, written = convert_weights(rest[0], own["output"])
        print(format_info(info))
        print(f"wrote {written} (an oddetr checkpoint: oddetr eval/predict checkpoint={written}, "
              f"model.init_weights={written})", file=sys.stderr)
    else:
        print(format_info(inspect_weights(rest[0])))
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
                       ("weights", cmd_weights), ("presets", cmd_presets)):
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
