"""compact(x, keep, index) -> (x[keep], index[keep]): DESIGN.md section 4.

Backends: the compiled extension (`cpu`, `cuda`: op occam::compact defined in csrc/), Triton
(op occam::compact_triton) and the reference. Both custom ops get a fake implementation
(the output size is data-dependent) and an autograd formula (scatter the gradient back).
"""
from typing import Optional, Tuple

import torch

from .. import reference
from .. import _backends
from .. import _checks

__all__ = ["compact"]

# Fastest first, per device: the CUDA kernel needs no JIT, the C++ loop beats the interpreter.
_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def _empty_rows_like(x: torch.Tensor, rows) -> torch.Tensor:
    """An empty tensor of `rows` rows with x's trailing shape and memory format."""
    shape = (rows, *x.shape[1:])
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return x.new_empty(shape)


def _fake_compact(x, keep, index):
    # The batch size may itself be symbolic, so only the lower bound is declared.
    kept = torch.library.get_ctx().new_dynamic_size()
    return _empty_rows_like(x, kept), index.new_empty((kept,))


def _setup_context(ctx, inputs, output):
    x, keep, _ = inputs
    ctx.x_shape = x.shape
    ctx.save_for_backward(keep)


def _backward(ctx, grad_kept, grad_index):
    (keep,) = ctx.saved_tensors
    grad_x = grad_kept.new_zeros(ctx.x_shape)
    grad_x[keep] = grad_kept
    return grad_x, None, None


@torch.library.custom_op("occam::compact_triton", mutates_args=())
def _compact_triton(x: torch.Tensor, keep: torch.Tensor,
                    index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    from ..triton.compact import compact as triton_compact  # triton reads TRITON_INTERPRET at import
    # Checked here, not only by compact: the kernel reads keep and writes index by x's rows
    # (the C++ op occam::compact checks its own).
    _checks.compact_inputs("occam::compact_triton", x, keep, index)
    with _backends.on_device_of(x):   # Triton launches on the current device
        return triton_compact(x, keep, index)


_compact_triton.register_fake(_fake_compact)
_compact_triton.register_autograd(_backward, setup_context=_setup_context)

if _backends.load_extension()[0] is not None:
    torch.library.register_fake("occam::compact")(_fake_compact)
    torch.library.register_autograd("occam::compact", _backward, setup_context=_setup_context)


def compact(x: torch.Tensor, keep: torch.Tensor, index: Optional[torch.Tensor] = None, *,
            backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the rows of x where `keep` is true, in their original order.

    Args:
        x: (B, ...) any dtype; contiguous and channels_last inputs keep their memory format.
        keep: (B,) bool.
        index: (B,) int64 positions carried along (default arange(B)), so the caller knows
            where each kept row came from.
        backend: "auto", "reference", "cpu", "cuda" or "triton".
    Returns:
        (x[keep], index[keep]). On CUDA the count is read by the host once.
    """
    if index is None:
        index = torch.arange(x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else 0,
                             device=getattr(x, "device", None))
    _checks.compact_inputs("compact", x, keep, index)
    name = _backends.resolve(backend, x.device, _PREFERENCE.get(x.device.type, ()))
    if name == "reference":
        return reference.compact_unchecked(x, keep, index)
    if name == "triton":
        return _compact_triton(x, keep, index)
    return torch.ops.occam.compact(x, keep, index)
