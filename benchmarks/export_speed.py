"""CPU inference time of an exported model: ONNX Runtime vs PyTorch, side by side in one process.

    OMP_NUM_THREADS=2 python benchmarks/export_speed.py          # deformable-detr-tiny @ 128, -r50 @ 800
    python benchmarks/export_speed.py --presets deformable-detr-tiny --repeats 20

For each preset (random weights, 80 classes for r50 and 6 for the tiny preset, batch 1) the
:class:`oddetr.export.ExportableDetector` (model + top-k postprocessing, plain tensors) is timed in
PyTorch (eval, ``torch.inference_mode``) and as the ONNX file ``oddetr export`` writes, run by ONNX
Runtime on the CPU with the same thread count. Runs alternate between the two runtimes after
warm-up runs; the table gives the median (and min) wall time per image and the max abs difference
of the boxes (pixels). Needs ``pip install oddetr[export]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_SIZES = {"deformable-detr-tiny": 128, "deformable-detr-r50": 800}


def bench(preset: str, size: int, repeats: int, warmup: int, threads: int) -> dict:
    import onnxruntime as ort
    import torch

    from oddetr.config import resolve_config
    from oddetr.export import ExportableDetector, export_detector
    from oddetr.models.detector import build_model

    torch.manual_seed(0)
    cfg = resolve_config(overrides=[f"model={preset}"])
    model = build_model(cfg.model, 80 if "r50" in preset else 6).eval()
    wrapper = ExportableDetector(model, cfg.eval.max_detections).eval()
    images = torch.rand(1, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_detector(model, Path(tmp) / "model.onnx", "onnx", (size, size), cfg.eval.max_detections)
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}

    def run_torch():
        with torch.inference_mode():
            return wrapper(images)

    def run_ort():
        return session.run(None, feed)

    for _ in range(warmup):
        run_torch()
        run_ort()
    times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
    for _ in range(repeats):
        for name, fn in (("pytorch", run_torch), ("onnxruntime", run_ort)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    diff = float((torch.from_numpy(run_ort()[0]) - run_torch()[0]).abs().max())
    return {"preset": preset, "size": size, "export_s": export_s, "box_diff": diff,
            **{f"{k}_median": statistics.median(v) for k, v in times.items()},
            **{f"{k}_min": min(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--size", type=int, default=None, help="image side (default: 128 tiny, 800 r50)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per runtime (default 20 tiny, 5 r50)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    import torch

    threads = torch.get_num_threads()
    rows = []
    for preset in args.presets:
        size = args.size or DEFAULT_SIZES.get(preset, 128)
        repeats = args.repeats or (5 if size >= 512 else 20)
        rows.append(bench(preset, size, repeats, args.warmup, threads))
        rows[-1]["repeats"] = repeats
    print(f"CPU inference, batch 1, {threads} threads (torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}); median (min) ms per image")
    header = f"{'preset':<22}{'size':>6}{'runs':>6}{'PyTorch':>20}{'ONNX Runtime':>20}{'ORT/PT':>8}{'box diff px':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        pt = f"{r['pytorch_median'] * 1e3:.1f} ({r['pytorch_min'] * 1e3:.1f})"
        ox = f"{r['onnxruntime_median'] * 1e3:.1f} ({r['onnxruntime_min'] * 1e3:.1f})"
        ratio = r["onnxruntime_median"] / r["pytorch_median"]
        print(f"{r['preset']:<22}{r['size']:>6}{r['repeats']:>6}{pt:>20}{ox:>20}{ratio:>8.2f}{r['box_diff']:>13.2e}")


if __name__ == "__main__":
    main()
