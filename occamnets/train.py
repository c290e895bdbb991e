"""Trainer for OccamResNet and the ResNet baseline on Biased MNIST.

Resumable exactly: a checkpoint holds the model, optimiser, scheduler, the objective's state
(OccamLoss's), RNG states, the epoch and the batch within it; the batch order of an epoch is
a function of (seed, epoch) (and, under balanced sampling, of the training split's groups or
classes and the sampling's gamma), so a resumed run sees the same batches. Ctrl-C and SIGTERM
write a checkpoint before stopping, and `checkpoint_every` writes one every N steps. What is
trained is decided once, by the objective (`make_objective`: the model's loss, the debiasing
method and the ablations of the config).
"""
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoints import read_checkpoint, resume_command, write_checkpoint
from .config import RunConfig, plural, resolve_device
from .data.augment import random_crop_flip
from .data.biased_mnist import VAL_MIXED
from .data.catalog import BIASED_MNIST
from .data.loaders import LabelledItems
from .environment import RunEnvironment, collect_environment, device_name
from .evaluate import (Evaluation, evaluate, load_model_state, load_splits,
                       reports_groups, split_description)
from .files import atomic_path, make_writable_dir, remove_stale_temporaries
from .losses import PER_PROCESS_PARTS, OccamLoss
from .methods import Method, build_method, feature_parameters
from .models import MODELS, build_model
from .plain_data import from_plain
from .progress import close, progress_bar
from .sampling import epoch_order, sampling_line, sampling_weights
from .text import first_few

# -- what is trained: one objective per model kind ---------------------------------------------

Forward = Callable[..., object]


class ObjectiveOutput(NamedTuple):
    loss: Tensor                        # backpropagated into every parameter
    parts: Dict[str, Tensor]            # its components (and the penalty's), for the logs
    feature_penalty: Optional[Tensor]   # backpropagated into the feature extractor only (PGI)


class ClassifierObjective:
    """The baseline: the method's loss (ERM: cross-entropy) on the plain classifier's logits.
    `groups` (N,): the training items' bias groups."""

    def __init__(self, method: Method, groups: Tensor):
        self.method, self.groups = method, groups

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def __call__(self, forward: Forward, x: Tensor, labels: Tensor, items: Tensor,
                 progress: float) -> ObjectiveOutput:
        logits = forward(x).float()
        method = self.method
        groups = self.groups[items] if method.uses_groups else None
        loss = method.reduce(method.sample_loss(logits, labels, groups), groups, 0)
        if not method.has_penalty:
            return ObjectiveOutput(loss, {}, None)
        penalty = method.penalty(logits, labels, groups, progress)
        return ObjectiveOutput(loss, {method.name: penalty.detach()}, penalty)

    def state_dict(self) -> Dict:
        return self.method.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.method.load_state_dict(state)


class OccamObjective:
    """OccamLoss (DESIGN.md section 5, its main loss shaped by the method) on every exit of an
    OccamNet called with labels; the method's penalty summed over the exits."""

    def __init__(self, loss: OccamLoss, groups: Tensor):
        self.loss, self.groups = loss, groups

    @property
    def method(self) -> Method:
        return self.loss.method

    def on_epoch_start(self, epoch: int) -> None:
        self.loss.on_epoch_start(epoch)

    def __call__(self, forward: Forward, x: Tensor, labels: Tensor, items: Tensor,
                 progress: float) -> ObjectiveOutput:
        out = forward(x, labels)
        method = self.loss.method
        groups = self.groups[items] if method.uses_groups else None
        loss, parts = self.loss(out, labels, items, groups)
        if not method.has_penalty:
            return ObjectiveOutput(loss, parts, None)
        terms = method.penalty(torch.stack([e.logits for e in out.exits]).float(), labels,
                               groups, progress)
        parts.update((f"{method.name}/E{t}", term) for t, term in enumerate(terms.detach()))
        return ObjectiveOutput(loss, parts, terms.sum())

    def state_dict(self) -> Dict:
        return self.loss.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.loss.load_state_dict(state)


def make_objective(config: RunConfig, model: nn.Module, train: LabelledItems,
                   num_classes: int, device) -> "ClassifierObjective | OccamObjective":
    """What the run minimises: the model's loss with the config's method and ablations."""
    groups = train.groups
    num_heads = model.num_exits if config.model == "occam" else 1
    method = build_method(config.method, model=config.model, group_sizes=groups.sizes,
                          num_classes=num_classes, num_heads=num_heads,
                          **config.method_settings).to(device)
    if config.model == "resnet":
        return ClassifierObjective(method, groups.index)
    loss = OccamLoss(len(train), num_classes, num_exits=model.num_exits, taus=config.taus,
                     supp_weight=config.effective_supp_weight, gate_weight=config.gate_weight,
                     gamma0=config.gamma0, gamma=config.gamma,
                     weight_offset=config.weight_offset, balance_factor=config.balance_factor,
                     min_epochs=config.min_epochs, method=method,
                     exit_weighting=config.exit_weighting)
    return OccamObjective(loss.to(device), groups.index)


# What a method that reads bias groups does where every class is one group (no attributes).
_CLASSES_ALONE = {"pgi": "its penalty is 0 on every batch: this run trains as ERM does",
                  "upwt": "it balances the classes", "gdro": "it weighs the classes",
                  "sd": "its per-group lambdas are per-class lambdas"}


def training_groups_line(method: Method, train: LabelledItems) -> Optional[str]:
    """The line a run prints about the bias groups its method reads (None: it reads none):
    what they are made of, how many, the smallest; and what the method does where every
    class is one group (a dataset without bias attributes)."""
    if not method.uses_groups:
        return None
    groups = train.groups
    sizes = groups.sizes.tolist()   # never empty: a split under one batch is refused first
    smallest = min(range(len(sizes)), key=sizes.__getitem__)
    line = (f"bias groups ({method.name} reads them): {' x '.join(groups.columns)}, "
            f"{groups.count} in the training split ({sizes[smallest]} to {max(sizes)} images "
            f"each; the smallest: {groups.name(smallest, train.class_names)})")
    per_class = torch.bincount(groups.keys[:, 0])
    if bool((per_class[per_class > 0] == 1).all()):
        line += (f"; every class is one group (no bias attributes), so "
                 f"{_CLASSES_ALONE.get(method.name, 'it sees the classes alone')}")
    return line


