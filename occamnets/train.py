"""Trainer for OccamResNet and the ResNet baseline on Biased MNIST.

Resumable exactly: a checkpoint holds the model, optimiser, scheduler, the objective's state
(OccamLoss's), RNG states, the epoch and the batch within it; the batch order of an epoch is
a function of (seed, epoch), so a resumed run sees the same batches. Ctrl-C writes a
checkpoint first. What is trained is decided once, by the objective (`make_objective`).
"""
import dataclasses
import json
import os
import random
import signal
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RunConfig, resolve_device
from .data.biased_mnist import VAL_MIXED
from .data.loaders import DeviceSplit
from .evaluate import Evaluation, evaluate, load_model_state, load_splits
from .losses import OccamLoss
from .models import MODELS, build_model

# -- what is trained: one objective per model kind ---------------------------------------------

Forward = Callable[..., object]


class CrossEntropyObjective:
    """The baseline: cross-entropy on the plain classifier's logits."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def __call__(self, forward: Forward, x: Tensor, labels: Tensor,
                 items: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        return F.cross_entropy(forward(x).float(), labels), {}

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


class OccamObjective:
    """OccamLoss (DESIGN.md section 5) on every exit of an OccamNet called with labels."""

    def __init__(self, loss: OccamLoss):
        self.loss = loss

    def on_epoch_start(self, epoch: int) -> None:
        self.loss.on_epoch_start(epoch)

    def __call__(self, forward: Forward, x: Tensor, labels: Tensor,
                 items: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        return self.loss(forward(x, labels), labels, items)

    def state_dict(self) -> Dict:
        return self.loss.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.loss.load_state_dict(state)


def make_objective(config: RunConfig, model: nn.Module, num_items: int, num_classes: int,
                   device) -> "CrossEntropyObjective | OccamObjective":
    if config.model == "resnet":
        return CrossEntropyObjective()
    loss = OccamLoss(num_items, num_classes, num_exits=model.num_exits, taus=config.taus,
                     supp_weight=config.supp_weight, gate_weight=config.gate_weight,
                     gamma0=config.gamma0, gamma=config.gamma,
                     weight_offset=config.weight_offset, balance_factor=config.balance_factor,
                     min_epochs=config.min_epochs)
    return OccamObjective(loss.to(device))


def epoch_order(num_items: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The permutation of an epoch: a function of (seed, epoch) only, so resuming repeats it."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(num_items, generator=generator).to(device)


def steps_per_epoch(num_items: int, batch_size: int, world: int = 1) -> int:
    """One process: every item once, the last batch ragged as the official trainer's (a
    single item left over joins the batch before it: BatchNorm cannot train on one sample).
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
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointMismatch(ValueError):
    pass


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


# What the reported model is: no checkpoint is picked by validation accuracy, as in the
# official trainer (PyTorch Lightning tests the weights the last epoch left).
MODEL_SELECTION = ("the weights after the last epoch: no model selection (as the official "
                   "trainer); the validation splits are reported, not used to choose")


@dataclasses.dataclass
class RunReport:
    """The end of a run: its config, the test and validation evaluations (val: biased like
    training; val_mixed: p_bias 0.5, when the data has it), the training speed (mean images/s
    over the epochs in metrics.jsonl) and how the reported model was selected."""
    model: str
    config: RunConfig
    test: Evaluation
    val: Evaluation
    val_mixed: Optional[Evaluation]
    train_images_per_s: float
    model_selection: str = MODEL_SELECTION

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        text = (f"# {MODELS[self.model]} on Biased MNIST\n\n"
                f"Training {self.train_images_per_s:.0f} images/s. Model reported: "
                f"{self.model_selection}.\n\n"
                f"## Unbiased test split\n\n{self.test.to_markdown()}\n"
                f"## Validation split (biased like training)\n\n{self.val.to_markdown()}")
        if self.val_mixed is not None:
            text += (f"\n## Validation split with p_bias 0.5 ({self.val_mixed.split})\n\n"
                     f"{self.val_mixed.to_markdown()}")
        return text


RELIABILITY_PICTURE = "reliability.png"


