"""A real dataset's splits ready for training and evaluation: found in its directory
(catalog.find), decoded once into the cache when it fits the size limit, else streamed; held
as `DeviceSplit`s (or `StreamingSplit`s) with labels, bias attributes and groups."""
import concurrent.futures
from typing import Dict, Optional, Sequence

import torch

from .catalog import find, spec
from .image_cache import (DecodeErrors, StreamingSplit, array_bytes, decode_positions,
                          load_cached)
from .index import DatasetIndex, SplitIndex
from .loaders import DeviceSplit, LabelledItems


def _device_split(split: SplitIndex, images: torch.Tensor, index: DatasetIndex,
                  device) -> DeviceSplit:
    labels, attributes, aligned = split.tensors()
    return DeviceSplit(images, labels, attributes, index.attribute_names, device,
                       aligned=aligned, class_names=index.class_names,
                       split_rule=index.split_rule, factor_values=index.attribute_values)


def first_images(index: DatasetIndex, name: str, size: int, centre_crop: Optional[int],
                 count: int, device="cpu", workers: int = 4,
                 skip_unreadable: bool = False) -> DeviceSplit:
    """The first `count` images of a split, decoded now (a picture needs no cache).
    skip_unreadable: leave out images that cannot be read (a preview of a damaged dataset)
    rather than raise DecodeErrors."""
    split = index.split(name)
    count = min(count, len(split))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        images, failed = decode_positions(split.images, range(count), size, centre_crop, pool)
    if failed and not skip_unreadable:
        raise DecodeErrors(name, [(split.images.names[row], why) for row, why in failed])
    bad = {row for row, _ in failed}   # by row: an image listed twice is left out twice
    rows = [row for row in range(count) if row not in bad]
    labels, attributes, aligned = split.tensors(rows)
    return DeviceSplit(torch.from_numpy(images[rows]), labels, attributes,
                       index.attribute_names, device, aligned=aligned,
                       class_names=index.class_names, split_rule=index.split_rule,
                       factor_values=index.attribute_values)


def load_real_splits(dataset: str, root: str, names: Optional[Sequence[str]], cache_dir: str,
                     size: int, device, bias_columns: Optional[Sequence[str]] = None,
                     limit_bytes: float = 8e9, workers: int = 4, progress: bool = False,
                     count: Optional[int] = None, decoder: str = "auto"
                     ) -> Dict[str, LabelledItems]:
    """The splits `names` (None: training and every reported split) of `dataset` in `root`.
    Cached decoded in `cache_dir` when all of them together take at most `limit_bytes`, else
    streamed (decoded per batch). count: only the first images of each, decoded now.
    decoder: pil, torchvision (JPEGs on `device`: nvJPEG on a GPU) or auto (torchvision on a
    GPU, else pil)."""
    device = torch.device(device)
    if decoder == "auto":
        decoder = "torchvision" if device.type == "cuda" else "pil"
    chosen = spec(dataset)
    index = find(dataset, root, bias_columns)
    if names is None:
        names = (chosen.train,) + chosen.reported_splits(list(index.splits))
    for name in names:
        index.split(name)  # an unknown split is named before any decoding
    crop = chosen.centre_crop
    if count is not None:
        return {n: first_images(index, n, size, crop, count, device, workers) for n in names}
    if array_bytes(index, names, size) > limit_bytes:
        return {n: StreamingSplit(n, index, size, crop, device, workers, decoder)
                for n in names}
    images = load_cached(index, names, cache_dir, size, crop, workers, progress, decoder,
                         device)
    return {n: _device_split(index.split(n), images[n], index, device) for n in names}
