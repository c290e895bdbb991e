"""Compaction: occam_kernels.compact against x[mask] and nonzero + index_select.

Stage-output shapes of OccamResNet-18 at 160 px with B=256, keep ratios 0.1/0.5/0.9, fp32 and
bf16; host syncs per call counted with torch.cuda.set_sync_debug_mode on a GPU.
"""
import pytest
import torch

from benchutils import (COMPACT_IMPLEMENTATIONS, ON_GPU, STAGE_SHAPES, count_host_syncs, device,
                        group_name, run_case, shrink, synchronize)

BATCH = 256


def scaled(shape):
    """(B, C, H, W): the stage shape at B=256 on a GPU, the smoke shape at B=8 otherwise."""
    return (BATCH if ON_GPU else 8, *shrink(shape, not ON_GPU))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("keep_ratio", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", STAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(COMPACT_IMPLEMENTATIONS))
def test_compact(benchmark, impl, shape, keep_ratio, dtype):
    full = scaled(shape)
    generator = torch.Generator().manual_seed(0)
    dev = device()
    x = torch.randn(full, generator=generator).to(dev, dtype)
    keep = (torch.rand(full[0], generator=generator) < keep_ratio).to(dev)
    index = torch.arange(full[0], device=dev)
    fn = COMPACT_IMPLEMENTATIONS[impl]

    def step():
        fn(x, keep, index)
        synchronize()

    benchmark.group = group_name(f"compact {'x'.join(map(str, shape))} keep={keep_ratio} {dtype}",
                                 "x".join(map(str, full)))
    syncs = count_host_syncs(lambda: fn(x, keep, index))
    kept = int(keep.sum())
    run_case(benchmark, step, {
        "impl": impl, "shape": list(full), "dtype": str(dtype), "keep_ratio": keep_ratio,
        "host_syncs": syncs,
        # read the kept rows once and write them once
        "floor_bytes": 2 * kept * x[0].numel() * x.element_size()})
