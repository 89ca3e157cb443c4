"""Inference of one vs_hf.py config run alone in its process, with the system's malloc settings or with
freed memory kept (what ``oddetr eval``, ``oddetr predict`` and the API's ``Detector`` set on a CPU).

    python benchmarks/inference_alone.py --configs tiny r50

``benchmarks/vs_hf.py`` times every case in one process, where the other library's allocations
change glibc's mmap threshold for everyone. This script runs each (config, library, allocator)
case in a fresh interpreter, as ``oddetr predict`` runs, and reports the median eval-mode forward
(``torch.inference_mode``) and the minor page faults per pass (``getrusage``): memory the pass
obtained from the kernel anew.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def measure(config: str, library: str, keep: bool, steps: int, warmup: int, threads: int) -> dict:
    """In this process: build the case, optionally keep freed memory, time ``steps`` inference passes."""
    import vs_hf

    from oddetr.engine.cpu_memory import keep_freed_memory

    torch.set_num_threads(threads)
    applied = keep_freed_memory() if keep else False
    c = vs_hf.run_settings(config, "cpu", "none")
    images, masks, _ = vs_hf.random_batch(c)
    case = vs_hf.make_case(library, c)
    for _ in range(warmup):
        case.infer(images, masks)
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        case.infer(images, masks)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"seconds": statistics.median(times), "faults": statistics.median(faults), "kept": applied}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny"], choices=["tiny", "r50"])
    parser.add_argument("--libraries", nargs="+", default=["oddetr"], choices=["oddetr", "HF"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    print(f"inference alone in its process, {args.threads} thread(s), median of {args.steps} after {args.warmup} "
          "warm-up; minor page faults per pass (x 4 KiB)")
    print("| config | library | malloc | inference s | page faults |")
    print("|---|---|---|---|---|")
    for config in args.configs:
        for library in args.libraries:
            for keep in (False, True):
                payload = dict(config=config, library=library, keep=keep, steps=args.steps, warmup=args.warmup,
                               threads=args.threads)
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(payload)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"{payload} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                malloc = "freed memory kept" if r["kept"] else "system settings"
                print(f"| {config} | {library} | {malloc} | {r['seconds']:.3f} | {r['faults']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
