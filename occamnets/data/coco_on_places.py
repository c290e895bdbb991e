"""COCO-on-Places (Ahmed et al., ICLR 2021; the OccamNets paper's second dataset): COCO objects
of 9 classes pasted on Places backgrounds, 64x64. In training 80% of a class's objects sit on
that class's own background; the test splits move them elsewhere.

On disk, as the official loader reads it: one HDF5 file per split, `<split>.h5py`, holding
`images` float32 (N, 3, 64, 64) in [0, 1], `y` int (N,) and, in some splits, `g` int (N,).
Pixels become uint8 as the official loader makes them, by truncation: (x * 255).astype(uint8).

The bias attribute, `background`: 0 where the object sits on its class's own training
background (bias-aligned), 1 elsewhere. Train, idtest and validtest carry it as `g`; the
other splits place every object elsewhere by construction (sgtest/valsgtest: another class's
background; oodtest/valoodtest: backgrounds never seen in training), so it is 1 there. (The
official loader reads a missing `g` as 0; it never uses it for those splits.) Groups are class
x background: 18, the official `2 * y + g`.
"""
import os
import threading
from typing import Dict

import numpy as np

from .index import DatasetIndex, DatasetLayoutError, ImageSource, SplitIndex, require_files

NAME = "COCO-on-Places"
CLASSES = ("boat", "airplane", "truck", "dog", "zebra", "horse", "bird", "train", "bus")
# Every labelled split of the official loader (anotest, motorcycles without labels for anomaly
# detection, is not a classification split and is not read).
SPLITS = ("train", "validtest", "valsgtest", "valoodtest", "idtest", "sgtest", "oodtest")
# Splits whose every object sits off its class's background (no `g` needed).
ELSEWHERE = {"sgtest", "valsgtest", "oodtest", "valoodtest"}
GET_IT = ("COCO-on-Places is made by the data maker of Faruk-Ahmed/predictive_group_invariance "
          "(coco/data/data_makers/coco_places.py), which writes the .h5py files; the official "
          "OccamNets code expects them in datasets/coco_on_places/")


def _h5py():
    try:
        import h5py
    except ImportError as error:
        raise ValueError(f"reading COCO-on-Places needs h5py ({error}): pip install h5py") \
            from error
    return h5py


def _array_source(path: str, count: int) -> ImageSource:
    """Row i of the file's `images`, as the official loader converts it. The file is opened
    on the first read, once (decoding threads share it: h5py serialises its calls anyway),
    and closed by the source's close()."""
    h5py = _h5py()
    handle, lock = {}, threading.Lock()

    def read(i: int) -> np.ndarray:
        with lock:
            if "file" not in handle:
                handle["file"] = h5py.File(path, "r")
            image = np.asarray(handle["file"]["images"][i], dtype=np.float32)
        return (np.transpose(image, (1, 2, 0)) * 255).astype(np.uint8)

    def release() -> None:
        with lock:
            if "file" in handle:
                handle.pop("file").close()

    name = os.path.basename(path)
    return ImageSource([f"{name}:{i}" for i in range(count)], read, array_file=path,
                       release=release)


def _read_split(path: str, split: str) -> SplitIndex:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as h5:
            missing = [key for key in ("images", "y") if key not in h5]
            if missing:
                raise DatasetLayoutError(f"{path} has no {' or '.join(missing)} dataset "
                                         f"(it holds {', '.join(h5.keys()) or 'nothing'})")
            for key in ("images", "y", "g"):   # a group has no shape and no rows to read
                if key in h5 and not isinstance(h5[key], h5py.Dataset):
                    raise DatasetLayoutError(f"{path}: {key} is an HDF5 "
                                             f"{type(h5[key]).__name__.lower()}, not a "
                                             f"dataset (an array); remake the file with "
                                             f"COCO-on-Places' data maker")
            shape = h5["images"].shape
            labels = np.asarray(h5["y"][:], dtype=np.int64)
            g = np.asarray(h5["g"][:], dtype=np.int64) if "g" in h5 else None
    except DatasetLayoutError:
        raise   # already says what is wrong (it is an OSError too: not to be wrapped below)
    except OSError as error:
        raise DatasetLayoutError(f"{path} cannot be read as HDF5 ({error})") from error
    if len(shape) != 4 or shape[1] != 3:
        raise DatasetLayoutError(f"{path}: images must be (N, 3, H, W), got {shape}")
    if labels.shape != (shape[0],):
        raise DatasetLayoutError(f"{path}: {shape[0]} images but y has shape {labels.shape}")
    if split in ELSEWHERE:
        background = np.ones_like(labels)
    elif g is None or g.shape != labels.shape:
        raise DatasetLayoutError(f"{path}: the {split} split needs g (N,) saying which "
                                 f"objects sit on their class's background")
    else:
        background = (g != 0).astype(np.int64)
    if len(labels) and not (0 <= labels.min() and labels.max() < len(CLASSES)):
        raise DatasetLayoutError(f"{path}: labels {labels.min()}..{labels.max()} outside "
                                 f"0..{len(CLASSES) - 1}")
    return SplitIndex(_array_source(path, shape[0]), labels, background[:, None],
                      aligned=(background == 0)[:, None])


def index(root: str) -> DatasetIndex:
    paths = require_files(root, [f"{split}.h5py" for split in SPLITS], NAME, GET_IT)
    splits: Dict[str, SplitIndex] = {split: _read_split(path, split)
                                     for split, path in zip(SPLITS, paths)}
    return DatasetIndex("coco-on-places", root, CLASSES, ("background",), splits)