def make_optimizer(config: RunConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay)
    return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(config: RunConfig, epoch: int) -> float:
    """The learning rate of `epoch` over config.lr: the official warm-up (epoch e < W takes
    (lr - warmup_start_lr) * (e + 1) / W), then lr_gamma per milestone passed, the
    milestones counted from the warm-up's end as the official scheduler counts them."""
    warmup = config.warmup_epochs
    if epoch < warmup:
        return (config.lr - config.warmup_start_lr) * (epoch + 1) / warmup / config.lr
    passed = sum(1 for milestone in config.milestones if epoch - warmup >= milestone)
    return config.lr_gamma ** passed


def make_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer):
    """Stepped once per epoch. Without warm-up a MultiStepLR (as every run before warm-up
    existed, so their checkpoints resume); with it, the same steps after the warm-up."""
    if not config.warmup_epochs:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.milestones),
                                                    gamma=config.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(config, epoch))


def augmentation_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's augmentation in one process: a function of (seed, step) so a
    resumed run augments as the uninterrupted one, and of the rank so DDP processes draw
    different crops for their different images."""
    # Below 2^63: a torch Generator refuses larger seeds (config seeds reach 2^32 - 1).
    return (((seed * 1_000_003) + step) * 65_537 + rank) % (1 << 63)


def steps_per_epoch(num_items: int, batch_size: int, world: int = 1) -> int:
    """One process: every item once (as many draws under balanced sampling), the last batch
    ragged as the official trainer's (a single item left over joins the batch before it:
    BatchNorm cannot train on one sample).
    Several processes (DDP): whole global batches only, the tail of the epoch's permutation
    dropped (fewer than world * batch_size items, different ones every epoch), because
    OccamLoss's all_gather and DDP's gradient averaging want one batch size everywhere."""
    if world > 1:
        return num_items // (batch_size * world)
    steps = -(-num_items // batch_size)
    return steps - 1 if steps > 1 and num_items % batch_size == 1 else steps


def batches(order: torch.Tensor, batch_size: int, start: int = 0, rank: int = 0,
            world: int = 1) -> Iterator[Tuple[int, torch.Tensor]]:
    """This process's batches of an epoch: step s of process r takes slice s * world + r."""
    steps = steps_per_epoch(len(order), batch_size, world)
    for step in range(start, steps):
        first = (step * world + rank) * batch_size
        last = world == 1 and step == steps - 1
        yield step, order[first:len(order) if last else first + batch_size]


def rng_state() -> Dict:
    """Every generator's state as tensors and plain data (a checkpoint holds nothing else)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "position": int(position), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        # Only the GPUs visible now: a run saved with more (CUDA_VISIBLE_DEVICES) resumes with
        # fewer. Training draws nothing from the CUDA generators; they are kept for the user.
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


class CheckpointMismatch(ValueError):
    pass


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


def check_resumable(saved: RunConfig, config: RunConfig) -> None:
    """A CheckpointMismatch naming every difference when a run saved with `saved` may not be
    continued as `config` (paths, devices and step caps may change; results' settings not)."""
    theirs, ours = saved.identity(), config.identity()
    differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differing:
        details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {ours.get(k)!r}"
                            for k in differing)
        raise CheckpointMismatch(f"this checkpoint was written for another model or config "
                                 f"({details}); start a new run with another --out, or resume "
                                 f"with the same settings")


def split_fingerprint(split: LabelledItems) -> Dict[str, object]:
    """What a checkpoint keeps of its training split: the item count and a SHA-256 of the
    labels and bias attributes. The run's identity leaves the data's location out (it may
    move), and per-item state (OccamLoss's gate targets) must meet the same items again."""
    return fingerprint(split.labels, split.factors)


def fingerprint(labels: Tensor, attributes: Tensor) -> Dict[str, object]:
    """split_fingerprint of items with these labels (N,) and bias attributes (N, F), as a
    split holds them (int64)."""
    digest = hashlib.sha256()
    for values in (labels, attributes):
        digest.update(values.long().cpu().contiguous().numpy().tobytes())
    return {"items": int(labels.shape[0]), "sha256": digest.hexdigest()}


def check_same_training_split(checkpoint: Dict, fingerprint: Dict[str, object],
                              path: str) -> None:
    """A CheckpointMismatch when the checkpoint was trained on another training split
    (checkpoints written before the fingerprint was kept are not checked)."""
    saved = checkpoint.get("train_split")
    if saved is None or saved == fingerprint:
        return
    what = (f"{saved['items']} items, now {fingerprint['items']}"
            if saved["items"] != fingerprint["items"]
            else f"{saved['items']} items, now as many with other labels or bias attributes")
    raise CheckpointMismatch(f"{path} was trained on another training split ({what}): resume "
                             f"with the data it was trained on, or start a new run with "
                             f"another --out")


def check_same_classes(trained: Optional[Sequence[str]], now: Optional[Sequence[str]],
                       whose: str, path: str, advice: str) -> None:
    """A CheckpointMismatch when `now` (`whose` classes: a split's, another model's) numbers
    the classes otherwise than the checkpoint at `path` learned them (`trained`): a folder
    dataset's CSV with a class renamed or dropped since training, or another dataset; its
    labels are the sorted names' positions, so every label past the change would shift."""
    if trained is None or now is None or list(trained) == list(now):
        return
    raise CheckpointMismatch(f"{whose} classes ({first_few(list(now), 6)}) are not the ones "
                             f"{path} was trained on ({first_few(list(trained), 6)}): {advice}")


def check_same_split_rule(checkpoint: Dict, split: LabelledItems, path: str) -> None:
    """A CheckpointMismatch when the dataset's splits are now assigned by another rule than
    the one the checkpoint's run saw (a folder CSV without a split column: by a permutation
    of the rows before 2026-11-29, by a hash of the paths since): most of its evaluation
    images would be images it trained on."""
    if split.split_rule is None or checkpoint.get("split_rule") == split.split_rule:
        return
    if "split_rule" not in checkpoint:   # written before the rule was kept
        then = "a permutation of the CSV's rows, before 2026-11-29"
    else:
        then = checkpoint["split_rule"] or "the CSV's split column"
    raise CheckpointMismatch(f"{path} was trained on splits assigned otherwise ({then}; now "
                             f"{split.split_rule}): its evaluation splits would hold images it "
                             f"trained on; train a new run, or give the CSV a split column")


