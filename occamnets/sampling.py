"""Which training items an epoch draws, and in what order.

`uniform` (the default) is a permutation: every item once per epoch. `groups` and `classes`
are the official code's balanced sampling (`dataset.sampling_type: balanced`, with
`sampling_attributes: [group_ix]` or `[y]`, in its datasets/dataloader_factory.py): as many
draws per epoch as items, with replacement, each item weighted 1 / n ** gamma, n the size of
its bias group or its class in the training split (gamma 1: every group or class equally
likely; 0: uniform draws with replacement). The official scripts leave it off; GroupDRO's
group weights drift without it (README, debiasing methods).
"""
from typing import Optional

import torch
from torch import Tensor

from .data.loaders import LabelledItems

SAMPLINGS = {
    "uniform": "a permutation: every training item once per epoch",
    "groups": "with replacement, each item weighted 1 / (its bias group's size) ** gamma",
    "classes": "with replacement, each item weighted 1 / (its class's size) ** gamma",
}
SAMPLING_GAMMA = 0.5   # the official dataset config's sampling_gamma


def sampling_weights(sampling: str, gamma: float, train: LabelledItems) -> Optional[Tensor]:
    """(N,) float64 on the CPU: each training item's draw weight, 1 / n ** gamma; None for
    uniform sampling (a permutation)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    if sampling == "uniform":
        return None
    index, sizes = _units(sampling, train)
    return sizes.double()[index].pow(-gamma)


def _units(sampling: str, train: LabelledItems):
    """(index (N,), sizes (U,)) on the CPU: each item's group (or class) and each one's size."""
    if sampling == "groups":
        groups = train.groups
        return groups.index.cpu(), groups.sizes.cpu()
    labels = train.labels.cpu()
    return labels, torch.bincount(labels)


def epoch_order(num_items: int, seed: int, epoch: int, device,
                weights: Optional[Tensor] = None) -> Tensor:
    """The items of an epoch, in order: a function of (seed, epoch, weights) only, so resuming
    repeats it, and every DDP process draws the same one (each takes its own slices). Without
    weights a permutation; with them num_items draws with replacement (an item may come twice,
    in one batch too: OccamLoss stores the last copy's gate target, as the official)."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    if weights is None:
        return torch.randperm(num_items, generator=generator).to(device)
    if weights.shape != (num_items,):
        raise ValueError(f"{tuple(weights.shape)} sampling weights for {num_items} items")
    # Inverse CDF, as torch.multinomial draws with replacement, without its limit of 2^24
    # categories (a folder dataset may hold more images).
    bounds = weights.double().cumsum(0)
    points = torch.rand(num_items, generator=generator, dtype=torch.float64) * bounds[-1]
    drawn = torch.searchsorted(bounds, points, right=True).clamp_max_(num_items - 1)
    return drawn.to(device)


def sampling_line(sampling: str, gamma: float, train: LabelledItems,
                  weights: Optional[Tensor]) -> Optional[str]:
    """What balanced sampling does to this training split, in a line printed when a run
    starts (None for uniform sampling, whose `weights` are None): how often an epoch draws its
    largest and smallest group (or class), where a permutation draws each as often as it has
    images, and the share of the images an epoch draws at least once. `weights`: the split's
    sampling_weights, computed once by the caller that draws with them."""
    if weights is None:
        return None
    index, sizes = _units(sampling, train)
    num_items = weights.shape[0]
    chance = weights / weights.sum()
    expected = torch.zeros(sizes.shape[0], dtype=torch.float64).index_add_(0, index, chance)
    expected *= num_items
    present = sizes > 0      # classes: a label absent from the split has no items
    largest = int(torch.where(present, sizes, -1).argmax())
    smallest = int(torch.where(present, sizes, sizes.max() + 1).argmin())
    drawn = float((1 - (1 - chance).pow(num_items)).mean())
    unit = "group" if sampling == "groups" else "class"
    return (f"sampling by {'bias group' if unit == 'group' else 'class'} (each image weighted "
            f"1 / {unit} size ^ {gamma:g}, "
            f"{num_items:,} draws per epoch with replacement): the largest {unit} "
            f"({int(sizes[largest]):,} images, drawn {int(sizes[largest]):,} times by a "
            f"permutation) expects {float(expected[largest]):.1f} draws per epoch, the smallest "
            f"({int(sizes[smallest]):,}) {float(expected[smallest]):.1f}; an epoch draws about "
            f"{100 * drawn:.0f}% of the images at least once")
