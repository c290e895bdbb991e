"""A biased dataset of the user's own: a folder of images and a CSV describing them
(Waterbirds' metadata.csv is one).

ROOT/metadata.csv, with a header row:
  path     the image file, relative to ROOT (also accepted: img_filename, filename, file)
  label    the class: integers 0..K-1, or names (sorted into 0..K-1) (also: y, target);
           integers leaving more than half of 0..K-1 without images are refused (ids)
  split    optional: train, val, test (or Waterbirds' 0, 1, 2), or further names (no '/'
           or '\\', not starting with '.': a split's name names its cache file), each an
           extra evaluation split; without it the images are assigned train/val/test
           80/10/10 in the order of a hash of their paths (SPLIT_RULE), so a path's split
           does not depend on the rows' order, and rows added later move only images near
           the cuts (a test image can become a training image only when the rows added
           number about an eighth of those before, or more)
  ...      bias attributes: those named by bias_columns, else every other named column with
           a value in every row and at most MAX_ATTRIBUTE_VALUES distinct values (an id or
           file-name column would make every image its own group: such columns are listed
           as skipped); integers 0.. as they are, other values (names, negative integers
           such as CelebA's -1/1) sorted into 0..V-1
Groups are label x the attributes' values. An image may be listed twice in one split (it is
then drawn twice as often) or in two evaluation splits, never in train and another split (an
image evaluated on would be trained on) nor with two labels.
"""
import csv
import hashlib
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .index import DatasetIndex, DatasetLayoutError, SplitIndex, file_source, require_files

NAME = "folder dataset"
CSV_NAME = "metadata.csv"
PATH_COLUMNS = ("path", "img_filename", "filename", "file")
LABEL_COLUMNS = ("label", "y", "target")
SPLIT_COLUMN = "split"
NUMBERED_SPLITS = {"0": "train", "1": "val", "2": "test"}   # Waterbirds' convention
REQUIRED_SPLITS = ("train", "val", "test")
UNSPLIT_SHARES = (0.8, 0.1)   # train and val shares when the CSV has no split column
MAX_ATTRIBUTE_VALUES = 32     # more distinct values: not a bias attribute unless named
# A split's name becomes a cache file's name ({split}_images.npy): no path in it.
NOT_A_SPLIT_NAME = re.compile(r"^\.|[/\\\0]")
# How splits are assigned without a split column; a checkpoint keeps it, so a run split by
# another rule (a permutation of the rows' positions, before 2026-11-29) is not evaluated
# on images it trained on.
SPLIT_RULE = "sha256-of-path-rank-80-10-10"
GET_IT = (f"write {CSV_NAME} beside the images: a header with path, label, optional split and "
          f"any bias attribute columns")


def _column(header: Sequence[str], choices: Sequence[str], what: str, path: str) -> str:
    for name in choices:
        if name in header:
            return name
    raise DatasetLayoutError(f"{path} has no {what} column: name one of "
                             f"{', '.join(choices)} (its columns: {', '.join(header)})")


def _codes(values: Sequence[str]) -> Tuple[np.ndarray, Tuple[str, ...]]:
    """Integer codes of a column and the names of the codes: integers 0.. as they are (names
    0..max); other integers (CelebA's -1/1) sorted by value; anything else sorted by name."""
    try:
        numbers = np.array([int(v) for v in values], dtype=np.int64)
    except ValueError:
        names = tuple(sorted(set(values)))
    else:
        if not len(numbers) or numbers.min() >= 0:
            top = int(numbers.max()) + 1 if len(numbers) else 0
            return numbers, tuple(str(n) for n in range(top))
        distinct = np.unique(numbers)
        return np.searchsorted(distinct, numbers), tuple(str(n) for n in distinct.tolist())
    lookup = {name: code for code, name in enumerate(names)}
    return np.array([lookup[v] for v in values], dtype=np.int64), names


def _assign_splits(paths: Sequence[str]) -> List[str]:
    """train/val/test for each row, 80/10/10 of the distinct paths in the order of their
    SHA-256: the same whatever the rows' order; a path listed twice has one split."""
    distinct = sorted(set(paths), key=lambda path: hashlib.sha256(path.encode()).digest())
    train_end = int(round(UNSPLIT_SHARES[0] * len(distinct)))
    val_end = train_end + int(round(UNSPLIT_SHARES[1] * len(distinct)))
    split_of = {path: "train" if rank < train_end else "val" if rank < val_end else "test"
                for rank, path in enumerate(distinct)}
    return [split_of[path] for path in paths]


