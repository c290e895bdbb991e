"""OccamNet: exits with CAM-based heads and gates attached to the stages of any backbone, and
early-exit inference (DESIGN.md section 6)."""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import occam_kernels

from .exits import OccamExit
from .outputs import EarlyExitOutput, ExitOutput, OccamOutput
from .resnet import init_weights, resnet18_trunk


class OccamNet(nn.Module):
    """A backbone given as a stem and a list of stages, with one exit after every stage.

    forward(x, labels=None, return_cams=False) -> OccamOutput, every exit on every sample (for
    training and analysis); early_exit(x) -> EarlyExitOutput, what inference runs. Exit 0 sees
    a detached input, so it does not train the trunk; exits before `first_inference_exit`
    (exit 0 by default) train but are not used at inference.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], num_classes: int,
                 stage_channels: Optional[Sequence[int]] = None, backend: str = "auto",
                 detach_first_exit: bool = True, probe_size: int = 64,
                 first_inference_exit: int = 1):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        if stage_channels is None:
            stage_channels = self._probe_channels(probe_size)
        if len(stage_channels) != len(self.stages):
            raise ValueError(f"{len(self.stages)} stages but {len(stage_channels)} channel counts")
        if not 0 <= first_inference_exit < len(self.stages):
            raise ValueError(f"first_inference_exit must lie in [0, {len(self.stages)}), got "
                             f"{first_inference_exit}")
        self.exits = nn.ModuleList(OccamExit(c, num_classes, backend) for c in stage_channels)
        self.exits.to(**_placement(self.stages))   # beside a backbone already moved or cast
        self.num_classes = num_classes
        self.detach_first_exit = detach_first_exit
        self.first_inference_exit = first_inference_exit

    @torch.no_grad()
    def _probe_channels(self, size: int) -> List[int]:
        # Run one small image through the backbone to learn each stage's output channels.
        training = self.training
        self.eval()
        x = self.stem(torch.zeros(1, 3, size, size, **_placement(self.stem)))
        channels = []
        for stage in self.stages:
            x = stage(x)
            channels.append(x.shape[1])
        self.train(training)
        return channels

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def _check_images(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"OccamNet expects images (B, C, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"OccamNet expects float images, got {x.dtype}: convert uint8 "
                            f"images with x.float() / 255 and normalise them first")
        weight = self.exits[0].cam.weight
        if x.device != weight.device:
            raise ValueError(f"the images are on {x.device}, the model on {weight.device}")

    def _exit(self, index: int, features: Tensor, labels: Optional[Tensor] = None,
              return_cam: bool = False) -> ExitOutput:
        if index == 0 and self.detach_first_exit:
            features = features.detach()
        return self.exits[index](features, labels, return_cam)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None,
                return_cams: bool = False) -> OccamOutput:
        self._check_images(x)
        if labels is not None and labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        exits = []
        features = self.stem(x)
        for index, stage in enumerate(self.stages):
            features = stage(features)
            exits.append(self._exit(index, features, labels, return_cams))
        return OccamOutput(tuple(exits))

    @torch.no_grad()
    def early_exit(self, x: Tensor, threshold: float = 0.5, compaction: bool = True,
                   compaction_backend: str = "auto") -> EarlyExitOutput:
        """Each sample stops at the first exit from `first_inference_exit` on whose gate is
        >= threshold (compared in float64), otherwise at the last exit.

        A non-finite gate (NaN) never fires, so its sample goes on to a deeper exit; the
        sample is flagged in `nonfinite`, as is one whose returned logits are not finite. (The
        official code lets a NaN gate exit at once, without a word.)

        With compaction each later stage runs only on the samples still active:
        `occam_kernels.compact` gathers them after every exit (one host read of the count per
        exit, which the next stage needs to launch anyway; nothing else is read on the host).
        compaction=False runs every exit on every sample and selects afterwards, with no host
        read at all: the same result, the check and the speed baseline.
        """
        if self.training:
            raise RuntimeError("early_exit needs the model in eval mode (BatchNorm must use its "
                               "running statistics): call model.eval() first")
        self._check_images(x)
        first, last = self.first_inference_exit, self.num_exits - 1
        if first >= last:
            raise ValueError(f"early exit needs an exit before the last to leave at: exits "
                             f"{first}..{last} are used")
        batch = x.shape[0]
        logits_out = torch.zeros(batch, self.num_classes, device=x.device)
        exit_out = torch.full((batch,), last, dtype=torch.int64, device=x.device)
        nonfinite_out = torch.zeros(batch, dtype=torch.bool, device=x.device)
        features = self.stem(x)
        for t in range(first):
            features = self.stages[t](features)
        index = torch.arange(batch, device=x.device)
        for t in range(first, last + 1):
            if features.shape[0] == 0:
                break  # everyone has exited
            features = self.stages[t](features)
            out = self._exit(t, features)
            logits = out.logits.float()
            bad_logits = ~torch.isfinite(logits).all(1)
            if t < last:
                done = out.gate.double() >= threshold
                bad = ~torch.isfinite(out.gate) | (done & bad_logits)
            else:
                done = torch.ones_like(bad_logits)
                bad = bad_logits
            if not compaction:
                undecided = exit_out == last
                take = undecided & done
                nonfinite_out |= undecided & bad
                logits_out = torch.where(take[:, None], logits, logits_out)
                exit_out = torch.where(take & (t < last), torch.full_like(exit_out, t), exit_out)
                continue
            nonfinite_out[index] |= bad
            if t == last:
                logits_out[index] = logits
                break
            # Write finished rows at their original positions without reading `done` on the host.
            logits_out[index] = torch.where(done[:, None], logits, logits_out[index])
            exit_out[index] = torch.where(done, torch.full_like(index, t), exit_out[index])
            features, index = occam_kernels.compact(features, ~done, index,
                                                    backend=compaction_backend)
        # Counted by comparison, not torch.bincount: on CUDA bincount reads its input's min and
        # max on the host, two syncs per call where compaction's counts should be the only ones.
        counts = (exit_out[:, None] == torch.arange(self.num_exits, device=x.device)).sum(0)
        return EarlyExitOutput(logits_out, exit_out, counts, nonfinite_out)

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
            x, sizes = torch.zeros(1, 3, probe_size, probe_size, **_placement(model)), []
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


def occam_resnet18(num_classes: int, width: int = 58, stem: str = "7x7",
                   backend: str = "auto") -> OccamNet:
    """OccamResNet-18: variable-width ResNet-18 (58/116/232/464 at width 58), an exit per stage.

    stem "7x7" (7x7/2 conv and max-pool, for 160 px images) or "3x3" (3x3/1, small images).
    """
    stem, stages, channels = resnet18_trunk(width, stem)
    model = OccamNet(stem, stages, num_classes, stage_channels=channels, backend=backend)
    init_weights(model)
    return model


def _placement(module: nn.Module) -> Dict[str, object]:
    """The device and floating dtype of a module's first parameter (CPU fp32 without one):
    where a probe image must be, and where the exits go, for a backbone already on a GPU."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return {"device": parameter.device, "dtype": parameter.dtype}
    return {"device": torch.device("cpu"), "dtype": torch.float32}
