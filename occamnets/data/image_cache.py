"""Decoding a real dataset once: each split's images prepared (centre crop, resize) into one
uint8 (N, 3, S, S) array file, written atomically and checksummed as Biased MNIST's cache is;
later runs map it (copy-on-write) instead of decoding again.

A dataset whose arrays would exceed the size limit is not cached: its splits decode the
images of each batch when asked (`StreamingSplit`, a thread pool: Pillow decodes with the GIL
released).

decoder: "pil" (Pillow, any image format), or "torchvision" for JPEG files: torchvision's
decode_jpeg on `decode_device`, with nvJPEG on a GPU (jpeg_decode.py); other files, and
array sources, are decoded by Pillow either way.

meta.json records, per split, the fingerprint of what was decoded (the source's image names,
the size and crop) and each array file's size and SHA-256; a split whose fingerprint or
checksum differs is decoded again, the others are kept. meta.json is rewritten after each
split, so an interruption loses at most the split being decoded.
"""
import concurrent.futures
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..files import atomic_path, file_problem, file_record, remove_stale_temporaries
from ..progress import close, progress_bar
from ..text import first_few
from .biased_mnist import ARRAY_FIELDS
from .index import DatasetIndex, ImageSource, SplitIndex
from .jpeg_decode import decode_jpeg_rows
from .loaders import LabelledItems, prepare, read_rgb

CACHE_FORMAT = 1
META = "meta.json"
DECODE_CHUNK = 256   # images decoded per task batch (progress and memory granularity)


class DecodeErrors(ValueError):
    """Images that could not be read; `problems` lists (name, why) for each."""

    def __init__(self, split: str, problems: List[Tuple[str, str]]):
        self.problems = problems
        shown = "; ".join(f"{name}: {why}" for name, why in problems[:3])
        super().__init__(f"{len(problems)} image(s) of the {split} split cannot be read "
                         f"({shown}{'; ...' if len(problems) > 3 else ''}); `occamnets data "
                         f"check` lists them all")


def decode_positions(source: ImageSource, rows: Sequence[int], size: int,
                     centre_crop: Optional[int],
                     pool: Optional[concurrent.futures.Executor] = None
                     ) -> Tuple[np.ndarray, List[Tuple[int, str]]]:
    """(images (len(rows), 3, size, size) uint8, [(position in `rows`, why) of each unreadable
    image]): by position, as an image listed twice is two positions (its name alone would
    tell only the first)."""
    def one(row: int):
        try:
            return prepare(source.read(row), size, centre_crop), None
        except (ValueError, OSError, KeyError) as error:
            return None, str(error)
    results = list(pool.map(one, rows)) if pool is not None else [one(r) for r in rows]
    out = np.zeros((len(rows), 3, size, size), dtype=np.uint8)
    failed = []
    for i, (image, why) in enumerate(results):
        if why is not None:
            failed.append((i, why))
        else:
            out[i] = image
    return out, failed


def uses_torchvision(split: SplitIndex, decoder: str) -> bool:
    return decoder == "torchvision" and split.images.all_jpeg


def fingerprint(split: SplitIndex, size: int, centre_crop: Optional[int],
                decoder: str = "pil") -> str:
    """What the split's array depends on: the images (by name, in order), the size and
    modification time of every file they come from (a file replaced or rewritten in place
    is decoded again), size, crop and the decoder that reads them."""
    used = "torchvision" if uses_torchvision(split, decoder) else "pil"
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, size, centre_crop, used]).encode())
    for name in split.images.names:
        digest.update(name.encode() + b"\0")
    for path in split.images.files:
        try:
            stat = os.stat(path)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\0".encode())
        except OSError:
            digest.update(b"missing\0")   # decoding it will say so
    return digest.hexdigest()


def array_bytes(index: DatasetIndex, splits: Sequence[str], size: int) -> int:
    return sum(len(index.split(s)) for s in splits) * 3 * size * size


def _read_meta(directory: str) -> Dict:
    try:
        with open(os.path.join(directory, META)) as handle:
            meta = json.load(handle)
        return meta if isinstance(meta, dict) and isinstance(meta.get("splits"), dict) else {}
    except (OSError, ValueError):
        return {}


def _refuse_other_contents(directory: str) -> None:
    """A ValueError when `directory` holds a Biased MNIST: its meta.json and split images
    have the same names as ours, and would be overwritten (its other arrays without its
    meta.json are one cut short). Other files (a run's, when the run directory is the cache
    too; a user's own) do not collide with ours."""
    try:
        with open(os.path.join(directory, META)) as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        meta = None   # none, or not JSON: ours, damaged (the arrays' checksums decide)
    if meta is not None and not (isinstance(meta, dict) and isinstance(meta.get("splits"), dict)):
        raise ValueError(f"{directory} holds another dataset (its {META} is not a "
                         f"decoded-image cache's, a Biased MNIST's perhaps): give the "
                         f"decoded images a directory of their own")
    theirs = tuple(f"_{field}.npy" for field in ARRAY_FIELDS if field != "images")
    found = sorted(name for name in os.listdir(directory) if name.endswith(theirs))
    if found:
        raise ValueError(f"{directory} holds a Biased MNIST's arrays ({first_few(found)}): give "
                         f"the decoded images a directory of their own")


def _write_meta(directory: str, meta: Dict) -> None:
    with atomic_path(os.path.join(directory, META)) as tmp, open(tmp, "w") as handle:
        json.dump(meta, handle, indent=1)


