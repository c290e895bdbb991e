"""Using a trained model: load it from a checkpoint, load the split to judge it on, evaluate
it (accuracy, exits, bias groups, timed inference) and gather the data the pictures draw.

The trainer, the CLI and the demo all evaluate through `evaluate`; none of this builds an
optimiser or reads more data than the split asked for.
"""
import contextlib
import dataclasses
import functools
import math
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from occam_kernels import available_backends

from .checkpoints import read_checkpoint
from .config import RunConfig, plural, resolve_device
from .data import biased_mnist
from .data.catalog import BIASED_MNIST
from .data.loaders import DeviceSplit, LabelledItems, cell_fraction, normalise
from .data.real_splits import load_real_splits
from .metrics import (CamAgreement, CamAgreementAccumulator, Reliability,
                      ReliabilityAccumulator)
from .models import OccamNet, ResNet, build_model
from .progress import close, progress_bar


# -- checkpoints and data ---------------------------------------------------------------------

def load_model_state(model: nn.Module, state: Dict, path: str) -> None:
    """The checkpoint's weights into `model`, or a ValueError saying why they do not fit (a
    checkpoint from before the exits' convs had biases, for one)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"the weights in {path} do not fit this version's "
                         f"{type(model).__name__} (written by an older occamnets? its exit "
                         f"convs had no biases before 2026-11-27): {error}") from error


def checkpoint_config(path: str) -> RunConfig:
    """The config of the run that wrote the checkpoint at `path`."""
    return RunConfig.from_dict(read_checkpoint(path)["config"])


def load_model(path: str, device: Optional[str] = None) -> Tuple[nn.Module, RunConfig]:
    """(model in eval mode on `device` (default: a GPU when present), its run's config) from a
    checkpoint written by the trainer. Reads nothing else: no data, no optimiser."""
    return model_from_checkpoint(read_checkpoint(path), path, device)


def model_from_checkpoint(checkpoint: Dict, path: str, device: Optional[str] = None
                          ) -> Tuple[nn.Module, RunConfig]:
    """load_model for a checkpoint already read (by read_checkpoint) from `path`. The
    checkpoint's "class_names" are the names of the classes the model predicts, in label
    order (absent: a dataset without names, as Biased MNIST's digits, or a checkpoint from
    before they were stored)."""
    config = RunConfig.from_dict(checkpoint["config"])
    device = resolve_device(device or "auto")
    model = build_model(config.model, checkpoint["num_classes"], config.width, config.stem,
                        inference_backend(config.backend, device))
    load_model_state(model, checkpoint["model"], path)
    return model.to(device).eval(), config


def inference_backend(trained_with: str, device: torch.device) -> str:
    """The run's exit-head backend where it can run on `device`, else "auto": every backend
    computes the same function, so a run trained with Triton on a GPU is evaluated on a CPU."""
    if trained_with == "auto" or available_backends(device).get(trained_with, False):
        return trained_with
    return "auto"


def load_splits(config: RunConfig, device, names: Optional[Sequence[str]] = None,
                progress: bool = False, count: Optional[int] = None, verbose: bool = True
                ) -> Dict[str, LabelledItems]:
    """The splits `names` of the run's dataset (None: every split the run trains or reports
    on), on `device`; only their files are read and checked.

    Biased MNIST: when they are missing or damaged the whole dataset is generated again into
    the run's dataset directory (it is a function of its config, and one random stream makes
    all three splits, so the others are rendered too); a directory holding another dataset is
    never overwritten. A real dataset: read from its directory, its decoded images cached in
    the run's dataset directory (or streamed when larger than the config's limit). verbose:
    say on stdout when Biased MNIST is generated again."""
    if config.dataset != BIASED_MNIST:
        return load_real_splits(config.dataset, config.root, names, config.dataset_dir,
                                config.input_size, device, config.bias_columns,
                                limit_bytes=config.cache_limit_gb * 1e9,
                                workers=config.workers, progress=progress, count=count,
                                decoder=config.decoder)
    names = biased_mnist.SPLITS if names is None else names
    unknown = [n for n in names if n not in biased_mnist.SPLITS]
    if unknown:
        raise ValueError(f"Biased MNIST has no split {unknown[0]!r}; its splits are "
                         f"{', '.join(biased_mnist.SPLITS)}")
    dataset, directory = config.biased_mnist(), config.dataset_dir
    try:
        # Memory-mapped (copy on write): only the rows used are read (count: a few images),
        # a split sent to a GPU leaves no second whole copy in host memory, and on a CPU the
        # pages are the file cache's, which the system can reclaim.
        splits = biased_mnist.load(dataset, directory, names, progress=progress,
                                   verbose=verbose, replace_other=False, mmap=True)
    except FileNotFoundError as error:
        problem = biased_mnist.cache_problem(dataset, directory, names)
        raise FileNotFoundError(f"the {', '.join(names)} split of this run's Biased MNIST is "
                                f"not in {directory} ({problem}) and cannot be regenerated: "
                                f"{error}") from error
    rows = slice(0, count)  # count: the first images only (a picture needs no more)
    return {name: DeviceSplit(s.images[rows], s.labels[rows], s.factors[rows], s.factor_names,
                              device, masks=s.digit_masks[rows], aligned=s.aligned[rows])
            for name, s in splits.items()}


def reports_groups(config: RunConfig) -> bool:
    """Whether the run's evaluations give bias-group accuracies (see `evaluate`)."""
    return config.dataset_spec.reports_groups