def check_continuable(checkpoint: Dict, config: RunConfig, world: int) -> None:
    """A ValueError when a checkpoint's run cannot go on as asked: fewer epochs than it has
    trained (an epoch begun counts: its steps cannot be undone), or another number of
    processes (the batches of an epoch are cut per process, so a change would skip or repeat
    images)."""
    begun = checkpoint.get("step_in_epoch", 0) > 0
    trained = checkpoint.get("epoch", 0) + begun
    if config.epochs < trained:
        what = (f"{plural(trained - 1, 'epoch')} and part of epoch {trained}" if begun
                else plural(trained, "epoch"))
        raise ValueError(f"this run has trained {what} already; --epochs {config.epochs} "
                         f"cannot undo them: give --epochs {trained} or more")
    saved_world = checkpoint.get("world", 1)
    if saved_world != world:
        raise ValueError(f"this run was trained on {saved_world} process(es), now "
                         f"{world}: resume it with the same number (torchrun "
                         f"--nproc_per_node={saved_world}, or plain `occamnets train` for 1)")


# What the reported model is: no checkpoint is picked by validation accuracy, as in the
# official trainer (PyTorch Lightning tests the weights the last epoch left).
MODEL_SELECTION = ("the weights after the last epoch: no model selection (as the official "
                   "trainer); the validation splits are reported, not used to choose")


@dataclasses.dataclass
class RunReport:
    """The end of a run: its config, the evaluations of the dataset's headline test split,
    its validation split (None: the dataset has none, as BAR) and its other splits (Biased
    MNIST's val-p0.5; COCO-on-Places's idtest, oodtest, ...), the training speed (mean
    images/s over the epochs in metrics.jsonl), the seconds spent training, the steps trained
    (fewer than the config's epochs when `complete` is False: a report asked for after
    --max-steps) and how the reported model was selected."""
    model: str
    config: RunConfig
    test: Evaluation
    val: Optional[Evaluation]
    others: Dict[str, Evaluation]
    train_images_per_s: float
    train_seconds: float = math.nan
    steps: int = 0
    complete: bool = True
    model_selection: str = MODEL_SELECTION
    environment: Optional[RunEnvironment] = None   # None: a report from before it was kept

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict) -> "RunReport":
        """A report as report.json holds it (typed again; reports written before a field
        existed take its default)."""
        values = dict(values)
        config = RunConfig.from_dict(values.pop("config"))
        return from_plain(cls, values, config=config)

    def to_markdown(self) -> str:
        trained = ("" if self.complete else
                   f" **Stopped early: {self.steps} steps, before the last epoch.**")
        config = self.config
        where = "" if self.environment is None else f" Ran on {self.environment.describe()}."
        text = (f"# {MODELS[self.model]} on {config.dataset_spec.title}\n\n"
                f"Method: {config.describe_method()}.{trained} Training "
                f"{self.train_images_per_s:.0f} images/s, {self.train_seconds:.0f} s. Model "
                f"reported: {self.model_selection}.{where}\n")
        for evaluation in [self.test] + ([self.val] if self.val else []) + list(
                self.others.values()):
            text += (f"\n## {evaluation.split}: {split_description(config, evaluation.split)}"
                     f"\n\n{evaluation.to_markdown()}")
        return text


RELIABILITY_PICTURE = "reliability.png"


def write_report(report: RunReport, run_dir: str) -> None:
    """report.json, report.md and the test split's reliability diagrams."""
    with atomic_path(os.path.join(run_dir, "report.json")) as tmp, open(tmp, "w") as handle:
        json.dump(report.to_dict(), handle, indent=1, default=str)
    text = report.to_markdown()
    if report.test.diagnostics:
        from .viz import save_reliability_diagrams
        save_reliability_diagrams(os.path.join(run_dir, RELIABILITY_PICTURE),
                                  report.test.diagnostics,
                                  title=f"{MODELS[report.model]}: reliability on "
                                        f"{report.test.split}")
        text += f"\n![reliability diagrams per exit]({RELIABILITY_PICTURE})\n"
    with atomic_path(os.path.join(run_dir, "report.md")) as tmp, open(tmp, "w") as handle:
        handle.write(text)


def training_time(metrics_path: str) -> Tuple[float, float]:
    """(mean training images/s, seconds of training) over the epoch records of metrics.jsonl."""
    epochs = [r for r in read_metrics(metrics_path) if r.get("kind", "epoch") == "epoch"]
    rates = [r["train_images_per_s"] for r in epochs]
    return (sum(rates) / max(1, len(rates)),
            sum(r.get("train_seconds", math.nan) for r in epochs))


def exit_record(prefix: str, evaluation: Evaluation) -> Dict[str, Optional[float]]:
    """An OccamNet's exits on a split, for an epoch record: per exit the share of the images
    that left there ("PREFIX_exit_share/Et") and their accuracy ("PREFIX_exit_accuracy/Et",
    None when none left there); nothing for a model without exits."""
    if evaluation.exit_share is None:
        return {}
    record: Dict[str, Optional[float]] = {}
    for t, (share, accuracy) in enumerate(zip(evaluation.exit_share,
                                               evaluation.exit_accuracy_taken)):
        record[f"{prefix}_exit_share/E{t}"] = share
        record[f"{prefix}_exit_accuracy/E{t}"] = accuracy
    return record


