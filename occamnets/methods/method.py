"""The interface every debiasing method implements, and ERM (plain cross-entropy), its default.

A method shapes a classifier head's loss in three places, each vectorised on the device:
  sample_loss(logits, labels, groups) -> (B,): the per-sample loss replacing cross-entropy;
  reduce(losses, groups, head) -> scalar: how the batch's per-sample losses become one
      (the mean; GroupDRO weighs group means);
  penalty(logits, labels, groups, progress) -> scalar or None: a term whose gradient reaches
      only the feature extractor, never the heads (PGI); given logits (H, B, K) of H heads,
      one term per head (H,).
A ResNet has one head (its fc); an OccamNet one per exit, where OccamLoss multiplies each
sample's loss by its exit weight before `reduce` (as the official Occam trainers do with the
loss their `compute_main_loss` returns). State (GroupDRO's group weights) lives in buffers,
so it is checkpointed with the objective.
"""
from typing import Optional

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def in_process_group() -> bool:
    """Whether this process trains with others (torch.distributed, more than one process):
    then the methods and OccamLoss compute their batch statistics over the global batch."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Method(nn.Module):
    """ERM: cross-entropy per sample, averaged over the batch, no penalty."""
    name = "erm"
    uses_groups = False
    has_penalty = False   # True where `penalty` returns a term

    def __init__(self, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads

    def sample_loss(self, logits: Tensor, labels: Tensor, groups: Optional[Tensor]) -> Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def reduce(self, losses: Tensor, groups: Optional[Tensor], head: int) -> Tensor:
        return losses.mean()

    def penalty(self, logits: Tensor, labels: Tensor, groups: Optional[Tensor],
                progress: float) -> Optional[Tensor]:
        return None