def cache_problem(directory: str, split: str, expected: str) -> Optional[str]:
    """None when the split's array in `directory` is the one `expected` (a fingerprint) and
    intact, else what is wrong."""
    entry = _read_meta(directory).get("splits", {}).get(split)
    path = os.path.join(directory, f"{split}_images.npy")
    if not isinstance(entry, dict):
        return "not cached"
    if entry.get("fingerprint") != expected:
        return "cached from other images or another size"
    problem = file_problem(path, entry)
    if problem in ("missing", "size"):
        return "its array file is missing or truncated"
    if problem == "checksum":
        return "its array file is corrupt (checksum differs)"
    return None


def decode_rows(split: SplitIndex, rows: Sequence[int], size: int, centre_crop: Optional[int],
                pool: Optional[concurrent.futures.Executor], decoder: str = "pil",
                decode_device="cpu") -> Tuple[torch.Tensor, List[Tuple[str, str]]]:
    """(uint8 (len(rows), 3, size, size), problems) by the decoder asked for; on
    `decode_device` with torchvision, on the CPU with Pillow."""
    if uses_torchvision(split, decoder):
        paths = [split.images.paths[r] for r in rows]
        images, failed = decode_jpeg_rows(paths, size, centre_crop, decode_device)
        # What torchvision refuses (a PNG named .jpg, a JPEG nvJPEG does not take) Pillow may
        # read: only what neither reads is a problem, so the decoders accept the same files.
        # Filled by row: a file listed twice fails, and is filled, in both of its rows.
        problems = []
        for row, why in failed:
            try:
                image = torch.from_numpy(prepare(read_rgb(paths[row]), size, centre_crop))
                images[row] = image.to(images.device)
            except ValueError:
                problems.append((paths[row], why))
        return images, problems
    images, failed = decode_positions(split.images, rows, size, centre_crop, pool)
    problems = [(split.images.names[rows[i]], why) for i, why in failed]
    return torch.from_numpy(images), problems


def _decode_split(split_name: str, split: SplitIndex, path: str, size: int,
                  centre_crop: Optional[int], workers: int, progress: bool,
                  decoder: str, decode_device) -> None:
    """Decode every image of the split into the .npy at `path` (written to a temporary file
    and renamed when whole)."""
    bar = progress_bar(len(split), f"decoding {split_name}", progress, unit="img")
    problems = []
    with atomic_path(path) as tmp, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                          shape=(len(split), 3, size, size))
        for start in range(0, len(split), DECODE_CHUNK):
            rows = range(start, min(start + DECODE_CHUNK, len(split)))
            images, found = decode_rows(split, rows, size, centre_crop, pool, decoder,
                                        decode_device)
            array[start:rows.stop] = images.cpu().numpy()
            problems += found
            if bar is not None:
                bar.update(len(rows))
        array.flush()
        del array
        split.images.close()
        if problems:
            raise DecodeErrors(split_name, problems)
    close(bar)


def load_cached(index: DatasetIndex, splits: Sequence[str], directory: str, size: int,
                centre_crop: Optional[int], workers: int = 4, progress: bool = False,
                decoder: str = "pil", decode_device="cpu") -> Dict[str, torch.Tensor]:
    """Each split's uint8 (N, 3, size, size) images, memory-mapped copy-on-write from the
    cache in `directory`; splits missing there (or stale, or damaged) are decoded first."""
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    _refuse_other_contents(directory)
    images = {}
    for name in splits:
        split = index.split(name)
        expected = fingerprint(split, size, centre_crop, decoder)
        path = os.path.join(directory, f"{name}_images.npy")
        if cache_problem(directory, name, expected) is not None:
            _decode_split(name, split, path, size, centre_crop, workers, progress, decoder,
                          decode_device)
            meta = _read_meta(directory) or {"format": CACHE_FORMAT, "splits": {}}
            meta.update(dataset=index.name, root=os.path.abspath(index.root), size=size,
                        centre_crop=centre_crop)
            meta["splits"][name] = {"fingerprint": expected, "count": len(split),
                                    **file_record(path)}
            _write_meta(directory, meta)
        images[name] = torch.from_numpy(np.load(path, mmap_mode="c"))
    return images


class StreamingSplit(LabelledItems):
    """A split too large to cache: the images of each batch are decoded when asked for, by a
    pool of threads; labels and attributes live on the device."""

    def __init__(self, name: str, index: DatasetIndex, size: int,
                 centre_crop: Optional[int], device="cpu", workers: int = 4,
                 decoder: str = "pil"):
        split = index.split(name)
        labels, attributes, aligned = split.tensors()
        super().__init__(labels, attributes, index.attribute_names, device, aligned,
                         index.class_names, index.split_rule, index.attribute_values)
        self.name, self.split, self.size, self.centre_crop = name, split, size, centre_crop
        self.decoder = decoder
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        # The next batch, decoded in the background while the current one trains.
        self.loader = concurrent.futures.ThreadPoolExecutor(1)
        self.pending: Optional[Tuple[List[int], concurrent.futures.Future]] = None

    def _decode(self, rows: List[int]) -> torch.Tensor:
        images, problems = decode_rows(self.split, rows, self.size, self.centre_crop,
                                       self.pool, self.decoder, self.device)
        if problems:
            raise DecodeErrors(self.name, problems)
        return images.to(self.device, non_blocking=True)

    def prefetch(self, rows: torch.Tensor) -> None:
        listed = rows.tolist()
        self.pending = (listed, self.loader.submit(self._decode, listed))

    def uint8(self, rows: torch.Tensor) -> torch.Tensor:
        """Decoded by torchvision on the split's device (nvJPEG on a GPU), or Pillow; by the
        background decode when `prefetch` announced these rows."""
        listed = rows.tolist()
        if self.pending is not None and self.pending[0] == listed:
            pending, self.pending = self.pending, None
            return pending[1].result()
        return self._decode(listed)   # another batch: the announced one stays pending
