"""oddetr vs Hugging Face transformers' Deformable-DETR: training step and inference, side by side.

    pip install 'oddetr[hf]'                           # transformers, optional; nothing is downloaded
    OMP_NUM_THREADS=1 python benchmarks/vs_hf.py --configs tiny
    python benchmarks/vs_hf.py                         # tiny and r50
    python benchmarks/vs_hf.py --teacher-amp bf16      # also OD-DETR with its teacher pass in bf16
    python benchmarks/vs_hf.py --compile --compile-hf  # also both libraries under torch.compile (Inductor)
    python benchmarks/vs_hf.py --device cuda --amp bf16  # on a GPU, both libraries under bf16 autocast
    python benchmarks/vs_hf.py --keep-freed-memory       # both with malloc keeping freed memory (as oddetr's trainer)

Configs (the same in both libraries, random init, ResNet backbone frozen, 4 feature levels, box
refinement, per-layer auxiliary losses, AdamW, gradient clipping 0.1, dropout 0):

- ``tiny``: ResNet-18, d=128, 8 heads, FFN 1024, 3 + 3 layers, 100 queries, batch 4 at 256 px
- ``r50``:  ResNet-50, d=256, 8 heads, FFN 1024, 6 + 6 layers, 300 queries, batch 2 at 512 px

A train step is forward, Hungarian matching, losses, backward, clip and optimiser step (OD-DETR
adds its teacher pass, extra groups and EMA update: oddetr's own :class:`GuardedStep`). Inference is
an eval-mode forward pass under ``torch.inference_mode`` (no post-processing), oddetr's with the
backbone's norms folded into its convolutions, as ``oddetr predict`` loads a model (``eval.fuse_norms``;
a line below the table gives the unfused pass, timed in the same loop). The three models of a
config (HF, oddetr baseline, oddetr OD-DETR) are timed in ONE process with their steps interleaved,
median over ``--steps``, so machine load hits them alike; peak memory is each case's peak RSS (CPU)
in its own short subprocess (build, one warm-up step, one step); on a GPU, the peak of
``torch.cuda.max_memory_allocated`` instead, and every timed step ends with a device synchronisation.
``--amp bf16`` runs both libraries' training and inference under bf16 autocast (oddetr: ``train.amp=bf16``;
its deformable attention and matching stay float32, as transformers' do). HF's backbone is its own
``ResNetConfig`` model (``use_timm_backbone=False``, ``use_pretrained_backbone=False``): no hub, no timm.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_common import random_batch as random_boxes_batch

from oddetr.engine.cpu_memory import keep_freed_memory
from oddetr.engine.evaluate import autocast_context, move_batch

CONFIGS = {
    "tiny": dict(backbone="resnet18", d_model=128, layers=3, queries=100, batch=4, size=256),
    "r50": dict(backbone="resnet50", d_model=256, layers=6, queries=300, batch=2, size=512),
}
NUM_CLASSES = 80
BOXES = 10
HEADS, FFN, LEVELS, POINTS = 8, 1024, 4, 4


PRESET = "model=deformable-detr-r50"  # oddetr's side starts from this preset, changed by oddetr_overrides


def oddetr_overrides(c: dict) -> list[str]:
    """The config keys that give oddetr the same model and training as transformers' side of config ``c``."""
    layers = c["layers"]
    return [
        f"model.backbone.name={c['backbone']}", "model.backbone.trainable_layers=0", "model.backbone.norm=frozen_bn",
        f"model.d_model={c['d_model']}", f"model.nheads={HEADS}", f"model.enc_layers={layers}",
        f"model.dec_layers={layers}", f"model.dim_feedforward={FFN}", "model.dropout=0.0",
        f"model.num_feature_levels={LEVELS}", f"model.enc_points={POINTS}", f"model.dec_points={POINTS}",
        f"model.num_queries={c['queries']}", "model.box_refine=true", "train.clip_grad=0.1"]


def random_batch(c: dict, seed: int = 0):
    """images (B, 3, S, S), masks (B, S, S) True on padding, targets (labels (G,), boxes (G, 4) cxcywh),
    on ``c["device"]``."""
    images, masks, targets = random_boxes_batch(c["batch"], c["size"], BOXES, NUM_CLASSES, seed)
    return move_batch(images, masks, targets, c["device"])


