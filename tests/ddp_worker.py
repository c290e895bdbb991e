"""Run by tests/test_distributed.py under torchrun: a few DDP training steps on gloo, then
each process saves its OccamLoss state (the method's included), the items it trained on, and
how many of gloo's threads are still running once Trainer.close has ended the group."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from process_threads import gloo_threads  # noqa: E402
from test_train import config, synthetic_splits  # noqa: E402

from occamnets.sampling import epoch_order, sampling_weights  # noqa: E402
from occamnets.train import Trainer, batches  # noqa: E402


def main(out_dir, method, sampling="uniform"):
    # pgi_weight large: its gradient, averaged by hand over the processes, must keep the
    # weights identical.
    trainer = Trainer(config(out_dir, max_steps=5, batch_size=4, method=method, gdro_eta=0.5,
                             pgi_weight=1e4, sampling=sampling, sampling_gamma=1.0),
                      synthetic_splits(n=48))
    trainer.train()
    trainer.close()  # the trainer lives on: close alone must free the group
    threads_after_close = gloo_threads()
    seen = []
    weights = sampling_weights(sampling, 1.0, trainer.splits["train"])
    for epoch in range(trainer.epoch + 1):
        order = epoch_order(48, trainer.config.seed, epoch, "cpu", weights)
        for step, rows in batches(order, 4, 0, trainer.rank, trainer.world):
            if epoch * 6 + step < 5:
                seen.append(rows)
    torch.save({"loss": trainer.objective.state_dict(), "items": torch.cat(seen),
                "gloo_threads_after_close": threads_after_close,
                "params": {k: v.detach() for k, v in trainer.model.named_parameters()}},
               os.path.join(out_dir, f"rank{trainer.rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