def split_description(config: RunConfig, name: str) -> str:
    """What a split of the run's dataset is, for the reports."""
    text = config.dataset_spec.describe(name)
    if config.dataset == BIASED_MNIST and name in ("train", "val"):
        text += f" (p_bias {config.p_bias})"
    return text


# -- evaluation -------------------------------------------------------------------------------

@dataclasses.dataclass
class FactorAccuracy:
    """Accuracy on the samples whose factor takes their class's value, and on the others."""
    aligned: Optional[float]
    conflicting: Optional[float]


@dataclasses.dataclass
class GroupAccuracy:
    """Accuracy on the items of one bias group (label x attribute values)."""
    name: str
    images: int
    accuracy: float


# Groups listed one by one in a report up to this many (Biased MNIST's seven factors make
# thousands, mostly of one image: only the worst and the mean are reported then).
MAX_LISTED_GROUPS = 64


@dataclasses.dataclass
class ExitDiagnostics:
    """One exit's (a plain classifier's: its output's) calibration and CAM agreement, over
    every sample of the split (every exit sees every sample here, as in the official)."""
    name: str                                   # "E0", "E1", ... or "output"
    class_calibration: Reliability              # top-label softmax confidence vs correct
    gate_calibration: Optional[Reliability] = None  # p(exit) vs this exit being correct
    cam: Optional[CamAgreement] = None          # the true class's CAM vs the object mask
    nonfinite_logits: int = 0


