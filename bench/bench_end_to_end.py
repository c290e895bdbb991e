"""End to end: an OccamResNet-18 training step (fused against reference exit heads, fp32 and
bf16 autocast) and early-exit inference (compaction against every exit on every sample) at
forced exit distributions. Images per second = batch / mean time (bench/report.py)."""
import pytest
import torch

from occamnets.inference import predict
from occamnets.losses import OccamLoss
from occamnets.models import occam_resnet18

from benchutils import ON_GPU, device, force_exit_distribution, run_case, synchronize

# GPU: the paper's model and input; CPU: a narrow 64 px-stem model on tiny images (smoke).
WIDTH, SIZE, BATCH = (58, 160, 128) if ON_GPU else (4, 16, 4)
INPUT_SIZE = 160 if ON_GPU else 64
NUM_CLASSES = 10
DISTRIBUTIONS = {"all_E1": (1.0, 0.0, 0.0), "50_30_20": (0.5, 0.3, 0.2),
                 "none_early": (0.0, 0.0, 1.0)}


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
    model = occam_resnet18(NUM_CLASSES, width=WIDTH, input_size=INPUT_SIZE,
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
    model = occam_resnet18(NUM_CLASSES, width=WIDTH, input_size=INPUT_SIZE).to(device()).eval()
    x, _ = images_and_labels()
    force_exit_distribution(model, x, DISTRIBUTIONS[distribution])
    counts = predict(model, x).exit_counts.tolist()

    def step():
        predict(model, x, compaction=compaction)
        synchronize()

    benchmark.group = f"inference {distribution}"
    run_case(benchmark, step, {"impl": "compaction" if compaction else "full_depth",
                               "images": BATCH, "exit_counts": counts,
                               "model": f"occam_resnet18 width={WIDTH} {SIZE}px"})
