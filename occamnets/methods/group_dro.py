"""GroupDRO (Sagawa et al. 2020; not in the official OccamNets code): online weights q over the
training groups, one set per head, updated every step by exponentiated gradient,

    q_g <- q_g * exp(eta * mean loss of group g in the batch);  q <- q / sum(q)

then the loss is sum_g q_g * (mean loss of group g in the batch), with the updated q (as the
authors' code: a group absent from the batch has loss 0 there). On an OccamNet each exit has
its own q, and the per-sample loss it weighs is OccamLoss's exit-weighted cross-entropy.
Under torch.distributed the update uses the global batch's group means, so q stays identical
on every process, and each process's loss is its share of the global robust loss (each
group's sum over its samples divided by the group's global count), so that DDP's averaged
gradient is the global batch's.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .method import Method, in_process_group


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

    def reduce(self, losses: Tensor, groups: Optional[Tensor], head: int) -> Tensor:
        losses = losses.float()
        sums = torch.zeros_like(self.group_weights[0]).index_add(0, groups, losses)
        counts = torch.zeros_like(sums).index_add(0, groups, torch.ones_like(losses))
        world = 1
        with torch.no_grad():
            global_sums, global_counts = sums.detach(), counts
            if in_process_group():
                world = dist.get_world_size()
                both = torch.stack([global_sums, global_counts])
                dist.all_reduce(both)
                global_sums, global_counts = both[0], both[1]
            counts_or_one = global_counts.clamp_min(1)          # 0 means for a group absent
            means = global_sums / counts_or_one
            # q * exp(eta * means), normalised, as a softmax of logs: the product overflows
            # float32 once eta * loss passes 88 (eta 40 at a 10-class start's loss 2.3).
            weights = torch.softmax(self.group_weights[head].log() + self.eta * means, 0)
            self.group_weights[head] = weights
        # sum_g q_g * (this process's share of group g's global mean), times the processes:
        # DDP averages the gradients, which gives exactly the global batch's robust loss (a
        # group on one process only weighs as much as on one process training alone). The
        # local copy of q: the buffer changes in place at the next head's update.
        return world * ((sums / counts_or_one) * weights).sum()