@dataclasses.dataclass
class Evaluation:
    split: str
    images: int
    accuracy: float
    images_per_s: float                             # what inference runs (early exit for OccamNets)
    # samples inference gave non-finite logits, or whose gates were non-finite (never exited)
    nonfinite_samples: int = 0
    full_depth_images_per_s: Optional[float] = None  # every exit on every sample, when timed
    early_exit: bool = True     # False: inference took every sample to the last exit (ablation)
    # OccamNets only, one entry per exit (exits before first_inference_exit take no samples):
    first_inference_exit: Optional[int] = None
    exit_counts: Optional[List[int]] = None
    exit_share: Optional[List[float]] = None
    exit_accuracy_taken: Optional[List[Optional[float]]] = None   # on the samples it took
    exit_accuracy_all_samples: Optional[List[float]] = None       # had every sample stopped there
    factors: Dict[str, FactorAccuracy] = dataclasses.field(default_factory=dict)
    diagnostics: List[ExitDiagnostics] = dataclasses.field(default_factory=list)
    # Bias groups: how many, the worst one, the mean of the groups' accuracies, and each
    # group when there are at most MAX_LISTED_GROUPS.
    group_count: int = 0
    worst_group: Optional[GroupAccuracy] = None
    mean_group_accuracy: Optional[float] = None
    groups: List[GroupAccuracy] = dataclasses.field(default_factory=list)

    def to_markdown(self) -> str:
        kind = "" if self.exit_share is None else (
            "early-exit " if self.early_exit else "last-exit (no early exit) ")
        rate = f"{kind}inference {self.images_per_s:.0f} images/s"
        if self.full_depth_images_per_s is not None:
            rate += f", every exit on every sample {self.full_depth_images_per_s:.0f} images/s"
        lines = [f"Accuracy on {self.split} ({self.images} images): "
                 f"**{percent(self.accuracy)}%**; {rate}", ""]
        if self.worst_group is not None:
            worst = self.worst_group
            lines += [f"Worst-group accuracy **{percent(worst.accuracy)}%** ({worst.name}; "
                      f"{plural(worst.images, 'image')}); mean over the {self.group_count} "
                      f"bias groups {percent(self.mean_group_accuracy)}%", ""]
        if self.groups:
            lines += ["| bias group | images | accuracy % |", "|---|---|---|"]
            lines += [f"| {g.name} | {g.images} | {percent(g.accuracy)} |" for g in self.groups]
            lines.append("")
        if self.nonfinite_samples:
            lines += [f"**Warning: {self.nonfinite_samples} samples had non-finite logits or "
                      f"gates** (a NaN gate never exits; those samples went deeper).", ""]
        if self.exit_share is not None:
            lines += ["| exit | share of samples % | accuracy of its samples % | accuracy on all % |",
                      "|---|---|---|---|"]
            # (without the every-exit pass there is no accuracy on all samples: "-")
            all_samples = self.exit_accuracy_all_samples or [None] * len(self.exit_share)
            for t, share in enumerate(self.exit_share):
                lines.append(f"| E{t} | {percent(share)} | "
                             f"{percent(self.exit_accuracy_taken[t])} | "
                             f"{percent(all_samples[t])} |")
            lines.append("")
        if self.diagnostics:
            # The CAM columns only where the data has object masks (Biased MNIST's digits).
            masks = any(d.cam for d in self.diagnostics)
            lines += ["| exit | ECE of the class softmax % | ECE of the gate % |"
                      + (" CAM mass on the digit % (digit area %) | CAM IoU % (threshold) |"
                         if masks else ""),
                      "|---|---|---|" + ("---|---|" if masks else "")]
            for d in self.diagnostics:
                gate = percent(d.gate_calibration.ece) if d.gate_calibration else "-"
                cam = (f"{percent(d.cam.mass_in_object)} ({percent(d.cam.object_area)})",
                       f"{percent(d.cam.iou)} ({d.cam.iou_threshold:.1f})") if d.cam else ("-", "-")
                lines.append(f"| {d.name} | {percent(d.class_calibration.ece)} | {gate} |"
                             + (f" {cam[0]} | {cam[1]} |" if masks else ""))
            lines.append("")
        if self.factors:
            lines += ["| factor | bias-aligned % | bias-conflicting % |", "|---|---|---|"]
            for name, values in self.factors.items():
                lines.append(f"| {name} | {percent(values.aligned)} | "
                             f"{percent(values.conflicting)} |")
            lines.append("")
        return "\n".join(lines)


