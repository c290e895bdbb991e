"""The epoch budget of the Biased MNIST reproduction (issue 17), from speeds measured on the
card: the largest number of epochs that trains both models within a time budget.

    python bench/repro_plan.py plan RUNS --budget 300 [--checkpoint-every 200]
    python bench/repro_plan.py summary RUNS STEPS_TSV     the window's closing table

Reads each model's probe run (`RUNS/probe-<model>`: a few steps of `occamnets train --preset
repro --log-every N --max-steps M`, the same data and settings as the real run, and the
probe's wall seconds in `wall_seconds`, written by bench/repro_window.sh), and measures:
- the training speed, from the metrics' step records (images between the first and the last
  record over the seconds between them: the start-up and the first steps' compiles left out);
- a run's fixed cost: the probe's wall time less its steps at that speed (process start,
  loading the data onto the device, compiles, one checkpoint);
- one checkpoint save (the probe's checkpoint read and written again), paid every
  --checkpoint-every steps and at each epoch's end;
- one epoch's validation (the val and val-p0.5 splits, as the trainer runs it after each
  epoch) and the final report's evaluations (test, val, val-p0.5), each timed on the
  probe's checkpoint after one untimed pass.

Then epochs = floor((budget - every run's fixed cost and report) / the sum over models of one
epoch's seconds), at least 1, with the LR steps at the paper's fractions
(`scaled_milestones`). Both models are always planned together, so that runs trained in
different calls or windows keep the same epochs. Writes RUNS/plan.json (every measurement, the
prediction for bench/NOTES.md, and the options to train with: `--epochs E --milestones M1
M2`).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

from occamnets.checkpoints import read_checkpoint
from occamnets.config import RunConfig, scaled_milestones
from occamnets.evaluate import evaluate, load_model, load_splits
from occamnets.files import atomic_path
from occamnets.train import RunReport, read_metrics, steps_per_epoch

from benchutils import synchronize

PLAN_NAME = "plan.json"
EPOCH_VALIDATION = ("val", "val-p0.5")        # what the trainer evaluates after every epoch
REPORT_SPLITS = ("test", "val", "val-p0.5")   # what its report evaluates at the end


@dataclasses.dataclass
class ModelSpeed:
    model: str
    train_images: int                # per epoch
    train_images_per_s: float        # measured between the probe's step records
    fixed_seconds: float             # measured: the probe's wall time less its timed steps
    checkpoint_seconds: float        # measured: one checkpoint read and written
    saves_per_epoch: int
    validation_seconds: float        # measured: one epoch's validation
    report_seconds: float            # measured: the final report's evaluations
    epoch_seconds: float             # predicted: training, checkpoints and validation


@dataclasses.dataclass
class Plan:
    budget_seconds: float
    models: List[ModelSpeed]
    epochs: int
    milestones: List[int]
    predicted_seconds: float         # every model's whole run
    device: str

    def options(self) -> str:
        return f"--epochs {self.epochs} --milestones {' '.join(map(str, self.milestones))}"


def training_speed(metrics_path: str) -> float:
    """Images/s between the first and the last step record of one epoch of a probe run."""
    steps = [r for r in read_metrics(metrics_path)
             if r.get("kind") == "step" and "epoch_seconds" in r]
    if not steps:
        raise ValueError(f"{metrics_path} has no timed step records: run the probe with "
                         f"--log-every N and --max-steps of at least 2 N")
    last_epoch = [r for r in steps if r["epoch"] == steps[-1]["epoch"]]
    if len(last_epoch) < 2:
        raise ValueError(f"{metrics_path}: fewer than two step records in one epoch; run the "
                         f"probe with --max-steps of at least 2 x --log-every")
    first, last = last_epoch[0], last_epoch[-1]
    images = (last["global_step"] - first["global_step"]) * last["batch"]
    seconds = last["epoch_seconds"] - first["epoch_seconds"]
    if seconds <= 0:
        raise ValueError(f"{metrics_path}: step records without elapsed time between them")
    return images / seconds


def evaluation_seconds(checkpoint: str) -> Tuple[float, float]:
    """(one epoch's validation, the final report's evaluations) in seconds for the
    checkpoint's model, each evaluated as the trainer does (after an epoch: accuracy on val
    and val-p0.5; the report: every diagnostic, full-depth timing on test, per factor on all
    but val) and timed after one untimed pass of both (compiles, cuDNN's choices). The model
    and the splits are loaded once."""
    model, config = load_model(checkpoint)
    data = load_splits(config, next(model.parameters()).device, REPORT_SPLITS)

    def run(splits: Sequence[str], full: bool) -> float:
        synchronize()
        started = time.perf_counter()
        for name in splits:
            evaluate(model, data[name], name, threshold=config.inference_threshold,
                     channels_last=config.channels_last, bf16=config.bf16,
                     per_factor=full and name != "val", diagnostics=full,
                     time_full_depth=full and name == "test", per_group=False, per_exit=full)
        synchronize()
        return time.perf_counter() - started

    run(EPOCH_VALIDATION, False), run(REPORT_SPLITS, True)   # warm-up
    return run(EPOCH_VALIDATION, False), run(REPORT_SPLITS, True)


def checkpoint_seconds(checkpoint: str) -> float:
    """Seconds to write the checkpoint's contents once more (beside it, then removed)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    copy = checkpoint + ".timing"
    started = time.perf_counter()
    with atomic_path(copy) as tmp:
        torch.save(state, tmp)
    seconds = time.perf_counter() - started
    os.remove(copy)
    return seconds


def choose_epochs(budget: float, epoch_seconds: Sequence[float],
                  fixed_seconds: Sequence[float]) -> int:
    """The most epochs whose training for every model, plus each run's fixed cost and report,
    fit `budget` seconds; at least 1 (a plan that overruns says so in its prediction)."""
    per_epoch = sum(epoch_seconds)
    if not per_epoch > 0:
        raise ValueError(f"epoch times must be positive, got {list(epoch_seconds)}")
    return max(1, math.floor((budget - sum(fixed_seconds)) / per_epoch))


def probe_images(global_step: int, train_images: int, batch_size: int, world: int = 1) -> int:
    """Images one process trained in `global_step` steps from the start of a run (the unit of
    `training_speed`'s rate): whole epochs (the ragged last batch included, `steps_per_epoch`)
    and then whole batches. Counted from the step, not summed over the step records: those
    are written only every --log-every steps."""
    steps = steps_per_epoch(train_images, batch_size, world)
    epochs, steps_into_epoch = divmod(global_step, steps)
    per_epoch = train_images if world == 1 else steps * batch_size
    return epochs * per_epoch + steps_into_epoch * batch_size


def measure(runs: str, model: str, checkpoint_every: int) -> ModelSpeed:
    """One model's speeds, from its probe run in RUNS/probe-<model>."""
    probe = os.path.join(runs, f"probe-{model}")
    checkpoint = os.path.join(probe, "checkpoint.pt")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"no probe run of {model} at {probe}: run `occamnets train "
                                f"--preset repro --model {model} --out {probe} --log-every 20 "
                                f"--max-steps 60` first")
    metrics = os.path.join(probe, "metrics.jsonl")
    rate = training_speed(metrics)
    state = read_checkpoint(checkpoint)
    config = RunConfig.from_dict(state["config"])
    images = config.train_size
    if images is None:   # every digit's renders: count them (this hashes the train split)
        images = len(load_splits(config, torch.device("cpu"), ("train",))["train"])
    steps = steps_per_epoch(images, config.batch_size)
    # The probe stops at --max-steps and saves: its checkpoint's step is every step it trained.
    probed_images = probe_images(state["global_step"], images, config.batch_size,
                                 state.get("world", 1))
    del state
    wall_path = os.path.join(probe, "wall_seconds")
    fixed = 0.0
    if os.path.exists(wall_path):
        with open(wall_path) as handle:
            wall = handle.read().strip()
        if wall:   # empty: the probe did not pass (and the plan fails before here)
            fixed = max(0.0, float(wall) - probed_images / rate)
    saves = steps // checkpoint_every + 1 if checkpoint_every else 1
    save = checkpoint_seconds(checkpoint)
    validation, report = evaluation_seconds(checkpoint)
    return ModelSpeed(model, images, rate, fixed, save, saves, validation, report,
                      images / rate + saves * save + validation)


