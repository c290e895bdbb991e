"""OccamNet: exits with CAM-based heads and gates attached to the stages of any backbone."""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .exits import OccamExit
from .resnet import init_weights, resnet18_trunk


class OccamNet(nn.Module):
    """A backbone given as a stem and a list of stages, with one exit after every stage.

    forward(x, labels=None, return_cams=False) returns a dict of per-exit lists:
    "logits" (B,K), "gates" (B,), "pooled" (B,C), "supp" (B,) when labels are given, and
    "cams" (B,K,H,W) on request. Exit 0 sees a detached input: it does not train the trunk.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], num_classes: int,
                 stage_channels: Optional[Sequence[int]] = None, backend: str = "auto",
                 detach_first_exit: bool = True, probe_size: int = 64):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        if stage_channels is None:
            stage_channels = self._probe_channels(probe_size)
        if len(stage_channels) != len(self.stages):
            raise ValueError(f"{len(self.stages)} stages but {len(stage_channels)} channel counts")
        self.exits = nn.ModuleList(OccamExit(c, num_classes, backend) for c in stage_channels)
        self.num_classes = num_classes
        self.detach_first_exit = detach_first_exit

    @torch.no_grad()
    def _probe_channels(self, size: int) -> List[int]:
        # Run one small image through the backbone to learn each stage's output channels.
        training = self.training
        self.eval()
        x = self.stem(torch.zeros(1, 3, size, size))
        channels = []
        for stage in self.stages:
            x = stage(x)
            channels.append(x.shape[1])
        self.train(training)
        return channels

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def set_backend(self, backend: str) -> None:
        for exit_module in self.exits:
            exit_module.backend = backend

    def run_exit(self, index: int, features: Tensor, labels: Optional[Tensor] = None,
                 return_cam: bool = False) -> Dict[str, Tensor]:
        if index == 0 and self.detach_first_exit:
            features = features.detach()
        return self.exits[index](features, labels, return_cam)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None,
                return_cams: bool = False) -> Dict[str, List[Tensor]]:
        if x.dim() != 4:
            raise ValueError(f"OccamNet expects images (B, C, H, W), got {tuple(x.shape)}")
        if labels is not None and labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        out: Dict[str, List[Tensor]] = {"logits": [], "gates": [], "pooled": []}
        if labels is not None:
            out["supp"] = []
        if return_cams:
            out["cams"] = []
        features = self.stem(x)
        for index, stage in enumerate(self.stages):
            features = stage(features)
            exit_out = self.run_exit(index, features, labels, return_cams)
            out["logits"].append(exit_out["logits"])
            out["gates"].append(exit_out["gate"])
            out["pooled"].append(exit_out["pooled"])
            if labels is not None:
                out["supp"].append(exit_out["supp"])
            if return_cams:
                out["cams"].append(exit_out["cam"])
        return out

    @classmethod
    def from_torchvision(cls, model: nn.Module, num_classes: int, num_stages: int = 4,
                         backend: str = "auto", probe_size: int = 64) -> "OccamNet":
        """Attach exits to a torchvision ResNet (layer1..layer4) or to a model with a
        `features` sequence (MobileNet, EfficientNet, ...), whose last `num_stages`
        resolutions become the stages and everything before them the stem."""
        if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
            stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
            stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
            return cls(stem, stages, num_classes, backend=backend, probe_size=probe_size)
        if not hasattr(model, "features"):
            raise ValueError("from_torchvision understands ResNets (layer1..4) and models with a "
                             "`features` Sequential; build OccamNet(stem, stages, ...) directly")
        modules = list(model.features)
        with torch.no_grad():
            training = model.training
            model.eval()
            x, sizes = torch.zeros(1, 3, probe_size, probe_size), []
            for module in modules:
                x = module(x)
                sizes.append(x.shape[-1])
            model.train(training)
        # Stage boundaries: the last module at each output resolution.
        ends = [i for i in range(len(modules)) if i == len(modules) - 1 or sizes[i + 1] != sizes[i]]
        if len(ends) < num_stages + 1:
            raise ValueError(f"the features have {len(ends)} resolutions; need more than "
                             f"{num_stages} to make {num_stages} stages and a stem")
        ends = ends[-(num_stages + 1):]
        stem = nn.Sequential(*modules[:ends[0] + 1])
        stages = [nn.Sequential(*modules[a + 1:b + 1]) for a, b in zip(ends[:-1], ends[1:])]
        return cls(stem, stages, num_classes, backend=backend, probe_size=probe_size)


def occam_resnet18(num_classes: int, width: int = 58, input_size: int = 160,
                   backend: str = "auto") -> OccamNet:
    """OccamResNet-18: variable-width ResNet-18 (58/116/232/464 at width 58), an exit per stage.

    input_size 160 uses the 7x7/2 stem and max-pool; 64 the 3x3/1 stem without max-pool.
    """
    stem, stages, channels = resnet18_trunk(width, input_size)
    model = OccamNet(stem, stages, num_classes, stage_channels=channels, backend=backend)
    init_weights(model)
    return model
