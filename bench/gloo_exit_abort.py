"""Does a two-process gloo run abort at exit when its process group outlives
destroy_process_group? Counts SIGABRTs over many torchrun launches, per import order.

    python bench/gloo_exit_abort.py --runs 40

Each launch: two processes (gloo on this CPU) start four large all-reduces without waiting,
call destroy_process_group and end. `late`: torch._dynamo is imported after
init_process_group, as DDP's constructor imports it; modules it pulls in keep the group as a
default argument value, so destroy cannot free it and gloo's threads are still running in
the interpreter's teardown. `early`: imported before (what occamnets' Trainer does); destroy
frees the group and joins the threads. bench/NOTES.md has the measured counts.
"""
import argparse
import os
import subprocess
import sys
import time

ORDERS = ("late", "early")


def one_process(order: str) -> None:
    """What each torchrun process runs."""
    import torch
    if order == "early":
        import torch._dynamo  # noqa: F401
    import torch.distributed as dist
    dist.init_process_group("gloo")
    import torch._dynamo  # noqa: F401,F811  (a no-op when imported above)
    works = []
    for _ in range(4):
        x = torch.ones(30_000_000)
        works.append(dist.all_reduce(x, async_op=True))
        del x  # the in-flight work holds the last reference to the tensor
    dist.destroy_process_group()


def launch(order: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", os.path.abspath(__file__), "--process", order],
                          env=env, capture_output=True, text=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="launches per import order")
    parser.add_argument("--process", choices=ORDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.process:
        one_process(args.process)
        return
    import torch
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, {args.runs} launches "
          f"of 2 processes per order", flush=True)
    rows = []
    for order in ORDERS:
        aborted = failed = 0
        started = time.perf_counter()
        for run in range(args.runs):
            result = launch(order)
            abort = "terminate called without an active exception" in result.stderr
            aborted += abort
            failed += result.returncode != 0 and not abort
            print(f"\r{order}: {run + 1}/{args.runs} launches, {aborted} aborted",
                  end="", flush=True)
        print(flush=True)
        rows.append((order, aborted, failed, time.perf_counter() - started))
    print("| torch._dynamo imported | launches | aborted at exit (SIGABRT) | other failures "
          "| seconds |\n|---|---|---|---|---|")
    for order, aborted, failed, seconds in rows:
        when = "after init_process_group" if order == "late" else "before init_process_group"
        print(f"| {when} | {args.runs} | {aborted} | {failed} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
