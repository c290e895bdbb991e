"""Run by tests/test_distributed.py under torchrun: Ctrl-C reaches the first process only,
while it validates the last epoch. Every process must stop there, before the report: one that
went on would wait in the report's collectives for a process that left."""
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import config, synthetic_splits  # noqa: E402

from occamnets.train import Trainer  # noqa: E402


def main(out_dir):
    trainer = Trainer(config(out_dir, epochs=1, batch_size=4), synthetic_splits(n=16))
    validate = trainer.evaluate

    def evaluate(split_name="test", **kwargs):
        if trainer.rank == 0 and split_name == "val" and not trainer.interrupted:
            os.kill(os.getpid(), signal.SIGINT)
        return validate(split_name, **kwargs)
    trainer.evaluate = evaluate
    report = trainer.run()
    trainer.close()
    with open(os.path.join(out_dir, f"rank{trainer.rank}.json"), "w") as handle:
        json.dump({"reported": report is not None, "stop_signal": trainer.stop_signal,
                   "epoch": trainer.epoch}, handle)


if __name__ == "__main__":
    main(sys.argv[1])
