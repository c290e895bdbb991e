"""`make demo`: Biased MNIST, the ResNet baseline and OccamResNet-18 trained side by side.

Prints a table (unbiased test accuracy, per-exit accuracy and exit shares, training and
inference images/s) and writes the CAM picture and the exit-distribution plot. Re-running
resumes from the checkpoints, so an interrupted demo loses nothing.
"""
import json
import os
import shutil
import time
from typing import Optional

import torch

from .train import TrainConfig, Trainer


def _mean_train_rate(out_dir: str) -> float:
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        rates = [json.loads(line)["train_images_per_s"] for line in handle if line.strip()]
    return sum(rates) / len(rates)


def _inference_rate(trainer: Trainer, compaction: Optional[bool]) -> float:
    """Test images/s: plain forward (baseline) or early exit with/without compaction."""
    from .cli import _time_inference
    split = trainer.splits["test"]
    model = trainer.model.eval()
    with torch.no_grad(), trainer.autocast:
        if compaction is None:
            for _ in range(2):  # the first pass warms up
                started = time.perf_counter()
                for start in range(0, len(split), 256):
                    rows = torch.arange(start, min(start + 256, len(split)), device=trainer.device)
                    model(split.batch(rows, trainer.channels_last))
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
            return len(split) / (time.perf_counter() - started)
        return _time_inference(model, split, 256, compaction, trainer.channels_last)[0]


def run_demo(out: str, preset: Optional[str] = None, docs: Optional[str] = None) -> int:
    from .cli import save_pictures
    preset = preset or ("gpu" if torch.cuda.is_available() else "quick")
    started = time.perf_counter()
    rows = {}
    for model in ("resnet", "occam"):
        config = TrainConfig.from_preset(preset, model=model, out_dir=os.path.join(out, model),
                                         data_dir=os.path.join(out, "data"))
        trainer = Trainer(config)
        checkpoint = os.path.join(config.out_dir, "checkpoint.pt")
        print(f"== {model}: {preset} preset on {trainer.device}")
        report = trainer.run(resume=checkpoint if os.path.exists(checkpoint) else None)
        if report is None:
            print("interrupted: run the demo again to continue")
            return 130
        test = report["test"]
        rows[model] = {"accuracy": test["accuracy"], "train": _mean_train_rate(config.out_dir)}
        if model == "occam":
            rows[model].update(exit_share=test["exit_share"],
                               exit_accuracy=test["exit_accuracy_taken"],
                               infer=_inference_rate(trainer, True),
                               infer_full=_inference_rate(trainer, False))
            cams, exits = os.path.join(out, "cams.png"), os.path.join(out, "exits.png")
            save_pictures(trainer, cams, exits)
            if docs:
                os.makedirs(docs, exist_ok=True)
                for path in (cams, exits):
                    shutil.copy(path, os.path.join(docs, "demo_" + os.path.basename(path)))
        else:
            rows[model]["infer"] = _inference_rate(trainer, None)
    print(table(rows))
    print(f"pictures: {os.path.join(out, 'cams.png')}, {os.path.join(out, 'exits.png')}; "
          f"reports: {out}/*/report.md; wall time {time.perf_counter() - started:.0f} s")
    return 0


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(rows) -> str:
    occam = rows["occam"]
    exits = range(1, len(occam["exit_share"]))
    lines = ["",
             "| model | unbiased test acc % | " + " | ".join(f"E{t} share % (acc %)" for t in exits)
             + " | train img/s | inference img/s |",
             "|---|---|" + "---|" * len(exits) + "---|---|"]
    base = rows["resnet"]
    lines.append(f"| ResNet-18 baseline | {_pct(base['accuracy'])} | "
                 + " | ".join("-" for _ in exits) + f" | {base['train']:.0f} | {base['infer']:.0f} |")
    lines.append(f"| OccamResNet-18 | {_pct(occam['accuracy'])} | "
                 + " | ".join(f"{_pct(occam['exit_share'][t])} ({_pct(occam['exit_accuracy'][t])})"
                              for t in exits)
                 + f" | {occam['train']:.0f} | {occam['infer']:.0f} early exit, "
                   f"{occam['infer_full']:.0f} full depth |")
    return "\n".join(lines) + "\n"
