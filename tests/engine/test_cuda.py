"""oddetr on a CUDA device: the deformable attention, a training run (fp32, bf16 and fp16 autocast), resume,
and a GPU checkpoint used on a CPU. The oracle is the same computation on the CPU.

These tests need a GPU and are skipped on machines without one (CI); they are run on a GPU machine with
``python -m pytest tests/engine/test_cuda.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from engine_testutils import FAST_KEYS, read_jsonl, synthetic_keys

from oddetr.api import Detector
from oddetr.cli import main
from oddetr.engine.checkpoint import safe_load
from oddetr.models.ms_deform_attn import ms_deform_attn_reference, multi_scale_deformable_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# dropout draws from a device's own generator (CPU and CUDA streams differ): off, so both devices agree
RUN_KEYS = [*FAST_KEYS, "model.dropout=0.0", "distill.enabled=true", "train.epochs=2", "train.max_steps_per_epoch=3",
            "train.log_steps=true"]


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in convolutions and matrix products, so that CUDA float32 is comparable with the CPU."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_deformable_attention_on_cuda_matches_the_cpu_oracle(dtype, tol) -> None:
    shapes = torch.tensor([[9, 11], [5, 6], [3, 3]])
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    g = torch.Generator().manual_seed(0)
    value = torch.randn(2, s, 4, 8, generator=g, dtype=dtype)
    loc = torch.rand(2, 7, 4, 3, 4, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    weights = torch.rand(2, 7, 4, 3, 4, generator=g, dtype=dtype)
    cpu = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    gpu = [t.cuda().requires_grad_(True) for t in (value, loc, weights)]
    out_ref = ms_deform_attn_reference(cpu[0], shapes, cpu[1], cpu[2])
    out = multi_scale_deformable_attention(gpu[0], shapes.cuda(), gpu[1], gpu[2])
    assert out.device.type == "cuda" and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), out_ref, rtol=tol, atol=tol)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grads_ref = torch.autograd.grad(out_ref, cpu, grad_out)
    grads = torch.autograd.grad(out, gpu, grad_out.cuda())
    for name, a, b in zip(("value", "locations", "weights"), grads, grads_ref):
        torch.testing.assert_close(a.cpu(), b, rtol=tol * 10, atol=tol * 10, msg=f"gradient w.r.t. {name}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_keys) -> Path:
    """The same 2-epoch, 6-step OD-DETR run on the CPU and on the GPU (fp32, bf16, fp16 autocast), and the GPU
    run stopped after epoch 1 and resumed; each in ``root / <name>``."""
    root = tmp_path_factory.mktemp("cuda")
    keys = tiny_keys(*synthetic_keys(root / "synthetic"), *RUN_KEYS)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for name, extra in {"cpu": ["device=cpu"], "cuda": ["device=cuda"],
                        "bf16": ["device=cuda", "train.amp=bf16"], "fp16": ["device=cuda", "train.amp=fp16"],
                        "resumed": ["device=cuda", "train.epochs=1"]}.items():
        assert main(["train", *keys, *extra, f"output={root / name}"]) == 0, name
    assert main(["train", "--resume", f"output={root / 'resumed'}", "train.epochs=2"]) == 0
    return root


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "steps.jsonl")]


def test_a_gpu_run_follows_the_cpu_run(runs) -> None:
    cpu, cuda = losses(runs / "cpu"), losses(runs / "cuda")
    assert len(cpu) == len(cuda) == 6
    assert cuda[0] == pytest.approx(cpu[0], rel=1e-4)  # same weights, same batch: the forward pass
    # later steps add the updates' rounding (AdamW's first steps are about lr * sign(gradient))
    assert cuda == pytest.approx(cpu, rel=2e-2)
    assert safe_load(runs / "cuda" / "last.pt")["teacher"]["step"] == 6


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_runs_train_near_the_float32_run(runs, amp) -> None:
    run, reference = losses(runs / amp), losses(runs / "cuda")
    assert len(run) == 6 and all(math.isfinite(v) for v in run)
    assert run[0] == pytest.approx(reference[0], rel=5e-2)
    state = safe_load(runs / amp / "last.pt")
    if amp == "fp16":  # the GradScaler took part and is saved for resume
        assert state["scaler"]["scale"] > 0


def test_resume_on_the_gpu_continues_the_run(runs) -> None:
    full, resumed = read_jsonl(runs / "cuda" / "steps.jsonl"), read_jsonl(runs / "resumed" / "steps.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    # CUDA's grid_sample backward adds with atomics: equal up to their rounding, not bit for bit
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], rel=1e-3)


def test_a_gpu_checkpoint_predicts_the_same_on_the_cpu(runs) -> None:
    on_gpu = Detector.from_checkpoint(runs / "cuda" / "last.pt", device="cuda")
    on_cpu = Detector.from_checkpoint(runs / "cuda" / "last.pt", device="cpu")
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 64, 80, dtype=torch.bool)
    with torch.inference_mode():
        out_gpu, out_cpu = on_gpu.model(images.cuda(), masks.cuda()), on_cpu.model(images, masks)
    torch.testing.assert_close(out_gpu.pred_logits.cpu(), out_cpu.pred_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_gpu.pred_boxes.cpu(), out_cpu.pred_boxes, rtol=1e-4, atol=1e-4)
    detections = on_gpu.predict(list(images), score_threshold=0.0)
    assert len(detections) == 2 and all(len(d.scores) > 0 for d in detections)
