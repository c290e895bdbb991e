"""An OccamNet exit: a small CAM network, the fused exit head and the exit gate (DESIGN.md 5)."""
from typing import Optional

import torch
from torch import Tensor, nn

import occam_kernels

from .outputs import ExitOutput


def conv3x3(in_channels: int, out_channels: int, stride: int = 1,
            bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class ExitGate(nn.Module):
    """The logit of p(exit | x) from the pooled CAM input: Linear(C,16)+BN1d+ReLU+Linear(16,1).

    Computed in the parameters' dtype (fp32) even under autocast: a bf16 logit, or a bf16
    sigmoid, rounds to exactly 1.0 from a logit of about 6, where the gate's BCE has no
    gradient left. The loss takes the BCE from this logit; inference reads sigmoid(logit).
    """

    def __init__(self, in_channels: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, hidden), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, pooled: Tensor) -> Tensor:
        with torch.autocast(pooled.device.type, enabled=False):
            return self.net(pooled.to(self.net[0].weight.dtype)).squeeze(1)


class OccamExit(nn.Module):
    """conv3x3(C->C/4)+BN+ReLU, conv3x3(C/4->C)+ReLU, then the exit head (1x1 conv to K).

    Both 3x3 convs carry biases, as the official exits' do (its `conv_bias` flag is never
    passed on, so nn.Conv2d's default applies); the trunk's convs have none.

    forward(x, labels) -> ExitOutput; the gate sees the pooled CAM input detached, so it does
    not train the features it judges.
    """

    def __init__(self, in_channels: int, num_classes: int, backend: str = "auto"):
        super().__init__()
        hidden = max(1, in_channels // 4)
        self.features = nn.Sequential(
            conv3x3(in_channels, hidden, bias=True), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            conv3x3(hidden, in_channels, bias=True), nn.ReLU(inplace=True))
        self.cam = nn.Conv2d(in_channels, num_classes, 1)
        self.gate = ExitGate(in_channels)
        self.backend = backend

    def forward(self, x: Tensor, labels: Optional[Tensor] = None,
                return_cam: bool = False) -> ExitOutput:
        h = self.features(x)
        # Under autocast h is bf16/fp16 while the parameters stay fp32: the op wants one dtype.
        weight, bias = self.cam.weight.to(h.dtype), self.cam.bias.to(h.dtype)
        head = occam_kernels.exit_head(h, weight, bias, labels, backend=self.backend)
        gate_logit = self.gate(head.pooled.detach())
        cam = (occam_kernels.class_activation_maps(h, weight, bias, backend=self.backend)
               if return_cam else None)
        return ExitOutput(head.logits, torch.sigmoid(gate_logit), gate_logit, head.pooled,
                          head.supp, cam)
