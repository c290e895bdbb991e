"""End to end: an OccamResNet-18 training step (fused against reference exit heads, fp32 and
bf16 autocast) and early-exit inference (compaction against every exit on every sample) at
forced exit distributions. Images per second = batch / mean time (bench/report.py)."""
import json
import os

import pytest
import torch

from occamnets.losses import OccamLoss
from occamnets.models import occam_resnet18

from benchutils import ON_GPU, device, force_exit_distribution, run_case, synchronize

# GPU: the paper's model and input; CPU: a narrow 64 px-stem model on tiny images (smoke).
WIDTH, SIZE, BATCH = (58, 160, 128) if ON_GPU else (4, 16, 4)
STEM = "7x7" if ON_GPU else "3x3"
NUM_CLASSES = 10
HERE = os.path.dirname(os.path.abspath(__file__))


def trained_distribution():
    """Exit shares (E1, E2, E3) of a trained OccamResNet on the unbiased test set: from the
    report named by OCCAM_BENCH_REPORT, else the demo's, else the copy kept in the repo
    (bench/trained_exit_distribution.json, written by `python bench/bench_end_to_end.py
    REPORT`)."""
    for path in (os.environ.get("OCCAM_BENCH_REPORT"),
                 os.path.join(HERE, "..", "runs", "demo", "occam", "report.json"),
                 os.path.join(HERE, "trained_exit_distribution.json")):
        if path and os.path.isfile(path):
            with open(path) as handle:
                data = json.load(handle)
            kept = data["test"] if "test" in data else data
            if "first_inference_exit" not in kept:
                continue  # written before reports named the first exit used at inference
            return tuple(kept["exit_share"][kept["first_inference_exit"]:]), path
    raise FileNotFoundError("no trained exit distribution: run `make demo` or set "
                            "OCCAM_BENCH_REPORT to a report.json")


DISTRIBUTIONS = {"all_E1": (1.0, 0.0, 0.0), "50_30_20": (0.5, 0.3, 0.2),
                 "none_early": (0.0, 0.0, 1.0), "trained": None}


def images_and_labels(batch=BATCH):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=generator).to(device())
    if ON_GPU:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "reference"], ids=["fused", "reference"])
def test_training_step(benchmark, backend, precision):
    torch.manual_seed(0)
    model = occam_resnet18(NUM_CLASSES, width=WIDTH, stem=STEM,
                           backend=backend).to(device())
    if ON_GPU:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = OccamLoss(num_items=BATCH, num_classes=NUM_CLASSES).to(device())
    loss_fn.on_epoch_start(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    x, labels = images_and_labels()
    items = torch.arange(BATCH, device=device())
    autocast = torch.autocast(device().type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            out = model(x, labels)
            loss, _ = loss_fn(out, labels, items)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize()

    benchmark.group = f"training step {precision}"
    run_case(benchmark, step, {"impl": "fused" if backend == "triton" else "reference",
                               "images": BATCH, "precision": precision,
                               "model": f"occam_resnet18 width={WIDTH} {SIZE}px"})


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
@pytest.mark.parametrize("compaction", [True, False], ids=["compaction", "full_depth"])
def test_inference(benchmark, compaction, distribution):
    torch.manual_seed(0)
    model = occam_resnet18(NUM_CLASSES, width=WIDTH, stem=STEM).to(device()).eval()
    x, _ = images_and_labels()
    shares, source = DISTRIBUTIONS[distribution], "forced"
    if shares is None:
        shares, source = trained_distribution()
    force_exit_distribution(model, x, shares)
    counts = model.early_exit(x).exit_counts.tolist()

    def step():
        model.early_exit(x, compaction=compaction)
        synchronize()

    benchmark.group = f"inference {distribution}"
    run_case(benchmark, step, {"impl": "compaction" if compaction else "full_depth",
                               "images": BATCH, "exit_counts": counts,
                               "target_shares": list(shares),
                               "distribution_source": os.path.relpath(source, HERE)
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
    with open(os.path.join(HERE, "trained_exit_distribution.json"), "w") as handle:
        json.dump(kept, handle, indent=1)
    print(f"wrote bench/trained_exit_distribution.json from {sys.argv[1]}")
