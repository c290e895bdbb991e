"""`occamnets compare`: a grid of runs, models x methods (x ablations) x seeds, one after the
other, summarised as a table (accuracy on the dataset's headline test split mean +- std over
the seeds, worst-group accuracy on the real datasets, exit shares, time per run) in Markdown
and JSON, and a bar chart with error bars.

Resumable: each cell is a run directory of its own; a cell whose report matches its settings
is read, not rerun; a cell with a checkpoint continues from it. Ctrl-C stops the cell
running with a checkpoint (as `occamnets train`); the same command continues the grid.
"""
import dataclasses
import json
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch.distributed as dist

from .checkpoints import read_checkpoint
from .config import RunConfig
from .data.catalog import BIASED_MNIST, DatasetSpec, find, spec
from .evaluate import percent
from .files import atomic_path
from .models import MODELS
from .train import (CheckpointMismatch, Trainer, check_resumable, end_process_group,
                    existing_checkpoint, fingerprint)

# The seed's ablations by the name the grid gives them, and the settings each switches off.
ABLATIONS = {"none": {}, "no-early-exit": {"early_exit": False},
             "no-cam-suppression": {"cam_suppression": False},
             "no-exit-weighting": {"exit_weighting": False}}
TABLE, JSON_NAME, CHART = "compare.md", "compare.json", "compare.png"
DISPLAY_ONLY = {"progress"}   # shared settings the table's note leaves out


class Interrupted(Exception):
    """A stop signal ended a cell's training (its checkpoint is written)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid."""
    model: str
    method: str
    ablation: str
    seed: int

    @property
    def row(self) -> str:
        """The table row the cell belongs to (the seeds are averaged)."""
        return "-".join([self.model, self.method] + ([self.ablation]
                                                      if self.ablation != "none" else []))

    def run_dir(self, out: str) -> str:
        return os.path.join(out, self.row, f"seed-{self.seed}")


@dataclasses.dataclass
class CellResult:
    cell: Cell
    test_accuracy: float
    exit_share: Optional[List[float]]      # OccamResNet: per exit, share of the test split
    first_inference_exit: Optional[int]    # OccamResNet: exits before it take no samples
    train_seconds: Optional[float]         # None: not recorded (a run from before it was)
    steps: int
    complete: bool                         # trained every epoch (not cut by --max-steps)
    reused: bool                           # read from an earlier invocation's report
    worst_group_accuracy: Optional[float] = None   # on the test split (None: not reported)


@dataclasses.dataclass
class Row:
    """A row of the table: one (model, method, ablation), over its seeds."""
    name: str
    model: str
    method: str
    ablation: str
    seeds: List[int]
    test_accuracy_mean: float
    test_accuracy_std: Optional[float]     # sample std over the seeds; None for one seed
    exit_share_mean: Optional[List[float]]
    first_inference_exit: Optional[int]
    train_seconds_mean: Optional[float]
    steps: int
    complete: bool
    worst_group_accuracy_mean: Optional[float] = None


@dataclasses.dataclass
class Comparison:
    preset: str
    settings: Dict                         # the options every cell shared, on top of the preset
    rows: List[Row]
    cells: List[CellResult]
    wall_seconds: float

    @property
    def dataset(self) -> DatasetSpec:
        return dataset_of(self.settings)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def save_chart(self, path: str) -> str:
        """The headline accuracy per row as bars; like the table's notes, it names the rows
        cut by --max-steps and the settings changed from the preset."""
        from .viz import save_comparison_chart   # matplotlib, only when drawing
        rows = self.rows
        changed = sorted(k for k in self.settings if k not in DISPLAY_ONLY)
        return save_comparison_chart(
            path, [r.name + ("" if r.complete else " (cut)") for r in rows],
            [r.test_accuracy_mean for r in rows], [r.test_accuracy_std for r in rows],
            [MODELS[r.model] for r in rows],
            title=f"{self.dataset.headline_name.capitalize()} accuracy ({self.preset} preset"
                  + (f"; also set: {', '.join(changed)}" if changed else "") + ")",
            every_kind=list(MODELS.values()))   # a model's colour, whichever rows are drawn

    def to_markdown(self) -> str:
        occam = [r for r in self.rows if r.exit_share_mean]
        # Exits before the first inference exit take no samples: no column.
        first = min((r.first_inference_exit for r in occam), default=0)
        exits = range(first, max((len(r.exit_share_mean) for r in occam), default=0))
        worst = ["worst group %"] if self.dataset.reports_groups else []
        header = (["model", "method", "ablation", "seeds",
                   f"{self.dataset.headline_name} acc %"] + worst
                  + [f"E{t} share %" for t in exits] + ["train s per run", "steps"])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            accuracy = percent(row.test_accuracy_mean) + (
                "" if row.test_accuracy_std is None else f" ± {percent(row.test_accuracy_std)}")
            shares = ([percent(row.exit_share_mean[t]) for t in exits] if row.exit_share_mean
                      else ["-"] * len(exits))
            steps = f"{row.steps}" + ("" if row.complete else " (cut)")
            worst_value = [percent(row.worst_group_accuracy_mean)] if worst else []
            lines.append("| " + " | ".join(
                [MODELS[row.model], row.method, row.ablation, str(len(row.seeds)), accuracy]
                + worst_value + shares + [seconds(row.train_seconds_mean), steps]) + " |")
        cut = any(not r.complete for r in self.rows)
        shared = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items())
                           if k not in DISPLAY_ONLY)
        reused = sum(c.reused for c in self.cells)
        notes = [f"Preset `{self.preset}`{f' with {shared}' if shared else ''}; ± is the sample standard deviation over the seeds "
                 f"(none with one seed); exit shares are OccamResNet's on the test split. This "
                 f"invocation trained {len(self.cells) - reused} cells and read {reused} "
                 f"finished earlier, in {self.wall_seconds:.0f} s."]
        if cut:
            notes.append("(cut): training stopped at --max-steps, before the preset's last "
                         "epoch; the accuracies are those of the weights at that step.")
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def dataset_of(settings: Dict) -> DatasetSpec:
    """The dataset the grid's shared settings train on."""
    return spec(settings.get("dataset", BIASED_MNIST))


def seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def grid(models: Sequence[str], methods: Sequence[str], ablations: Sequence[str],
         seeds: Sequence[int]) -> List[Cell]:
    """The cells in the order they run; ablations apply to OccamResNet only (the ResNet
    rows have "none")."""
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation {unknown[0]!r}; choose from {', '.join(ABLATIONS)}")
    return [Cell(model, method, ablation, seed)
            for model in models for method in methods
            for ablation in (ablations if model == "occam" else ["none"])
            for seed in seeds]


def cell_config(cell: Cell, preset: str, out: str, settings: Dict) -> RunConfig:
    """The cell's run: the grid's shared settings, its own model, method, ablation, seed and
    directory (and TensorBoard subdirectory, so that TensorBoard shows the cells side by
    side)."""
    own = dict(model=cell.model, method=cell.method, seed=cell.seed, out_dir=cell.run_dir(out),
               **ABLATIONS[cell.ablation])
    if settings.get("tensorboard"):
        own["tensorboard"] = os.path.join(settings["tensorboard"], cell.row, f"seed-{cell.seed}")
    return RunConfig.from_preset(preset, **dict(settings, **own))


def _finished_report(config: RunConfig) -> Optional[Dict]:
    """The cell's report when it was written for these settings and this many steps."""
    path = os.path.join(config.run_dir, "report.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        saved = json.load(handle)
    try:
        check_resumable(RunConfig.from_dict(saved["config"]), config)
    except (ValueError, KeyError, TypeError):
        return None
    if _absolute(saved["config"].get("data_root")) != _absolute(config.data_root):
        # Another real dataset's directory (the identity leaves where the data lives out, as
        # a dataset may move): the cell resumes, and its checkpoint's checks of the classes
        # and the training split refuse other data, or re-evaluate moved data.
        return None
    if saved["config"].get("epochs") != config.epochs:
        return None   # more epochs asked for now: the cell continues (fewer are refused)
    wanted_steps = config.max_steps
    if saved.get("complete", True) is False and (wanted_steps is None
                                                  or saved.get("steps", 0) < wanted_steps):
        return None   # cut before the steps asked for now: the cell continues
    return saved


class TrainingSplits:
    """Whether a finished cell was trained on the training split a real dataset holds now (a
    folder dataset's CSV may have been edited since): its checkpoint's fingerprint against the
    labels and bias attributes of the dataset's index (no image is read), once per dataset
    however many cells ask. A Biased MNIST is a function of its settings, which the report's
    config already matched."""

    def __init__(self):
        self.fingerprints: Dict[tuple, Optional[Dict]] = {}

    def unchanged_for(self, config: RunConfig) -> bool:
        if config.dataset == BIASED_MNIST:
            return True
        key = (config.dataset, config.data_root, str(config.bias_columns))
        if key not in self.fingerprints:
            try:
                index = find(config.dataset, config.root, config.bias_columns)
                labels, attributes, _ = index.split(config.dataset_spec.train).tensors()
            except (OSError, ValueError):
                # The data is gone or unreadable: nothing to compare with; the reports stand.
                self.fingerprints[key] = None
            else:
                self.fingerprints[key] = fingerprint(labels, attributes)
        if self.fingerprints[key] is None:
            return True
        try:
            trained = read_checkpoint(config.checkpoint_path).get("train_split")
        except FileNotFoundError:
            return True    # the checkpoint deleted: the report stands (retraining would not)
        except (OSError, ValueError):
            return False   # a damaged checkpoint: the cell resumes, which says what is wrong
        return trained is None or trained == self.fingerprints[key]


def _absolute(path: Optional[str]) -> Optional[str]:
    return None if path is None else os.path.abspath(path)


def _result(cell: Cell, report: Dict, reused: bool) -> CellResult:
    test = report["test"]
    trained = report.get("train_seconds")
    known = isinstance(trained, (int, float)) and math.isfinite(trained)
    worst = test.get("worst_group") or {}
    return CellResult(cell, test["accuracy"], test.get("exit_share"),
                      test.get("first_inference_exit"), trained if known else None,
                      report.get("steps", 0), report.get("complete", True), reused,
                      worst.get("accuracy"))


def run_cell(config: RunConfig, hint: str) -> Dict:
    """Train (or continue) one cell and report it (as JSON data); Interrupted when a stop
    signal ended its training."""
    try:
        trainer = Trainer(config, resume=existing_checkpoint(config))   # reads and checks the checkpoint first
    except CheckpointMismatch as error:
        # Its message names what differs (settings, classes, training split) and the advice.
        raise ValueError(f"{config.run_dir}: {error}") from error
    trainer.continue_hint, trainer.say_max_steps = hint, False
    trainer.train()
    if trainer.interrupted:
        raise Interrupted(trainer.stop_signal)
    report = trainer.report()   # after the last epoch, or at --max-steps (marked cut)
    # Its TensorBoard writer's thread and DDP wrapper, cell by cell; a process group
    # (torchrun) stays for the next cell: a second group on torchrun's store could read the
    # first one's addresses. run_comparison ends it after the last cell.
    trainer.close(end_group=False)
    return json.loads(json.dumps(report.to_dict(), default=str))


def summarise(results: List[CellResult]) -> List[Row]:
    rows: Dict[str, List[CellResult]] = {}
    for result in results:
        rows.setdefault(result.cell.row, []).append(result)
    summary = []
    for name, members in rows.items():
        accuracies = [m.test_accuracy for m in members]
        shares = [m.exit_share for m in members if m.exit_share]
        times = [m.train_seconds for m in members if m.train_seconds is not None]
        worst = [m.worst_group_accuracy for m in members if m.worst_group_accuracy is not None]
        first = members[0].cell
        summary.append(Row(
            name, first.model, first.method, first.ablation, [m.cell.seed for m in members],
            statistics.fmean(accuracies),
            statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            [statistics.fmean(s) for s in zip(*shares)] if shares else None,
            members[0].first_inference_exit,
            statistics.fmean(times) if times else None,
            max(m.steps for m in members), all(m.complete for m in members),
            statistics.fmean(worst) if worst else None))
    return summary


def run_comparison(cells: Sequence[Cell], preset: str, out: str, settings: Dict,
                   hint: str, say: Callable[[str], None] = print) -> Comparison:
    """Run every cell not finished before; write compare.md, compare.json and compare.png
    into `out`. Interrupted when a stop signal ended a cell (its checkpoint is written).
    Under torchrun every process trains every cell; the first one says and writes, and the
    process group the first cell started ends after the last."""
    started = time.perf_counter()
    first_process = os.environ.get("RANK", "0") == "0"
    say = say if first_process else (lambda line: None)
    had_group = dist.is_initialized()
    configs = [cell_config(cell, preset, out, settings) for cell in cells]  # checked first
    test_name = dataset_of(settings).headline_name
    results = []
    training_splits = TrainingSplits()
    for number, (cell, config) in enumerate(zip(cells, configs), 1):
        label = f"[{number}/{len(cells)}] {cell.row} seed {cell.seed}"
        report = _finished_report(config)
        if report is not None and not training_splits.unchanged_for(config):
            report = None   # it resumes: its checkpoint's check names what changed
        reused = report is not None
        if reused:
            say(f"{label}: finished before, read from {config.run_dir}")
        else:
            say(f"{label}: training in {config.run_dir}")
            report = run_cell(config, hint)
        result = _result(cell, report, reused)
        results.append(result)
        cut = "" if result.complete else f" (stopped at step {result.steps}: --max-steps)"
        say(f"{label}: {test_name} accuracy {percent(result.test_accuracy)}%, "
            f"{seconds(result.train_seconds)} s of training{cut}")
    if not had_group:
        end_process_group()   # every cell is done with it (none is after an error: see close)
    comparison = Comparison(preset, dict(settings), summarise(results), results,
                            time.perf_counter() - started)
    if not first_process:
        return comparison
    os.makedirs(out, exist_ok=True)
    with atomic_path(os.path.join(out, TABLE)) as tmp, open(tmp, "w") as handle:
        handle.write(comparison.to_markdown())
    with atomic_path(os.path.join(out, JSON_NAME)) as tmp, open(tmp, "w") as handle:
        json.dump(comparison.to_dict(), handle, indent=1)
    comparison.save_chart(os.path.join(out, CHART))
    return comparison
