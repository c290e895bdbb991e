"""How fast real-dataset images come in: decode throughput of each decoder, and training
images/s from the decoded cache against streaming (decoding every batch, the next one in
the background), on a synthetic dataset in BAR's layout (300x400 JPEGs).

    python bench/data_input.py [--device cuda] [--out results.json]

On a GPU the torchvision decoder runs nvJPEG there. Not a pytest file: it trains two short
runs, minutes on a CPU.
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from occamnets.config import RunConfig
from occamnets.data import bar, catalog, image_cache
from occamnets.train import Trainer, read_metrics

from benchutils import synchronize


def write_dataset(root: str, train_per_class: int = 100, test_per_class: int = 20) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for label, name in enumerate(bar.CLASSES):
            for n in range(count):
                pixels = (rng.random((300, 400, 3)) * 64 + 30 * label).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f"{name}_{n}.jpg"),
                                             quality=90)


def decode_rate(split, decoder: str, size: int, device, workers: int) -> float:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        image_cache.decode_rows(split, range(32), size, None, pool, decoder, device)  # warm-up
        synchronize()
        started = time.perf_counter()
        image_cache.decode_rows(split, range(len(split)), size, None, pool, decoder, device)
        synchronize()
    return len(split) / (time.perf_counter() - started)


def training_rate(root: str, work: str, device: str, size: int, streamed: bool,
                  workers: int) -> float:
    """Images/s of the second epoch (the first includes decoding into the cache)."""
    run = os.path.join(work, "streamed" if streamed else "cached")
    config = RunConfig.from_preset("quick", dataset="bar", data_root=root, image_size=size,
                                   out_dir=run, data_dir=run, device=device, progress=False,
                                   epochs=2, cache_limit_gb=0.0 if streamed else 8.0,
                                   workers=workers)
    Trainer(config).train()
    epochs = [r for r in read_metrics(os.path.join(run, "metrics.jsonl"))
              if r.get("kind") == "epoch"]
    return epochs[-1]["train_images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="occam-data-input-")
    try:
        root = os.path.join(work, "bar")
        write_dataset(root)
        train = catalog.find("bar", root).split("train")
        results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else "cpu", "images": len(train), "size": args.size,
                   "workers": args.workers}
        for decoder in ("pil", "torchvision"):
            results[f"decode_{decoder}_images_per_s"] = decode_rate(
                train, decoder, args.size, args.device, args.workers)
        for streamed in (False, True):
            name = "streamed" if streamed else "cached"
            results[f"train_{name}_images_per_s"] = training_rate(
                root, work, args.device, args.size, streamed, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
