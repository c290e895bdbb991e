"""The `occamnets` command: data, train, eval, predict, viz and demo. It parses arguments and
calls the library (config, train, evaluate, viz, demo); nothing imports it."""
import argparse
import dataclasses
import os
import sys
import time
import typing
from typing import List, Optional


# -- data --------------------------------------------------------------------------------------

def _add_data(subparsers) -> None:
    from .config import DATA_FIELDS, PRESETS
    data = subparsers.add_parser("data", help="generate datasets")
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
    biased.add_argument("--seed", dest="data_seed", type=int, default=argparse.SUPPRESS,
                        help="the same as --data-seed")
    biased.add_argument("--force", action="store_true",
                        help="replace another dataset found in --out")
    biased.add_argument("--preview", default=None, help="save a grid of samples to this PNG")
    biased.set_defaults(handler=_run_data)


def _run_data(args) -> int:
    from .config import RunConfig, default_preset
    from .data import biased_mnist
    from .viz import save_sample_grid
    run = RunConfig.from_preset(args.preset or default_preset(), **_explicit_settings(args))
    config = run.biased_mnist()
    out = args.out or run.dataset_dir
    started = time.perf_counter()
    splits = biased_mnist.load(config, out, progress=True, replace_other=args.force)
    sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    print(f"Biased MNIST in {out}: {sizes} images of {config.image_size} px "
          f"({time.perf_counter() - started:.1f} s); train on it with "
          f"`occamnets train --data-dir {out}`")
    if args.preview:
        train = splits["train"]
        save_sample_grid(args.preview, train.images[:24], train.labels, train.factors,
                         train.factor_names, title=f"Biased MNIST train, p_bias={run.p_bias}")
        print(f"preview written to {args.preview}")
    return 0


# -- train: one option per RunConfig field -----------------------------------------------------

_HELP = {
    "model": "occam (OccamResNet-18) or resnet (the ResNet-18 baseline)",
    "stem": "7x7 (7x7/2 conv + max-pool, for 160 px) or 3x3 (3x3/1, small images)",
    "data_dir": "the dataset's directory: one written by `occamnets data` is used as it is "
                "(its settings become the run's); an empty one is filled",
    "out_dir": "run directory (default runs/<model>)",
    "backend": "exit-head implementation",
    "max_steps": "stop with a checkpoint after this many steps in total",
    "compile": "torch.compile the model",
    "bf16": "bf16 autocast (GPU only; the gate and the losses stay fp32)",
    "log_every": "write the loss and its components per exit to metrics.jsonl every N steps "
                 "(0: never)",
}
_EXIT_HEAD_BACKENDS = ("auto", "triton", "reference")


def _option_type(hint):
    """(argparse type, nargs) for a RunConfig field's annotation."""
    if typing.get_origin(hint) is tuple:                  # Tuple[int, ...]
        return typing.get_args(hint)[0], "+"
    if typing.get_origin(hint) is typing.Union:           # Optional[X]; p_bias: float first
        return typing.get_args(hint)[0], None
    return hint, None


def _add_config_options(parser, names) -> None:
    """One option per RunConfig field in `names`, given only when typed (SUPPRESS default)."""
    from .config import RunConfig
    from .models import MODELS, STEMS
    choices = {"model": list(MODELS), "stem": list(STEMS), "backend": _EXIT_HEAD_BACKENDS}
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        if field.name not in names:
            continue
        flags = ["--" + field.name.replace("_", "-")] + (["--out"] if field.name == "out_dir" else [])
        common = dict(dest=field.name, default=argparse.SUPPRESS,
                      help=_HELP.get(field.name, "") + f" (quick preset: {field.default!r})")
        kind, nargs = _option_type(hints[field.name])
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(*flags, type=kind, nargs=nargs,
                                choices=choices.get(field.name), **common)


def _add_train_options(parser) -> None:
    from .config import PRESETS, RunConfig
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="starting values (default: gpu with a GPU, quick without)")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out with its checkpoint's settings")
    _add_config_options(parser, [f.name for f in dataclasses.fields(RunConfig)
                                 if f.name != "preset"])


