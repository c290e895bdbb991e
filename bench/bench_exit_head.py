"""Exit head: fused (Triton) against the eager reference and torch.compile of the reference.

Forward and forward+backward at the OccamResNet-18 exit shapes (DESIGN.md section 8), fp32
and bf16, peak memory in extra_info. `pytest bench/bench_exit_head.py` on a GPU.
"""
import pytest
import torch

import occam_kernels
from occam_kernels import exit_head_reference

from benchutils import EXIT_SHAPES, ON_GPU, CompiledForOneCase, device, run_case, synchronize

BATCH, CLASSES = 128, 10


def scaled(shape):
    """The case's shape on a GPU; a small one with the same aspect on CPU (a smoke test)."""
    channels, height, width = shape
    if ON_GPU:
        return BATCH, channels, height, width
    return 2, max(1, channels // 29), max(1, height // 8), max(1, width // 8)


def implementation(name):
    if name == "fused":
        return lambda h, w, b, y: occam_kernels.exit_head(h, w, b, y, backend="triton")
    if name == "eager":
        return exit_head_reference
    # A fresh compile per case that raises rather than time eager. Inductor on a GPU; on CPU
    # the smoke run only proves the compiled path runs.
    return CompiledForOneCase(exit_head_reference, "inductor" if ON_GPU else "aot_eager")


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", EXIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_exit_head(benchmark, impl, shape, dtype, mode):
    batch, channels, height, width = scaled(shape)
    generator = torch.Generator().manual_seed(0)
    dev = device()
    h = torch.relu(torch.randn(batch, channels, height, width, generator=generator)).to(dev, dtype)
    weight = (torch.randn(CLASSES, channels, generator=generator) / channels ** 0.5).to(dev, dtype)
    bias = torch.zeros(CLASSES, device=dev, dtype=dtype)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator).to(dev)
    fn = implementation(impl)
    backward = mode == "forward_backward"
    for t in (h, weight, bias):
        t.requires_grad_(backward)

    def step():
        logits, pooled, supp = fn(h, weight, bias, labels)
        if backward:
            (logits.float().logsumexp(1).mean() + supp.float().mean()
             + pooled.float().mean()).backward()
            h.grad = weight.grad = bias.grad = None
        synchronize()

    group = f"exit_head {mode} {'x'.join(map(str, shape))} {str(dtype).split('.')[-1]}"
    benchmark.group = group
    run_case(benchmark, step, {"impl": impl, "shape": [batch, channels, height, width],
                               "classes": CLASSES, "dtype": str(dtype), "mode": mode,
                               # the floor of bytes moved: h read twice forward; backward reads
                               # h once and writes dh once
                               "floor_bytes": h.numel() * h.element_size() * (4 if backward else 2)})
