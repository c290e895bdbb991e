"""OccamResNet, the exit module and gate, the ResNet baseline, the generic OccamNet, and the
typed outputs they return."""
from torch import nn

from .exits import ExitGate, OccamExit
from .occam_net import OccamNet, occam_resnet18
from .outputs import EarlyExitOutput, ExitOutput, OccamOutput
from .resnet import STEMS, BasicBlock, ResNet, resnet18

# The models a run can train, by name, with the title reports give them.
MODELS = {"occam": "OccamResNet-18", "resnet": "ResNet-18 baseline"}
SHORT_NAMES = {"occam": "OccamResNet", "resnet": "ResNet"}   # where space is short (pictures)


def build_model(name: str, num_classes: int, width: int, stem: str,
                backend: str = "auto") -> nn.Module:
    """A fresh model by name (`backend` is the exit heads' and matters to OccamNets only)."""
    if name == "occam":
        return occam_resnet18(num_classes, width=width, stem=stem, backend=backend)
    if name == "resnet":
        return resnet18(num_classes, width=width, stem=stem)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


__all__ = ["MODELS", "SHORT_NAMES", "STEMS", "BasicBlock", "EarlyExitOutput", "ExitGate",
           "ExitOutput", "OccamExit", "OccamNet", "OccamOutput", "ResNet", "build_model",
           "occam_resnet18", "resnet18"]
