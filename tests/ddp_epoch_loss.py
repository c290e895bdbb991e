"""Run by tests/test_distributed.py under torchrun: one epoch on two processes, every step
logged; either whole with a periodic checkpoint part-way, or (`resumed`) stopped by
--max-steps after 3 of its 6 steps and resumed from the checkpoint by a new Trainer. Each
process saves the losses of its own steps; the test compares them with what the first
process wrote to metrics.jsonl."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import config, synthetic_splits  # noqa: E402

from occamnets.train import Trainer  # noqa: E402


def train(trainer, own):
    train_step = trainer._train_step

    def recording(rows, following):
        loss, parts = train_step(rows, following)
        own.append((loss.item(), rows.numel()))
        return loss, parts
    trainer._train_step = recording
    trainer.train()
    trainer.close()
    # DDP holds the group: dropped before the group is destroyed (as Trainer.close does for a
    # group it owns), else gloo's threads may abort the process at exit.
    trainer.forward = trainer.model


def main(out_dir, mode):
    # One group for both trainers (neither owns it): a second group on torchrun's store can
    # read the first one's stale addresses.
    dist.init_process_group("gloo")
    own = []
    settings = dict(epochs=1, batch_size=4, log_every=1)
    if mode == "resumed":
        first = Trainer(config(out_dir, max_steps=3, **settings), synthetic_splits(n=48))
        train(first, own)
        trainer = Trainer(config(out_dir, **settings), synthetic_splits(n=48),
                          resume=os.path.join(out_dir, "checkpoint.pt"))
    else:
        trainer = Trainer(config(out_dir, checkpoint_every=4, **settings), synthetic_splits(n=48))
    train(trainer, own)
    torch.save(own, os.path.join(out_dir, f"own{trainer.rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
