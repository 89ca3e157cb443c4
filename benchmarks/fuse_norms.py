"""What folding the backbone's batch norms into its convolutions (``eval.fuse_norms``) saves at inference.

    python benchmarks/fuse_norms.py --configs tiny r50 --passes 30

For each vs_hf.py config (random init, frozen BatchNorm): the backbone alone at that config's batch and
image size, then the whole detector (eval-mode forward under ``torch.inference_mode``, as
``oddetr predict`` runs it), each fused and unfused, their passes interleaved in one process so that
machine load hits both alike; median seconds after 3 warm-up passes, with freed memory kept (as
``oddetr predict`` sets on a CPU). Also the largest output difference the fold makes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import vs_hf

from oddetr.engine.cpu_memory import keep_freed_memory
from oddetr.models.backbone import Backbone

WARMUP = 3


def interleaved(passes: int, **runs) -> dict[str, float]:
    """Median seconds of each named zero-argument callable, called in turn ``passes`` times."""
    times = {name: [] for name in runs}
    for i in range(WARMUP + passes):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def backbone_row(config: str, passes: int) -> str:
    c = vs_hf.CONFIGS[config]
    torch.manual_seed(0)
    plain = Backbone(c["backbone"], return_strides=(8, 16, 32), trainable_layers=0, norm="frozen_bn").eval()
    fused = copy.deepcopy(plain)
    fused.fuse_norms()
    images = torch.randn(c["batch"], 3, c["size"], c["size"])
    diff = max((a - b).abs().max().item() for a, b in zip(plain(images), fused(images)))
    t = interleaved(passes, unfused=lambda: plain(images), fused=lambda: fused(images))
    return (f"| {config} | backbone ({c['backbone']}, B={c['batch']} @ {c['size']} px) | {t['unfused']:.4f} | "
            f"{t['fused']:.4f} | {t['fused'] / t['unfused']:.3f}x | {diff:.1e} |")


def detector_row(config: str, passes: int) -> str:
    c = vs_hf.run_settings(config, "cpu", "none")
    images, masks, _ = vs_hf.random_batch(c)
    case = vs_hf.make_case("oddetr", c)
    case.infer(images, masks)  # builds the fused copy
    with torch.inference_mode():
        case.model.eval()
        diff = (case.model(images, masks).pred_logits - case.deployed(images, masks).pred_logits).abs().max().item()
    t = interleaved(passes, unfused=lambda: case.infer(images, masks, fused=False),
                    fused=lambda: case.infer(images, masks))
    return (f"| {config} | whole detector | {t['unfused']:.4f} | {t['fused']:.4f} | "
            f"{t['fused'] / t['unfused']:.3f}x | {diff:.1e} (logits) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "r50"], choices=list(vs_hf.CONFIGS))
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    print(f"CPU, {args.threads} thread(s), freed memory kept: {kept}; median of {args.passes} interleaved passes "
          f"after {WARMUP} warm-up")
    print("| config | what | unfused s | fused s | fused / unfused | largest output difference |")
    print("|---|---|---|---|---|---|")
    for config in args.configs:
        print(backbone_row(config, args.passes), flush=True)
        print(detector_row(config, args.passes), flush=True)


if __name__ == "__main__":
    main()
