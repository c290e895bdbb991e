"""BAR, the Biased Action Recognition dataset (Nam et al., NeurIPS 2020; alinlab/BAR): six
actions whose training images show their typical place (climbing on rock walls, diving under
water, ...) while the test images show them elsewhere. The OccamNets paper's third dataset.

On disk (as alinlab/BAR ships it and the official loader reads it): `train/` and `test/`,
flat folders of `<class>_<n>.jpg`; the class is the file name up to the first underscore
(`pole vaulting_12.jpg` is pole vaulting). BAR has no bias labels: no attribute, so the
groups are the classes and the worst-group accuracy is the worst class's. There is no
validation split (the official loader has none); the test split is reported.
"""
import os

import numpy as np

from .index import DatasetIndex, DatasetLayoutError, SplitIndex, file_source, require_files

NAME = "BAR"
CLASSES = ("climbing", "diving", "fishing", "pole vaulting", "racing", "throwing")
SPLITS = ("train", "test")
SUFFIXES = (".jpg", ".jpeg", ".png")
GET_IT = "get it from https://github.com/alinlab/BAR (train/ and test/ folders of JPEGs)"


def _read_split(folder: str) -> SplitIndex:
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(SUFFIXES))
    if not names:
        raise DatasetLayoutError(f"{folder} holds no images ({GET_IT})")
    unknown = sorted({name.split("_")[0] for name in names} - set(CLASSES))
    if unknown:
        raise DatasetLayoutError(f"{folder} has files of unknown classes "
                                 f"{', '.join(map(repr, unknown))}; BAR's files are named "
                                 f"<class>_<n>.jpg with the class one of {', '.join(CLASSES)}")
    labels = np.array([CLASSES.index(name.split("_")[0]) for name in names], dtype=np.int64)
    return SplitIndex(file_source([os.path.join(folder, n) for n in names]), labels,
                      np.zeros((len(names), 0), dtype=np.int64))


def index(root: str) -> DatasetIndex:
    folders = require_files(root, list(SPLITS), NAME, GET_IT)
    return DatasetIndex("bar", root, CLASSES, (),
                        {split: _read_split(folder) for split, folder in zip(SPLITS, folders)})
