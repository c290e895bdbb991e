"""Spectral decoupling (SD; Pezeshki et al. 2021), as the official SpectralDecouplingTrainer:
per sample, cross-entropy + 0.5 * lambda_g * (logit of the true class - gamma_g) ** 2, with one
(lambda, gamma) for every group or one per training group."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from .method import Method


def _per_group(values: Sequence[float], num_groups: int, name: str) -> Tensor:
    if len(values) not in (1, num_groups):
        raise ValueError(f"spectral decoupling needs one {name} or one per training group "
                         f"({num_groups}), got {len(values)}")
    return torch.tensor(list(values) * (num_groups if len(values) == 1 else 1),
                        dtype=torch.float32)


class SpectralDecoupling(Method):
    name = "sd"
    uses_groups = True

    def __init__(self, lambdas: Sequence[float], gammas: Sequence[float], num_groups: int,
                 num_heads: int = 1):
        super().__init__(num_heads)
        self.register_buffer("lambdas", _per_group(lambdas, num_groups, "lambda"))
        self.register_buffer("gammas", _per_group(gammas, num_groups, "gamma"))

    def sample_loss(self, logits: Tensor, labels: Tensor, groups: Optional[Tensor]) -> Tensor:
        cross_entropy = super().sample_loss(logits, labels, groups)
        true_logit = logits.gather(1, labels[:, None])[:, 0].float()   # one column cast
        return cross_entropy + 0.5 * self.lambdas[groups] * (true_logit - self.gammas[groups]) ** 2
