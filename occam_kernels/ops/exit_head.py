"""exit_head and class_activation_maps: DESIGN.md section 3.

The fused path is two torch.library custom ops (forward, backward) around the Triton
kernels, tied together with register_autograd; both have fake implementations so
torch.compile(fullgraph=True) traces through them. Autograd saves h, the weights, labels,
pooled and the suppression mask's threshold (B,): never a (B, K, H, W) tensor. Not the
logits, which backward does not read, so that they may be edited in place (`logits /= T`) as
the reference's may; pooled is saved for the weight's gradient, as the reference's matmul
saves it, so an in-place edit of pooled is refused by both (edit a copy).

The ops run with autocast off: the kernels accumulate in fp32 for bf16/fp16 inputs
(DESIGN.md section 3), and the torch matmuls among them would otherwise follow an enclosing
autocast down to bf16. They run with h's GPU current (_backends.on_device_of).
"""
import contextlib
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .. import _backends
from .. import _checks

__all__ = ["ExitHeadOutput", "exit_head", "class_activation_maps"]

# The interpreter is far slower than the reference on CPU, so "auto" picks Triton on GPU only.
_PREFERENCE = {"cuda": ("triton",)}


class ExitHeadOutput(NamedTuple):
    logits: Tensor            # (B, K): GAP of the CAM
    pooled: Tensor            # (B, C): GAP of h, the gate's input
    supp: Optional[Tensor]    # (B,): CAM-suppression KL per sample; None without labels


def _accumulation_dtype(h: Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _launching_on(h: Tensor):
    """Autocast off, and h's GPU the current device (where Triton launches)."""
    with torch.autocast(h.device.type, enabled=False), _backends.on_device_of(h):
        yield


@torch.library.custom_op("occam::exit_head_fused", mutates_args=())
def _exit_head_fused(h: Tensor, weight: Tensor, bias: Tensor,
                     labels: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits, pooled, supp, threshold): the threshold (B,) is the suppression mask's, saved
    for backward (the public API drops it)."""
    from ..triton.exit_head import exit_head_forward  # triton reads TRITON_INTERPRET at import
    # Checked here, not only by exit_head: the kernels index by these shapes and labels.
    op = "occam::exit_head_fused"
    _checks.exit_head_inputs(op, h, weight, bias, labels, flat_weight=True)
    _checks.labels_in_range(op, labels, weight.shape[0])
    with _launching_on(h):
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
        h: Tensor, weight: Tensor, bias: Tensor, labels: Optional[Tensor],
        pooled: Tensor, threshold: Tensor, grad_logits: Optional[Tensor],
        grad_pooled: Optional[Tensor],
        grad_supp: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_h, grad_weight, grad_bias). The labels' range is the forward op's check (autograd
    passes the labels it saved): on a GPU a second one would add launches to every step."""
    from ..triton.exit_head import exit_head_backward
    op = "occam::exit_head_fused_backward"
    _checks.exit_head_inputs(op, h, weight, bias, labels, flat_weight=True)
    _checks.per_sample(op, h, weight, pooled=pooled, threshold=threshold,
                       grad_logits=grad_logits, grad_pooled=grad_pooled, grad_supp=grad_supp)
    with _launching_on(h):
        return exit_head_backward(h, weight, bias, labels, grad_logits, grad_pooled,
                                  grad_supp, pooled=pooled, threshold=threshold)


@_exit_head_fused_backward.register_fake
def _(h, weight, bias, labels, pooled, threshold, grad_logits, grad_pooled, grad_supp):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    h, weight, bias, labels = inputs
    _, pooled, _, threshold = output
    ctx.mark_non_differentiable(threshold)
    ctx.has_labels = labels is not None
    # An output the loss does not use gets None, not zeros: the CAM term of the backward then
    # is not run at all, as the reference does not differentiate supp when the loss ignores
    # it. With zeros it would run, and give 0 * NaN = NaN at a pixel whose CAM is not finite.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, weight, bias, labels, pooled, threshold)


def _backward(ctx, grad_logits, grad_pooled, grad_supp, _grad_threshold):
    h, weight, bias, labels, pooled, threshold = ctx.saved_tensors
    if not ctx.has_labels:
        labels, grad_supp = None, None
    grad_h, grad_weight, grad_bias = _exit_head_fused_backward(
        h, weight, bias, labels, pooled, threshold, grad_logits, grad_pooled, grad_supp)
    return grad_h, grad_weight, grad_bias, None


_exit_head_fused.register_autograd(_backward, setup_context=_setup_context)


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
    _checks.exit_head_inputs("exit_head", h, weight, bias, labels)
    name = _backends.resolve(backend, h.device, _PREFERENCE.get(h.device.type, ()))
    if name not in ("reference", "triton"):
        raise ValueError(f"exit_head has no {name!r} backend; use 'triton' or 'reference'")
    if name == "reference":   # the fused op checks the labels' range itself
        _checks.labels_in_range("exit_head", labels, weight.shape[0])
        return ExitHeadOutput(*reference.exit_head_unchecked(h, weight, bias, labels))
    weight2d = weight.reshape(weight.shape[0], weight.shape[1]).contiguous()
    bias_or_zero = bias if bias is not None else weight2d.new_zeros(weight2d.shape[0])
    logits, pooled, supp, _ = _exit_head_fused(h, weight2d, bias_or_zero.contiguous(), labels)
    return ExitHeadOutput(logits, pooled, supp if labels is not None else None)


@torch.library.custom_op("occam::class_activation_maps_fused", mutates_args=())
def _class_activation_maps_fused(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    from ..triton.exit_head import class_activation_maps as triton_cams
    _checks.exit_head_inputs("occam::class_activation_maps_fused", h, weight, bias, None,
                             pixels=False, flat_weight=True)
    with _launching_on(h):
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
    _checks.exit_head_inputs("class_activation_maps", h, weight, bias, None, pixels=False)
    name = _backends.resolve(backend, h.device, _PREFERENCE.get(h.device.type, ()))
    if name not in ("reference", "triton"):
        raise ValueError(f"class_activation_maps has no {name!r} backend; use 'triton' or "
                         f"'reference'")
    if name == "reference":
        return reference.class_activation_maps_unchecked(h, weight, bias)
    weight2d = weight.reshape(weight.shape[0], weight.shape[1]).contiguous()
    bias_or_zero = bias if bias is not None else weight2d.new_zeros(weight2d.shape[0])
    return _class_activation_maps_fused(h, weight2d, bias_or_zero.contiguous())
