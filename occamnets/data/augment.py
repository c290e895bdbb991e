"""Training augmentation on the device, per batch: the official COCO-on-Places transform
(RandomCrop(size, padding, reflect), then a horizontal flip half the time), on whole float
batches in a few kernels rather than per image in Python.

Randomness comes from a generator the caller seeds (the trainer: from the seed and the step),
so a resumed run augments its batches as the uninterrupted run did.
"""
import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """x (B, C, H, W) float -> the same shape: each image cut at a random offset from itself
    reflect-padded by `padding` pixels per side, then mirrored left-right with probability 1/2.
    `generator` is a CPU generator (the draws are a few numbers per image)."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"need a float (B, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be at least 0, got {padding}")
    batch, _, height, width = x.shape
    # The output keeps the input's memory format (channels_last on a GPU).
    memory_format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                     and not x.is_contiguous() else torch.contiguous_format)
    if batch == 0:
        return x
    # Reflection needs padding < side; a smaller image gets less.
    padding = min(padding, height - 1, width - 1)
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    padded = F.pad(x, (padding,) * 4, mode="reflect") if padding > 0 else x
    rows = top[:, None] + torch.arange(height)                                   # (B, H)
    # A mirrored image reads its crop's columns right to left: crop and flip in one gather.
    offsets = torch.where(flip[:, None], torch.arange(width - 1, -1, -1), torch.arange(width))
    columns = left[:, None] + offsets                                           # (B, W)
    # Image b's pixel (i, j) comes from padded[b, :, rows[b, i], columns[b, j]].
    indices = torch.cat([rows, columns], 1)
    if x.is_cuda:   # pinned and asynchronous: a blocking copy would wait for the last step
        indices = indices.pin_memory().to(x.device, non_blocking=True)
    rows, columns = indices.split([height, width], 1)
    picked = padded.permute(0, 2, 3, 1)[torch.arange(batch, device=x.device)[:, None, None],
                                        rows[:, :, None], columns[:, None, :]]
    return picked.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
