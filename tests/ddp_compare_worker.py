"""Run by tests/test_distributed.py under torchrun: a grid of two cells on two processes,
then how many of gloo's threads still run in each process once the grid is done."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from process_threads import gloo_threads  # noqa: E402

from occamnets.compare import grid, run_comparison  # noqa: E402


def main(out: str) -> None:
    settings = dict(cell_size=6, train_size=48, val_size=10, test_size=20, epochs=1,
                    batch_size=8, width=4, device="cpu", backend="reference", progress=False,
                    data_dir=os.path.join(out, "data"))
    run_comparison(grid(["occam"], ["erm"], ["none"], [0, 1]), "quick", out, settings,
                   hint="the same command again")
    print(f"process {os.environ['RANK']}: gloo threads after the grid: {gloo_threads()}",
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