def _explicit_settings(args) -> dict:
    from .config import RunConfig
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"preset"}
    values = {k: v for k, v in vars(args).items() if k in names}
    for name in ("milestones", "taus"):
        if name in values:
            values[name] = tuple(values[name])
    return values


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
    print(f"training on the Biased MNIST in {explicit['data_dir']}: "
          f"{', '.join(f'{n}={getattr(adopted, n)}' for n in DATA_FIELDS)}")
    return adopted


def _run_train(args) -> int:
    from .config import RunConfig, default_preset, describe_presets
    from .evaluate import checkpoint_config
    from .train import Trainer, check_resumable
    if args.list_presets:
        print(describe_presets())
        return 0
    explicit = _explicit_settings(args)
    config = RunConfig.from_preset(args.preset or default_preset(), **explicit)
    checkpoint = config.checkpoint_path
    if args.resume:
        if not os.path.exists(checkpoint):
            print(f"--resume: no checkpoint at {checkpoint}", file=sys.stderr)
            return 2
        # The run's own settings, with what was given now on top (the trainer refuses a change
        # of what the checkpoint was trained with).
        # A step cap is for one invocation: it is not inherited.
        saved = checkpoint_config(checkpoint)
        config = dataclasses.replace(saved, **dict(dict(max_steps=None), **explicit))
        check_resumable(saved, config)  # before any data is loaded or generated
    elif os.path.exists(checkpoint):
        print(f"{checkpoint} exists: pass --resume to continue it, or choose another --out",
              file=sys.stderr)
        return 2
    else:
        config = _with_cached_dataset(config, explicit)
    trainer = Trainer(config)
    report = trainer.run(resume=checkpoint if args.resume else None)
    if report is None:
        return 130 if trainer.interrupted else 0
    print(report.to_markdown())
    return 0


# -- eval, predict, viz: a checkpoint, no training state ----------------------------------------

def _add_checkpoint_command(subparsers, name, help_text, handler):
    from .data.biased_mnist import SPLITS
    parser = subparsers.add_parser(name, help=help_text)
    parser.add_argument("checkpoint")
    parser.add_argument("--device", default=None, help="default: the GPU when there is one")
    parser.add_argument("--split", default="test", choices=list(SPLITS))
    parser.add_argument("--data-dir", default=None,
                        help="where the run's dataset is now (default: where it was trained)")
    parser.set_defaults(handler=handler)
    return parser


def _model_and_split(args, need_exits: bool = False):
    from .evaluate import load_model, load_splits
    model, config = load_model(args.checkpoint, args.device)
    if need_exits and not hasattr(model, "early_exit"):
        raise ValueError(f"{args.command} needs an OccamNet checkpoint; this one is a "
                         f"{config.model} model")
    if args.data_dir:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    device = next(model.parameters()).device
    return model, config, load_splits(config, device, (args.split,))[args.split]


def _run_eval(args) -> int:
    from .evaluate import evaluate
    model, config, split = _model_and_split(args)
    result = evaluate(model, split, args.split, threshold=config.exit_threshold,
                      batch_size=args.batch_size, channels_last=config.channels_last,
                      bf16=config.bf16)
    print(f"# {config.model} from {args.checkpoint}\n\n{result.to_markdown()}")
    if args.reliability:
        from .viz import save_reliability_diagrams
        save_reliability_diagrams(args.reliability, result.diagnostics,
                                  title=f"Reliability on {args.split} ({result.images} images)")
        print(f"reliability diagrams written to {args.reliability}")
    return 0