def percent(value: Optional[float]) -> str:
    """A share as a percentage with one decimal; "-" when there is none."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


class Classified(NamedTuple):
    logits: Tensor                 # (B, K)
    exit_index: Optional[Tensor]   # (B,) for an OccamNet, else None
    nonfinite: Tensor              # (B,) bool: non-finite logits, or (OccamNet) gates


def check_images(x: Tensor) -> None:
    """A ValueError unless `x` is a float batch (B, 3, H, W) in [0, 1], what the models were
    trained on (one host read)."""
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"images must be a float (B, 3, H, W) batch, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"images must hold at least one pixel, got {tuple(x.shape)}")
    low, high = torch.stack(torch.aminmax(x.float())).tolist()
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(f"images must lie in [0, 1] as in training, got values in [{low:g}, "
                         f"{high:g}]: scale uint8 images with occamnets.data.normalise")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (BatchNorm on its running statistics, as inference runs) for the
    block, and every module's mode as it was after: judging a model being trained leaves it
    training."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _in_eval_mode(function):
    """`function(model, ...)` run with the model in eval mode (`eval_mode`)."""
    @functools.wraps(function)
    def in_eval_mode(model: nn.Module, *args, **kwargs):
        with eval_mode(model):
            return function(model, *args, **kwargs)
    return in_eval_mode


@torch.no_grad()
def classify(model: nn.Module, x: Tensor, threshold: float = 0.5,
             check: bool = True) -> Classified:
    """What inference runs: early exit for an OccamNet, the forward pass for a plain
    classifier; without autograd, and in eval mode: a model in train mode (which early exit
    refuses, and in which a forward pass would move BatchNorm's running statistics) is
    switched to it for the call and back after. check: refuse inputs that are not images in
    [0, 1] (a host read; the evaluator, whose inputs are its own, skips it)."""
    if check:
        check_images(x)
    if model.training:
        with eval_mode(model):
            return classify(model, x, threshold, check=False)
    if isinstance(model, OccamNet):
        result = model.early_exit(x, threshold)
        return Classified(result.logits, result.exit_index, result.nonfinite)
    logits = model(x)
    return Classified(logits, None, ~torch.isfinite(logits).all(1))


def _timed(step: Callable[[Tensor], object], chunks: List[Tensor],
           inputs: Callable[[Tensor], Tensor],
           tick: Optional[Callable[[], object]] = None) -> Tuple[list, float]:
    """(step's outputs per chunk, seconds for all of them); one untimed warm-up chunk first
    (kernel compilation, cuDNN algorithm search). tick: called after each chunk."""
    step(inputs(chunks[0]))
    device = chunks[0].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    outputs = []
    for rows in chunks:
        outputs.append(step(inputs(rows)))
        if tick is not None:
            tick()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return outputs, time.perf_counter() - started


@torch.no_grad()
@_in_eval_mode
def evaluate(model: nn.Module, split: DeviceSplit, split_name: str = "test", *,
             threshold: float = 0.5, batch_size: int = 256, channels_last: bool = False,
             bf16: bool = False, per_factor: bool = True, diagnostics: bool = True,
             time_full_depth: bool = False, progress: bool = False,
             per_group: bool = True, per_exit: bool = True) -> Evaluation:
    """Judge `model` on `split` as inference runs it: early exit with compaction for an
    OccamNet (timed), its plain forward otherwise (timed). For an OccamNet also every exit on
    every sample (untimed, for the per-exit accuracies and diagnostics; timed too with
    time_full_depth). diagnostics: per-exit calibration, and CAM agreement with the split's
    object masks when it has them. channels_last and bf16 autocast apply on CUDA only.
    progress: a progress bar on stderr (when it is a terminal). per_group: the bias groups'
    accuracies (worst, mean, each); off for Biased MNIST, whose groups (digit x seven
    factors) are mostly single images (its per-factor accuracies say what they would).
    per_exit: an OccamNet's untimed every-exit pass (per-exit accuracy on all samples, and
    their diagnostics); off where only the accuracy and speed are kept (per-epoch validation),
    which saves one full-depth pass over the split. The model runs in eval mode; its mode is
    restored after."""
    if len(split) == 0:
        raise ValueError(f"the {split_name} split is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    classes = getattr(model, "num_classes", None)
    low, high = torch.stack(torch.aminmax(split.labels)).tolist()  # one host read
    if classes is not None and not 0 <= low <= high < classes:
        raise ValueError(f"the {split_name} split has labels in [{low}, {high}], the model "
                         f"predicts {classes} classes")
    on_gpu = split.device.type == "cuda"
    autocast = torch.autocast(split.device.type, dtype=torch.bfloat16, enabled=bf16 and on_gpu)
    chunks = [torch.arange(start, min(start + batch_size, len(split)), device=split.device)
              for start in range(0, len(split), batch_size)]

    def inputs(rows: Tensor) -> Tensor:
        return split.batch(rows, channels_last and on_gpu)

    result = Evaluation(split_name, len(split), accuracy=math.nan, images_per_s=math.nan,
                        early_exit=math.isfinite(threshold))
    labels = split.labels
    has_exits = isinstance(model, OccamNet)
    every_exit_pass = has_exits and per_exit
    # A plain classifier's CAMs against the object masks: one untimed pass of its own.
    plain_cams = (not has_exits and diagnostics and split.masks is not None
                  and isinstance(model, ResNet))
    passes = 1 + every_exit_pass + (has_exits and time_full_depth) + plain_cams
    bar = progress_bar(passes * len(chunks), f"evaluating {split_name}", progress)
    tick = bar.update if bar is not None else None
    with autocast:
        if every_exit_pass:
            every_exit, exit_diagnostics = _every_exit(model, split, chunks, inputs,
                                                       diagnostics, tick)
        if has_exits:
            if time_full_depth:
                _, full_seconds = _timed(lambda x: model.early_exit(x, threshold, compaction=False),
                                         chunks, inputs, tick)
                result.full_depth_images_per_s = len(split) / max(full_seconds, 1e-9)
        if plain_cams:
            output_cams = _output_cam_agreement(model, split, chunks, inputs, tick)
        outputs, seconds = _timed(lambda x: classify(model, x, threshold, check=False), chunks,
                                  inputs, tick)
    close(bar)
    logits = torch.cat([out.logits for out in outputs]).float()
    correct = logits.argmax(1) == labels
    result.nonfinite_samples = int(torch.cat([out.nonfinite for out in outputs]).sum())
    result.accuracy = correct.float().mean().item()
    result.images_per_s = len(split) / max(seconds, 1e-9)
    if has_exits:
        exit_index = torch.cat([out.exit_index for out in outputs])
        counts = torch.bincount(exit_index, minlength=model.num_exits)
        right = torch.bincount(exit_index, weights=correct.double(), minlength=model.num_exits)
        result.first_inference_exit = model.first_inference_exit
        result.exit_counts = counts.tolist()
        result.exit_share = (counts.double() / len(split)).tolist()
        result.exit_accuracy_taken = _ratios(right, counts)
        if every_exit_pass:
            result.exit_accuracy_all_samples = every_exit.mean(0).tolist()
            result.diagnostics = exit_diagnostics
    elif diagnostics:
        calibration = ReliabilityAccumulator(split.device)
        calibration.add(torch.softmax(logits, 1).max(1).values, correct)
        result.diagnostics = [ExitDiagnostics("output", calibration.result(),
                                              cam=output_cams if plain_cams else None,
                                              nonfinite_logits=result.nonfinite_samples)]
    if per_group:
        _group_accuracy(result, split, correct)
    if per_factor and split.aligned is not None:
        aligned = split.aligned                                         # (N, factors)
        hits = correct[:, None]
        aligned_accuracy = _ratios((aligned & hits).sum(0), aligned.sum(0))
        conflicting_accuracy = _ratios((~aligned & hits).sum(0), (~aligned).sum(0))
        result.factors = {name: FactorAccuracy(a, c) for name, a, c in
                          zip(split.factor_names, aligned_accuracy, conflicting_accuracy)}
    return result


def _group_accuracy(result: Evaluation, split: LabelledItems, correct: Tensor) -> None:
    """The bias groups' accuracies into `result`: the worst, the mean, and each (when few)."""
    groups = split.groups
    if groups.count == 0:
        return
    right = torch.bincount(groups.index, weights=correct.double(), minlength=groups.count)
    accuracy = right / groups.sizes.double()
    worst = int(accuracy.argmin())
    names = groups.names(split.class_names) if groups.count <= MAX_LISTED_GROUPS else None
    values, sizes = accuracy.tolist(), groups.sizes.tolist()
    result.group_count = groups.count
    result.mean_group_accuracy = sum(values) / len(values)
    result.worst_group = GroupAccuracy(groups.name(worst, split.class_names), sizes[worst],
                                       values[worst])
    if names:
        result.groups = [GroupAccuracy(*entry) for entry in zip(names, sizes, values)]


def _every_exit(model: OccamNet, split: DeviceSplit, chunks: List[Tensor],
                inputs: Callable[[Tensor], Tensor], diagnostics: bool,
                tick: Optional[Callable[[], object]] = None
                ) -> Tuple[Tensor, List[ExitDiagnostics]]:
    """(N, exits) float: each exit right on each sample; and per exit its diagnostics (an
    empty list without diagnostics)."""
    device, exits = split.device, model.num_exits
    with_cams = diagnostics and split.masks is not None
    classes = [ReliabilityAccumulator(device) for _ in range(exits)]
    gates = [ReliabilityAccumulator(device) for _ in range(exits)]
    cams = [CamAgreementAccumulator(device) for _ in range(exits)]
    nonfinite = torch.zeros(exits, dtype=torch.int64, device=device)
    right = []
    for rows in chunks:
        out, y = model(inputs(rows), return_cams=with_cams), split.labels[rows]
        masks = split.object_masks(rows) if with_cams else None  # unpacked once for all exits
        row = []
        for t, exit_out in enumerate(out.exits):
            logits = exit_out.logits.float()
            correct = logits.argmax(1) == y
            row.append(correct)
            if not diagnostics:
                continue
            nonfinite[t] += (~torch.isfinite(logits).all(1)).sum()
            classes[t].add(torch.softmax(logits, 1).max(1).values, correct)
            gates[t].add(exit_out.gate.float(), correct)
            if with_cams:
                cams[t].add(_true_class_cam(exit_out.cam, y),
                            cell_fraction(masks, *exit_out.cam.shape[2:]))
        right.append(torch.stack(row, 1))
        if tick is not None:
            tick()
    every_exit = torch.cat(right).float()
    if not diagnostics:
        return every_exit, []
    return every_exit, [ExitDiagnostics(f"E{t}", classes[t].result(), gates[t].result(),
                                         cams[t].result() if with_cams else None, count)
                        for t, count in enumerate(nonfinite.tolist())]


def _true_class_cam(cams: Tensor, labels: Tensor) -> Tensor:
    """(N, h, w) float: each sample's CAM for its true class."""
    height, width = cams.shape[2:]
    true_class = labels[:, None, None, None].expand(-1, 1, height, width)
    return cams.float().gather(1, true_class)[:, 0]


def _output_cam_agreement(model: ResNet, split: DeviceSplit, chunks: List[Tensor],
                          inputs: Callable[[Tensor], Tensor],
                          tick: Optional[Callable[[], object]] = None) -> CamAgreement:
    """The agreement of a plain ResNet's last-stage CAM (its true class) with the objects."""
    agreement = CamAgreementAccumulator(split.device)
    for rows in chunks:
        _, cams = model.forward_with_cams(inputs(rows))
        agreement.add(_true_class_cam(cams, split.labels[rows]),
                      split.object_fraction(rows, *cams.shape[2:]))
        if tick is not None:
            tick()
    return agreement.result()


def _ratios(numerators: Tensor, denominators: Tensor) -> List[Optional[float]]:
    """numerator / denominator per entry, None where the denominator is 0 (one host read)."""
    pairs = torch.stack([numerators.double(), denominators.double()], 1).tolist()
    return [n / d if d else None for n, d in pairs]


# -- the data behind the pictures -------------------------------------------------------------

@dataclasses.dataclass
class CamPictureData:
    """Images (a split's first, or image files) and, for each exit used at inference (an
    OccamNet) or for the output (a plain ResNet: the last stage's CAM), its CAMs and
    predictions, with the exit each image took (viz.save_cam_grid draws it)."""
    images: Tensor              # (N, 3, H, W) uint8
    labels: Optional[Tensor]    # (N,); None: image files, whose classes are not known
    column_names: List[str]     # per CAM column: "E1", "E2", ... or "output"
    cams: List[Tensor]          # per column: (N, K, h, w)
    predictions: List[Tensor]   # per column: (N,)
    exit_taken: Optional[List[int]]   # per image: the column index of its exit (OccamNets)
    captions: Optional[List[str]] = None   # per image, shown in place of its label


def cam_picture_data(model: nn.Module, split: DeviceSplit, count: int = 6,
                     threshold: float = 0.5) -> CamPictureData:
    """The CAMs of the split's first `count` images: the same images for every model given
    the same split, so that two models' pictures can be set side by side. The model runs in
    eval mode; its mode is restored after."""
    if count < 1 or len(split) == 0:
        raise ValueError(f"need at least one image to draw (count {count}, split of {len(split)})")
    rows = torch.arange(min(count, len(split)), device=split.device)
    images, labels = split.uint8(rows), split.labels[rows]   # fetched (or decoded) once
    return cams_of_images(model, images, threshold, labels=labels)


@torch.no_grad()
@_in_eval_mode
def cams_of_images(model: nn.Module, images: Tensor, threshold: float = 0.5,
                   labels: Optional[Tensor] = None,
                   captions: Optional[List[str]] = None) -> CamPictureData:
    """The CAM picture data of uint8 images (N, 3, H, W) on the model's device, prepared as
    its training images were: each exit's CAMs and predictions (a ResNet: its last stage's)
    and the exit each image takes at `threshold`. `labels` (a split's) or `captions` (image
    files' names) title the rows. The model runs in eval mode; its mode is restored after."""
    if not isinstance(model, (OccamNet, ResNet)):
        raise TypeError(f"CAM pictures need an OccamNet or a ResNet, got {type(model).__name__}")
    x = normalise(images)
    if isinstance(model, ResNet):
        logits, cams = model.forward_with_cams(x)
        return CamPictureData(images, labels, ["output"], [cams], [logits.argmax(1)], None,
                              captions)
    out = model(x, return_cams=True)
    first = model.first_inference_exit
    used = out.exits[first:]
    taken = (model.early_exit(x, threshold).exit_index - first).tolist()
    return CamPictureData(images, labels, [f"E{t}" for t in range(first, model.num_exits)],
                          [e.cam for e in used], [e.logits.argmax(1) for e in used], taken,
                          captions)