def run_settings(config: str, device: str, amp: str) -> dict:
    """The config's sizes plus where and in which precision both libraries run."""
    return {**CONFIGS[config], "device": torch.device(device), "amp": amp}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFCase:
    """transformers' DeformableDetrForObjectDetection with its own loss, AdamW and clipping."""

    def __init__(self, c: dict, compiled: bool = False) -> None:
        import transformers

        r18 = c["backbone"] == "resnet18"
        backbone = transformers.ResNetConfig(
            layer_type="basic" if r18 else "bottleneck", depths=[2, 2, 2, 2] if r18 else [3, 4, 6, 3],
            hidden_sizes=[64, 128, 256, 512] if r18 else [256, 512, 1024, 2048],
            out_features=["stage2", "stage3", "stage4"])
        config = transformers.DeformableDetrConfig(
            use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
            d_model=c["d_model"], encoder_layers=c["layers"], decoder_layers=c["layers"],
            encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
            encoder_n_points=POINTS, decoder_n_points=POINTS, num_feature_levels=LEVELS,
            num_queries=c["queries"], with_box_refine=True, two_stage=False, auxiliary_loss=True,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, num_labels=NUM_CLASSES)
        torch.manual_seed(0)
        self.model = transformers.DeformableDetrForObjectDetection(config).to(c["device"]).train()
        self.autocast = lambda: autocast_context(c["device"], c["amp"])
        for p in self.model.model.backbone.parameters():
            p.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=2e-4, weight_decay=1e-4)
        if compiled:  # what a user of transformers gets from torch.compile (Inductor, default options)
            self.model.compile()

    def train_step(self, images, masks, targets) -> None:
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        with self.autocast():
            out = self.model(pixel_values=images, pixel_mask=(~masks).long(), labels=labels)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 0.1)
        self.optimizer.step()

    def infer(self, images, masks) -> None:
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            self.model(pixel_values=images, pixel_mask=(~masks).long())
        self.model.train()


class OddetrCase:
    """oddetr's trainer step (GuardedStep), distillation on or off."""

    def __init__(self, c: dict, distill: bool, extra: tuple[str, ...] = (), compiled: bool = False) -> None:
        from oddetr.config import resolve_config
        from oddetr.distill.distiller import OnlineDistiller
        from oddetr.engine.checkpoint import TrainState
        from oddetr.engine.compiled import compile_detector
        from oddetr.engine.optim import build_optimizer, build_scheduler
        from oddetr.engine.step import GuardedStep
        from oddetr.losses.criterion import SetCriterion
        from oddetr.models.detector import build_model

        cfg = resolve_config(overrides=[PRESET, *oddetr_overrides(c), f"train.amp={c['amp']}",
                                        f"distill.enabled={str(distill).lower()}", *extra])
        torch.manual_seed(0)
        device = c["device"]
        self.model = build_model(cfg.model, NUM_CLASSES).to(device).train()
        self.autocast = lambda: autocast_context(device, c["amp"])
        criterion = SetCriterion(cfg.loss)
        distiller = OnlineDistiller(self.model, cfg, criterion, total_steps=1000) if distill else None
        optimizer = build_optimizer(self.model, cfg)
        state = TrainState(self.model, optimizer, build_scheduler(optimizer, 1000, cfg),
                           torch.amp.GradScaler(device.type, enabled=False), distiller, {})
        self.step = GuardedStep(state, None, criterion, cfg.train, device)
        self.compiled, self.deployed = compiled, None
        if compiled:  # as the trainer does with compile=true
            compile_detector(self.model, "inductor", "oddetr")
            if distiller is not None:
                compile_detector(distiller.teacher.model, "inductor", "its teacher")

    def train_step(self, images, masks, targets) -> None:
        if not self.step(images, masks, targets, True, "benchmark").finite:
            raise RuntimeError("non-finite step")

    def infer(self, images, masks, fused: bool = True) -> None:
        """One pass as ``oddetr predict`` runs it: eval mode, the backbone's norms folded into its
        convolutions (``eval.fuse_norms``; a copy of the model, made once). ``fused=False`` or a compiled
        case: the training model itself in eval mode."""
        if fused and not self.compiled:
            if self.deployed is None:
                self.deployed = copy.deepcopy(self.model).eval()
                self.deployed.backbone.fuse_norms()
            with torch.inference_mode(), self.autocast():
                self.deployed(images, masks)
            return
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            self.model(images, masks)
        self.model.train()


