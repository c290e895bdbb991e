"""Variable-width ResNet-18 trunk (the OccamResNet backbone) and its plain classifier."""
from typing import List, Tuple

import torch
from torch import Tensor, nn

from .exits import conv3x3


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


# The stems: "7x7" is ImageNet's (7x7/2 conv and a 3x3/2 max-pool: 160 px images reach
# stage 1 at 40x40, the paper's Biased MNIST); "3x3" is CIFAR's (3x3/1 conv, no pooling),
# for small images.
STEMS = ("7x7", "3x3")


def make_stem(stem: str, width: int) -> nn.Module:
    if stem == "7x7":
        return nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
                             nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                             nn.MaxPool2d(3, stride=2, padding=1))
    if stem == "3x3":
        return nn.Sequential(conv3x3(3, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")


def resnet18_trunk(width: int = 58, stem: str = "7x7",
                   blocks=(2, 2, 2, 2)) -> Tuple[nn.Module, List[nn.Module], List[int]]:
    """(stem, stages, stage channels) of the variable-width ResNet-18."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    stem_module = make_stem(stem, width)
    channels = [width * 2 ** i for i in range(len(blocks))]
    stages, previous = [], width
    for index, (count, out_channels) in enumerate(zip(blocks, channels)):
        layers = []
        for block in range(count):
            stride = 2 if (index > 0 and block == 0) else 1
            layers.append(BasicBlock(previous, out_channels, stride))
            previous = out_channels
        stages.append(nn.Sequential(*layers))
    return stem_module, stages, channels


def init_weights(module: nn.Module) -> None:
    """Conv weights ~ N(0, sqrt(2 / (k*k*out))), BN weight 1 and bias 0 (official init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """The plain baseline: the same trunk, global average pooling and one linear classifier."""

    def __init__(self, num_classes: int, width: int = 58, stem: str = "7x7"):
        super().__init__()
        stem, stages, channels = resnet18_trunk(width, stem)
        self.stem, self.stages = stem, nn.ModuleList(stages)
        self.fc = nn.Linear(channels[-1], num_classes)
        self.num_classes = num_classes
        init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        """The last stage's feature map (N, C, h, w)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    def forward_with_cams(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(logits (N, K), CAMs (N, K, h, w)): the class activation maps of Zhou et al. 2016
        from the last stage, each pixel's features through the classifier. Their spatial mean
        is the logits (the classifier is linear and follows the average pool), so the CAM of a
        class is where its logit comes from, as an OccamNet exit's CAM is."""
        features = self.features(x)
        cams = nn.functional.conv2d(features, self.fc.weight[:, :, None, None], self.fc.bias)
        logits = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1))
        return logits, cams


def resnet18(num_classes: int, width: int = 58, stem: str = "7x7") -> ResNet:
    return ResNet(num_classes, width, stem)
