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

from benchutils import (BATCH, ON_GPU, SIZE, WIDTH, group_name, images_and_labels,
                        occam_inference_step, occam_training_step, official_model,
                        official_training_call, run_case, synchronised, synchronize,
                        trained_distribution)

CHECKOUT = os.environ.get("OCCAM_OFFICIAL")
pytestmark = pytest.mark.skipif(
    not CHECKOUT, reason="the peer needs a checkout of erobic/occam-nets-v1: set OCCAM_OFFICIAL "
                         "to its path (bench/NOTES.md)")
MODEL = f"occam_resnet18 width={WIDTH} {SIZE}px"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["official", "ours"])
def test_peer_training_step(benchmark, impl, precision):
    step = (synchronised(official_training_call(CHECKOUT, precision)) if impl == "official"
            else occam_training_step("triton", precision))
    benchmark.group = group_name(f"peer training_step {precision}", MODEL)
    run_case(benchmark, step, {"impl": impl, "images": BATCH, "precision": precision,
                               "model": MODEL, "layout": "channels_last" if ON_GPU and
                               impl == "ours" else "contiguous"})


@pytest.mark.parametrize("impl", ["official", "ours"])
def test_peer_inference(benchmark, impl):
    shares, source = trained_distribution()
    if impl == "official":
        model = official_model(CHECKOUT).eval()
        x = images_and_labels()[0].contiguous()
        counts = None

        def step():
            with torch.no_grad():
                model(x)
            synchronize()
    else:
        step, counts = occam_inference_step(True, shares)
    benchmark.group = group_name("peer inference trained", MODEL)
    run_case(benchmark, step, {"impl": impl, "images": BATCH, "model": MODEL,
                               "exit_counts": counts, "target_shares": list(shares),
                               "distribution_source": os.path.basename(source)})
