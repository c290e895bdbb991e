"""Device copy bandwidth, the yardstick bench/report.py divides achieved bandwidths by."""
import torch

from benchutils import ON_GPU, device, group_name, run_case, synchronize


def test_copy_bandwidth(benchmark):
    elements = (256 if ON_GPU else 4) * 2 ** 20
    source = torch.ones(elements, device=device())
    target = torch.empty_like(source)

    def step():
        target.copy_(source)
        synchronize()

    benchmark.group = group_name("copy", f"{elements * 4 // 2 ** 20} MiB")
    run_case(benchmark, step, {"impl": "copy", "floor_bytes": 2 * source.numel() * 4})
