"""An OccamNet exit: a small CAM network, the fused exit head and the exit gate (DESIGN.md 5)."""
from typing import Optional

import torch
from torch import Tensor, nn

import occam_kernels

from .outputs import ExitOutput


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ExitGate(nn.Module):
    """p(exit | x) from the pooled CAM input: Linear(C,16)+BN1d+ReLU+Linear(16,1)+sigmoid."""

    def __init__(self, in_channels: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, pooled: Tensor) -> Tensor:
        return torch.sigmoid(self.net(pooled)).squeeze(1)


class OccamExit(nn.Module):
    """conv3x3(C->C/4)+BN+ReLU, conv3x3(C/4->C)+ReLU, then the exit head (1x1 conv to K).

    forward(x, labels) -> ExitOutput; the gate sees the pooled CAM input detached, so it does
    not train the features it judges.
    """

    def __init__(self, in_channels: int, num_classes: int, backend: str = "auto"):
        super().__init__()
        hidden = max(1, in_channels // 4)
        self.features = nn.Sequential(
            conv3x3(in_channels, hidden), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            conv3x3(hidden, in_channels), nn.ReLU(inplace=True))
        self.cam = nn.Conv2d(in_channels, num_classes, 1)
        self.gate = ExitGate(in_channels)
        self.backend = backend

    def forward(self, x: Tensor, labels: Optional[Tensor] = None,
                return_cam: bool = False) -> ExitOutput:
        h = self.features(x)
        # Under autocast h is bf16/fp16 while the parameters stay fp32: the op wants one dtype.
        weight, bias = self.cam.weight.to(h.dtype), self.cam.bias.to(h.dtype)
        head = occam_kernels.exit_head(h, weight, bias, labels, backend=self.backend)
        gate = self.gate(head.pooled.detach().to(self.cam.weight.dtype))
        cam = (occam_kernels.class_activation_maps(h, weight, bias, backend=self.backend)
               if return_cam else None)
        return ExitOutput(head.logits, gate, head.pooled, head.supp, cam)
