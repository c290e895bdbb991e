"""Group upweighting (UpWt), as the official GroupUpweightingTrainer: each sample's
cross-entropy times (1 / its group's training size) ** gamma, averaged over the batch (not
renormalised: with gamma = 1 every group's weights sum to 1 over the training set)."""
from typing import Optional

from torch import Tensor

from .method import Method


class GroupUpweighting(Method):
    name = "upwt"
    uses_groups = True

    def __init__(self, group_sizes: Tensor, gamma: float, num_heads: int = 1):
        super().__init__(num_heads)
        if (group_sizes < 1).any():
            raise ValueError("every training group needs at least one sample")
        self.register_buffer("weights", group_sizes.double().reciprocal().pow(gamma).float())

    def sample_loss(self, logits: Tensor, labels: Tensor, groups: Optional[Tensor]) -> Tensor:
        return self.weights[groups] * super().sample_loss(logits, labels, groups)
