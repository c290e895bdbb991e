"""Decoding JPEG files in batches with torchvision: on a CUDA device with nvJPEG (the GPU
decodes and resizes; the host only reads the files), on the CPU with libjpeg-turbo.

The pixels differ slightly from Pillow's (another decoder, torch's antialiased bilinear
resize), so the cache records which decoder made an array (image_cache.fingerprint)."""
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .loaders import centre_box

JPEG_SUFFIXES = (".jpg", ".jpeg")
DECODERS = ("pil", "torchvision")   # the image decoders a run may choose (or auto)


def all_jpeg(paths: Optional[Sequence[str]]) -> bool:
    return bool(paths) and all(p.lower().endswith(JPEG_SUFFIXES) for p in paths)


def _crop(image: torch.Tensor, centre_crop: Optional[int]) -> torch.Tensor:
    """uint8 (3, H, W): the centre crop (as loaders.prepare), a view."""
    if centre_crop is None:
        return image
    top, left, side = centre_box(*image.shape[1:], centre_crop)
    return image[:, top:top + side, left:left + side]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> uint8 (N, 3, size, size): antialiased bilinear, rounded."""
    if images.shape[2:] == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def _place_squares(out: torch.Tensor, pairs: List[Tuple[int, torch.Tensor]],
                   centre_crop: Optional[int]) -> None:
    """Each (row, decoded image) cropped and resized into out[row]. Crops of one shape are
    resized as one batch (a dataset of one image size, CelebA's 178 x 178 say, is one call
    per batch, not one per image); each image's pixels are the same either way."""
    size, by_shape = out.shape[-1], {}
    for row, image in pairs:
        crop = _crop(image, centre_crop)
        if crop.shape[1:] == (size, size):
            out[row] = crop  # already the output size: one copy, no batch to stack
        else:
            by_shape.setdefault(tuple(crop.shape), []).append((row, crop))
    for members in by_shape.values():
        rows = torch.tensor([row for row, _ in members], device=out.device)
        out[rows] = _resize(torch.stack([crop for _, crop in members]), size)


def decode_jpeg_rows(paths: Sequence[str], size: int, centre_crop: Optional[int],
                     device) -> Tuple[torch.Tensor, List[Tuple[int, str]]]:
    """(uint8 (N, 3, size, size) on `device`, [(row, why) of each row whose file failed]) for
    JPEG files, decoded as one batch there. A failed batch is decoded one file at a time to
    name the culprits (their rows stay zero)."""
    # torchvision 0.29 warns on every call that its image decoding is deprecated in favour of
    # TorchCodec; it still works, and the GPU machines' torchvision (0.26) has no successor.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities",
                                DeprecationWarning)
        return _decode_jpeg_rows(paths, size, centre_crop, device)


def _decode_jpeg_rows(paths: Sequence[str], size: int, centre_crop: Optional[int],
                      device) -> Tuple[torch.Tensor, List[Tuple[int, str]]]:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    out = torch.zeros((len(paths), 3, size, size), dtype=torch.uint8, device=device)
    problems, data, readable = [], [], []
    for row, path in enumerate(paths):
        try:
            data.append(read_file(path))
            readable.append(row)
        except (OSError, RuntimeError) as error:
            problems.append((row, str(error)))
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []
        pairs = list(zip(readable, images))
    except RuntimeError:
        pairs = []
        for row, encoded in zip(readable, data):
            try:
                pairs.append((row, decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)))
            except RuntimeError as error:
                problems.append((row, f"cannot be decoded as a JPEG: {error}"))
    _place_squares(out, pairs, centre_crop)
    return out, problems
