"""Official weights: the parameter count of the official OccamResNet-18, and its state_dict
loaded through the key mapping computes the same outputs.

The official code cannot be installed here, so `OfficialLayout` below restates its forward
pass (erobic/occam-nets-v1, models/occam_resnet.py and models/occam_lib.py) under its module
names: a torchvision-style trunk, exits with `convs.{conv1,norm1,conv2}` (both convs with
biases), a ReLU, a 1x1 `cam` conv whose GAP is the logits, and a gate on the detached GAP.
"""
import pytest
import torch
from torch import nn

from occamnets.models import occam_resnet18
from occamnets.models.official import (from_official_state_dict, load_official_state_dict,
                                       official_key)


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _Exit(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.convs = nn.Module()
        self.convs.conv1 = nn.Conv2d(channels, channels // 4, 3, padding=1)
        self.convs.norm1 = nn.BatchNorm2d(channels // 4)
        self.convs.conv2 = nn.Conv2d(channels // 4, channels, 3, padding=1)
        self.cam = nn.Conv2d(channels, classes, 1)
        self.gate = nn.Module()
        self.gate.net = nn.Sequential(nn.Linear(channels, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                      nn.Linear(16, 1))

    def forward(self, x):
        c = self.convs
        h = torch.relu(c.conv2(torch.relu(c.norm1(c.conv1(x)))))
        logits = self.cam(h).mean(dim=(2, 3))
        gate = torch.sigmoid(self.gate.net(h.detach().mean(dim=(2, 3)))).squeeze(1)
        return logits, gate


class OfficialLayout(nn.Module):
    def __init__(self, classes, width=58, stem="7x7"):
        super().__init__()
        big = stem == "7x7"
        self.conv1 = nn.Conv2d(3, width, 7 if big else 3, 2 if big else 1, 3 if big else 1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, 2, 1) if big else nn.Identity()
        cin = width
        for i in range(4):
            cout = width * 2 ** i
            setattr(self, f"layer{i + 1}", nn.Sequential(_Block(cin, cout, 1 if i == 0 else 2),
                                                         _Block(cout, cout, 1)))
            cin = cout
        self.multi_exit = nn.Module()
        self.multi_exit.exits = nn.ModuleList(_Exit(width * 2 ** i, classes) for i in range(4))

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(self.multi_exit.exits[i](x.detach() if i == 0 else x))
        return outs


def randomise(model):
    """Non-trivial BN statistics and biases, so a swapped or dropped tensor shows."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_mean") or name.endswith("bias"):
                tensor.normal_(0, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.normal_(0, 0.1)


def test_parameter_count_is_the_official_models():
    count = sum(p.numel() for p in occam_resnet18(10).parameters())
    assert count == 10_491_411
    assert count == sum(p.numel() for p in OfficialLayout(10).parameters())


@pytest.mark.parametrize("stem,size", [("7x7", 64), ("3x3", 16)])
def test_official_state_dict_gives_the_same_outputs(stem, size):
    torch.manual_seed(0)
    official = OfficialLayout(10, width=8, stem=stem)
    randomise(official)
    ours = load_official_state_dict(occam_resnet18(10, width=8, stem=stem,
                                                   backend="reference"), official.state_dict())
    x = torch.rand(5, 3, size, size)
    for training in (False, True):
        official.train(training), ours.train(training)
        with torch.no_grad():
            expected, got = official(x), ours(x)
        for (logits, gate), exit_out in zip(expected, got.exits):
            torch.testing.assert_close(exit_out.logits, logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(exit_out.gate, gate, rtol=1e-5, atol=1e-6)


def test_lightning_checkpoint_keys_and_unknown_keys():
    official = OfficialLayout(3, width=4, stem="3x3").state_dict()
    lightning = {"state_dict": {f"model.{k}": v for k, v in official.items()}, "epoch": 3}
    assert from_official_state_dict(lightning).keys() == from_official_state_dict(official).keys()
    assert official_key("layer2.0.downsample.1.weight") == "stages.1.0.shortcut.1.weight"
    assert official_key("multi_exit.exits.3.gate.net.3.bias") == "exits.3.gate.net.3.bias"
    with pytest.raises(KeyError, match="fc.weight"):
        from_official_state_dict({**official, "fc.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_official_state_dict(occam_resnet18(3, width=8, stem="3x3"), official)
