"""Exit head: fused (Triton) against the eager reference and torch.compile of the reference.

Forward and forward+backward at the OccamResNet-18 exit shapes (DESIGN.md section 8), fp32
and bf16, peak memory in extra_info. `pytest bench/bench_exit_head.py` on a GPU.
"""
import pytest
import torch

from benchutils import (EXIT_SHAPES, ON_GPU, device, exit_head_implementation,
                        exit_head_inputs, exit_head_step, group_name, run_case, shrink,
                        synchronize)

BATCH, CLASSES = 128, 10


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", EXIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_exit_head(benchmark, impl, shape, dtype, mode):
    # a small shape with the same aspect on CPU (a smoke test)
    batch, (channels, height, width) = (BATCH if ON_GPU else 2), shrink(shape, not ON_GPU)
    h, weight, bias, labels, upstream = exit_head_inputs(
        batch, (channels, height, width), CLASSES, dtype, "contiguous", device(), seed=0)
    fn = exit_head_implementation(impl)
    backward = mode == "forward_backward"
    # forward+backward with fixed upstream gradients, returned rather than accumulated
    # (benchutils.exit_head_step): the op's own work, no loss kernels, no layout copy into .grad
    run = exit_head_step(fn, h, weight, bias, labels, upstream) if backward else \
        (lambda: fn(h, weight, bias, labels))

    def step():
        run()
        synchronize()

    benchmark.group = group_name(
        f"exit_head {mode} {'x'.join(map(str, shape))} {str(dtype).split('.')[-1]}",
        "x".join(map(str, (batch, channels, height, width))))
    run_case(benchmark, step, {"impl": impl, "shape": [batch, channels, height, width],
                               "classes": CLASSES, "dtype": str(dtype), "mode": mode,
                               # the floor of bytes moved: h read twice forward; backward reads
                               # h once and writes dh once
                               "floor_bytes": h.numel() * h.element_size() * (4 if backward else 2)})
