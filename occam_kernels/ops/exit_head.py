"""exit_head and class_activation_maps: DESIGN.md section 3.

The fused path is two torch.library custom ops (forward, backward) around the Triton
kernels, tied together with register_autograd; both have fake implementations so
torch.compile(fullgraph=True) traces through them. Autograd saves h, the weights, labels,
logits, pooled and the suppression mask's threshold (B,): never a (B, K, H, W) tensor.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .. import _backends

__all__ = ["ExitHeadOutput", "exit_head", "class_activation_maps"]

# The interpreter is far slower than the reference on CPU, so "auto" picks Triton on GPU only.
_PREFERENCE = {"cuda": ("triton",)}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ExitHeadOutput(NamedTuple):
    logits: Tensor            # (B, K): GAP of the CAM
    pooled: Tensor            # (B, C): GAP of h, the gate's input
    supp: Optional[Tensor]    # (B,): CAM-suppression KL per sample; None without labels


def _accumulation_dtype(h: Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


@torch.library.custom_op("occam::exit_head_fused", mutates_args=())
def _exit_head_fused(h: Tensor, weight: Tensor, bias: Tensor,
                     labels: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits, pooled, supp, threshold): the threshold (B,) is the suppression mask's, saved
    for backward (the public API drops it)."""
    from ..triton.exit_head import exit_head_forward  # triton reads TRITON_INTERPRET at import
    logits, pooled, supp, threshold = exit_head_forward(h, weight, bias, labels)
    if supp is None:  # a custom op returns tensors only; the public API turns this into None
        supp = h.new_zeros(h.shape[0])
        threshold = h.new_zeros(h.shape[0], dtype=_accumulation_dtype(h))
    return logits, pooled, supp, threshold


@_exit_head_fused.register_fake
def _(h, weight, bias, labels):
    batch, channels = h.shape[:2]
    return (h.new_empty(batch, weight.shape[0]), h.new_empty(batch, channels),
            h.new_empty(batch), h.new_empty(batch, dtype=_accumulation_dtype(h)))


