"""Why an OD-DETR step costs more than a baseline step on a GPU: per case, the step's wall time, its host
syncs (counted by source line with ``torch.cuda.set_sync_debug_mode``), its CUDA kernels (count and summed
GPU time, from ``torch.profiler``) and the host time per phase (``oddetr.*`` scopes).

    python benchmarks/gpu_step_probe.py --config tiny --amp bf16          # needs a CUDA device

A step whose wall time is far above its summed kernel time is bound by the host (kernel launches, Python,
syncs), not by the GPU's arithmetic.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import traceback
import warnings

import torch
from profile_steps import phase_times
from torch.profiler import ProfilerActivity, profile
from vs_hf import make_case, random_batch, run_settings

from oddetr.profiling import PREFIX

# ops that only make a view or an empty tensor: no kernel on a GPU
NO_KERNEL = {"aten::" + n for n in (
    "detach", "view", "reshape", "_reshape_alias", "as_strided", "transpose", "permute", "expand", "slice", "select",
    "unsqueeze", "squeeze", "t", "alias", "empty", "empty_like", "empty_strided", "unbind", "split", "chunk",
    "narrow", "view_as", "lift_fresh", "resolve_conj", "resolve_neg", "result_type", "is_nonzero", "unflatten",
    "flatten", "contiguous", "to", "numpy_T", "_unsafe_view", "split_with_sizes", "set_", "resize_")}


def kernel_ops(prof: profile) -> collections.Counter:
    """Leaf ``aten::`` ops (no aten op inside them) that are not views, per innermost ``oddetr.*`` scope: about
    the kernels the step launches on a GPU (host-side count, so it can be read on a CPU)."""
    counts: collections.Counter = collections.Counter()
    has_child = {id(ev.cpu_parent) for ev in prof.events() if ev.name.startswith("aten::") and ev.cpu_parent}
    for ev in prof.events():
        if not ev.name.startswith("aten::") or id(ev) in has_child or ev.name in NO_KERNEL:
            continue
        parent, scope_name = ev.cpu_parent, None
        while parent is not None and scope_name is None:
            if parent.name.startswith(PREFIX) and parent.name != PREFIX + "step":
                scope_name = parent.name[len(PREFIX):]
            parent = parent.cpu_parent
        counts[scope_name or "other"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=["tiny", "r50"])
    parser.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cases", nargs="+", default=["oddetr", "OD-DETR"])
    args = parser.parse_args()
    c = run_settings(args.config, args.device, args.amp)
    images, masks, targets = random_batch(c)
    cases = {name: make_case(name, c) for name in args.cases}
    sync = (lambda: torch.cuda.synchronize()) if c["device"].type == "cuda" else (lambda: None)
    for case in cases.values():
        for _ in range(3):
            case.train_step(images, masks, targets)
    sync()
    print(f"{args.config}, {args.device}, amp {args.amp}; median of {args.steps} steps")
    for name, case in cases.items():
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            case.train_step(images, masks, targets)
            sync()
            times.append(time.perf_counter() - t0)
        # host syncs of one step, by the innermost line of oddetr code that asked for them
        syncs: collections.Counter = collections.Counter()
        if c["device"].type == "cuda":
            def record(message, category, filename, lineno, file=None, line=None, counter=syncs):
                frames = [f for f in traceback.extract_stack() if "src/oddetr/" in f.filename]
                where = frames[-1] if frames else None
                counter[f"{where.filename.split('src/')[-1]}:{where.lineno}" if where else f"{filename}:{lineno}"] += 1
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                case.train_step(images, masks, targets)
                torch.cuda.set_sync_debug_mode("default")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.profiler.record_function(PREFIX + "step"):
                case.train_step(images, masks, targets)
            sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if kernels:
            gpu_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
        else:  # older profilers attach the kernels to the op that launched them
            kernels = [k for e in prof.events() for k in e.kernels]
            gpu_s = sum(k.duration for k in kernels) / 1e6
        print(f"\n## {name}: step {statistics.median(times) * 1e3:.1f} ms wall; {len(kernels)} GPU kernels/copies, "
              f"{gpu_s * 1e3:.1f} ms of GPU time; {sum(syncs.values())} host syncs")
        for where, n in syncs.most_common(12):
            print(f"   sync x{n}: {where}")
        ops = kernel_ops(prof)
        print(f"   {sum(ops.values())} leaf aten ops that are not views (~ GPU kernel launches), by phase: "
              + ", ".join(f"{k} {v}" for k, v in ops.most_common(14)))
        phases = phase_times(prof)
        print("   host time by phase (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in
                                                        sorted(phases.items(), key=lambda kv: -kv[1])[:14]))


if __name__ == "__main__":
    main()
