"""Two processes (torchrun, gloo on CPU) train a few steps; their OccamLoss states agree."""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(*arguments: str, timeout: int = 300, cwd=None) -> subprocess.CompletedProcess:
    """Two processes on this machine (gloo on CPU), this repository on their path."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *arguments], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("method,sampling", [("erm", "uniform"), ("gdro", "uniform"),
                                             ("pgi", "uniform"), ("erm", "groups")])
def test_two_process_gloo_training_keeps_occam_state_identical(tmp_path, method, sampling):
    """GroupDRO's group weights and PGI's feature-only gradient are synchronised by hand:
    every process must end with the same state and parameters. Balanced sampling: both
    processes draw one epoch order (with replacement: an item on both, or twice in one
    batch) and take their own slices."""
    result = torchrun(os.path.join(HERE, "ddp_worker.py"), str(tmp_path), method, sampling)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # -1: no /proc to count them by (not Linux).
    assert [s["gloo_threads_after_close"] for s in states] in ([0, 0], [-1, -1])
    a, b = states[0]["loss"], states[1]["loss"]
    assert ("method.group_weights" in a) == (method == "gdro")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name in states[0]["params"]:  # BN running stats are per process, as in any DDP run
        assert torch.equal(states[0]["params"][name], states[1]["params"][name]), name
    # Each process saw different items (drawn with replacement, some twice); both hold
    # targets for the union.
    items0, items1 = states[0]["items"], states[1]["items"]
    union = torch.cat([items0, items1])
    distinct = len(set(union.tolist()))
    assert (distinct == len(union)) == (sampling == "uniform")
    assert a["has_target"][:, union].all()
    assert a["has_target"].sum(1).tolist() == [distinct] * 4


def test_a_grid_under_torchrun_ends_its_process_group_and_speaks_once(tmp_path):
    """compare under torchrun left the group its first cell started to interpreter exit,
    where gloo's threads can abort a finished process, and every process said every line and
    wrote the table."""
    result = torchrun(os.path.join(HERE, "ddp_compare_worker.py"), str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        assert f"process {rank}: gloo threads after the grid: " in result.stdout
    assert result.stdout.count("gloo threads after the grid: 0") == 2 or (
        result.stdout.count("gloo threads after the grid: -1") == 2)   # -1: no /proc
    assert result.stdout.count("occam-erm seed 1: training in") == 1
    assert result.stdout.count("unbiased test accuracy") == 2          # one line per cell
    assert (tmp_path / "compare.md").exists() and (tmp_path / "compare.png").exists()


@pytest.mark.parametrize("when", ["validating", "at_the_step_cap"])
def test_a_signal_to_one_process_after_the_last_epoch_stops_every_process(tmp_path, when):
    """The processes agree on a stop at every epoch's end too: the first one, interrupted
    while validating the last epoch, stops before the report, and so does the other (which
    would otherwise wait in the report's collectives until this test's timeout). When the
    signal comes during the last step and --max-steps caps it, the processes agree there
    (at the cap, whatever the step) and stop at once, before the epoch's end."""
    result = torchrun(os.path.join(HERE, "ddp_stop_worker.py"), str(tmp_path),
                      *([when] if when == "at_the_step_cap" else []), timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    epoch = 0 if when == "at_the_step_cap" else 1
    assert ranks == [{"reported": False, "stop_signal": 2, "epoch": epoch}] * 2, ranks
    assert not (tmp_path / "report.json").exists()
    # The hint to continue names torchrun: the plain command is refused (2 processes, now 1).
    assert f"with `torchrun --nproc_per_node=2 -m occamnets.cli train --out {tmp_path} " \
           "--resume` (2 processes in all, as before)" in result.stdout, result.stdout[-2000:]


def test_torchrun_through_the_command_line_exits_0_with_one_report(tmp_path):
    """Only the first process writes files (data cache, metrics, checkpoint, report) and prints
    the report; the others wait at barriers and exit 0 too (rank 1 used to fail on report.md)."""
    result = torchrun("-m", "occamnets.cli", "train", "--preset", "quick", "--epochs", "1",
                      "--width", "4", "--train-size", "256", "--val-size", "20",
                      "--test-size", "40", "--no-progress", "--out", str(tmp_path / "run"),
                      "--data-dir", str(tmp_path / "data"), timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("# OccamResNet-18 on Biased MNIST") == 1
    assert result.stdout.count("training OccamResNet-18") == 1
    # --batch-size is each process's: the summary says so, with the global batch.
    assert "batches of 64 per process on 2 processes (128 in all)" in result.stdout
    assert {"checkpoint.pt", "metrics.jsonl", "report.md", "report.json"} <= set(
        os.listdir(tmp_path / "run"))
    assert not [name for name in os.listdir(tmp_path / "data") if ".tmp-" in name]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]


def test_a_torchrun_training_ends_the_process_group_it_started(tmp_path):
    """Left to interpreter exit, gloo's threads can abort a finished process (SIGABRT,
    "terminate called without an active exception"); `occamnets train` ends the group itself,
    in every process, and the group is really freed: no gloo thread is left running (torch
    modules imported after the group existed used to hold it; Trainer's start_process_group)."""
    # The line goes out in one write of its own (the report flushed first): two processes
    # share the pipe, and a block-buffered flush may cut a line where the other's lands.
    program = (f"import sys; sys.path.insert(0, {HERE!r}); import torch.distributed as dist; "
               "from occamnets.cli import main; from process_threads import gloo_threads; "
               "code = main(sys.argv[1:]); sys.stdout.flush(); "
               "print(f'group still up: {dist.is_initialized()}, gloo threads: {gloo_threads()}', "
               "flush=True); sys.exit(code)")
    result = torchrun("--no-python", sys.executable, "-c", program, "train", "--preset", "quick",
                      "--epochs", "1", "--width", "4", "--batch-size", "16", "--train-size", "64",
                      "--val-size", "8", "--test-size", "8", "--no-progress",
                      "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # -1: no /proc to count them by (not Linux).
    assert result.stdout.count("group still up: False, gloo threads: 0") == 2 or \
        result.stdout.count("group still up: False, gloo threads: -1") == 2, result.stdout[-3000:]


def test_group_dro_under_two_processes_is_the_whole_batch_robust_loss():
    """A group on one process only must weigh as it would for one process with the whole
    batch (not 1 / processes of it): loss, per-sample gradients and group weights agree."""
    result = torchrun(os.path.join(HERE, "ddp_group_dro.py"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_occam_loss_and_methods_under_two_processes_are_the_whole_batch_loss():
    """The gate loss balanced exit and continue samples by each process's own counts, and PGI
    split each class's groups per process: two processes trained another loss than one
    process with their whole batch."""
    result = torchrun(os.path.join(HERE, "ddp_loss_equivalence.py"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("the whole batch's loss, gradients and state") == 2


@pytest.mark.parametrize("mode", ["whole", "resumed"])
def test_two_processes_log_the_global_batchs_loss_and_images(tmp_path, mode):
    """The epoch's train_loss and images/s, and each step record's loss, were the first
    process's own (half the images). Neither a checkpoint folded part-way nor a resume from
    it (the global sum so far, counted once, not once per process) may change that."""
    result = torchrun(os.path.join(HERE, "ddp_epoch_loss.py"), str(tmp_path), mode)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    own = [torch.load(tmp_path / f"own{rank}.pt") for rank in range(2)]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if r["kind"] == "step"]
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == len(own[0]) == len(own[1]) == 6      # 48 images, 2 x 4 per step
    for record, mine, theirs in zip(steps, *own):
        assert record["batch"] == 8
        assert record["loss"] == pytest.approx((mine[0] + theirs[0]) / 2, rel=1e-6)
    everything = [loss * images for rank in own for loss, images in rank]
    assert epoch["train_loss"] == pytest.approx(sum(everything) / 48, rel=1e-6)
    # The rate counts the global 48 images (the first process alone took 24).
    assert epoch["train_images_per_s"] * epoch["train_seconds"] == pytest.approx(48, rel=1e-6)


@pytest.mark.parametrize("seconds_per_step, agreed_at", [
    (0.01, [1, 2, 12, 22, 32]),    # fast steps: every 10 steps, a host sync at most that often
    (4.0, [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32]),   # every 10 s
    (30.0, list(range(1, 33)))])   # slower than the whole budget: every step
def test_processes_agree_on_stopping_often_enough_for_torchrun(tmp_path, monkeypatch,
                                                               seconds_per_step, agreed_at):
    """Agreeing every 10 steps alone, at 4 s a step a signal waited up to 40 s for the
    agreement, and torchrun kills its processes 30 s after passing a signal on: the run was
    lost without a checkpoint. The schedule follows the slowest process's step time."""
    import signal

    import torch.distributed as dist

    import occamnets.train as train_module
    from test_train import config, synthetic_splits
    trainer = train_module.Trainer(config(tmp_path / "run"), synthetic_splits())
    clock = [100.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])
    agreements = []
    real_all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        agreements.append(trainer.global_step)
        return real_all_reduce(tensor, *args, **kwargs)
    monkeypatch.setattr(train_module.dist, "all_reduce", recording)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        trainer.world = 2   # a group of one stands for two: only the schedule is checked here
        for step in range(1, 33):
            trainer.global_step = step
            clock[0] += seconds_per_step
            if step == agreed_at[-2] + 1:
                trainer.stop_signal = signal.SIGTERM   # to this process, between agreements
            stopped = trainer._should_stop()
            assert (stopped is not None) == (step == agreed_at[-1]), step
            if stopped:
                break
    finally:
        trainer.world = 1
        dist.destroy_process_group()
    assert agreements == agreed_at
