"""Datasets over the cached uint8 arrays, and a loader that keeps a whole split on the device.

Python data loading (a worker per batch decoding and collating) would bound training speed on
a GPU; Biased MNIST at 160 px is 3.8 GB of uint8 for 50,000 images, which fits on the GPU, so
batches are gathered and converted to float there.
"""
from typing import Dict, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset

MEAN, STD = 0.5, 0.5  # images are scaled to [-1, 1]


class BiasedMNISTDataset(Dataset):
    """(image uint8 (3,S,S), label, item index, factors (7,)) per item, on the CPU."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, factors: torch.Tensor):
        if not (images.shape[0] == labels.shape[0] == factors.shape[0]):
            raise ValueError("images, labels and factors must have one length")
        self.images, self.labels, self.factors = images, labels, factors

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index]), index, self.factors[index]


class DeviceSplit:
    """A split held as tensors on one device; `batch(rows)` converts uint8 images there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, factors: torch.Tensor,
                 factor_names: Sequence[str], device="cpu"):
        self.images = images.to(device)
        self.labels = labels.long().to(device)
        self.factors = factors.long().to(device)
        self.factor_names = list(factor_names)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, rows: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        x = self.images[rows].float().div_(255.0).sub_(MEAN).div_(STD)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: Optional[torch.Generator] = None, drop_last: bool = False,
                channels_last: bool = False) -> Iterator[Dict[str, torch.Tensor]]:
        """Dicts of x (float, normalised), labels, items (dataset indices) and factors."""
        count = len(self)
        order = (torch.randperm(count, generator=generator).to(self.labels.device) if shuffle
                 else torch.arange(count, device=self.labels.device))
        stop = count - count % batch_size if drop_last else count
        for start in range(0, stop, batch_size):
            rows = order[start:start + batch_size]
            yield {"x": self.batch(rows, channels_last), "labels": self.labels[rows],
                   "items": rows, "factors": self.factors[rows]}