CASES = ("HF", "oddetr", "OD-DETR")
# --teacher-amp bf16: OD-DETR with its teacher pass under bf16 autocast, timed (training) beside the others
TEACHER_AMP_CASE = "OD-DETR, {} teacher"


# inference only: oddetr's baseline model with its norms left unfused (eval.fuse_norms=false)
UNFUSED = "oddetr, norms unfused"

# --compile / --compile-hf: the same models under torch.compile (Inductor), timed beside the eager ones
COMPILED = ", compiled"


def make_case(name: str, c: dict):
    compiled = name.endswith(COMPILED)
    base = name.removesuffix(COMPILED)
    if base == "HF":
        return HFCase(c, compiled)
    if base.startswith("OD-DETR, "):
        return OddetrCase(c, distill=True, extra=(f"distill.teacher_amp={base.split()[1]}",))
    return OddetrCase(c, distill=base == "OD-DETR", compiled=compiled)


def case_names(teacher_amp: str = "none", compile_oddetr: bool = False, compile_hf: bool = False) -> list[str]:
    return [*CASES, *([TEACHER_AMP_CASE.format(teacher_amp)] if teacher_amp != "none" else []),
            *([f"HF{COMPILED}"] if compile_hf else []),
            *([f"oddetr{COMPILED}", f"OD-DETR{COMPILED}"] if compile_oddetr else [])]