def read_metrics(metrics_path: str) -> List[Dict]:
    """The records of a run's metrics.jsonl. Its last line, when it is not a whole record (a
    crash while it was appended), is dropped, said in one line on stderr (a run resumed from
    before it writes it again). Any other line that is not one is a ValueError naming the
    file and the line."""
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path, errors="replace") as handle:  # a bad byte: that line's error
        lines = [(number, line) for number, line in enumerate(handle, 1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == lines[-1][0]:
            print(f"occamnets: {metrics_path}: its last line ({number}) is not a whole record "
                  f"(cut short by a crash while it was written?); it is left out",
                  file=sys.stderr)
        else:
            raise ValueError(f"{metrics_path} line {number} is not a JSON record: repair or "
                             f"delete that line")
    return records


def existing_checkpoint(config: RunConfig) -> Optional[str]:
    """The run's checkpoint when it has one (a run to continue), else None."""
    return config.checkpoint_path if os.path.exists(config.checkpoint_path) else None


def prepare_run_dir(path: str) -> bool:
    """Create the run directory (True when it did not exist), or a ValueError saying why it
    cannot be written (checked before any data is read or generated)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"the run directory {path} is a file: choose another --out")
    created = not os.path.exists(path)
    try:
        make_writable_dir(path)
    except OSError as error:
        raise ValueError(f"cannot write to the run directory {path} ({error.strerror}): "
                         f"choose another --out") from error
    remove_stale_temporaries(path)
    return created


def lock_run_dir(path: str):
    """An exclusive lock on the run directory for this process's life (the open file holding
    it), or a ValueError when another process trains there: two runs in one directory would
    write one checkpoint and one metrics.jsonl between them."""
    handle = open(os.path.join(path, ".lock"), "a")
    try:
        # A POSIX lock: held per process, so this process may build several Trainers on one
        # directory (a resumed run in a test); another process is refused.
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        raise ValueError(f"another occamnets process is training in {path}: wait for it, or "
                         f"choose another --out") from error
    return handle


# Signals that stop training with a checkpoint: Ctrl-C, and what schedulers send before a kill.
STOP_SIGNALS = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "SIGTERM received"}
# Under DDP the processes agree on stopping (one small all-reduce, a host sync) every this many
# steps at most, and at least every STOP_SYNC_SECONDS where steps are slow: torchrun kills its
# processes 30 s (--shutdown-timeout) after passing a signal on, checkpoint written or not.
STOP_SYNC_EVERY = 10
STOP_SYNC_SECONDS = 10.0
# A batch's loss is read from the device for the progress bar every this many steps.
PROGRESS_EVERY = 10


def start_process_group(device: torch.device) -> None:
    """The process group of a torchrun launch: NCCL on GPUs, gloo on CPU.

    torch._dynamo is imported first, on purpose. It imports torch.distributed.nn.functional,
    whose collectives take `group.WORLD` as a default argument value, evaluated at import:
    imported after the group exists (DDP's constructor imports torch._dynamo), those defaults
    hold the group for the life of the process. destroy_process_group then cannot free it, and
    gloo's worker threads run on into the interpreter's teardown, where the process can abort
    (SIGABRT, "terminate called without an active exception"; measured in bench/NOTES.md).
    Imported before, the defaults hold None."""
    import torch._dynamo  # noqa: F401  (DDP imports it anyway: no extra cost)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def end_process_group() -> None:
    """End this process's group (torchrun's), if one is running; the DDP wrappers on it must
    be dropped first (Trainer.close) or the group outlives this call."""
    if dist.is_initialized():
        dist.destroy_process_group()


class Trainer:
    """Trains one model; `run()` returns the final report (also written as JSON and Markdown).

    `splits` (train, val, test DeviceSplits) default to the config's dataset, loaded or
    generated into its dataset directory. `resume`: a checkpoint to continue; it is read and
    checked against the config before any data is loaded.
    """

    def __init__(self, config: RunConfig, splits: Optional[Dict[str, LabelledItems]] = None,
                 resume: Optional[str] = None):
        self.config = config = config.with_absolute_paths()
        self.device = resolve_device(config.device)
        # torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per GPU (NCCL), or gloo on CPU.
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        # torchrun's processes on this node (its layout, for the hint to continue a run)
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.owns_process_group = self.world > 1 and not dist.is_initialized()
        if self.owns_process_group:
            start_process_group(self.device)
        self.rank = dist.get_rank() if self.world > 1 else 0
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.device_name = device_name(self.device)
        # Cheap checks first: the batch, where the run writes, the checkpoint it continues.
        if splits is None and config.dataset == BIASED_MNIST and config.train_size is not None and (
                config.batch_size * self.world > config.train_size):
            raise ValueError(f"a batch of {config.batch_size} images"
                             + (f" on each of {self.world} processes" if self.world > 1 else "")
                             + f" is more than the training split ({config.train_size} "
                               f"images): lower --batch-size or raise --train-size")
        created = prepare_run_dir(config.run_dir)
        try:
            self._set_up(config, splits, resume)
        except BaseException:
            # A run that never started leaves no directory behind (only the lock, if any).
            if created and set(os.listdir(config.run_dir)) <= {".lock"}:
                shutil.rmtree(config.run_dir, ignore_errors=True)
            raise

    def _set_up(self, config: RunConfig, splits: Optional[Dict[str, LabelledItems]],
                resume: Optional[str]) -> None:
        self.run_lock = lock_run_dir(config.run_dir) if self.rank == 0 else None
        if config.tensorboard and os.path.isfile(config.tensorboard):
            raise ValueError(f"--tensorboard {config.tensorboard} is a file: give a directory")
        self.checkpoint_path = config.checkpoint_path
        self.metrics_path = os.path.join(config.run_dir, "metrics.jsonl")
        resumed = None
        if resume:
            resumed = read_checkpoint(resume, mmap=False)
            check_resumable(RunConfig.from_dict(resumed["config"]), config)
            check_continuable(resumed, config, self.world)
        writer = _tensorboard_writer() if config.tensorboard and self.rank == 0 else None
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.splits = splits if splits is not None else self._load_data()
        if len(self.splits["train"]) < config.batch_size * self.world:
            raise ValueError(f"the training split has {len(self.splits['train'])} images, fewer "
                             f"than one batch of {config.batch_size}"
                             + (f" on each of {self.world} processes" if self.world > 1 else "")
                             + ": lower --batch-size")
        # The dataset's classes when it names them; else every split's labels (a small
        # training split may miss a class the test split has).
        named = self.splits["train"].class_names
        self.num_classes = len(named) if named else max(
            int(s.labels.max()) for s in self.splits.values() if len(s)) + 1
        self.model = build_model(config.model, self.num_classes, config.width, config.stem,
                                 config.backend).to(self.device)
        on_gpu = self.device.type == "cuda"
        self.channels_last = config.channels_last and on_gpu
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.bf16_autocast = config.bf16 and on_gpu   # the config asks; a GPU applies it
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=self.bf16_autocast)
        self.forward = self.model
        if self.world > 1:
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.forward = torch.compile(self.forward)
        self.optimizer = make_optimizer(config, self.model.parameters())
        self.scheduler = make_scheduler(config, self.optimizer)
        # Training augmentation (the dataset's): pixels of padding per side of the crop.
        padding = config.dataset_spec.crop_padding
        self.crop_padding = None if padding is None else round(padding * config.input_size)
        self.objective = make_objective(config, self.model, self.splits["train"],
                                        self.num_classes, self.device)
        groups_line = training_groups_line(self.objective.method, self.splits["train"])
        if groups_line and self.rank == 0:
            print(groups_line, flush=True)
        # Each item's draw weight (None: a permutation), once: the split does not change.
        self.sampling_weights = sampling_weights(config.sampling, config.sampling_gamma,
                                                 self.splits["train"])
        if self.sampling_weights is not None and self.rank == 0:
            print(sampling_line(config.sampling, config.sampling_gamma, self.splits["train"],
                                self.sampling_weights), flush=True)
        self.train_split_fingerprint = split_fingerprint(self.splits["train"])
        self.feature_parameters = feature_parameters(self.model)
        self.total_steps = config.epochs * steps_per_epoch(len(self.splits["train"]),
                                                           config.batch_size, self.world)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        # The epoch so far (kept in checkpoints, so a resumed epoch's loss counts every step):
        # the sum of each step's loss times its images, the images, the seconds.
        self.epoch_loss_sum, self.epoch_images, self.epoch_seconds = 0.0, 0, 0.0
        self.stop_signal: Optional[int] = None
        # Under DDP: the step after which the processes next agree on stopping (the first
        # step, then as often as their slowest step time allows), and when they last did.
        self.next_agreement = 1
        self.last_agreement: Optional[Tuple[int, float]] = None   # (step, time)
        # The step whose state this run's checkpoint file holds (None: none written or read).
        self.checkpoint_step: Optional[int] = None
        # What the stop message tells the user to do next (the demo says its own), and
        # whether reaching --max-steps is said (a grid of runs, where it is the budget, not).
        self.continue_hint = resume_command(config.run_dir, self.world, self.local_world)
        self.say_max_steps = True
        if resumed is not None:
            self._load_state(resumed, resume)
        # A resumed run's TensorBoard drops the events logged after its checkpoint, as
        # metrics.jsonl drops those records.
        self.events = (writer(config.tensorboard, purge_step=self.global_step + 1)
                       if writer is not None else None)

    @property
    def interrupted(self) -> bool:
        return self.stop_signal is not None

    def _load_data(self) -> Dict[str, LabelledItems]:
        # Under DDP the first process loads (or generates and caches) the data, then the
        # others read its cache: never two writers on one dataset directory.
        if self.world > 1 and self.rank != 0:
            dist.barrier()
        splits = load_splits(self.config, self.device, progress=self.config.progress)
        if self.world > 1 and self.rank == 0:
            dist.barrier()
        return splits

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "objective": self.objective.state_dict(),
                "rng": rng_state(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "config": self.config.to_dict(),
                "train_split": self.train_split_fingerprint,
                "num_classes": self.num_classes, "world": self.world,
                "local_world": self.local_world,   # for the hint to continue
                "class_names": (list(self.splits["train"].class_names)
                                if self.splits["train"].class_names else None),
                "split_rule": self.splits["train"].split_rule,
                "epoch_progress": {"image_loss_sum": self.epoch_loss_sum,
                                   "images": self.epoch_images, "seconds": self.epoch_seconds}}

    def save_checkpoint(self) -> str:
        # Every process holds the same state (DDP, OccamLoss sync): the first one writes it.
        if self.rank == 0:
            write_checkpoint(self.state_dict(), self.checkpoint_path)
        if self.world > 1:
            dist.barrier()
        self.checkpoint_step = self.global_step
        return self.checkpoint_path

    def load_checkpoint(self, path: str) -> None:
        checkpoint = read_checkpoint(path, mmap=False)
        check_resumable(RunConfig.from_dict(checkpoint["config"]), self.config)
        self._load_state(checkpoint, path)

    def _load_state(self, checkpoint: Dict, path: str) -> None:
        missing = [k for k in ("optimizer", "scheduler", "objective", "rng", "epoch",
                               "step_in_epoch", "global_step", "epoch_progress")
                   if k not in checkpoint]
        if missing:
            raise ValueError(f"{path} holds a model but not the training state to resume "
                             f"({', '.join(missing)} missing)")
        check_same_classes(checkpoint.get("class_names"), self.splits["train"].class_names,
                           "the training split's", path, "resume with the data it was trained "
                           "on, or start a new run with another --out")
        check_same_split_rule(checkpoint, self.splits["train"], path)
        check_same_training_split(checkpoint, self.train_split_fingerprint, path)
        load_model_state(self.model, checkpoint["model"], path)
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.objective.load_state_dict(checkpoint["objective"])
        except (RuntimeError, ValueError, KeyError) as error:
            # A checkpoint from before the split was fingerprinted, or edited: one line, not
            # torch's state-dict traceback.
            raise CheckpointMismatch(f"{path}: its training state does not fit this run "
                                     f"({str(error).splitlines()[0]}); resume with the data "
                                     f"and settings it was trained with") from error
        set_rng_state(checkpoint["rng"])
        self.epoch, self.step_in_epoch = checkpoint["epoch"], checkpoint["step_in_epoch"]
        self.global_step = checkpoint["global_step"]
        if os.path.abspath(path) == os.path.abspath(self.checkpoint_path):
            self.checkpoint_step = self.global_step
        progress = checkpoint["epoch_progress"]
        self.epoch_images = progress["images"]
        if "image_loss_sum" in progress:
            self.epoch_loss_sum = progress["image_loss_sum"]
        else:   # written before 2026-11-29, a sum per step: exact when the steps so far were
            # all full (one cut at an epoch's last, smaller batch is close, not exact)
            self.epoch_loss_sum = (progress["loss_sum"] * self.epoch_images
                                   / max(1, checkpoint["step_in_epoch"]))
        self.epoch_seconds = progress["seconds"]
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """metrics.jsonl as it was when the checkpoint was written: records a run wrote after
        its last checkpoint (before a crash) are dropped, so a resumed run never repeats a
        step or an epoch."""
        if self.rank != 0 or not os.path.exists(self.metrics_path):
            return
        kept = [r for r in read_metrics(self.metrics_path)
                if r.get("global_step", 0) <= self.global_step
                and (r.get("kind") != "epoch" or r["epoch"] <= self.epoch)]
        with atomic_path(self.metrics_path) as tmp, open(tmp, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)

    # -- training ----------------------------------------------------------------------------
    def _train_step(self, rows: torch.Tensor, following: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One optimiser step on the training items `rows`; `following`: the next step's
        rows, which a streamed split starts decoding once this batch is in hand."""
        train = self.splits["train"]
        x, labels = train.batch(rows, self.channels_last), train.labels[rows]
        if following is not None:
            train.prefetch(following)
        if self.crop_padding is not None:
            generator = torch.Generator().manual_seed(
                augmentation_seed(self.config.seed, self.global_step, self.rank))
            x = random_crop_flip(x, self.crop_padding, generator)
        progress = (self.global_step + 1) / max(1, self.total_steps)  # PGI's warm-up
        with self.autocast:
            out = self.objective(self.forward, x, labels, rows, progress)
        self.optimizer.zero_grad(set_to_none=True)
        loss = out.loss
        if out.feature_penalty is not None:
            # The penalty's gradient reaches the feature extractor only (as the official's
            # backward with inputs=); autograd.grad leaves .grad and DDP's hooks alone.
            penalty_grads = torch.autograd.grad(out.feature_penalty, self.feature_parameters,
                                                retain_graph=True, allow_unused=True)
            loss.backward()
            self._add_gradients(penalty_grads)
            loss = loss + out.feature_penalty
        else:
            loss.backward()
        self.optimizer.step()
        return loss.detach(), out.parts

    def _add_gradients(self, grads) -> None:
        """Add `grads` (one per feature parameter, None where unused) to the parameters'
        gradients; under DDP averaged over the processes first, as DDP averages the rest."""
        pairs = [(p, g) for p, g in zip(self.feature_parameters, grads) if g is not None]
        if self.world > 1 and pairs:
            flat = torch.cat([g.reshape(-1) for _, g in pairs]).div_(self.world)
            dist.all_reduce(flat)
            grads = flat.split([g.numel() for _, g in pairs])
            pairs = [(p, g.view_as(p)) for (p, _), g in zip(pairs, grads)]
        for parameter, grad in pairs:
            if parameter.grad is None:
                parameter.grad = grad.clone()
            else:
                parameter.grad.add_(grad)

    def _on_stop_signal(self, signum, frame):
        self.stop_signal = signum  # finish the step, write a checkpoint, then stop

    def _should_stop(self, sync: bool = False) -> Optional[str]:
        """Why training stops after this step, or None. Under DDP the processes agree (a
        signal may reach them at different steps) after the first step, then every
        STOP_SYNC_EVERY steps or every STOP_SYNC_SECONDS if that is fewer steps, and where
        `sync` (every process calls it there)."""
        # Whether to agree is decided by the step alone, the same on every process; at the
        # step cap too, so that wherever training stops `interrupted` is the same everywhere.
        capped = self._at_step_cap()
        agree = self.world > 1 and (sync or capped or self.global_step >= self.next_agreement)
        if agree:
            now = time.perf_counter()
            # None at a (re)start, on every process alike: agree again after one step, timed.
            seconds_per_step = 0.0 if self.last_agreement is None else (
                (now - self.last_agreement[1]) / max(1, self.global_step - self.last_agreement[0]))
            both = torch.tensor([float(self.stop_signal or 0), seconds_per_step],
                                dtype=torch.float64, device=self.device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            flag, slowest = both.tolist()
            self.stop_signal = int(flag) or None
            # Decided from the reduced (common) value: every process agrees at the same steps.
            every = 1 if self.last_agreement is None else min(
                STOP_SYNC_EVERY, max(1, int(STOP_SYNC_SECONDS / max(slowest, 1e-9))))
            self.next_agreement = self.global_step + every
            self.last_agreement = (self.global_step, now)
        if capped:
            return f"reached --max-steps {self.config.max_steps}"
        if self.world > 1 and not agree:
            return None
        return STOP_SIGNALS.get(self.stop_signal) if self.stop_signal else None

    def _at_step_cap(self) -> bool:
        return bool(self.config.max_steps) and self.global_step >= self.config.max_steps

    def _stop(self, reason: str, saved: bool = False) -> None:
        """Write the checkpoint (unless it was just `saved`) and say how to continue."""
        path = self.checkpoint_path if saved else self.save_checkpoint()
        if self.rank == 0 and (self.say_max_steps or self.interrupted):
            if self.epoch >= self.config.epochs:   # stopped between the last epoch and the report
                where, then = f"after the last epoch ({self.epoch})", "write the report"
            elif self.step_in_epoch == 0 and self.epoch > 0:   # at an epoch's end
                where, then = f"after epoch {self.epoch}", "continue"
            else:
                where, then = f"at epoch {self.epoch + 1} step {self.step_in_epoch}", "continue"
            print(f"{reason}: stopped {where} (step {self.global_step} in all); checkpoint "
                  f"written to {path}; {then} with {self.continue_hint}", flush=True)

    def train(self) -> None:
        """Train until the last epoch, --max-steps or a stop signal (a checkpoint is written
        in every case; `interrupted` says whether a signal stopped it)."""
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_stop_signal) for s in STOP_SIGNALS
                    } if in_main_thread else {}
        try:
            self._train_epochs()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.events is not None:
                self.events.flush()

    def _train_epochs(self) -> None:
        config = self.config
        train = self.splits["train"]
        if self.global_step == 0 and self.rank == 0 and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a new run: nothing from an earlier one
        if self._at_step_cap():
            # Resumed at the cap already: no step past it (the checkpoint is this state).
            self._stop(f"reached --max-steps {config.max_steps}", saved=True)
            return
        while self.epoch < config.epochs:
            if self.step_in_epoch == 0:  # the epoch's progress is zero here (reset at its end)
                self.objective.on_epoch_start(self.epoch)
            self.model.train()
            order = epoch_order(len(train), config.seed, self.epoch, self.device,
                                self.sampling_weights)
            steps = steps_per_epoch(len(train), config.batch_size, self.world)
            bar = progress_bar(steps, f"epoch {self.epoch + 1}/{config.epochs}",
                               config.progress and self.rank == 0, initial=self.step_in_epoch)
            started, seen = time.perf_counter(), 0   # seen: this process's, since a fold
            # The sum over the processes is the epoch's: the first process starts from it.
            loss_sum = torch.full((), self.epoch_loss_sum if self.rank == 0 else 0.0,
                                  device=self.device)
            epoch_batches = list(batches(order, config.batch_size, self.step_in_epoch,
                                         self.rank, self.world))
            for position, (step, rows) in enumerate(epoch_batches):
                following = (epoch_batches[position + 1][1]
                             if position + 1 < len(epoch_batches) else None)
                loss, parts = self._train_step(rows, following)
                # The epoch's loss is per image (a last, smaller batch weighs its images
                # only); one fused kernel, as the plain sum was.
                loss_sum.add_(loss, alpha=rows.numel())
                seen += rows.numel()
                self.step_in_epoch, self.global_step = step + 1, self.global_step + 1
                if config.log_every and self.global_step % config.log_every == 0:
                    self._log_step(loss, parts, rows.numel(), started)
                if bar is not None:
                    if step % PROGRESS_EVERY == 0 or step == steps - 1:
                        rate = seen / (time.perf_counter() - started)
                        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}",
                                        refresh=False)
                    bar.update(1)
                stop = self._should_stop()
                if step == steps - 1 and self._at_step_cap() and not self.interrupted:
                    # The step cap at an epoch's last step: the epoch's end (its record, and
                    # after the last epoch the report) comes first, then the cap stops. The
                    # processes agreed on `interrupted` at the cap: they go on alike.
                    stop = None
                # Not at the epoch's last step: the epoch's own checkpoint follows its record,
                # and one between them would resume before a record TensorBoard already holds.
                periodic = config.checkpoint_every and step != steps - 1 and (
                    self.global_step % config.checkpoint_every == 0)
                if stop or periodic:
                    self.epoch_loss_sum, images = self._fold_epoch_sums(loss_sum, seen)
                    self.epoch_images = self.epoch_images + images
                    self._refuse_diverged(self.epoch_loss_sum / max(1, self.epoch_images))
                    self.epoch_seconds += time.perf_counter() - started
                    started, seen = time.perf_counter(), 0
                if stop:
                    close(bar)
                    self._stop(stop)
                    return
                if periodic:
                    self.save_checkpoint()
            close(bar)
            loss_total, images = self._fold_epoch_sums(loss_sum, seen)
            elapsed = self.epoch_seconds + time.perf_counter() - started
            images = self.epoch_images + images
            train_loss = loss_total / max(1, images)
            self._refuse_diverged(train_loss)
            lr = self.optimizer.param_groups[0]["lr"]  # this epoch's: read before the step
            with warnings.catch_warnings():
                # Resumed right at an epoch's end, this process made no optimiser step yet:
                # torch's warning about the call order does not apply.
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
                self.scheduler.step()
            record = {"kind": "epoch", "epoch": self.epoch + 1, "global_step": self.global_step,
                      "train_loss": train_loss,
                      "train_images_per_s": images / max(elapsed, 1e-9),
                      "train_seconds": elapsed,
                      "lr": lr,
                      # A resumed run may continue on another card: each epoch names its
                      # own, and whether bf16 autocast applied there.
                      "device": self.device_name, "bf16_autocast": self.bf16_autocast}
            val_split = config.dataset_spec.val
            if val_split in self.splits:
                # Accuracy (and an OccamNet's exits) only: the early-exit pass, no other.
                val = self.evaluate(val_split, per_factor=False, diagnostics=False,
                                    per_group=False, per_exit=False)
                record.update(val_accuracy=val.accuracy, val_images_per_s=val.images_per_s,
                              **exit_record("val", val))
            if VAL_MIXED in self.splits:
                mixed = self.evaluate(VAL_MIXED, per_factor=False, diagnostics=False,
                                      per_group=False, per_exit=False)
                record[f"{VAL_MIXED}_accuracy"] = mixed.accuracy
                record.update(exit_record(VAL_MIXED, mixed))
            self._append_metrics(record)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.epoch_loss_sum, self.epoch_images, self.epoch_seconds = 0.0, 0, 0.0
            self.save_checkpoint()
            stop = self._should_stop(sync=True)
            if stop and self.epoch >= config.epochs:
                # After the last epoch only a signal stops (before the report, which may take
                # as long as an epoch): the step cap has nothing left to cut.
                stop = STOP_SIGNALS[self.stop_signal] if self.interrupted else None
            if stop:
                self._stop(stop, saved=True)
                return

    def _refuse_diverged(self, mean_loss: float) -> None:
        """A TrainingDiverged when the epoch's mean loss so far (`mean_loss`, on the host
        already) or the weights are NaN or infinite. Called before every checkpoint write, so
        the checkpoint on disk is always the last finite state. The weights are checked too:
        an update can break them while the loss it came from was finite."""
        weights = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        flags = torch.stack([torch.tensor(not math.isfinite(mean_loss), device=self.device),
                             ~torch.stack([t.isfinite().all() for t in weights]).all()]).int()
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every process stops, or none
        loss_broken, weights_broken = flags.tolist()
        if not (loss_broken or weights_broken):
            return
        if not math.isfinite(mean_loss):
            what = f"the loss was {mean_loss}"
        elif loss_broken:
            what = "the loss was not finite on another process"
        else:
            what = "the weights became NaN or infinite"
        kept = ("no checkpoint was written" if self.checkpoint_step is None else
                f"{self.checkpoint_path} still holds the last finite state (step "
                f"{self.checkpoint_step}), not overwritten")
        fp32 = ", or train in fp32 with --no-bf16" if self.bf16_autocast else ""
        # Said in the log too: a reader of the run (`occamnets results`) must not suggest
        # resuming, which replays the same steps into the same NaN.
        self._append_metrics({"kind": "diverged", "epoch": self.epoch + 1,
                              "global_step": self.global_step, "what": what})
        raise TrainingDiverged(
            f"training diverged: {what} in epoch {self.epoch + 1}; {kept} (lower --lr or the "
            f"loss weights{fp32}, in a new run)")

    def _append_metrics(self, record: Dict) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.events is not None:
            for name, value in record.items():
                # Numbers only: the epoch's device name is a label, not a scalar.
                if name not in ("kind", "epoch", "step", "global_step", "batch") and isinstance(
                        value, (int, float)):
                    self.events.add_scalar(f"{record['kind']}/{name}", value,
                                           record["global_step"])

    def _fold_epoch_sums(self, loss_sum: Tensor, seen: int) -> Tuple[float, int]:
        """(the epoch's image-weighted loss sum, the images since the last fold), over every
        process: train_loss and images/s are the global batch's, and a checkpoint (the first
        process writes it) holds every process's share. Every process calls it at the same
        step; after it the first process's `loss_sum` holds the total, the others' zero."""
        if self.world == 1:
            return loss_sum.item(), seen
        both = torch.stack([loss_sum.double(), torch.tensor(
            float(seen), dtype=torch.float64, device=loss_sum.device)])
        dist.all_reduce(both)
        total, images = both.tolist()
        loss_sum.fill_(total if self.rank == 0 else 0.0)
        return total, int(images)

    def _log_step(self, loss: Tensor, parts: Dict[str, Tensor], batch: int,
                  started: float) -> None:
        """A "step" record: the loss and every component (per exit for OccamNets), read from
        the device in one transfer (only every config.log_every steps), and the seconds of
        training in this epoch so far (`started`: when this process's share of it began),
        taken after that transfer, so after the device finished the step: two records of an
        epoch give the training speed between them, without the start-up of the first."""
        names = ["loss"] + list(parts)
        values = torch.stack([loss.float()] + [parts[n].float() for n in names[1:]])
        if self.world > 1:   # the global batch's means (the gate state is global already)
            own = torch.tensor([n == "loss" or n.split("/")[0] in PER_PROCESS_PARTS
                                for n in names], device=values.device)
            summed = values.clone()
            dist.all_reduce(summed)
            values = torch.where(own, summed / self.world, values)
        values = values.tolist()
        seconds = self.epoch_seconds + time.perf_counter() - started
        self._append_metrics({"kind": "step", "epoch": self.epoch + 1,
                              "step": self.step_in_epoch, "global_step": self.global_step,
                              "batch": batch * self.world, "epoch_seconds": seconds,
                              **dict(zip(names, values))})

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, split_name: str = "test", per_factor: bool = True,
                 diagnostics: bool = True, time_full_depth: bool = False,
                 per_group: bool = True, per_exit: bool = True) -> Evaluation:
        """per_group: the bias groups' accuracies too, where the dataset reports them;
        per_exit: an OccamNet's every-exit pass (evaluate's)."""
        return evaluate(self.model, self.splits[split_name], split_name,
                        threshold=self.config.inference_threshold,
                        channels_last=self.channels_last,
                        bf16=self.config.bf16, per_factor=per_factor, diagnostics=diagnostics,
                        time_full_depth=time_full_depth,
                        per_group=per_group and reports_groups(self.config),
                        per_exit=per_exit)

    def run(self) -> Optional[RunReport]:
        """Train and evaluate; None if stopped before the report (a stop signal, or max_steps
        reached before the last epoch). Only the first process writes the report."""
        self.train()
        if self.epoch < self.config.epochs or self.interrupted:
            return None
        try:
            return self.report()
        except BaseException as stop:
            # Ctrl-C or SIGTERM (the command line's handlers, once training is over) while the
            # test split is evaluated: the finished run is safe; say how to get its report.
            if not isinstance(stop, Exception) and self.rank == 0:
                print(f"stopped before the report was written; {self.checkpoint_path} holds "
                      f"the finished run: write the report with {self.continue_hint}",
                      flush=True)
            raise

    def close(self, end_group: bool = True) -> None:
        """Close the TensorBoard writer, drop the DDP wrapper, and end the process group this
        trainer started, once every process is done with it (after run(); never after an
        error, where a process still waiting would hang). Left to interpreter exit, gloo's
        threads can abort a finished process (SIGABRT, "terminate called without an active
        exception"; see start_process_group). A group is started once per process: torchrun's
        store keeps the first one's keys, and a second group on it can read stale addresses,
        so a process training several runs (compare's cells) passes end_group=False and ends
        the group after the last one (end_process_group)."""
        if self.events is not None:   # the TensorBoard writer's thread
            self.events.close()
            self.events = None
        # DDP holds the group too: dropped here, the group is freed (and gloo's threads
        # joined) when it ends, not whenever this trainer is collected.
        self.forward = self.model
        if end_group and self.owns_process_group:
            end_process_group()
        self.owns_process_group = False

    def report(self) -> RunReport:
        """Evaluate the weights as they are and write the report (a run stopped before its
        last epoch is marked incomplete)."""
        # Full-depth timing on the test split too: what early exit saves (OccamNets only).
        roles = self.config.dataset_spec
        test = self.evaluate(roles.test, time_full_depth=True)
        val = self.evaluate(roles.val, per_factor=False) if roles.val in self.splits else None
        others = {name: self.evaluate(name) for name in roles.reported_splits(list(self.splits))
                  if name not in (roles.test, roles.val)}
        timing = [training_time(self.metrics_path) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(timing, src=0)  # metrics.jsonl is the first process's
        rate, seconds = timing[0]
        if self.epoch_seconds > 0:  # the epoch stopped part-way (a report after --max-steps)
            seconds += self.epoch_seconds
            rate = rate or self.epoch_images / self.epoch_seconds
        report = RunReport(self.config.model, self.config, test, val, others, rate, seconds,
                           self.global_step, complete=self.epoch >= self.config.epochs,
                           environment=collect_environment(self.device))
        if self.rank == 0:
            write_report(report, self.config.run_dir)
        if self.world > 1:
            dist.barrier()  # no process leaves before the report is written
        return report


def _tensorboard_writer():
    """torch's SummaryWriter class, or a ValueError saying how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ValueError(f"--tensorboard needs the tensorboard package ({error}): "
                         f"`pip install tensorboard`, or leave --tensorboard out") from error
    return SummaryWriter
