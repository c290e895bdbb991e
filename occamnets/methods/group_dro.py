"""GroupDRO (Sagawa et al. 2020; not in the official OccamNets code): online weights q over the
training groups, one set per head, updated every step by exponentiated gradient,

    q_g <- q_g * exp(eta * mean loss of group g in the batch);  q <- q / sum(q)

then the loss is sum_g q_g * (mean loss of group g in the batch), with the updated q (as the
authors' code: a group absent from the batch has loss 0 there). On an OccamNet each exit has
its own q, and the per-sample loss it weighs is OccamLoss's exit-weighted cross-entropy.
Under torch.distributed the update uses the global batch's group means, so q stays identical
on every process; each process's loss uses its own samples, as DDP averages gradients.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .method import Method


class GroupDRO(Method):
    name = "gdro"
    uses_groups = True

    def __init__(self, num_groups: int, eta: float, num_heads: int = 1):
        super().__init__(num_heads)
        if num_groups < 1:
            raise ValueError("GroupDRO needs at least one training group")
        self.eta = eta
        self.register_buffer("group_weights", torch.full((num_heads, num_groups),
                                                         1.0 / num_groups))

    def group_means(self, losses: Tensor, groups: Tensor) -> Tensor:
        """(G,) mean loss of each group over the batch's samples (0 for a group absent)."""
        sums = torch.zeros_like(self.group_weights[0]).index_add(0, groups, losses.float())
        counts = torch.zeros_like(sums).index_add(0, groups, torch.ones_like(sums[groups]))
        return sums / counts.clamp_min(1)

    def reduce(self, losses: Tensor, groups: Optional[Tensor], head: int) -> Tensor:
        means = self.group_means(losses, groups)
        with torch.no_grad():
            global_means = means.detach()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                sums = torch.zeros_like(means).index_add(0, groups, losses.detach().float())
                counts = torch.zeros_like(means).index_add(0, groups, torch.ones_like(losses.float()))
                both = torch.stack([sums, counts])
                dist.all_reduce(both)
                global_means = both[0] / both[1].clamp_min(1)
            weights = self.group_weights[head] * torch.exp(self.eta * global_means)
            weights = weights / weights.sum()
            self.group_weights[head] = weights
        # The local copy: the buffer changes in place at the next head's update.
        return (means * weights).sum()

    def describe(self) -> str:
        return f"GroupDRO (eta {self.eta:g})"
