"""Debiasing methods, one per file, each usable on a ResNet and on every exit of an OccamNet
(see method.py for how they plug in). Defaults are the official scripts' for Biased MNIST
(scripts/biased_mnist/bmnist_*.sh of erobic/occam-nets-v1), per model where they differ."""
from typing import Optional, Sequence

from .group_dro import GroupDRO
from .method import Method
from .pgi import PredictiveGroupInvariance, feature_parameters
from .spectral_decoupling import SpectralDecoupling
from .upweighting import GroupUpweighting

# Name -> what it is, for --help and reports.
METHODS = {
    "erm": "plain cross-entropy (empirical risk minimisation)",
    "upwt": "group upweighting: each sample's loss times (1 / its group's size) ** gamma",
    "gdro": "GroupDRO: online group weights by exponentiated gradient (Sagawa et al. 2020)",
    "sd": "spectral decoupling: + 0.5 * lambda * (true-class logit - gamma) ** 2",
    "pgi": "predictive group invariance: match the class's group halves' mean softmax",
}

# The official Biased MNIST scripts' values: UpWt gamma 1 (bmnist_upwt.sh), SD lambda 0.1
# for ResNet and 1e-3 for OccamResNet with gamma 0 (bmnist_sd.sh), PGI weight 100 for ResNet
# and 50 for OccamResNet (bmnist_pgi.sh). GroupDRO is not in the official code: eta 0.01 is
# Sagawa et al.'s released default step size.
UPWT_GAMMA = 1.0
GDRO_ETA = 0.01
SD_GAMMAS = (0.0,)
SD_LAMBDAS = {"resnet": (0.1,), "occam": (1e-3,)}
PGI_WEIGHT = {"resnet": 100.0, "occam": 50.0}


def per_model_defaults(model: str, sd_lambdas: Optional[Sequence[float]],
                       pgi_weight: Optional[float]):
    """(sd_lambdas, pgi_weight), a None taking the model's official default."""
    return (SD_LAMBDAS[model] if sd_lambdas is None else sd_lambdas,
            PGI_WEIGHT[model] if pgi_weight is None else pgi_weight)


def build_method(name: str, *, model: str, group_sizes, num_classes: int, num_heads: int,
                 upwt_gamma: float = UPWT_GAMMA, gdro_eta: float = GDRO_ETA,
                 sd_lambdas: Optional[Sequence[float]] = None,
                 sd_gammas: Sequence[float] = SD_GAMMAS,
                 pgi_weight: Optional[float] = None) -> Method:
    """The method `name` for a `model` ("resnet" or "occam") with `num_heads` heads, for a
    training split whose groups have `group_sizes` (G,); None hyper-parameters take the
    official per-model defaults."""
    num_groups = int(group_sizes.shape[0])
    sd_lambdas, pgi_weight = per_model_defaults(model, sd_lambdas, pgi_weight)
    if name == "erm":
        return Method(num_heads)
    if name == "upwt":
        return GroupUpweighting(group_sizes, upwt_gamma, num_heads)
    if name == "gdro":
        return GroupDRO(num_groups, gdro_eta, num_heads)
    if name == "sd":
        return SpectralDecoupling(sd_lambdas, sd_gammas, num_groups, num_heads)
    if name == "pgi":
        return PredictiveGroupInvariance(pgi_weight, num_groups, num_classes, num_heads)
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


__all__ = ["GDRO_ETA", "METHODS", "PGI_WEIGHT", "SD_GAMMAS", "SD_LAMBDAS", "UPWT_GAMMA",
           "GroupDRO", "GroupUpweighting", "Method", "PredictiveGroupInvariance",
           "SpectralDecoupling", "build_method", "feature_parameters", "per_model_defaults"]
