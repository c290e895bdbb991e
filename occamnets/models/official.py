"""Weights from the official OccamNets code (github.com/erobic/occam-nets-v1) in our models.

The official OccamResNet-18 and ours hold the same parameters under other names (both have
10,491,411 at 10 classes): the official trunk is a torchvision-style ResNet (conv1, bn1,
layerN, downsample), its exits live under multi_exit.exits.N with the exit convs in a `convs`
module. `official_key` renames one key; `load_official_state_dict` loads a whole official
state_dict (or the PyTorch Lightning checkpoint the official trainer writes, whose keys start
with "model.") into `occam_resnet18(K, width, stem)` built with the official width and stem
("7x7" for occam_resnet18, "3x3" for occam_resnet18_img64).
"""
import re
from typing import Dict, Mapping

from torch import Tensor, nn

# (official pattern, ours): the first match renames the key; the rest of the key is kept.
_RENAMES = (
    (r"conv1\.", "stem.0."),
    (r"bn1\.", "stem.1."),
    (r"layer(\d+)\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.shortcut."),
    (r"layer(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}."),
    (r"multi_exit\.exits\.(\d+)\.convs\.conv1\.", lambda m: f"exits.{m[1]}.features.0."),
    (r"multi_exit\.exits\.(\d+)\.convs\.norm1\.", lambda m: f"exits.{m[1]}.features.1."),
    (r"multi_exit\.exits\.(\d+)\.convs\.conv2\.", lambda m: f"exits.{m[1]}.features.3."),
    (r"multi_exit\.exits\.(\d+)\.(cam|gate\.net)\.", lambda m: f"exits.{m[1]}.{m[2]}."),
)


def official_key(key: str) -> str:
    """Our name for the official parameter or buffer `key`; a KeyError for a key with no
    counterpart (the official model has no other parameters)."""
    for pattern, replacement in _RENAMES:
        match = re.match(pattern, key)
        if match:
            new = replacement if isinstance(replacement, str) else replacement(match)
            return new + key[match.end():]
    raise KeyError(f"{key!r} is not a parameter of the official OccamResNet")


def from_official_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """An official OccamResNet state_dict, or the official trainer's Lightning checkpoint
    (a dict with "state_dict", keys prefixed "model."), renamed to our keys."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    renamed, unknown = {}, []
    for key, value in state_dict.items():
        key = key[len("model."):] if key.startswith("model.") else key
        try:
            renamed[official_key(key)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not the official OccamResNet's: "
                       f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return renamed


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load official weights into `model` (strict: every parameter and buffer must match in
    name and shape, so a wrong width, stem or class count fails with the names)."""
    model.load_state_dict(from_official_state_dict(state_dict), strict=True)
    return model
