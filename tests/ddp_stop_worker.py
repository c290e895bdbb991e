"""Run by tests/test_distributed.py under torchrun: Ctrl-C reaches the first process only,
while it validates the last epoch, or (`at_the_step_cap`) during the last step, which
--max-steps caps. Every process must stop at the epoch's end, before the report: one that
went on would wait in the report's collectives for a process that left."""
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import config, synthetic_splits  # noqa: E402

from occamnets.train import Trainer  # noqa: E402


def main(out_dir, at_the_step_cap=False):
    # 16 images, batches of 4 on each of 2 processes: 2 steps.
    trainer = Trainer(config(out_dir, epochs=1, batch_size=4,
                             max_steps=2 if at_the_step_cap else None), synthetic_splits(n=16))
    validate, step = trainer.evaluate, trainer._train_step

    def evaluate(split_name="test", **kwargs):
        if (trainer.rank == 0 and split_name == "val" and not trainer.interrupted
                and not at_the_step_cap):
            os.kill(os.getpid(), signal.SIGINT)
        return validate(split_name, **kwargs)

    def train_step(rows, following=None):
        if trainer.rank == 0 and trainer.global_step == 1 and at_the_step_cap:
            os.kill(os.getpid(), signal.SIGINT)
        return step(rows, following)
    trainer.evaluate, trainer._train_step = evaluate, train_step
    report = trainer.run()
    trainer.close()
    with open(os.path.join(out_dir, f"rank{trainer.rank}.json"), "w") as handle:
        json.dump({"reported": report is not None, "stop_signal": trainer.stop_signal,
                   "epoch": trainer.epoch}, handle)


if __name__ == "__main__":
    main(sys.argv[1], at_the_step_cap=sys.argv[2:] == ["at_the_step_cap"])
