"""A split held whole on the device, and its batches as normalised float images.

Python data loading (a worker per batch decoding and collating) would bound training speed on
a GPU; Biased MNIST at 160 px is 3.8 GB of uint8 for 50,000 images, which fits on the GPU, so
batches are gathered and converted to float there.
"""
import functools
import os
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..text import first_few
from .groups import BiasGroups, bias_groups


def normalise(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> the float input the models were trained on: [0, 1], as
    the official code feeds Biased MNIST (ToTensor and no normalisation)."""
    x = images.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def unpack_masks(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Bit-packed masks (..., ceil(width / 8)) uint8, as np.packbits packs rows (first pixel in
    the high bit), -> bool (..., width); on the tensor's device."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed[..., None] >> shifts) & 1
    return bits.flatten(-2)[..., :width].bool()


def cell_fraction(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W) float masks -> (B, height, width): the share of each cell's pixels they cover
    (area pooling)."""
    return F.adaptive_avg_pool2d(masks[:, None], (height, width))[:, 0]


class LabelledItems:
    """What every split holds on its device: labels (N,), bias attributes `factors` (N, F)
    named `factor_names`, `aligned` (N, F) bool where an attribute takes the value tied to the
    label (None when the attributes are not tied to classes), the bias groups (label x the
    attributes' values, each item's group index) and, when known, the classes' names, the
    rule that assigned the dataset's splits (DatasetIndex.split_rule) and the names of the
    attributes' values (DatasetIndex.attribute_values)."""

    masks: Optional[torch.Tensor] = None

    def __init__(self, labels: torch.Tensor, factors: torch.Tensor,
                 factor_names: Sequence[str], device="cpu",
                 aligned: Optional[torch.Tensor] = None,
                 class_names: Optional[Sequence[str]] = None,
                 split_rule: Optional[str] = None,
                 factor_values: Optional[Sequence[Sequence[str]]] = None):
        if labels.shape[0] != factors.shape[0] or factors.dim() != 2:
            raise ValueError(f"labels (N,) and factors (N, F) must have one length, got "
                             f"{tuple(labels.shape)} and {tuple(factors.shape)}")
        if aligned is not None and aligned.shape != factors.shape:
            raise ValueError(f"aligned must have the factors' shape {tuple(factors.shape)}, "
                             f"got {tuple(aligned.shape)}")
        self.labels = labels.long().to(device)
        self.factors = factors.long().to(device)
        self.factor_names = list(factor_names)
        self.aligned = None if aligned is None else aligned.bool().to(device)
        self.class_names = None if class_names is None else tuple(class_names)
        self.split_rule = split_rule
        self.factor_values = factor_values

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @functools.cached_property
    def groups(self) -> BiasGroups:
        """The split's bias groups (label x the factors' values), on its device; computed
        when first asked for."""
        return bias_groups(self.labels, self.factors, self.factor_names, self.aligned,
                           self.factor_values)

    def uint8(self, rows: torch.Tensor) -> torch.Tensor:
        """The images of `rows` as uint8 (B, 3, H, W) on the device."""
        raise NotImplementedError

    def prefetch(self, rows: torch.Tensor) -> None:
        """`rows` will be asked for next: a split that decodes may start now."""

    def batch(self, rows: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        return normalise(self.uint8(rows), channels_last)


class DeviceSplit(LabelledItems):
    """A split held as tensors on one device; `batch(rows)` converts uint8 images there.

    masks, optional: the object's pixels per image, bit-packed (N, H, ceil(W/8)) uint8;
    `object_masks(rows)` unpacks them; `object_fraction(rows, h, w)` gives the share of each
    cell of an h x w grid they cover.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, factors: torch.Tensor,
                 factor_names: Sequence[str], device="cpu",
                 masks: Optional[torch.Tensor] = None, aligned: Optional[torch.Tensor] = None,
                 class_names: Optional[Sequence[str]] = None, split_rule: Optional[str] = None,
                 factor_values: Optional[Sequence[Sequence[str]]] = None):
        if not images.shape[0] == labels.shape[0] == factors.shape[0]:
            raise ValueError(f"images, labels and factors must have one length, got "
                             f"{images.shape[0]}, {labels.shape[0]} and {factors.shape[0]}")
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if masks is not None and (masks.dtype != torch.uint8 or masks.shape[:2] != (
                images.shape[0], images.shape[2]) or masks.shape[2] != -(-images.shape[3] // 8)):
            raise ValueError(f"masks must be bit-packed uint8 (N, H, ceil(W/8)) for images "
                             f"{tuple(images.shape)}, got {masks.dtype} {tuple(masks.shape)}")
        super().__init__(labels, factors, factor_names, device, aligned, class_names,
                         split_rule, factor_values)
        self.images = images.to(device)
        self.masks = None if masks is None else masks.to(device)

    def uint8(self, rows: torch.Tensor) -> torch.Tensor:
        return self.images[rows]

    def object_masks(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, H, W) float: 1 on the object's pixels."""
        if self.masks is None:
            raise ValueError("this split has no object masks")
        return unpack_masks(self.masks[rows], self.images.shape[3]).float()

    def object_fraction(self, rows: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, height, width) float: the share of each cell's pixels inside the object mask
        (area pooling of the full-resolution mask)."""
        return cell_fraction(self.object_masks(rows), height, width)


# Pillow modes whose values convert("RGB") would clip rather than scale (16-bit, 32-bit,
# float): read as they are, they would be classified as white or black images.
WIDE_MODES = {"I": "32-bit integer", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit",
              "I;16N": "16-bit", "F": "floating-point"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(paths: Sequence[str]) -> List[str]:
    """Files as given, and the image files (by suffix, sorted) of any directory given (not of
    its subfolders); a FileNotFoundError names a path that does not exist or a directory
    without images (and its subfolders, where the images may be: one per class, say)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            inside = _images_in(path)
            if not inside:
                folders = sorted(name for name in os.listdir(path)
                                 if os.path.isdir(os.path.join(path, name)))
                raise FileNotFoundError(
                    f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})" +
                    (f"; its subfolders are not searched: give them "
                     f"({first_few([os.path.join(path, f) for f in folders])})"
                     if folders else ""))
            found.extend(inside)
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"no such image file or directory: {path}")
    return found