@torch.library.custom_op("occam::exit_head_fused_backward", mutates_args=())
def _exit_head_fused_backward(
        h: Tensor, weight: Tensor, bias: Tensor, labels: Optional[Tensor], logits: Tensor,
        pooled: Tensor, threshold: Tensor, grad_logits: Optional[Tensor],
        grad_pooled: Optional[Tensor],
        grad_supp: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    from ..triton.exit_head import exit_head_backward
    return exit_head_backward(h, weight, bias, labels, grad_logits, grad_pooled, grad_supp,
                              logits=logits, pooled=pooled, threshold=threshold)


@_exit_head_fused_backward.register_fake
def _(h, weight, bias, labels, logits, pooled, threshold, grad_logits, grad_pooled, grad_supp):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    h, weight, bias, labels = inputs
    logits, pooled, _, threshold = output
    ctx.mark_non_differentiable(threshold)
    ctx.has_labels = labels is not None
    # An output the loss does not use gets None, not zeros: the CAM term of the backward then
    # is not run at all, as the reference does not differentiate supp when the loss ignores
    # it. With zeros it would run, and give 0 * NaN = NaN at a pixel whose CAM is not finite.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, weight, bias, labels, logits, pooled, threshold)


def _backward(ctx, grad_logits, grad_pooled, grad_supp, _grad_threshold):
    h, weight, bias, labels, logits, pooled, threshold = ctx.saved_tensors
    if not ctx.has_labels:
        labels, grad_supp = None, None
    grad_h, grad_weight, grad_bias = _exit_head_fused_backward(
        h, weight, bias, labels, logits, pooled, threshold, grad_logits, grad_pooled, grad_supp)
    return grad_h, grad_weight, grad_bias, None


_exit_head_fused.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(h, weight, bias, labels) -> None:
    if not isinstance(h, Tensor) or h.dim() != 4:
        raise ValueError(f"exit_head: h must be a 4-D (B, C, H, W) tensor, got "
                         f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"exit_head: h must be float16/bfloat16/float32/float64, got {h.dtype}")
    if weight.dim() not in (2, 4) or (weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)):
        raise ValueError(f"exit_head: weight must be (K, C) or a 1x1 conv weight (K, C, 1, 1), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[1] != h.shape[1]:
        raise ValueError(f"exit_head: weight has {weight.shape[1]} input channels but h has "
                         f"{h.shape[1]}")
    num_classes = weight.shape[0]
    if num_classes < 1:
        raise ValueError("exit_head: weight must have at least one class (K >= 1)")
    if h.shape[1] < 1:
        # No channel to pool: the Triton launchers size their grids by C (and the CAM would
        # be the bias alone, which no exit computes).
        raise ValueError(f"exit_head: h must have at least one channel (C >= 1), got "
                         f"{tuple(h.shape)}")
    if bias is not None and tuple(bias.shape) != (num_classes,):
        raise ValueError(f"exit_head: bias must have shape ({num_classes},), got "
                         f"{tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.device != h.device:
            raise ValueError(f"exit_head: {name} is on {tensor.device} but h is on {h.device}")
        if tensor.dtype != h.dtype:
            raise TypeError(f"exit_head: {name} is {tensor.dtype} but h is {h.dtype}; cast "
                            f"them to one dtype (under autocast, cast h to the weight's)")
    if labels is None:
        return
    if labels.dtype != torch.int64:
        raise TypeError(f"exit_head: labels must be int64 class indices, got {labels.dtype}")
    if tuple(labels.shape) != (h.shape[0],):
        raise ValueError(f"exit_head: labels must have shape ({h.shape[0]},), got "
                         f"{tuple(labels.shape)}")
    if labels.device != h.device:
        raise ValueError(f"exit_head: labels are on {labels.device} but h is on {h.device}")
    if labels.numel():
        # Checked on the device without a host sync; a failure raises (CPU) or trips a
        # device-side assert (CUDA) instead of reading out of bounds.
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"exit_head: labels must lie in [0, {num_classes})")


def exit_head(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
              labels: Optional[Tensor] = None, *, backend: str = "auto") -> ExitHeadOutput:
    """Fused exit head of an OccamNet exit: (logits, pooled, supp), DESIGN.md section 3.

    Args:
        h: (B, C, H, W) CAM input (after the exit's last ReLU); any strides, channels_last too.
        weight: (K, C) or (K, C, 1, 1) (an nn.Conv2d(C, K, 1) weight passes as it is).
        bias: (K,) or None.
        labels: (B,) int64 in [0, K), or None (then supp is None).
        backend: "auto" (Triton on GPU, reference on CPU), "triton" or "reference".

    An empty batch (B = 0) is an ordinary case, as after a compaction that nobody survived:
    every backend returns empty (0, K), (0, C) and (0,) outputs, and zero weight and bias
    gradients. Empty spatial dimensions (H or W = 0) are an error: the pooled mean and the
    suppression loss average over H * W pixels, which would be 0 / 0 = NaN.
    """
    _check_inputs(h, weight, bias, labels)
    if h.shape[2] < 1 or h.shape[3] < 1:
        raise ValueError(f"exit_head: h must have H, W >= 1, got {tuple(h.shape)} (the pooled "
                         f"mean and the suppression loss average over the H * W pixels)")
    name = _backends.resolve(backend, h.device, _PREFERENCE.get(h.device.type, ()))
    if name not in ("reference", "triton"):
        raise ValueError(f"exit_head has no {name!r} backend; use 'triton' or 'reference'")
    if name == "reference":
        return ExitHeadOutput(*reference.exit_head_reference(h, weight, bias, labels))
    weight2d = weight.reshape(weight.shape[0], weight.shape[1]).contiguous()
    bias_or_zero = bias if bias is not None else weight2d.new_zeros(weight2d.shape[0])
    logits, pooled, supp, _ = _exit_head_fused(h, weight2d, bias_or_zero.contiguous(), labels)
    return ExitHeadOutput(logits, pooled, supp if labels is not None else None)


@torch.library.custom_op("occam::class_activation_maps_fused", mutates_args=())
def _class_activation_maps_fused(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    from ..triton.exit_head import class_activation_maps as triton_cams
    return triton_cams(h, weight, bias)


@_class_activation_maps_fused.register_fake
def _(h, weight, bias):
    return h.new_empty(h.shape[0], weight.shape[0], h.shape[2], h.shape[3])


def _cam_setup_context(ctx, inputs, output):
    h, weight, _ = inputs
    ctx.save_for_backward(h, weight)


def _cam_backward(ctx, grad_cam):
    # The CAM is a 1x1 convolution: its gradients are two contractions and a sum.
    h, weight = ctx.saved_tensors
    grad_h = torch.einsum("kc,bkhw->bchw", weight, grad_cam)
    grad_weight = torch.einsum("bkhw,bchw->kc", grad_cam, h)
    return grad_h, grad_weight, grad_cam.sum(dim=(0, 2, 3))


_class_activation_maps_fused.register_autograd(_cam_backward, setup_context=_cam_setup_context)


def class_activation_maps(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                          backend: str = "auto") -> Tensor:
    """The (B, K, H, W) class activation maps, for pictures and inference."""
    _check_inputs(h, weight, bias, None)
    name = _backends.resolve(backend, h.device, _PREFERENCE.get(h.device.type, ()))
    if name not in ("reference", "triton"):
        raise ValueError(f"class_activation_maps has no {name!r} backend; use 'triton' or "
                         f"'reference'")
    if name == "reference":
        return reference.class_activation_maps_reference(h, weight, bias)
    weight2d = weight.reshape(weight.shape[0], weight.shape[1]).contiguous()
    bias_or_zero = bias if bias is not None else weight2d.new_zeros(weight2d.shape[0])
    return _class_activation_maps_fused(h, weight2d, bias_or_zero.contiguous())
