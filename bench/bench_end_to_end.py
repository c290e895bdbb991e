"""End to end: an OccamResNet-18 training step (fused against reference exit heads, fp32 and
bf16 autocast) and early-exit inference (compaction against every exit on every sample) at
forced exit distributions, each with its FLOPs (bench/inference_ceiling.py). Images per second =
batch / mean time (bench/report.py)."""
import json
import os

import pytest

from benchutils import (BATCH, BENCH_DIR, DISTRIBUTIONS, SIZE, WIDTH, distribution_shares,
                        group_name, inference_work, occam_inference_step, occam_training_step,
                        run_case)
from inference_ceiling import early_exit_work


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "reference"], ids=["fused", "reference"])
def test_training_step(benchmark, backend, precision):
    step = occam_training_step(backend, precision)
    benchmark.group = group_name(f"training step {precision}", f"width {WIDTH}, {SIZE} px")
    run_case(benchmark, step, {"impl": "fused" if backend == "triton" else "reference",
                               "images": BATCH, "precision": precision,
                               "model": f"occam_resnet18 width={WIDTH} {SIZE}px"})


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
@pytest.mark.parametrize("compaction", [True, False], ids=["compaction", "full_depth"])
def test_inference(benchmark, compaction, distribution):
    shares, source = distribution_shares(distribution)
    step, counts = occam_inference_step(compaction, shares)
    work = inference_work()
    benchmark.group = group_name(f"inference {distribution}", f"width {WIDTH}, {SIZE} px")
    run_case(benchmark, step, {"impl": "compaction" if compaction else "full_depth",
                               "images": BATCH, "exit_counts": counts,
                               "flops": early_exit_work(work, BATCH, counts) if compaction
                               else BATCH * work.full_depth,
                               "target_shares": list(shares),
                               "distribution_source": os.path.relpath(source, BENCH_DIR)
                               if source != "forced" else source,
                               "model": f"occam_resnet18 width={WIDTH} {SIZE}px"})


if __name__ == "__main__":
    # Keep a trained model's exit distribution in the repo: python bench/bench_end_to_end.py REPORT
    import sys
    with open(sys.argv[1]) as handle:
        report = json.load(handle)
    kept = {"exit_share": report["test"]["exit_share"], "source": sys.argv[1],
            "first_inference_exit": report["test"]["first_inference_exit"],
            "preset": report["config"]["preset"], "model": report["model"]}
    with open(os.path.join(BENCH_DIR, "trained_exit_distribution.json"), "w") as handle:
        json.dump(kept, handle, indent=1)
    print(f"wrote bench/trained_exit_distribution.json from {sys.argv[1]}")
