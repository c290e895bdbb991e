"""Predictive group invariance (PGI; Ahmed et al. 2021), as the official PGITrainer: within each
class of the batch, the mean softmax of one half of its groups should match the other half's.

For each class c present with at least two groups in the batch, its groups (by index, see
occamnets/data/groups.py) are split as the official splits them: with two groups, the first
against the second; with n > 2, those of rank <= n // 2 against the rest. With p0 and p1 each
half's mean softmax, clamped to [eps, 1 - eps],

    penalty = w * sum_c mean_k(p1_k * log(p1_k / p0_k)) / K,   w = weight * min(1, progress)

where progress is the share of all training steps done (a linear warm-up over the whole run,
as the official's iteration ramp). Its gradient reaches only the feature extractor (the
official backpropagates it with `inputs=` the non-exit, non-fc parameters); on an OccamNet it
is summed over the exits (all exits in one pass). Vectorised: presence and ranks of groups
from a (K, G) table.

Under torch.distributed the halves and their means are the global batch's (the presence
table, the sums and the counts summed over the processes), so every process computes the
penalty one process holding the whole batch would. The sums are summed differentiably: each
process's backward then carries (processes x) its own samples' share, and averaging the
penalty's gradients over the processes (as the trainer does) gives the whole batch's.
"""
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as differentiable
from torch import Tensor, nn

from .method import Method, in_process_group

# The parameters of the heads: an OccamNet's exits, a ResNet's classifier (the official's
# get_non_exit_layers leaves these out).
HEAD_PREFIXES = ("exits.", "fc.")


def feature_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The trainable parameters PGI's penalty reaches: all but the heads'."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and not name.startswith(HEAD_PREFIXES)]


class PredictiveGroupInvariance(Method):
    name = "pgi"
    uses_groups = True
    has_penalty = True

    def __init__(self, weight: float, num_groups: int, num_classes: int, num_heads: int = 1,
                 eps: float = 1e-12):
        super().__init__(num_heads)
        self.weight, self.num_groups, self.num_classes, self.eps = (
            weight, num_groups, num_classes, eps)

    def halves(self, labels: Tensor, groups: Tensor):
        """(side (B,) long: 0 or 1 per sample, valid (K,) bool: the class has both halves)."""
        present = torch.zeros(self.num_classes, self.num_groups, device=labels.device)
        present[labels, groups] = 1.0
        if in_process_group():   # a class's groups across the processes: the same halves on all
            dist.all_reduce(present, op=dist.ReduceOp.MAX)
        rank = present.cumsum(1)[labels, groups] - 1          # the group's rank in its class
        count = present.sum(1)                                 # groups per class in the batch
        cut = torch.where(count == 2, torch.zeros_like(count), torch.div(
            count, 2, rounding_mode="floor"))
        side = (rank > cut[labels]).long()
        return side, count >= 2

    def penalty(self, logits: Tensor, labels: Tensor, groups: Optional[Tensor],
                progress: float) -> Optional[Tensor]:
        """The penalty of logits (B, K); of (H, B, K), one per head (H,), the halves found
        once for all heads."""
        side, valid = self.halves(labels, groups)
        heads = logits.float() if logits.dim() == 3 else logits.float()[None]
        probabilities = torch.softmax(heads, dim=2).transpose(0, 1)      # (B, H, K)
        classes = self.num_classes
        sums = torch.zeros(classes, 2, *probabilities.shape[1:], device=logits.device).index_put(
            (labels, side), probabilities, accumulate=True)              # (K, 2, H, K)
        counts = torch.zeros(classes, 2, device=logits.device).index_put(
            (labels, side), torch.ones_like(labels, dtype=torch.float32), accumulate=True)
        if in_process_group():
            dist.all_reduce(counts)
            sums = differentiable.all_reduce(sums)
        means = (sums / counts.clamp_min(1)[..., None, None]).clamp(self.eps, 1 - self.eps)
        p0, p1 = means[:, 0], means[:, 1]
        per_class = (p1 * torch.log(p1 / p0)).mean(2) / classes           # (K, H)
        ramp = self.weight * min(1.0, progress)
        per_head = ramp * torch.where(valid[:, None], per_class,
                                      torch.zeros_like(per_class)).sum(0)
        return per_head if logits.dim() == 3 else per_head[0]