def make_plan(runs: str, models: Sequence[str], budget: float, checkpoint_every: int,
              max_epochs: Optional[int] = None) -> Plan:
    speeds = [measure(runs, model, checkpoint_every) for model in models]
    epochs = choose_epochs(budget, [s.epoch_seconds for s in speeds],
                           [s.fixed_seconds + s.report_seconds for s in speeds])
    if max_epochs is not None:
        epochs = min(epochs, max_epochs)
    predicted = sum(s.fixed_seconds + epochs * s.epoch_seconds + s.report_seconds
                    for s in speeds)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return Plan(budget, speeds, epochs, list(scaled_milestones(epochs)), predicted, device)


def summary(runs: str, steps_path: str) -> str:
    """The table a window prints last: each step's outcome, then each finished run's headline."""
    lines = [f"{'step':<16} {'status':<8} {'seconds':>7}"]
    if os.path.exists(steps_path):
        with open(steps_path) as handle:
            for line in handle:
                name, status, seconds, _ = line.rstrip("\n").split("\t")
                lines.append(f"{name:<16} {status:<8} {seconds:>7}")
    lines.append(f"{'model':<8} {'unbiased test %':>15} {'epochs':>6} {'train s':>8} "
                 f"{'train img/s':>11}")
    for model in ("resnet", "occam"):
        path = os.path.join(runs, model, "report.json")
        if not os.path.exists(path):
            lines.append(f"{model:<8} {'(no report)':>15}")
            continue
        with open(path) as handle:
            report = RunReport.from_dict(json.load(handle))
        lines.append(f"{model:<8} {100 * report.test.accuracy:>15.1f} {report.config.epochs:>6} "
                     f"{report.train_seconds:>8.0f} {report.train_images_per_s:>11.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan_parser = commands.add_parser("plan", help="measure and choose the epochs")
    plan_parser.add_argument("runs", help="the directory holding probe-<model>/ runs")
    plan_parser.add_argument("--budget", type=float, required=True,
                             help="seconds for every model's whole run (training, validation, "
                                  "report)")
    plan_parser.add_argument("--models", nargs="+", default=["resnet", "occam"])
    plan_parser.add_argument("--checkpoint-every", type=int, default=0,
                             help="the runs' --checkpoint-every (0: at epoch ends only)")
    plan_parser.add_argument("--max-epochs", type=int, default=None,
                             help="at most this many epochs (the CPU smoke run)")
    summary_parser = commands.add_parser("summary", help="the window's closing table")
    summary_parser.add_argument("runs")
    summary_parser.add_argument("steps", help="steps.tsv")
    args = parser.parse_args(argv)
    if args.command == "summary":
        print(summary(args.runs, args.steps))
        return 0
    plan = make_plan(args.runs, args.models, args.budget, args.checkpoint_every,
                     args.max_epochs)
    with atomic_path(os.path.join(args.runs, PLAN_NAME)) as tmp, open(tmp, "w") as handle:
        json.dump(dict(dataclasses.asdict(plan), options=plan.options()), handle, indent=1)
    for speed in plan.models:
        print(f"{speed.model}: {speed.train_images_per_s:.0f} training images/s, "
              f"{speed.epoch_seconds:.1f} s per epoch (validation {speed.validation_seconds:.1f} "
              f"s, {speed.saves_per_epoch} checkpoints of {speed.checkpoint_seconds:.2f} s), "
              f"fixed {speed.fixed_seconds:.1f} s, report {speed.report_seconds:.1f} s")
    print(f"plan: {plan.options()}, predicted {plan.predicted_seconds:.0f} s of "
          f"{plan.budget_seconds:.0f} s on {plan.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