def _run_predict(args) -> int:
    import torch
    from .evaluate import classify, evaluate, load_model
    if not args.images:
        model, config, split = _model_and_split(args, need_exits=True)
        threshold = config.exit_threshold if args.threshold is None else args.threshold
        result = evaluate(model, split, args.split, threshold=threshold,
                          batch_size=args.batch_size, channels_last=config.channels_last,
                          bf16=config.bf16, per_factor=False, time_full_depth=True)
        shares = ", ".join(f"E{t} {100 * s:.1f}%" for t, s in enumerate(result.exit_share))
        if result.nonfinite_samples:
            print(f"warning: {result.nonfinite_samples} of {result.images} images gave "
                  f"non-finite logits or gates", file=sys.stderr)
        print(f"{result.images} {args.split} images on {split.device}: early exit with "
              f"compaction {result.images_per_s:.0f} images/s, every exit on every sample "
              f"{result.full_depth_images_per_s:.0f} images/s "
              f"({result.images_per_s / result.full_depth_images_per_s:.2f}x); exits: {shares}")
        return 0
    from .data.loaders import normalise, read_images
    model, config = load_model(args.checkpoint, args.device)
    threshold = config.exit_threshold if args.threshold is None else args.threshold
    device = next(model.parameters()).device
    size = config.biased_mnist().image_size
    images = read_images(args.images, size)
    nonfinite = 0
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size].to(device)
        with torch.no_grad():
            out = classify(model, normalise(chunk), threshold)
        probabilities = torch.softmax(out.logits.float(), 1)
        for i, path in enumerate(args.images[start:start + args.batch_size]):
            exit_text = f"  exit E{int(out.exit_index[i])}" if out.exit_index is not None else ""
            if out.nonfinite[i]:
                nonfinite += 1
                print(f"{path}: no prediction: non-finite logits or gate{exit_text}")
                continue
            print(f"{path}: class {int(probabilities[i].argmax())} "
                  f"(p={float(probabilities[i].max()):.2f}){exit_text}")
    if nonfinite:
        print(f"warning: {nonfinite} of {len(images)} images gave non-finite logits or gates",
              file=sys.stderr)
    return 0


def _run_viz(args) -> int:
    from .evaluate import cam_picture_data, evaluate
    from .viz import save_cam_grid, save_exit_distribution
    model, config, split = _model_and_split(args, need_exits=True)
    save_cam_grid(args.out, cam_picture_data(model, split, args.count, config.exit_threshold))
    if args.exits_plot:
        result = evaluate(model, split, args.split, threshold=config.exit_threshold,
                          channels_last=config.channels_last, bf16=config.bf16, per_factor=False)
        save_exit_distribution(args.exits_plot, result.exit_counts, result.exit_accuracy_taken,
                               title=f"Exits on {args.split} ({len(split)} images)")
    print(f"CAM picture written to {args.out}" +
          (f", exit distribution to {args.exits_plot}" if args.exits_plot else ""))
    return 0


def _run_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.out, args.preset, args.docs)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    parser = argparse.ArgumentParser(prog="occamnets", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_data(subparsers)
    train = subparsers.add_parser("train", help="train OccamResNet-18 or the ResNet baseline")
    _add_train_options(train)
    train.set_defaults(handler=_run_train)
    evaluation = _add_checkpoint_command(subparsers, "eval", "evaluate a checkpoint", _run_eval)
    evaluation.add_argument("--batch-size", type=_positive_int, default=256)
    evaluation.add_argument("--reliability", default=None, metavar="PNG",
                            help="also draw each exit's reliability diagrams (class softmax "
                                 "and gate) to this file")
    predict = _add_checkpoint_command(
        subparsers, "predict", "classify image files, or time early-exit inference on a split",
        _run_predict)
    predict.add_argument("images", nargs="*",
                         help="PNG/JPEG files to classify (resized to the training size); "
                              "none: time inference on --split")
    predict.add_argument("--batch-size", type=_positive_int, default=256)
    predict.add_argument("--threshold", type=float, default=None,
                         help="leave at the first exit whose gate is at least this (default: "
                              "the run's exit_threshold)")
    viz = _add_checkpoint_command(subparsers, "viz", "CAM picture of every exit", _run_viz)
    viz.add_argument("--out", default="cams.png")
    viz.add_argument("--exits-plot", default=None, help="also save the exit distribution")
    viz.add_argument("--count", type=_positive_int, default=6)
    demo = subparsers.add_parser("demo", help="train both models and compare them")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--preset", choices=list(PRESETS), default=None)
    demo.add_argument("--docs", default=None, help="also copy the pictures here")
    demo.set_defaults(handler=_run_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"occamnets {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
