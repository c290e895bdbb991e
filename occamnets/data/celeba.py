"""CelebA as the debiasing literature uses it (Sagawa et al.'s GroupDRO, and the official
OccamNets loader adapted from it): the target is Blond_Hair, the bias attribute Male (few
blond men in training). Groups: 2 * blond + male, 4 of them.

On disk, the dataset's own layout as the official loader reads it:
  Anno/list_attr_celeba.txt      line 1 the count, line 2 the 40 attribute names, then
                                 `<image_id> <40 values of -1 or 1>`
  Eval/list_eval_partition.txt   `<image_id> <0 train | 1 val | 2 test>`
  Img/img_align_celeba/<image_id>   the aligned 178x218 JPEGs
"""
import os
from typing import Dict, List

import numpy as np

from .index import DatasetIndex, DatasetLayoutError, SplitIndex, file_source, require_files

NAME = "CelebA"
TARGET, BIAS = "Blond_Hair", "Male"
CLASSES = ("not blond", "blond")
PARTITIONS = {0: "train", 1: "val", 2: "test"}
ATTRIBUTES_FILE = os.path.join("Anno", "list_attr_celeba.txt")
PARTITION_FILE = os.path.join("Eval", "list_eval_partition.txt")
IMAGE_DIR = os.path.join("Img", "img_align_celeba")
GET_IT = ("get it from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Anno/, Eval/ and "
          "Img/img_align_celeba/)")
# CelebA's aligned images are 178x218: the centre 178x178 square is what the models see.
CROP = 178


def _read_attributes(path: str) -> Dict[str, List[int]]:
    """image_id -> [Blond_Hair, Male] in {0, 1}."""
    with open(path) as handle:
        lines = handle.read().splitlines()
    if len(lines) < 2:
        raise DatasetLayoutError(f"{path} is too short to be CelebA's attribute list")
    names = lines[1].split()
    missing = [n for n in (TARGET, BIAS) if n not in names]
    if missing:
        raise DatasetLayoutError(f"{path}: line 2 names no {', '.join(missing)} attribute")
    columns = [names.index(TARGET), names.index(BIAS)]
    values = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1 or any(v not in ("-1", "1") for v in fields[1:]):
            raise DatasetLayoutError(f"{path} line {number}: expected an image id and "
                                     f"{len(names)} values of -1 or 1")
        values[fields[0]] = [int(fields[1 + c] == "1") for c in columns]
    return values


def _read_partition(path: str) -> Dict[str, int]:
    partition = {}
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DatasetLayoutError(f"{path} line {number}: expected `<image id> 0|1|2`")
            partition[fields[0]] = int(fields[1])
    return partition


def index(root: str) -> DatasetIndex:
    attributes_path, partition_path, image_dir = require_files(
        root, [ATTRIBUTES_FILE, PARTITION_FILE, IMAGE_DIR], NAME, GET_IT)
    attributes, partition = _read_attributes(attributes_path), _read_partition(partition_path)
    unlabelled = sorted(set(partition) - set(attributes))
    if unlabelled:
        raise DatasetLayoutError(f"{len(unlabelled)} images of {partition_path} have no "
                                 f"attributes in {attributes_path} (first: {unlabelled[0]})")
    splits = {}
    for number, split in PARTITIONS.items():
        ids = sorted(i for i, p in partition.items() if p == number)
        if not ids:
            raise DatasetLayoutError(f"{partition_path} puts no image in the {split} split")
        values = np.array([attributes[i] for i in ids], dtype=np.int64).reshape(-1, 2)
        splits[split] = SplitIndex(file_source([os.path.join(image_dir, i) for i in ids]),
                                   values[:, 0].copy(), values[:, 1:].copy())
    return DatasetIndex("celeba", root, CLASSES, ("male",), splits)
