"""Trainer for OccamResNet and the ResNet baseline on Biased MNIST.

Resumable exactly: a checkpoint holds the model, optimiser, scheduler, OccamLoss state, RNG
states, the epoch and the batch within it; the batch order of an epoch is a function of
(seed, epoch), so a resumed run sees the same batches. Ctrl-C writes a checkpoint first.
"""
import dataclasses
import json
import math
import os
import random
import signal
import time
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data.loaders import DeviceSplit
from .inference import predict
from .losses import OccamLoss
from .models import occam_resnet18, resnet18

PRESETS = {
    # The paper's Biased MNIST settings (DESIGN.md section 5 and the official configs).
    "paper": dict(epochs=90, lr=1e-3, weight_decay=5e-4, milestones=(50, 70), lr_gamma=0.1,
                  batch_size=128, cell_size=32, width=58, input_size=160, p_bias=0.95,
                  train_size=50000, val_size=10000, test_size=10000),
    # Minutes on a GPU.
    "gpu": dict(epochs=12, lr=1e-3, weight_decay=5e-4, milestones=(8, 11), lr_gamma=0.1,
                batch_size=128, cell_size=16, width=32, input_size=64, p_bias=0.95,
                train_size=8000, val_size=1000, test_size=2000),
    # A few minutes on a 2-core CPU: 40 px images, a narrow network, and p_bias 0.9 rather
    # than 0.95 so that so little data and training still leaves some digit signal.
    "quick": dict(epochs=8, lr=2e-3, weight_decay=5e-4, milestones=(6,), lr_gamma=0.1,
                  batch_size=64, cell_size=8, width=12, input_size=64, p_bias=0.9,
                  train_size=3500, val_size=250, test_size=1000),
}


@dataclasses.dataclass
class TrainConfig:
    model: str = "occam"             # "occam" (OccamResNet-18) or "resnet" (baseline)
    preset: str = "quick"
    epochs: int = 4
    lr: float = 2e-3
    weight_decay: float = 5e-4
    milestones: Tuple[int, ...] = (3,)
    lr_gamma: float = 0.1
    batch_size: int = 64
    cell_size: int = 8
    width: int = 12
    input_size: int = 64             # which stem: 160 (7x7/2 + max-pool) or 64 (3x3/1)
    p_bias: float = 0.95
    train_size: int = 2000
    val_size: int = 250
    test_size: int = 500
    seed: int = 0
    device: str = "auto"
    bf16: bool = True                # autocast on GPU only
    channels_last: bool = True       # GPU only
    compile: bool = False
    backend: str = "auto"            # exit-head backend
    data_dir: str = "data"
    out_dir: str = "runs/occam"
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this many steps in total
    progress: bool = True

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "TrainConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values = dict(PRESETS[preset], preset=preset)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def identity(self) -> Dict:
        """What a checkpoint must agree on to be resumed (not paths, devices or step caps)."""
        skip = {"device", "out_dir", "data_dir", "max_steps", "progress", "compile", "epochs"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: TrainConfig, num_classes: int):
    if config.model == "occam":
        return occam_resnet18(num_classes, width=config.width, input_size=config.input_size,
                              backend=config.backend)
    if config.model == "resnet":
        return resnet18(num_classes, width=config.width, input_size=config.input_size)
    raise ValueError(f"unknown model {config.model!r}; choose 'occam' or 'resnet'")


def epoch_order(num_items: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The permutation of an epoch: a function of (seed, epoch) only, so resuming repeats it."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(num_items, generator=generator).to(device)


def steps_per_epoch(num_items: int, batch_size: int, world: int = 1) -> int:
    # The ragged tail is dropped: BatchNorm, the gate balance and all_gather want full batches.
    return num_items // (batch_size * world)


def batches(order: torch.Tensor, batch_size: int, start: int = 0, rank: int = 0,
            world: int = 1) -> Iterator[Tuple[int, torch.Tensor]]:
    """This process's batches of an epoch: step s of process r takes slice s * world + r."""
    for step in range(start, steps_per_epoch(len(order), batch_size, world)):
        first = (step * world + rank) * batch_size
        yield step, order[first:first + batch_size]


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


def check_checkpoint(checkpoint: Dict, config: TrainConfig) -> None:
    theirs, ours = checkpoint.get("config_identity", {}), config.identity()
    differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differing:
        details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {ours.get(k)!r}"
                            for k in differing)
        raise CheckpointMismatch(f"this checkpoint was written for another model or config "
                                 f"({details}); start a new run with another --out, or resume "
                                 f"with the same settings")