def _images_in(directory: str) -> List[str]:
    """The image files (by suffix) directly in `directory`, sorted."""
    return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                  if name.lower().endswith(IMAGE_SUFFIXES)
                  and os.path.isfile(os.path.join(directory, name)))


def _holds_images(directory: str) -> bool:
    """Whether an image file lies directly in `directory` (the listing stops at the first)."""
    with os.scandir(directory) as entries:
        return any(entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file()
                   for entry in entries)


def unsearched_image_folders(paths: Sequence[str]) -> List[str]:
    """The subfolders holding image files of the directories among `paths` that image_paths
    took images from: their images are not read (one folder per class, say), which the user
    should be told."""
    folders = []
    for path in paths:
        if os.path.isdir(path) and _holds_images(path):
            folders += [os.path.join(path, name) for name in sorted(os.listdir(path))
                        if os.path.isdir(os.path.join(path, name))
                        and _holds_images(os.path.join(path, name))]
    return folders


class UnreadableImage(ValueError):
    """An image file the model cannot read; `reason` says why without naming the file (a
    per-file line names it already)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def read_rgb(path: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB; an UnreadableImage naming the file if it cannot
    be read (truncated, not an image, 16-bit or float pixels)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            if image.mode in WIDE_MODES:
                reason = (f"has {WIDE_MODES[image.mode]} pixels; the model reads 8-bit "
                          f"images: convert it to 8 bits per channel")
                raise UnreadableImage(f"{path} {reason}", reason)
            return np.asarray(image.convert("RGB")).copy()
    except (OSError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"cannot read {path} as an image: {error}",
                              f"not readable as an image: {error}") from error


def centre_box(height: int, width: int, crop: int) -> Tuple[int, int, int]:
    """(top, left, side) of the centred square of side `crop` (at most the shorter side): the
    one crop every decoder takes, so their images agree."""
    side = min(crop, height, width)
    return (height - side) // 2, (width - side) // 2, side


def prepare(image: np.ndarray, size: int, centre_crop: Optional[int] = None) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (3, size, size): the centred square of side centre_crop
    (at most the shorter side) cut out when given, then resized (Pillow's bilinear, which
    filters when shrinking). How every real dataset's images, and predict's, are prepared."""
    from PIL import Image
    height, width = image.shape[:2]
    if centre_crop is not None:
        top, left, side = centre_box(height, width, centre_crop)
        image = image[top:top + side, left:left + side]
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return np.ascontiguousarray(image.transpose(2, 0, 1))


class ImageFile(NamedTuple):
    """One image file as predict and viz read it."""
    path: str
    image: Optional[torch.Tensor]          # uint8 (3, size, size); None: unreadable
    size: Optional[Tuple[int, int]]        # the file's own (width, height)
    problem: Optional[UnreadableImage]     # why it could not be read


def read_image_file(path: str, size: int, centre_crop: Optional[int] = None) -> ImageFile:
    """An image file (anything Pillow reads) as uint8 RGB (3, size, size), prepared as the
    model's training images were (`prepare`), with its own size (to tell the user it was
    resized); an unreadable file is returned with its problem, not raised."""
    try:
        rgb = read_rgb(path)
    except UnreadableImage as problem:
        return ImageFile(path, None, None, problem)
    return ImageFile(path, torch.from_numpy(prepare(rgb, size, centre_crop)),
                     (rgb.shape[1], rgb.shape[0]), None)


# Decoding threads: Pillow releases the GIL while it decodes and resizes, so they run in
# parallel; at most 8, to leave cores for the model on a CPU.
READ_THREADS = min(8, os.cpu_count() or 1)


def read_image_batches(paths: Sequence[str], batch_size: int, size: int,
                       centre_crop: Optional[int] = None,
                       threads: int = READ_THREADS) -> Iterator[List[ImageFile]]:
    """The files in batches of `batch_size`, in order, read by `threads` threads one batch
    ahead of the caller, so decoding overlaps the model's work on the batch before and at
    most two batches are held (a folder of photos need not fit in memory)."""
    import concurrent.futures
    read = functools.partial(read_image_file, size=size, centre_crop=centre_crop)
    starts = range(0, len(paths), batch_size)
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    try:
        ahead = pool.map(read, paths[:batch_size])
        for start in starts:
            batch = list(ahead)
            ahead = pool.map(read, paths[start + batch_size:start + 2 * batch_size])
            yield batch
    finally:   # Ctrl-C or an error: files not started yet are not read
        pool.shutdown(wait=True, cancel_futures=True)
