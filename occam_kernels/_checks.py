"""Input checks shared by the public ops, the custom ops under them (which anyone may call as
torch.ops.occam.*) and the references: a mistake is a ValueError or TypeError naming the op,
the argument, what it takes and what it got, never a kernel reading or writing past a buffer,
nor a broadcast answer. Metadata only (shapes, dtypes, devices), except the labels' range,
which is checked on the device without a host sync.

The fake implementations do not call them: under torch.compile a compacted batch has a size
known only at run time, and comparing two such sizes at trace time fails; the public ops
check before tracing reaches the custom op, and the op checks again when it runs.
"""
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(op: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(value).__name__}")


def _shape(tensor: Tensor) -> tuple:
    return tuple(tensor.shape)


def exit_head_inputs(op: str, h: Tensor, weight: Tensor, bias: Optional[Tensor],
                     labels: Optional[Tensor], *, pixels: bool = True,
                     flat_weight: bool = False) -> None:
    """h (B, C, H, W) float; weight (K, C), or (K, C, 1, 1) unless `flat_weight`; bias (K,) or
    None; labels (B,) int64 or None; one device and one float dtype. `pixels`: H, W >= 1 (the
    exit head averages over the H * W pixels; a CAM of no pixel is merely empty)."""
    _tensor(op, "h", h)
    if h.dim() != 4:
        raise ValueError(f"{op}: h must be a 4-D (B, C, H, W) tensor, got {_shape(h)}")
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: h must be float16/bfloat16/float32/float64, got {h.dtype}")
    if h.shape[1] < 1:
        # No channel to pool: the Triton launchers size their grids by C (and the CAM would
        # be the bias alone, which no exit computes).
        raise ValueError(f"{op}: h must have at least one channel (C >= 1), got {_shape(h)}")
    if pixels and (h.shape[2] < 1 or h.shape[3] < 1):
        raise ValueError(f"{op}: h must have H, W >= 1, got {_shape(h)} (the pooled mean and "
                         f"the suppression loss average over the H * W pixels)")
    _tensor(op, "weight", weight)
    conv_weight = weight.dim() == 4 and _shape(weight)[2:] == (1, 1)
    if weight.dim() != 2 and (flat_weight or not conv_weight):
        raise ValueError(f"{op}: weight must be (K, C)"
                         f"{'' if flat_weight else ' or a 1x1 conv weight (K, C, 1, 1)'}, got "
                         f"{_shape(weight)}")
    if weight.shape[1] != h.shape[1]:
        raise ValueError(f"{op}: weight has {weight.shape[1]} input channels but h has "
                         f"{h.shape[1]}")
    num_classes = weight.shape[0]
    if num_classes < 1:
        raise ValueError(f"{op}: weight must have at least one class (K >= 1)")
    if bias is not None:
        _tensor(op, "bias", bias)
        if _shape(bias) != (num_classes,):
            raise ValueError(f"{op}: bias must have shape ({num_classes},), got {_shape(bias)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.device != h.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but h is on {h.device}")
        if tensor.dtype != h.dtype:
            raise TypeError(f"{op}: {name} is {tensor.dtype} but h is {h.dtype}; cast them to "
                            f"one dtype (under autocast, cast h to the weight's)")
    if labels is None:
        return
    _tensor(op, "labels", labels)
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: labels must be int64 class indices, got {labels.dtype}")
    if _shape(labels) != (h.shape[0],):
        raise ValueError(f"{op}: labels must have shape ({h.shape[0]},), got {_shape(labels)}")
    if labels.device != h.device:
        raise ValueError(f"{op}: labels are on {labels.device} but h is on {h.device}")


def labels_in_range(op: str, labels: Optional[Tensor], num_classes: int) -> None:
    """Every label in [0, num_classes): checked on the device without a host sync; a failure
    raises (CPU) or trips a device-side assert (CUDA) instead of a kernel reading out of
    bounds."""
    if labels is not None and labels.numel():
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"{op}: labels must lie in [0, {num_classes})")


def per_sample(op: str, h: Tensor, weight: Tensor, **tensors: Optional[Tensor]) -> None:
    """Tensors of the exit head's outputs or their gradients, each None or of its shape on
    h's device: logits / grad_logits (B, K), pooled / grad_pooled (B, C), threshold /
    grad_supp (B,)."""
    batch, channels, num_classes = h.shape[0], h.shape[1], weight.shape[0]
    shapes = {"logits": (batch, num_classes), "grad_logits": (batch, num_classes),
              "pooled": (batch, channels), "grad_pooled": (batch, channels),
              "threshold": (batch,), "grad_supp": (batch,)}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        _tensor(op, name, tensor)
        if _shape(tensor) != shapes[name]:
            raise ValueError(f"{op}: {name} must have shape {shapes[name]}, got "
                             f"{_shape(tensor)}")
        if tensor.device != h.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but h is on {h.device}")
        if not tensor.is_floating_point():
            raise TypeError(f"{op}: {name} must be a float tensor, got {tensor.dtype}")


def compact_inputs(op: str, x: Tensor, keep: Tensor, index: Tensor) -> None:
    """x (B, ...) of any dtype, keep (B,) bool, index (B,) int64, on one device."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        got = _shape(x) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a tensor with a batch dimension, got {got}")
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"{op}: keep must be a bool tensor, got "
                        f"{getattr(keep, 'dtype', type(keep).__name__)}")
    if keep.dim() != 1 or keep.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: keep must have shape ({x.shape[0]},) to match x's batch size, "
                         f"got {_shape(keep)}")
    _tensor(op, "index", index)
    if index.dtype != torch.int64 or index.dim() != 1 or index.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: index must be an int64 tensor of shape ({x.shape[0]},), got "
                         f"{index.dtype} {_shape(index)}")
    if keep.device != x.device or index.device != x.device:
        raise ValueError(f"{op}: x, keep and index must be on one device, got x on {x.device}, "
                         f"keep on {keep.device}, index on {index.device}")
