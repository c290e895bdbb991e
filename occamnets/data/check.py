"""`occamnets data check`: is a dataset directory complete and readable? Per split its
images, classes and bias groups counted, files missing and images that cannot be decoded
listed."""
import concurrent.futures
import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..progress import close, progress_bar
from .groups import bias_groups
from .index import DatasetIndex, SplitIndex

LISTED = 10   # problems listed per split in the Markdown (all are in the result)


@dataclasses.dataclass
class SplitCheck:
    name: str
    images: int
    per_class: List[int]                   # images per class, in class order
    groups: List[Tuple[str, int]]          # (bias group, images), in group order
    missing: List[str]                     # files that do not exist
    unreadable: List[Tuple[str, str]]      # (image, why) that cannot be decoded

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unreadable


@dataclasses.dataclass
class DatasetCheck:
    dataset: str
    root: str
    class_names: List[str]
    attribute_names: List[str]
    splits: List[SplitCheck]
    skipped_columns: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(split.ok for split in self.splits)

    def to_markdown(self) -> str:
        attributes = ", ".join(self.attribute_names) or "none (groups are the classes)"
        lines = [f"# {self.dataset} in {self.root}", "",
                 f"Classes: {', '.join(self.class_names)}. Bias attributes: {attributes}."
                 + (f" Columns not taken as bias attributes (too many distinct values, or "
                    f"blanks; name them with --bias-columns to use them): "
                    f"{', '.join(self.skipped_columns)}." if self.skipped_columns else ""), "",
                 "| split | images | bias groups | smallest group | missing | unreadable |",
                 "|---|---|---|---|---|---|"]
        for s in self.splits:
            smallest = min(s.groups, key=lambda g: g[1]) if s.groups else ("-", 0)
            lines.append(f"| {s.name} | {s.images} | {len(s.groups)} | {smallest[1]} "
                         f"({smallest[0]}) | {len(s.missing)} | {len(s.unreadable)} |")
        for s in self.splits:
            lines += ["", f"## {s.name}", "",
                      "Per class: " + ", ".join(f"{name} {count}" for name, count in
                                                zip(self.class_names, s.per_class)) + "."]
            if len(s.groups) <= 64:
                lines.append("Per bias group: " + "; ".join(f"{g} {n}" for g, n in s.groups) + ".")
            for path in s.missing[:LISTED]:
                lines.append(f"- missing: {path}")
            for name, why in s.unreadable[:LISTED]:
                lines.append(f"- unreadable: {name} ({why})")
            hidden = len(s.missing) + len(s.unreadable) - min(LISTED, len(s.missing)) - min(
                LISTED, len(s.unreadable))
            if hidden > 0:
                lines.append(f"- ... and {hidden} more (--json lists them all)")
        lines += ["", "All files present and readable." if self.ok else
                  "**Problems found**: fix or remove the files listed before training."]
        return "\n".join(lines)


def _check_split(name: str, split: SplitIndex, index: DatasetIndex, workers: int,
                 bar) -> SplitCheck:
    labels, attributes, aligned = split.tensors()
    groups = bias_groups(labels, attributes, index.attribute_names, aligned,
                         index.attribute_values)
    paths = split.images.paths
    missing = [] if paths is None else [p for p in paths if not os.path.isfile(p)]
    gone = set(missing)

    def readable(row: int) -> Optional[Tuple[str, str]]:
        if paths is not None and paths[row] in gone:
            return None
        try:
            split.images.read(row)
        except (ValueError, OSError, KeyError) as error:
            return split.images.names[row], str(error)
        return None

    unreadable = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for problem in pool.map(readable, range(len(split))):
            if problem is not None:
                unreadable.append(problem)
            if bar is not None:
                bar.update(1)
    split.images.close()
    per_class = np.bincount(split.labels, minlength=len(index.class_names)).tolist()
    return SplitCheck(name, len(split), per_class,
                      list(zip(groups.names(index.class_names), groups.sizes.tolist())), missing,
                      unreadable)


def check_dataset(index: DatasetIndex, splits: Optional[Sequence[str]] = None,
                  workers: int = 4, progress: bool = False) -> DatasetCheck:
    """Count and decode every image of `splits` (None: all) of the dataset."""
    names = list(index.splits) if splits is None else list(splits)
    bar = progress_bar(sum(len(index.split(n)) for n in names), "checking", progress,
                       unit="img")
    try:
        checked = [_check_split(n, index.split(n), index, workers, bar) for n in names]
    finally:
        close(bar)
    return DatasetCheck(index.name, index.root, list(index.class_names),
                        list(index.attribute_names), checked, list(index.skipped_columns))