def timing(c: dict, steps: int, warmup: int, names: list[str]) -> dict:
    """Median train-step and inference seconds of the cases, interleaved in this process (compiled cases
    compile during the warm-up)."""
    images, masks, targets = random_batch(c)
    cases = {name: make_case(name, c) for name in names}
    train = {n: [] for n in cases}
    infer = {n: [] for n in cases}
    for i in range(warmup + steps):
        for name, case in cases.items():
            t0 = time.perf_counter()
            case.train_step(images, masks, targets)
            synchronize(c["device"])
            if i >= warmup:
                train[name].append(time.perf_counter() - t0)
    for i in range(warmup + steps):
        for name, case in cases.items():
            if name.startswith("OD-DETR,"):
                continue  # OD-DETR's variants deploy OD-DETR's model (compiled: the compiled baseline's)
            t0 = time.perf_counter()
            case.infer(images, masks)
            synchronize(c["device"])
            if i >= warmup:
                infer[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cases["oddetr"].infer(images, masks, fused=False)
        synchronize(c["device"])
        if i >= warmup:
            infer.setdefault(UNFUSED, []).append(time.perf_counter() - t0)
    return {"train": {n: statistics.median(v) for n, v in train.items()},
            "infer": {n: statistics.median(v) for n, v in infer.items() if v}}


def memory(c: dict, name: str) -> float:
    """Peak MB of one case (run in its own process): build, one warm-up step, one step. CPU: peak RSS;
    GPU: peak of the memory PyTorch allocated on the device."""
    images, masks, targets = random_batch(c)
    case = make_case(name, c)
    for _ in range(2):
        case.train_step(images, masks, targets)
    if c["device"].type == "cuda":
        return torch.cuda.max_memory_allocated(c["device"]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace, payload: dict) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--device", args.device, "--amp", args.amp,
           *(["--keep-freed-memory"] if args.keep_freed_memory else []), "--child", json.dumps(payload)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{payload} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--teacher-amp", default="none", choices=["none", "bf16", "fp16"],
                        help="also time OD-DETR with distill.teacher_amp set to this")
    parser.add_argument("--compile", action="store_true",
                        help="also time oddetr and OD-DETR with compile=true (torch.compile, Inductor)")
    parser.add_argument("--compile-hf", action="store_true", help="also time HF under torch.compile")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"],
                        help="both libraries under this autocast (training and inference)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure each case's peak memory in its own process (--no-memory: timings only)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="both libraries' processes with glibc malloc set to keep freed memory, as oddetr's "
                             "trainer sets it on CPU (train.keep_freed_memory); default: the system's settings")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: this C library is not glibc")
    if args.child:
        p = json.loads(args.child)
        c = run_settings(p["config"], args.device, args.amp)
        if p["kind"] == "timing":
            print(json.dumps(timing(c, p["steps"], p["warmup"], p["names"])))
        else:
            print(json.dumps({"peak_mb": memory(c, p["case"])}))
        return
    where = (f"{torch.cuda.get_device_name(args.device)}, amp {args.amp}" if args.device.startswith("cuda")
             else f"CPU, {args.threads} thread(s), amp {args.amp}")
    peak = "peak allocated GPU memory" if args.device.startswith("cuda") else "peak RSS"
    allocator = "malloc keeping freed memory" if args.keep_freed_memory else "the system's malloc settings"
    print(f"{where}; train / inference: median of {args.steps} interleaved steps after "
          f"{args.warmup} warm-up; {peak} per case in its own process; {allocator}")
    print("| config | HF train / infer | oddetr train / infer | oddetr / HF train, infer | "
          "OD-DETR train | OD-DETR / baseline step | peak MB HF / oddetr / OD-DETR | OD-DETR / baseline memory |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        names = case_names(args.teacher_amp, args.compile, args.compile_hf)
        t = child(args, {"kind": "timing", "config": config, "steps": args.steps, "warmup": args.warmup,
                         "names": names})
        mem = {name: child(args, {"kind": "memory", "config": config, "case": name})["peak_mb"] if args.memory
               else float("nan") for name in CASES}
        tr, inf = t["train"], t["infer"]
        c = CONFIGS[config]
        label = (f"{c['backbone'].replace('resnet', 'R')}, d={c['d_model']}, {c['layers']}+{c['layers']} layers, "
                 f"{c['queries']} queries, B={c['batch']} @ {c['size']} px")
        print(f"| {label} | {tr['HF']:.2f} s / {inf['HF']:.2f} s | {tr['oddetr']:.2f} s / {inf['oddetr']:.2f} s | "
              f"{tr['oddetr'] / tr['HF']:.2f}x, {inf['oddetr'] / inf['HF']:.2f}x | {tr['OD-DETR']:.2f} s | "
              f"{tr['OD-DETR'] / tr['oddetr']:.2f}x | {mem['HF']:.0f} / {mem['oddetr']:.0f} / {mem['OD-DETR']:.0f} | "
              f"{mem['OD-DETR'] / mem['oddetr']:.2f}x |", flush=True)
        print(f"|   oddetr inference with its norms unfused (eval.fuse_norms=false): {inf[UNFUSED]:.2f} s, "
              f"{inf[UNFUSED] / inf['HF']:.2f}x HF; fused / unfused {inf['oddetr'] / inf[UNFUSED]:.2f}x | | | | | | | |",
              flush=True)
        if args.teacher_amp != "none":
            name = TEACHER_AMP_CASE.format(args.teacher_amp)
            print(f"|   {name}: train {tr[name]:.2f} s, {tr[name] / tr['oddetr']:.2f}x baseline step, "
                  f"{tr[name] / tr['HF']:.2f}x HF | | | | | | | |", flush=True)
        if args.compile_hf:
            name = f"HF{COMPILED}"
            print(f"|   HF, torch.compile: train {tr[name]:.2f} s, infer {inf[name]:.2f} s "
                  f"({tr[name] / tr['HF']:.2f}x, {inf[name] / inf['HF']:.2f}x HF eager) | | | | | | | |", flush=True)
        if args.compile:
            o, od = f"oddetr{COMPILED}", f"OD-DETR{COMPILED}"
            hf_best_train = min(tr["HF"], tr.get(f"HF{COMPILED}", float("inf")))
            hf_best_infer = min(inf["HF"], inf.get(f"HF{COMPILED}", float("inf")))
            print(f"|   oddetr, compile=true: train {tr[o]:.2f} s, infer {inf[o]:.2f} s ({tr[o] / tr['oddetr']:.2f}x, "
                  f"{inf[o] / inf['oddetr']:.2f}x eager oddetr; {tr[o] / hf_best_train:.2f}x, "
                  f"{inf[o] / hf_best_infer:.2f}x HF's faster mode); OD-DETR {tr[od]:.2f} s, "
                  f"{tr[od] / tr[o]:.2f}x the compiled baseline step | | | | | | | |", flush=True)
        print(json.dumps({"config": config, **t, "peak_mb": mem}))


if __name__ == "__main__":
    main()
