"""Run by tests/test_distributed.py under torchrun: one epoch on two processes, a periodic
checkpoint part-way, every step logged. Each process saves the losses of its own steps; the
test compares them with what the first process wrote to metrics.jsonl."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import config, synthetic_splits  # noqa: E402

from occamnets.train import Trainer  # noqa: E402


def main(out_dir):
    trainer = Trainer(config(out_dir, epochs=1, batch_size=4, log_every=1, checkpoint_every=4),
                      synthetic_splits(n=48))
    own = []
    train_step = trainer._train_step

    def recording(rows, following):
        loss, parts = train_step(rows, following)
        own.append((loss.item(), rows.numel()))
        return loss, parts
    trainer._train_step = recording
    trainer.train()
    trainer.close()
    torch.save(own, os.path.join(out_dir, f"own{trainer.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