def write_report(report: RunReport, run_dir: str) -> None:
    """report.json, report.md and the test split's reliability diagrams."""
    with open(os.path.join(run_dir, "report.json"), "w") as handle:
        json.dump(report.to_dict(), handle, indent=1, default=str)
    text = report.to_markdown()
    if report.test.diagnostics:
        from .viz import save_reliability_diagrams
        save_reliability_diagrams(os.path.join(run_dir, RELIABILITY_PICTURE),
                                  report.test.diagnostics,
                                  title=f"{MODELS[report.model]}: reliability on the unbiased "
                                        f"test split")
        text += f"\n![reliability diagrams per exit]({RELIABILITY_PICTURE})\n"
    with open(os.path.join(run_dir, "report.md"), "w") as handle:
        handle.write(text)


def mean_train_rate(metrics_path: str) -> float:
    """Mean training images/s over the epoch records of metrics.jsonl."""
    with open(metrics_path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    rates = [r["train_images_per_s"] for r in records if r.get("kind", "epoch") == "epoch"]
    return sum(rates) / max(1, len(rates))


class Trainer:
    """Trains one model; `run()` returns the final report (also written as JSON and Markdown).

    `splits` (train, val, test DeviceSplits) default to the config's dataset, loaded or
    generated into its dataset directory.
    """

    def __init__(self, config: RunConfig, splits: Optional[Dict[str, DeviceSplit]] = None):
        self.config = config = config.with_absolute_paths()
        self.device = resolve_device(config.device)
        # torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: one process per GPU (NCCL), or gloo on CPU.
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.splits = (splits if splits is not None else
                       load_splits(config, self.device, progress=config.progress))
        if len(self.splits["train"]) < config.batch_size * self.world:
            raise ValueError(f"the training split has {len(self.splits['train'])} images, fewer "
                             f"than one batch of {config.batch_size}"
                             + (f" on each of {self.world} processes" if self.world > 1 else ""))
        # Every split's labels: a small training split may miss a class the test split has.
        self.num_classes = max(int(s.labels.max()) for s in self.splits.values() if len(s)) + 1
        self.model = build_model(config.model, self.num_classes, config.width, config.stem,
                                 config.backend).to(self.device)
        on_gpu = self.device.type == "cuda"
        self.channels_last = config.channels_last and on_gpu
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=config.bf16 and on_gpu)
        self.forward = self.model
        if self.world > 1:
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self.forward = torch.compile(self.forward)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.milestones), gamma=config.lr_gamma)
        self.objective = make_objective(config, self.model, len(self.splits["train"]),
                                        self.num_classes, self.device)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        os.makedirs(config.run_dir, exist_ok=True)
        self.checkpoint_path = config.checkpoint_path
        self.metrics_path = os.path.join(config.run_dir, "metrics.jsonl")
        self.interrupted = False

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "objective": self.objective.state_dict(),
                "rng": rng_state(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "config": self.config.to_dict(),
                "num_classes": self.num_classes}

    def save_checkpoint(self) -> str:
        # Every process holds the same state (DDP, OccamLoss sync): the first one writes it.
        if self.rank == 0:
            save_atomic(self.state_dict(), self.checkpoint_path)
        if self.world > 1:
            dist.barrier()
        return self.checkpoint_path

    def load_checkpoint(self, path: str) -> None:
        checkpoint = torch.load(path, map_location=self.device, weights_only=False)
        check_resumable(RunConfig.from_dict(checkpoint["config"]), self.config)
        load_model_state(self.model, checkpoint["model"], path)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.objective.load_state_dict(checkpoint["objective"])
        set_rng_state(checkpoint["rng"])
        self.epoch, self.step_in_epoch = checkpoint["epoch"], checkpoint["step_in_epoch"]
        self.global_step = checkpoint["global_step"]

    # -- training ----------------------------------------------------------------------------
    def _train_step(self, rows: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        train = self.splits["train"]
        x, labels = train.batch(rows, self.channels_last), train.labels[rows]
        with self.autocast:
            loss, parts = self.objective(self.forward, x, labels, rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), parts

    def _on_sigint(self, signum, frame):
        self.interrupted = True  # finish the step, write a checkpoint, then stop

    def train(self) -> None:
        config = self.config
        train = self.splits["train"]
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while self.epoch < config.epochs:
                if self.step_in_epoch == 0:
                    self.objective.on_epoch_start(self.epoch)
                self.model.train()
                order = epoch_order(len(train), config.seed, self.epoch, self.device)
                steps = steps_per_epoch(len(train), config.batch_size, self.world)
                bar = _progress(steps, self.step_in_epoch, f"epoch {self.epoch + 1}/{config.epochs}",
                                config.progress and self.rank == 0)
                started, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=self.device)
                for step, rows in batches(order, config.batch_size, self.step_in_epoch,
                                          self.rank, self.world):
                    loss, parts = self._train_step(rows)
                    loss_sum += loss
                    seen += rows.numel()
                    self.step_in_epoch, self.global_step = step + 1, self.global_step + 1
                    if config.log_every and self.global_step % config.log_every == 0:
                        self._log_step(loss, parts, rows.numel())
                    if bar is not None and (step % 10 == 0 or step == steps - 1):
                        rate = seen / (time.perf_counter() - started)
                        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                        bar.update(min(10, steps - bar.n) if step % 10 == 0 else steps - bar.n)
                    if self.interrupted or (config.max_steps and self.global_step >= config.max_steps):
                        if bar is not None:
                            bar.close()
                        path = self.save_checkpoint()
                        print(f"stopped at epoch {self.epoch + 1} step {self.step_in_epoch}; "
                              f"checkpoint written to {path}; continue with --resume")
                        return
                if bar is not None:
                    bar.close()
                elapsed = time.perf_counter() - started
                self.scheduler.step()
                record = {"kind": "epoch", "epoch": self.epoch + 1,
                          "train_loss": (loss_sum / max(1, steps)).item(),
                          "train_images_per_s": seen / max(elapsed, 1e-9),
                          "lr": self.optimizer.param_groups[0]["lr"]}
                val = self.evaluate("val", per_factor=False, diagnostics=False)
                record.update(val_accuracy=val.accuracy, val_images_per_s=val.images_per_s)
                if VAL_MIXED in self.splits:
                    mixed = self.evaluate(VAL_MIXED, per_factor=False, diagnostics=False)
                    record[f"{VAL_MIXED}_accuracy"] = mixed.accuracy
                self._append_metrics(record)
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.save_checkpoint()
        finally:
            signal.signal(signal.SIGINT, previous)

    def _append_metrics(self, record: Dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _log_step(self, loss: Tensor, parts: Dict[str, Tensor], batch: int) -> None:
        """A "step" record: the loss and every component (per exit for OccamNets), read from
        the device in one transfer (only every config.log_every steps)."""
        names = ["loss"] + list(parts)
        values = torch.stack([loss.float()] + [parts[n].float() for n in names[1:]]).tolist()
        self._append_metrics({"kind": "step", "epoch": self.epoch + 1,
                              "step": self.step_in_epoch, "global_step": self.global_step,
                              "batch": batch, **dict(zip(names, values))})

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, split_name: str = "test", per_factor: bool = True,
                 diagnostics: bool = True, time_full_depth: bool = False) -> Evaluation:
        return evaluate(self.model, self.splits[split_name], split_name,
                        threshold=self.config.exit_threshold, channels_last=self.channels_last,
                        bf16=self.config.bf16, per_factor=per_factor, diagnostics=diagnostics,
                        time_full_depth=time_full_depth)

    def run(self, resume: Optional[str] = None) -> Optional[RunReport]:
        """Train (from `resume`, a checkpoint path, if given) and evaluate; None if stopped
        before the last epoch (interrupted, or max_steps reached)."""
        if resume:
            self.load_checkpoint(resume)
        self.train()
        if self.epoch < self.config.epochs:
            return None
        # Full-depth timing on the test split too: what early exit saves (OccamNets only).
        report = RunReport(self.config.model, self.config,
                           self.evaluate("test", time_full_depth=True),
                           self.evaluate("val", per_factor=False),
                           (self.evaluate(VAL_MIXED, per_factor=False)
                            if VAL_MIXED in self.splits else None),
                           mean_train_rate(self.metrics_path))
        if self.rank == 0:
            write_report(report, self.config.run_dir)
        return report


def _progress(total: int, initial: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True)