# A split on the training device (the trainer's view of a dataset).
Split = DeviceSplit


def load_splits(config: TrainConfig, device) -> Dict[str, Split]:
    from .data import biased_mnist
    splits = biased_mnist.load_splits(
        cache_dir=config.data_dir, cell_size=config.cell_size, p_bias=config.p_bias,
        train_size=config.train_size, val_size=config.val_size, test_size=config.test_size,
        seed=config.seed, progress=config.progress)
    return {name: Split(s.images, s.labels, s.factors, s.factor_names, device)
            for name, s in splits.items()}


class Trainer:
    """Trains one model; `run()` returns the final report (also written as JSON and Markdown)."""

    def __init__(self, config: TrainConfig, splits: Optional[Dict[str, Split]] = None):
        self.config = config
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
        self.splits = splits if splits is not None else load_splits(config, self.device)
        self.num_classes = int(self.splits["train"].labels.max().item()) + 1
        self.model = build_model(config, self.num_classes).to(self.device)
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
        self.loss_fn = (OccamLoss(len(self.splits["train"]), self.num_classes,
                                  num_exits=self.model.num_exits).to(self.device)
                        if config.model == "occam" else None)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        os.makedirs(config.out_dir, exist_ok=True)
        self.checkpoint_path = os.path.join(config.out_dir, "checkpoint.pt")
        self.metrics_path = os.path.join(config.out_dir, "metrics.jsonl")
        self._interrupted = False

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "loss": self.loss_fn.state_dict() if self.loss_fn is not None else None,
                "rng": rng_state(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "config": dataclasses.asdict(self.config),
                "config_identity": self.config.identity(), "num_classes": self.num_classes}

    def save_checkpoint(self) -> str:
        # Every process holds the same state (DDP, OccamLoss sync): the first one writes it.
        if self.rank == 0:
            save_atomic(self.state_dict(), self.checkpoint_path)
        if self.world > 1:
            dist.barrier()
        return self.checkpoint_path

    def load_checkpoint(self, path: str) -> None:
        checkpoint = torch.load(path, map_location=self.device, weights_only=False)
        check_checkpoint(checkpoint, self.config)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.loss_fn is not None:
            self.loss_fn.load_state_dict(checkpoint["loss"])
        set_rng_state(checkpoint["rng"])
        self.epoch, self.step_in_epoch = checkpoint["epoch"], checkpoint["step_in_epoch"]
        self.global_step = checkpoint["global_step"]

    # -- training ----------------------------------------------------------------------------
    def _train_step(self, rows: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        train = self.splits["train"]
        x, labels = train.batch(rows, self.channels_last), train.labels[rows]
        with self.autocast:
            if self.loss_fn is None:
                loss = F.cross_entropy(self.forward(x).float(), labels)
                parts = {}
            else:
                loss, parts = self.loss_fn(self.forward(x, labels), labels, rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), parts

    def _on_sigint(self, signum, frame):
        self._interrupted = True  # finish the step, write a checkpoint, then stop

    def train(self) -> None:
        config = self.config
        train = self.splits["train"]
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while self.epoch < config.epochs:
                if self.step_in_epoch == 0 and self.loss_fn is not None:
                    self.loss_fn.on_epoch_start(self.epoch)
                self.model.train()
                order = epoch_order(len(train), config.seed, self.epoch, self.device)
                steps = steps_per_epoch(len(train), config.batch_size, self.world)
                bar = _progress(steps, self.step_in_epoch, f"epoch {self.epoch + 1}/{config.epochs}",
                                config.progress and self.rank == 0)
                started, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=self.device)
                for step, rows in batches(order, config.batch_size, self.step_in_epoch,
                                          self.rank, self.world):
                    loss, _ = self._train_step(rows)
                    loss_sum += loss
                    seen += rows.numel()
                    self.step_in_epoch, self.global_step = step + 1, self.global_step + 1
                    if bar is not None and (step % 10 == 0 or step == steps - 1):
                        rate = seen / (time.perf_counter() - started)
                        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                        bar.update(min(10, steps - bar.n) if step % 10 == 0 else steps - bar.n)
                    if self._interrupted or (config.max_steps and self.global_step >= config.max_steps):
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
                record = {"epoch": self.epoch + 1, "train_loss": (loss_sum / max(1, steps)).item(),
                          "train_images_per_s": seen / max(elapsed, 1e-9),
                          "lr": self.optimizer.param_groups[0]["lr"]}
                record.update({f"val_{k}": v for k, v in
                               self.evaluate("val", per_factor=False).items()
                               if not isinstance(v, (list, dict))})
                if self.rank == 0:
                    with open(self.metrics_path, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.save_checkpoint()
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split_name: str = "test", per_factor: bool = True,
                 batch_size: int = 256) -> Dict:
        split = self.splits[split_name]
        self.model.eval()
        chunks = [torch.arange(start, min(start + batch_size, len(split)), device=self.device)
                  for start in range(0, len(split), batch_size)]
        predictions, exits, per_exit_correct = [], [], []
        # Timed: what a user's inference does (early exit with compaction for an OccamNet).
        started = time.perf_counter()
        for rows in chunks:
            x = split.batch(rows, self.channels_last)
            with self.autocast:
                if self.loss_fn is None:
                    logits = self.model(x)
                    exit_index = torch.zeros(len(rows), dtype=torch.long, device=self.device)
                else:
                    result = predict(self.model, x)
                    logits, exit_index = result.logits, result.exit_index
            predictions.append(logits.argmax(1))
            exits.append(exit_index)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if self.loss_fn is not None:
            # Untimed: every exit on every sample, for the per-exit accuracies.
            for rows in chunks:
                with self.autocast:
                    every = self.model(split.batch(rows, self.channels_last))["logits"]
                per_exit_correct.append(torch.stack(
                    [l.argmax(1) == split.labels[rows] for l in every], 1))
        predicted, exit_index = torch.cat(predictions), torch.cat(exits)
        correct = (predicted == split.labels).float()
        report = {"accuracy": correct.mean().item(),
                  "eval_images_per_s": len(split) / max(elapsed, 1e-9)}
        if per_exit_correct:
            every_correct = torch.cat(per_exit_correct).float()
            num_exits = every_correct.shape[1]
            counts = torch.bincount(exit_index, minlength=num_exits)
            report["exit_accuracy_all_samples"] = every_correct.mean(0).tolist()
            report["exit_share"] = (counts.float() / len(split)).tolist()
            report["exit_accuracy_taken"] = [
                correct[exit_index == t].mean().item() if counts[t] else None
                for t in range(num_exits)]
        if per_factor:
            # A sample is bias-aligned for a factor when the factor takes its class's value.
            report["factors"] = {}
            for column, name in enumerate(split.factor_names):
                aligned = split.factors[:, column] == split.labels
                report["factors"][name] = {
                    "aligned": correct[aligned].mean().item() if aligned.any() else None,
                    "conflicting": correct[~aligned].mean().item() if (~aligned).any() else None}
        return report

    def run(self, resume: Optional[str] = None) -> Optional[Dict]:
        if resume:
            self.load_checkpoint(resume)
        self.train()
        if self.epoch < self.config.epochs:
            return None  # interrupted
        report = {"model": self.config.model, "config": dataclasses.asdict(self.config),
                  "test": self.evaluate("test"), "val": self.evaluate("val", per_factor=False)}
        if self.rank == 0:
            write_report(report, self.config.out_dir)
        return report


def _progress(total: int, initial: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True)


def write_report(report: Dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    with open(os.path.join(out_dir, "report.md"), "w") as handle:
        handle.write(report_markdown(report))


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * value:.1f}"


def report_markdown(report: Dict) -> str:
    test = report["test"]
    lines = [f"# {report['model']} on Biased MNIST", "",
             f"Unbiased test accuracy: **{_pct(test['accuracy'])}%**; "
             f"inference {test['eval_images_per_s']:.0f} images/s", ""]
    if "exit_share" in test:
        lines += ["| exit | share of samples % | accuracy of its samples % | accuracy on all % |",
                  "|---|---|---|---|"]
        for t, share in enumerate(test["exit_share"]):
            lines.append(f"| E{t} | {_pct(share)} | {_pct(test['exit_accuracy_taken'][t])} | "
                         f"{_pct(test['exit_accuracy_all_samples'][t])} |")
        lines.append("")
    lines += ["| factor | bias-aligned % | bias-conflicting % |", "|---|---|---|"]
    for name, values in test.get("factors", {}).items():
        lines.append(f"| {name} | {_pct(values['aligned'])} | {_pct(values['conflicting'])} |")
    return "\n".join(lines) + "\n"
