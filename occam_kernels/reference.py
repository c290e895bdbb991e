"""Pure-PyTorch references of every op: the specification the kernels are tested against.

They are written from the formulas of DESIGN.md sections 3 and 4, use only differentiable
torch operations (so autograd gives the reference backward) and compute in the dtype of
their inputs. Upcast to float64 for a precise answer.
"""
import math
from typing import Optional, Tuple

import torch

from . import _checks

__all__ = ["compact_reference", "exit_head_reference", "class_activation_maps_reference"]


def compact_reference(x: torch.Tensor, keep: torch.Tensor,
                      index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (and of index, default arange(B)) where keep is true, in their order."""
    if index is None and isinstance(x, torch.Tensor) and x.dim():
        index = torch.arange(x.shape[0], device=x.device)
    _checks.compact_inputs("compact_reference", x, keep, index)
    return compact_unchecked(x, keep, index)


# The *_unchecked functions are the formulas alone, for callers that checked the inputs
# already (the public ops): the check, a pass over the labels among it, is not done twice.

def compact_unchecked(x: torch.Tensor, keep: torch.Tensor,
                      index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return x[keep], index[keep]


def _flat_weight(weight: torch.Tensor) -> torch.Tensor:
    # A 1x1 convolution weight (K, C, 1, 1) is the same map as a (K, C) matrix.
    return weight.reshape(weight.shape[0], weight.shape[1])


def class_activation_maps_reference(h: torch.Tensor, weight: torch.Tensor,
                                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """cam[b,k,y,x] = sum_c W[k,c] h[b,c,y,x] + bias[k]: the 1x1 CAM convolution."""
    _checks.exit_head_inputs("class_activation_maps_reference", h, weight, bias, None,
                             pixels=False)
    return class_activation_maps_unchecked(h, weight, bias)


def class_activation_maps_unchecked(h: torch.Tensor, weight: torch.Tensor,
                                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    cam = torch.einsum("kc,bchw->bkhw", _flat_weight(weight), h)
    if bias is not None:
        cam = cam + bias[None, :, None, None]
    return cam


def exit_head_reference(h: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None,
                        labels: Optional[torch.Tensor] = None,
                        threshold: Optional[torch.Tensor] = None):
    """(logits, pooled, supp) of one exit, DESIGN.md section 3.

    pooled (B,C) is the global average of h; logits (B,K) the global average of the CAM (equal
    to W @ pooled + b); supp (B,) is the per-sample CAM-suppression loss: the mean over pixels
    of KL(uniform || softmax_k cam) on the pixels whose ground-truth CAM is at or below its
    mean (None without labels). The mask is piecewise constant and carries no gradient.

    threshold (B,), optional, replaces the CAM's mean (= logits[b, y_b]) in the mask: a kernel
    that compares against its logits rounded to a low-precision dtype is checked with that
    same threshold.
    """
    op = "exit_head_reference"
    _checks.exit_head_inputs(op, h, weight, bias, labels)
    _checks.labels_in_range(op, labels, weight.shape[0])
    if labels is not None and threshold is not None:
        _checks.per_sample(op, h, weight, threshold=threshold)
    return exit_head_unchecked(h, weight, bias, labels, threshold)


def exit_head_unchecked(h: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None,
                        labels: Optional[torch.Tensor] = None,
                        threshold: Optional[torch.Tensor] = None):
    weight2d = _flat_weight(weight)
    pooled = h.mean(dim=(2, 3))
    logits = pooled @ weight2d.t()
    if bias is not None:
        logits = logits + bias
    if labels is None:
        return logits, pooled, None
    num_classes = weight2d.shape[0]
    cam = class_activation_maps_unchecked(h, weight, bias).flatten(2)       # (B, K, P)
    cam_true = cam.gather(1, labels[:, None, None].expand(-1, 1, cam.shape[2]))[:, 0]
    if threshold is None:
        # The CAM's own mean, which logits[b, y_b] equals in exact arithmetic. Taken from the
        # CAM, a 1x1 map ties with it exactly; taken from the logits (another rounding of
        # W @ h + b), fp64 on CUDA once put that pixel 1 ulp above and dropped it. Kept within
        # the CAM's range, as the exact mean is: the rounded mean of a constant CAM (a dead
        # ReLU stage, h = 0, CAM = bias) fell 1 ulp below it and dropped every pixel.
        threshold = cam_true.mean(dim=1).clamp(*torch.aminmax(cam_true, dim=1))
    threshold = threshold.detach().to(logits.dtype)[:, None]                 # (B, 1)
    mask = (cam_true <= threshold).detach().to(cam.dtype)                    # (B, P)
    kl_to_uniform = torch.logsumexp(cam, dim=1) - cam.mean(dim=1) - math.log(num_classes)
    supp = (mask * kl_to_uniform).mean(dim=1)
    return logits, pooled, supp
