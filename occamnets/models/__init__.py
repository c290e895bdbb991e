"""OccamResNet, the exit module and gate, the ResNet baseline and the generic OccamNet."""
from .exits import ExitGate, OccamExit
from .occam_net import OccamNet, occam_resnet18
from .resnet import BasicBlock, ResNet, resnet18

__all__ = ["BasicBlock", "ExitGate", "OccamExit", "OccamNet", "ResNet", "occam_resnet18",
           "resnet18"]
