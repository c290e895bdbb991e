"""A split held whole on the device, and its batches as normalised float images.

Python data loading (a worker per batch decoding and collating) would bound training speed on
a GPU; Biased MNIST at 160 px is 3.8 GB of uint8 for 50,000 images, which fits on the GPU, so
batches are gathered and converted to float there.
"""
from typing import Sequence

import numpy as np
import torch

MEAN, STD = 0.5, 0.5  # images are scaled to [-1, 1]


def normalise(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> the float input the models were trained on."""
    x = images.float().div_(255.0).sub_(MEAN).div_(STD)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class DeviceSplit:
    """A split held as tensors on one device; `batch(rows)` converts uint8 images there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, factors: torch.Tensor,
                 factor_names: Sequence[str], device="cpu"):
        if not images.shape[0] == labels.shape[0] == factors.shape[0]:
            raise ValueError(f"images, labels and factors must have one length, got "
                             f"{images.shape[0]}, {labels.shape[0]} and {factors.shape[0]}")
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.images = images.to(device)
        self.labels = labels.long().to(device)
        self.factors = factors.long().to(device)
        self.factor_names = list(factor_names)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def batch(self, rows: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        return normalise(self.images[rows], channels_last)


def read_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """Image files (anything Pillow reads) as uint8 (N, 3, size, size), resized to `size`."""
    from PIL import Image
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {path} as an image: {error}") from error
        images.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1))
    return torch.stack(images)
