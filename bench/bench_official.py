"""The peer (issue 16, item 3): the official OccamNets code against ours, same card, batch and
image size, in one run.

    OCCAM_OFFICIAL=PATH/TO/occam-nets-v1 pytest bench/bench_official.py

- Training step: the official OccamResNet-18 with its OccamTrainer's training_step (CAM
  suppression, gate and gate-weighted CE losses per exit, its per-item bookkeeping; Lightning's
  loop left out) and Adam, against ours with the fused exit heads and OccamLoss
  (bench/benchutils.py, occam_training_step), in fp32 and bf16 autocast each. The official
  runs contiguous (as its code does), ours channels_last on a GPU (as `occamnets train` does).
  The official step runs at epoch 1 (after its forced first epoch), from batch 1 on.
- Early-exit inference: the official model's eval forward (every exit computed, then one
  chosen per sample) against ours with compaction, at the exit distribution of a trained
  model (bench/trained_exit_distribution.json).

Without OCCAM_OFFICIAL every case is skipped with that reason printed (CI has no checkout;
bench/NOTES.md says how a GPU window carries one). On CPU the cases run at the smoke sizes.
"""
import os

import pytest
import torch

from benchutils import (BATCH, NUM_CLASSES, ON_GPU, SIZE, STEM, WIDTH, device, images_and_labels,
                        occam_inference_step, occam_training_step, run_case, synchronize,
                        trained_distribution)

CHECKOUT = os.environ.get("OCCAM_OFFICIAL")
pytestmark = pytest.mark.skipif(
    not CHECKOUT, reason="the peer needs a checkout of erobic/occam-nets-v1: set OCCAM_OFFICIAL "
                         "to its path (bench/NOTES.md)")
MODEL = f"occam_resnet18 width={WIDTH} {SIZE}px"


def official_model():
    from official_code import import_official
    official = import_official(CHECKOUT, "models.occam_resnet")
    # The 7x7 stem at 160 px on a GPU; the 64 px variant (3x3 stem) for the CPU smoke sizes.
    builder = official.occam_resnet18 if STEM == "7x7" else official.occam_resnet18_img64
    torch.manual_seed(0)
    # A fresh exits_kwargs dict: the builder fills in the one it is given.
    return builder(NUM_CLASSES, width=WIDTH, exits_kwargs={}).to(device())


def official_training_step(precision: str):
    from official_code import official_training_step as wrap
    model = official_model()
    driver = wrap(CHECKOUT, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    x, labels = images_and_labels()
    # As Lightning hands it over: everything on the device, the images in the default layout.
    batch = {"x": x.contiguous(), "y": labels, "item_ix": torch.arange(BATCH, device=device())}
    autocast = torch.autocast(device().type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch_idx=1):
        with autocast:
            loss = driver.training_step(batch, batch_idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize()

    step(batch_idx=0)        # epoch 0, batch 0: the losses are made and every gate target set
    driver.current_epoch = 1  # then as in every later epoch
    return step


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["official", "ours"])
def test_peer_training_step(benchmark, impl, precision):
    step = (official_training_step(precision) if impl == "official"
            else occam_training_step("triton", precision))
    benchmark.group = f"peer training_step {precision}"
    run_case(benchmark, step, {"impl": impl, "images": BATCH, "precision": precision,
                               "model": MODEL, "layout": "channels_last" if ON_GPU and
                               impl == "ours" else "contiguous"})


@pytest.mark.parametrize("impl", ["official", "ours"])
def test_peer_inference(benchmark, impl):
    shares, source = trained_distribution()
    if impl == "official":
        model = official_model().eval()
        x = images_and_labels()[0].contiguous()
        counts = None

        def step():
            with torch.no_grad():
                model(x)
            synchronize()
    else:
        step, counts = occam_inference_step(True, shares)
    benchmark.group = "peer inference trained"
    run_case(benchmark, step, {"impl": impl, "images": BATCH, "model": MODEL,
                               "exit_counts": counts, "target_shares": list(shares),
                               "distribution_source": os.path.basename(source)})