def _read_csv(path: str) -> Tuple[List[str], List[Dict[str, str]], List[int]]:
    """(header, rows, each row's line number in the file) with names and values stripped; a
    UTF-8 byte-order mark (Excel's) is dropped, and so are columns without a name (a comma
    at the end of every line, as spreadsheets write)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        table, lines = [], []
        try:
            for row in reader:
                if row:   # blank lines skipped; their numbers still count
                    table.append([cell.strip() for cell in row])
                    lines.append(reader.line_num)
        except csv.Error as error:   # a value over the csv module's size limit, a NUL byte
            raise DatasetLayoutError(f"{path} line {reader.line_num} cannot be read as CSV "
                                     f"({error}): {GET_IT}") from error
        except UnicodeDecodeError as error:
            raise DatasetLayoutError(f"{path} is not UTF-8 text ({error}): save it as UTF-8 "
                                     f"CSV") from error
    if not table:
        raise DatasetLayoutError(f"{path} is empty: {GET_IT}")
    header = table[0]
    for number, row in zip(lines[1:], table[1:]):
        if len(row) != len(header):
            raise DatasetLayoutError(f"{path} line {number}: {len(row)} values for "
                                     f"{len(header)} columns")
    named = [i for i, name in enumerate(header) if name]
    return ([header[i] for i in named],
            [{header[i]: row[i] for i in named} for row in table[1:]], lines[1:])


def _check_paths(csv_path: str, keys: Sequence[str], labels: Sequence[str],
                 splits: Sequence[str], lines: Sequence[int]) -> None:
    """A DatasetLayoutError for an image (`keys`: its normalised path) listed in train and
    another split (it would be evaluated on after training on it) or with two labels, naming
    both lines."""
    first: Dict[str, int] = {}                                   # each image's first row,
    trained: Dict[str, int] = {}                                 # first training row,
    evaluated: Dict[str, int] = {}                               # first row elsewhere
    for row, key in enumerate(keys):
        seen = first.setdefault(key, row)
        if labels[seen] != labels[row]:
            raise DatasetLayoutError(f"{csv_path} lists {key} with two labels ({labels[seen]} "
                                     f"on line {lines[seen]}, {labels[row]} on line "
                                     f"{lines[row]}): one image, one label")
        (trained if splits[row] == "train" else evaluated).setdefault(key, row)
    for key, row in evaluated.items():
        if key in trained:
            raise DatasetLayoutError(f"{csv_path} lists {key} in train (line "
                                     f"{lines[trained[key]]}) and in {splits[row]} (line "
                                     f"{lines[row]}): an image evaluated on must not be "
                                     f"trained on")


def index(root: str, bias_columns: Optional[Sequence[str]] = None) -> DatasetIndex:
    (csv_path,) = require_files(root, [CSV_NAME], NAME, GET_IT)
    header, rows, lines = _read_csv(csv_path)
    if not rows:
        raise DatasetLayoutError(f"{csv_path} lists no images")
    path_column = _column(header, PATH_COLUMNS, "image path", csv_path)
    label_column = _column(header, LABEL_COLUMNS, "label", csv_path)
    others = [c for c in header if c not in (path_column, label_column, SPLIT_COLUMN)]
    if bias_columns is None:   # a column with blanks (notes, say) is skipped, not refused
        attributes = [c for c in others if all(row[c] for row in rows)
                      and len({row[c] for row in rows}) <= MAX_ATTRIBUTE_VALUES]
    else:
        attributes = list(bias_columns)
    unknown = [c for c in attributes if c not in others]
    if unknown:
        raise DatasetLayoutError(f"{csv_path} has no bias column {', '.join(unknown)} (its "
                                 f"columns: {', '.join(header)})")
    required = [path_column, label_column] + attributes + (
        [SPLIT_COLUMN] if SPLIT_COLUMN in header else [])
    for number, row in zip(lines, rows):
        empty = [c for c in required if not row[c]]
        if empty:
            raise DatasetLayoutError(f"{csv_path} line {number}: no value for {', '.join(empty)}")
    labels, class_names = _codes([row[label_column] for row in rows])
    coded = [_codes([row[c] for row in rows]) for c in attributes]
    values = [codes for codes, _ in coded]
    present = len(np.unique(labels))
    if present * 2 < len(class_names):   # only integer labels can leave classes without images
        raise DatasetLayoutError(
            f"{csv_path}: the labels are integers up to {len(class_names) - 1}, and only "
            f"{present} of those {len(class_names)} classes have images (the model would "
            f"predict them all): they look like ids, not 0..K-1; number the classes 0..K-1, "
            f"or write them as names (a letter in front)")
    attribute_array = (np.stack(values, 1) if values
                       else np.zeros((len(rows), 0), dtype=np.int64))
    keys = [os.path.normpath(row[path_column]) for row in rows]   # a.png and ./a.png: one image
    if SPLIT_COLUMN in header:
        split_names = [NUMBERED_SPLITS.get(row[SPLIT_COLUMN], row[SPLIT_COLUMN]) for row in rows]
        for name in set(split_names):   # each name once, its first line named
            if NOT_A_SPLIT_NAME.search(name):
                number = lines[split_names.index(name)]
                raise DatasetLayoutError(f"{csv_path} line {number}: split {name!r} is not a "
                                         f"name (it names a file: no '/' or '\\', no leading "
                                         f"'.')")
        rule = None
    else:
        split_names, rule = _assign_splits(keys), SPLIT_RULE
    _check_paths(csv_path, keys, [row[label_column] for row in rows], split_names, lines)
    missing = [s for s in REQUIRED_SPLITS if s not in split_names]
    if missing:
        raise DatasetLayoutError(f"{csv_path} puts no image in the {', '.join(missing)} "
                                 f"split(s): training needs train, val and test")
    paths = np.array([os.path.join(root, row[path_column]) for row in rows], dtype=object)
    chosen = np.array(split_names, dtype=object)
    splits: Dict[str, SplitIndex] = {}
    for split in list(REQUIRED_SPLITS) + sorted(set(split_names) - set(REQUIRED_SPLITS)):
        rows_of = np.flatnonzero(chosen == split)
        splits[split] = SplitIndex(file_source(list(paths[rows_of])), labels[rows_of],
                                   attribute_array[rows_of])
    skipped = tuple(c for c in others if c not in attributes) if bias_columns is None else ()
    return DatasetIndex("folder", root, class_names, tuple(attributes), splits, skipped, rule,
                        tuple(names for _, names in coded))
