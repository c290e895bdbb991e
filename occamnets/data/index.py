"""What a real dataset is on disk, as the loaders find it: per split the images (files, or rows
of an array file), labels and bias attributes, before anything is decoded.

Every loader (coco_on_places, bar, celeba, folder) returns a `DatasetIndex`; the cache
(image_cache.py) decodes it, `occamnets data check` verifies it. A directory that does not hold
the dataset raises `DatasetLayoutError`, naming what is missing and where to get it.
"""
import dataclasses
import functools
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .jpeg_decode import all_jpeg
from .loaders import read_rgb


class DatasetLayoutError(FileNotFoundError):
    """The dataset directory is missing files or has them in another layout."""


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """N images of one split: `read(i)` gives image i as uint8 (H, W, 3). `names[i]` says
    where it comes from (a path, or file:row) for messages; `paths` are the image files, one
    per image (None: the images are rows of `array_file`)."""
    names: Sequence[str]
    read: Callable[[int], np.ndarray]
    paths: Optional[Sequence[str]] = None
    array_file: Optional[str] = None
    # Releases what reading opened (the array file); a later read opens it again.
    release: Optional[Callable[[], None]] = None

    def __len__(self) -> int:
        return len(self.names)

    def close(self) -> None:
        if self.release is not None:
            self.release()

    @functools.cached_property
    def all_jpeg(self) -> bool:
        """Whether every image is a JPEG file (torchvision can decode them in batches);
        computed once: a split may have 200,000 paths and is asked per batch."""
        return all_jpeg(self.paths)

    @property
    def files(self) -> Sequence[str]:
        """Every file the images are read from."""
        return self.paths if self.paths is not None else [self.array_file] if self.array_file else []


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    """One split: images, labels (N,) int64 in [0, classes), attributes (N, F) int64 (the
    bias attributes' values, F may be 0), and `aligned` (N, F) bool where an attribute value is
    the one tied to the label (bias-aligned), None when the attributes are not tied to
    classes (CelebA's gender, a user's CSV)."""
    images: ImageSource
    labels: np.ndarray
    attributes: np.ndarray
    aligned: Optional[np.ndarray] = None

    def __post_init__(self):
        count = len(self.images)
        if self.labels.shape != (count,) or self.attributes.ndim != 2 \
                or self.attributes.shape[0] != count:
            raise ValueError(f"a split of {count} images needs labels ({count},) and "
                             f"attributes ({count}, F), got {self.labels.shape} and "
                             f"{self.attributes.shape}")
        if self.aligned is not None and self.aligned.shape != self.attributes.shape:
            raise ValueError(f"aligned must have the attributes' shape {self.attributes.shape}, "
                             f"got {self.aligned.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def tensors(self, rows=slice(None)) -> Tuple[torch.Tensor, torch.Tensor,
                                                  Optional[torch.Tensor]]:
        """(labels, attributes, aligned or None) of `rows` (default: all) as tensors."""
        aligned = None if self.aligned is None else torch.from_numpy(self.aligned[rows])
        return torch.from_numpy(self.labels[rows]), torch.from_numpy(self.attributes[rows]), aligned


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
    """A dataset found in `root`: its classes, bias attribute names and splits;
    `skipped_columns`: a CSV's columns not taken as bias attributes (too many values, or
    blanks); `split_rule`: how the splits were assigned when the dataset does not say (None:
    it says); `attribute_values`: per attribute, the names of its integer values where the
    dataset names them (a CSV's 'land', 'water'; None: the numbers are the names)."""
    name: str
    root: str
    class_names: Tuple[str, ...]
    attribute_names: Tuple[str, ...]
    splits: Dict[str, SplitIndex]
    skipped_columns: Tuple[str, ...] = ()
    split_rule: Optional[str] = None
    attribute_values: Optional[Tuple[Tuple[str, ...], ...]] = None

    def __post_init__(self):
        for split, index in self.splits.items():
            if index.attributes.shape[1] != len(self.attribute_names):
                raise ValueError(f"{split}: {index.attributes.shape[1]} attribute columns for "
                                 f"{len(self.attribute_names)} names")
            if len(index) and (index.labels.min() < 0
                               or index.labels.max() >= len(self.class_names)):
                raise ValueError(f"{split}: labels outside 0..{len(self.class_names) - 1}")

    def split(self, name: str) -> SplitIndex:
        if name not in self.splits:
            raise ValueError(f"{self.name} has no split {name!r}; its splits are "
                             f"{', '.join(self.splits)}")
        return self.splits[name]


def require_files(root: str, relative: Sequence[str], dataset: str, get_it: str) -> List[str]:
    """The absolute paths of `relative` under `root`, or a DatasetLayoutError listing every
    one that is missing, with where to get the dataset."""
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"{root} is not a directory: give the {dataset} directory "
                                 f"with --root ({get_it})")
    paths = [os.path.join(root, name) for name in relative]
    missing = [name for name, path in zip(relative, paths) if not os.path.exists(path)]
    if missing:
        raise DatasetLayoutError(f"{root} is not a complete {dataset} directory: missing "
                                 f"{', '.join(missing)} ({get_it})")
    return paths


def file_source(paths: Sequence[str]) -> ImageSource:
    paths = list(paths)
    return ImageSource(paths, lambda i: read_rgb(paths[i]), paths)
