"""Triton kernels of the fused exit head (DESIGN.md section 3), without autograd.

Training never materialises the (B, K, H, W) CAM: every kernel recomputes the CAM tile it
needs, cam[k, p] = W[k, :] @ h[:, p] + b[k], from a (C, BLOCK_P) slice of h.

Forward, three launches:
  _pool_kernel      grid (B, C blocks, pixel splits): per split, the sum of h over a fixed
                    pixel range; the splits are summed in torch (reads h once)
  logits = pooled @ W.T + b and the threshold logits[b, y_b]: a (B, C) x (C, K) matmul in torch
  _supp_kernel      grid (B * P blocks,): per pixel block, the CAM over all K (online
                    logsumexp over K blocks), KL to uniform, the mask cam[y] <= threshold;
                    writes the masked and unmasked sums and min cam[y] per (b, P block)
                    (reads h once)
  _supp_finish_kernel grid (B,): supp per sample, and the threshold kept within the
                    ground-truth CAM's range (see there), which backward then masks with
Backward, two launches (the terms without the CAM, W^T g_logits, g_logits^T pooled, are torch
matmuls on (B, K) and (B, C) tensors):
  _grad_h_kernel    grid (B * P blocks,): recomputes the CAM tile, writes dh once and the
                    per-pixel logsumexp and mask coefficient (B, P) for the next kernel.
                    K <= BLOCK_K: one CAM tile gives the statistics and dcam. K > BLOCK_K: a
                    logsumexp pass over the class blocks, then each dcam block is recomputed
                    once and W^T dcam is added into the program's own (C, BLOCK_P) slice of an
                    fp32 buffer (grad_h itself for fp32/fp64), cast into grad_h at the end.
  _grad_weight_kernel grid (splits, K blocks, C blocks): dW and db partial sums over a fixed
                    range of (sample, pixel block) units per split (at most 256), written to
                    a (splits, K, C) buffer and reduced afterwards with torch.sum
  A candidate, opt-in (exit_head_backward(..., one_pass=True)) where K <= BLOCK_K and
  C <= BLOCK_C (the C = 58 exits): _grad_h_and_weight_kernel, grid (splits,) as the dW
  kernel's, does both in one launch from one read of h per unit (DESIGN.md section 3's floor:
  h read once backward), with no (B, P) statistics in memory. Off by default until a GPU
  window has timed it against the two kernels (bench/device_time.py, bench/NOTES.md).
No float atomics anywhere and every reduction has a fixed order, so equal inputs give bitwise
equal outputs. Accumulation is fp32 (fp64 for fp64 inputs; that path uses
broadcast-multiply-sum instead of tl.dot, which has no fp64 form on every GPU, so gradcheck
can run on the kernels). fp32 dots use input_precision="ieee" (no TF32). For bf16/fp16 inputs
the backward's dots with fp32 operands (dcam against W and h) use TF32, whose rounding is
below the inputs' own; the interpreter computes them exactly, so only a GPU shows it. The
launchers' torch matmuls (logits = pooled W^T + b, the backward's dense terms) follow torch's
TF32 setting for fp32 inputs: with torch.backends.cuda.matmul.allow_tf32 (or
set_float32_matmul_precision("high")) the logits, and so the suppression mask's threshold,
are TF32-rounded too.

Memory access: the launcher classifies h (and dh) per sample as PIXELS_DENSE (NCHW: the
pixels of a channel are one run), CHANNELS_DENSE (NHWC, channels_last: the channels of a pixel
are one run) or STRIDED, and passes the largest power of two (<= 16 elements) dividing the
strides that start the runs. Offsets are then plain `run start + arange`, which the compiler
can prove contiguous and aligned, so loads and stores become 16-byte vectors where the shape
allows (bench/CODEGEN.md lists the widths per kernel and shape). Offsets that scale with the
batch or the pixel count are int64: B * H * W and K * H * W may pass 2^31. Grids put every
dimension that grows with B or P on axis 0 (axes 1 and 2 stop at 65,535).

The mask threshold is logits[b, y_b] as rounded to h's dtype, raised to min_p cam[y, p] where
rounding put it below every pixel (as the exact mean never is: a constant CAM ties every pixel
with it); forward returns it and the caller saves it, so forward and backward mask the same
pixels. With P = 1 the mask is all ones (the ground-truth CAM equals its own mean: a tie,
decided exactly rather than by rounding).

Block sizes (a heuristic, not autotuned, so the interpreter and the GPU run the same code):
BLOCK_K = next power of two of K clamped to [16, 64] (K = 10 is one block); BLOCK_C likewise
clamped to [16, 64] (16 for fp64); BLOCK_P = 32 when P >= 32 else 16 (16 for fp64). tl.dot
needs every dimension >= 16, which these bounds guarantee; padding lanes are masked.
Warps and pipeline stages (see _config) were chosen from the registers and spills of sm_90
cubins compiled ahead of time (bench/CODEGEN.md), not from timings: nothing spills at the
design shapes.
The pool and dW kernels split their pixel loops so that about _TARGET_PROGRAMS programs run
(a few per SM of an H100), each over a fixed range: more parallelism, same summation order.
The dW kernel also caps the units per split (_DW_MAX_UNITS): a long chain of dots drifts.

Non-finite values (NaN, +-inf in h, the weights, the bias or g_supp) come out where, and as,
the reference's (tests/test_exit_head_nonfinite.py): the mask multiplies kl and g_supp
(0 * NaN is NaN, as in the reference; a select would give 0), the online logsumexp shifts
by 0 where its max is infinite (as torch.logsumexp), and dcam is coef * softmax - coef / K,
the reference's two terms. On finite inputs these are the same operations as before, up to
the rounding of that last product.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backends


# Layouts of a (B, C, H, W) tensor within one sample (see the module docstring).
PIXELS_DENSE = tl.constexpr(0)
CHANNELS_DENSE = tl.constexpr(1)
STRIDED = tl.constexpr(2)


@triton.jit
def _in_range(offsets, size, ALIGN: tl.constexpr):
    """offsets < size, for offsets in runs starting at multiples of ALIGN with size a multiple
    of ALIGN: written so the compiler sees the mask constant over ALIGN lanes, which keeps
    masked loads and stores vectorised when size is not a multiple of 16."""
    return (offsets // ALIGN) < (size // ALIGN)


@triton.jit
def _sample_start(sample, stride_b, ALIGN: tl.constexpr):
    """Element offset of a sample: int64 (B * C * H * W may pass 2^31), a multiple of ALIGN."""
    return tl.multiple_of(sample.to(tl.int64) * stride_b, ALIGN)


@triton.jit
def _unit_pixels(unit, num_p_blocks, P, BLOCK_P: tl.constexpr, P_ALIGN: tl.constexpr):
    """(sample, pixel offsets, pixel mask) of one (sample, pixel block) unit of a split. The
    offsets are block index * BLOCK_P + arange: the compiler sees every run start at a
    multiple of BLOCK_P."""
    offs_p = (unit % num_p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    return unit // num_p_blocks, offs_p, _in_range(offs_p, P, P_ALIGN)


@triton.jit
def _tile_offsets(offs_c, offs_p, width, stride_c, stride_h, stride_w,
                  LAYOUT: tl.constexpr, ALIGN: tl.constexpr):
    """(BLOCK_C, BLOCK_P) int64 element offsets of x[c, p] within one sample.

    PIXELS_DENSE: c * stride_c + p, CHANNELS_DENSE: c + p * stride_w (stride_w is the pixel
    stride), STRIDED: c * stride_c + (p // W) * stride_h + (p % W) * stride_w. In the dense
    layouts every run starts at a multiple of ALIGN and the run itself is an arange, which is
    what lets the compiler vectorise the access."""
    c = offs_c.to(tl.int64)
    p = offs_p.to(tl.int64)
    if LAYOUT == PIXELS_DENSE:
        offsets = tl.multiple_of(c * stride_c, ALIGN)[:, None] + p[None, :]
    elif LAYOUT == CHANNELS_DENSE:
        offsets = c[:, None] + tl.multiple_of(p * stride_w, ALIGN)[None, :]
    else:
        pixel = (p // width) * stride_h + (p % width) * stride_w
        offsets = c[:, None] * stride_c + pixel[None, :]
    return offsets


@triton.jit
def _w_h(w, h, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
         UPCAST: tl.constexpr):
    """W @ h in ACC for a (BLOCK_K, BLOCK_C) block of W and a (BLOCK_C, BLOCK_P) tile of h in
    their own dtype: a tensor-core dot (operands upcast only for the interpreter), or
    broadcast-multiply-sum for fp64."""
    if USE_DOT:
        if UPCAST:
            w, h = w.to(ACC), h.to(ACC)
        return tl.dot(w, h, input_precision=PRECISION, out_dtype=ACC)
    return tl.sum(w.to(ACC)[:, :, None] * h.to(ACC)[None, :, :], axis=1)


@triton.jit
def _cam_tile(sample_ptr, w_ptr, b_ptr, offs_k, k_ok, offs_p, p_ok, C, width,
              stride_c, stride_h, stride_w, LAYOUT: tl.constexpr, ALIGN: tl.constexpr,
              C_ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_P: tl.constexpr,
              USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
              UPCAST: tl.constexpr):
    """cam[k, p] for a (BLOCK_K, BLOCK_P) tile: W[k, :] @ h[:, p] + b[k], looping over C."""
    acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = _in_range(offs_c, C, C_ALIGN)
        # K * C stays far below 2^31 (the weight is a (K, C) matrix in memory): int32 is safe.
        w = tl.load(w_ptr + offs_k[:, None] * C + offs_c[None, :],
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        h = tl.load(sample_ptr + _tile_offsets(offs_c, offs_p, width, stride_c, stride_h,
                                               stride_w, LAYOUT, ALIGN),
                    mask=c_ok[:, None] & p_ok[None, :], other=0.0)
        acc += _w_h(w, h, USE_DOT, PRECISION, ACC, UPCAST)
    bias = tl.load(b_ptr + offs_k, mask=k_ok, other=0.0).to(ACC)
    return acc + bias[:, None]


@triton.jit
def _lse_shift(running_max):
    """The shift of the online logsumexp: the running max, or 0 where that is infinite, as in
    torch.logsumexp. Shifting by an infinite max would give inf - inf = NaN: a pixel with a
    +inf CAM must give lse = +inf (the reference's, whose backward then keeps the other
    classes' softmax at 0), and a pixel whose classes so far are all -inf (a whole class
    block, with K > BLOCK_K) must have sum 0 so far, not NaN.
    A NaN CAM needs nothing here: exp(NaN - shift) makes the sum, hence lse, NaN (tl.max
    itself drops NaN, on the GPU and in the interpreter alike)."""
    return tl.where(tl.abs(running_max) == float("inf"), 0.0, running_max)


@triton.jit
def _class_block_update(cam, offs_k, k_ok, label, running_max, running_sum, cam_total, cam_true):
    """Folds one (BLOCK_K, BLOCK_P) CAM block into the per-pixel online logsumexp (running max
    and the sum of exponentials shifted by _lse_shift of it), the sum over classes and the
    ground-truth row. lse = _lse_shift(running_max) + log(running_sum) at the end."""
    cam_for_max = tl.where(k_ok[:, None], cam, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(cam_for_max, axis=0))
    shift = _lse_shift(new_max)  # == new_max whenever it is finite: the usual update
    running_sum = (running_sum * tl.exp(running_max - shift)
                   + tl.sum(tl.exp(cam_for_max - shift[None, :]), axis=0))
    cam_total += tl.sum(tl.where(k_ok[:, None], cam, 0.0), axis=0)
    cam_true += tl.sum(tl.where((offs_k == label)[:, None], cam, 0.0), axis=0)
    return new_max, running_sum, cam_total, cam_true


@triton.jit
def _single_block_statistics(cam, offs_k, k_ok, label, BLOCK_P: tl.constexpr,
                             ACC: tl.constexpr):
    """(lse, sum over classes, ground-truth row) per pixel when all K classes are one block."""
    running_max, running_sum, cam_total, cam_true = _class_block_update(
        cam, offs_k, k_ok, label, tl.full((BLOCK_P,), float("-inf"), dtype=ACC),
        tl.zeros((BLOCK_P,), dtype=ACC), tl.zeros((BLOCK_P,), dtype=ACC),
        tl.zeros((BLOCK_P,), dtype=ACC))
    return _lse_shift(running_max) + tl.log(running_sum), cam_total, cam_true


@triton.jit
def _suppression_coef(cam_true, threshold, grad_supp, p_ok, P, ACC: tl.constexpr):
    """coef[p] = g_supp / P * mask[p], the weight of dcam, 0 on padding pixels.

    (g / P) * mask, a product as in the reference's backward, not a select: a non-finite
    g_supp reaches the unsuppressed pixels as NaN there. (An unsuppressed pixel with a NaN
    softmax gets dcam = 0 * NaN = NaN either way, as the reference's 0 * exp(cam - lse).)"""
    mask = (cam_true <= threshold).to(ACC)
    return tl.where(p_ok, (grad_supp.to(ACC) / P) * mask, 0.0)


@triton.jit
def _logsumexp_over_classes(sample_ptr, w_ptr, b_ptr, label, K, C, offs_p, p_ok, width,
                            stride_c, stride_h, stride_w, LAYOUT: tl.constexpr,
                            ALIGN: tl.constexpr, C_ALIGN: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_P: tl.constexpr, USE_DOT: tl.constexpr,
                            PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Per pixel: logsumexp_k cam, sum_k cam and the ground-truth row cam[label], over K blocks
    (only one CAM block of BLOCK_K classes lives in registers at a time)."""
    running_max = tl.full((BLOCK_P,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_P,), dtype=ACC)
    cam_total = tl.zeros((BLOCK_P,), dtype=ACC)
    cam_true = tl.zeros((BLOCK_P,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        cam = _cam_tile(sample_ptr, w_ptr, b_ptr, offs_k, k_ok, offs_p, p_ok, C, width,
                        stride_c, stride_h, stride_w, LAYOUT, ALIGN, C_ALIGN,
                        BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
        running_max, running_sum, cam_total, cam_true = _class_block_update(
            cam, offs_k, k_ok, label, running_max, running_sum, cam_total, cam_true)
    return _lse_shift(running_max) + tl.log(running_sum), cam_total, cam_true


@triton.jit
def _pool_kernel(h_ptr, partial_ptr, C, P, width, blocks_per_split, num_splits,
                 stride_hb, stride_hc, stride_hh, stride_hw,
                 LAYOUT: tl.constexpr, ALIGN: tl.constexpr, C_ALIGN: tl.constexpr,
                 P_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """partial[b, s, c] = sum of h[b, c, p] over the pixel blocks of split s (a fixed range)."""
    pid_b, pid_c, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = _in_range(offs_c, C, C_ALIGN)
    sample = h_ptr + _sample_start(pid_b, stride_hb, ALIGN)
    acc = tl.zeros((BLOCK_C,), dtype=ACC)
    for i in range(0, blocks_per_split):
        # block index * BLOCK_P: the compiler sees every run start at a multiple of BLOCK_P
        offs_p = (pid_s * blocks_per_split + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = _in_range(offs_p, P, P_ALIGN)
        h = tl.load(sample + _tile_offsets(offs_c, offs_p, width, stride_hc, stride_hh,
                                           stride_hw, LAYOUT, ALIGN),
                    mask=c_ok[:, None] & p_ok[None, :], other=0.0)
        acc += tl.sum(h.to(ACC), axis=1)
    out = partial_ptr + (pid_b.to(tl.int64) * num_splits + pid_s) * C + offs_c
    tl.store(out, acc, mask=c_ok)


@triton.jit
def _supp_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, threshold_ptr, masked_ptr, unmasked_ptr,
                 min_true_ptr, K, C, P, width,
                 num_p_blocks, stride_hb, stride_hc, stride_hh, stride_hw,
                 LAYOUT: tl.constexpr, ALIGN: tl.constexpr, C_ALIGN: tl.constexpr,
                 P_ALIGN: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                 USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Per (sample, pixel block): sum_p m[p] kl[p], sum_p kl[p] (kl = lse_k cam - mean_k cam -
    log K) and min_p cam[y, p], for _supp_finish_kernel (the unmasked sum and the minimum
    serve a threshold that rounding put below every pixel)."""
    pid = tl.program_id(0)
    pid_b, pid_p = pid // num_p_blocks, pid % num_p_blocks
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = _in_range(offs_p, P, P_ALIGN)
    sample = h_ptr + _sample_start(pid_b, stride_hb, ALIGN)
    label = tl.load(labels_ptr + pid_b)
    lse, cam_total, cam_true = _logsumexp_over_classes(
        sample, w_ptr, b_ptr, label, K, C, offs_p, p_ok, width, stride_hc, stride_hh, stride_hw,
        LAYOUT, ALIGN, C_ALIGN, BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
    mask = (cam_true <= tl.load(threshold_ptr + pid_b)).to(ACC)
    num_classes = tl.zeros((BLOCK_P,), dtype=ACC) + K  # K in ACC: 1/K and log K exact to ACC
    kl_to_uniform = lse - cam_total / num_classes - tl.log(num_classes)
    # mask * kl, a product as in the reference, not a select: an unsuppressed pixel whose kl
    # is NaN or inf gives 0 * NaN = NaN, so a sample with a non-finite CAM (whose threshold
    # is then NaN, suppressing nothing) has supp NaN, not 0. Padding pixels add 0.
    # The partial buffers are (B, P blocks) row-major: program pid owns element pid.
    at = pid.to(tl.int64)
    tl.store(masked_ptr + at, tl.sum(tl.where(p_ok, mask * kl_to_uniform, 0.0), axis=0))
    tl.store(unmasked_ptr + at, tl.sum(tl.where(p_ok, kl_to_uniform, 0.0), axis=0))
    tl.store(min_true_ptr + at, tl.min(tl.where(p_ok, cam_true, float("inf")), axis=0))


@triton.jit
def _supp_finish_kernel(masked_ptr, unmasked_ptr, min_true_ptr, threshold_ptr, supp_ptr,
                        num_p_blocks, P, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Per sample: supp = (sum of its partials) / P in h's dtype, and the threshold kept within
    the ground-truth CAM's range, as the exact mean is (the reference's clamp).

    The threshold is logits[b, y_b], another rounding of the CAM's mean than the CAM's own
    pixels: a constant CAM (a dead ReLU stage gives h = relu(bias), constant per channel) ties
    every pixel with its mean, and a threshold 1 ulp below would drop them all. Where the
    threshold is below every pixel it becomes the smallest, the unmasked sum is supp, and
    the raised threshold (written in place) is what backward masks with. NaN compares false:
    a NaN threshold stays NaN."""
    b = tl.program_id(0)
    row = b.to(tl.int64) * num_p_blocks
    masked = tl.zeros((BLOCK,), dtype=ACC)
    unmasked = tl.zeros((BLOCK,), dtype=ACC)
    min_true = tl.full((BLOCK,), float("inf"), dtype=ACC)
    for start in range(0, num_p_blocks, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < num_p_blocks
        masked += tl.load(masked_ptr + row + offs, mask=ok, other=0.0)
        unmasked += tl.load(unmasked_ptr + row + offs, mask=ok, other=0.0)
        min_true = tl.minimum(min_true, tl.load(min_true_ptr + row + offs, mask=ok,
                                                other=float("inf")))
    smallest = tl.min(min_true, axis=0)
    threshold = tl.load(threshold_ptr + b)
    below = threshold < smallest
    total = tl.where(below, tl.sum(unmasked, axis=0), tl.sum(masked, axis=0))
    tl.store(threshold_ptr + b, tl.where(below, smallest, threshold))
    tl.store(supp_ptr + b, (total / P).to(supp_ptr.dtype.element_ty))


@triton.jit
def _w_t_dcam(w, dcam, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """sum_k W[k, c] dcam[k, p] for a (BLOCK_K, BLOCK_C) block of W already in ACC."""
    if USE_DOT:
        return tl.dot(tl.trans(w), dcam, input_precision=PRECISION, out_dtype=ACC)
    return tl.sum(w[:, :, None] * dcam[:, None, :], axis=0)


@triton.jit
def _accumulate_w_t_dcam(acc, w_ptr, offs_k, k_ok, offs_c, c_ok, C, dcam,
                         USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc[c, p] += sum_k W[k, c] dcam[k, p] for one (BLOCK_K, BLOCK_C) block of W."""
    w = tl.load(w_ptr + offs_k[:, None] * C + offs_c[None, :],
                mask=k_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
    return acc + _w_t_dcam(w, dcam, USE_DOT, PRECISION, ACC)


@triton.jit
def _grad_h_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, threshold_ptr, grad_supp_ptr, dense_ptr,
                   grad_h_ptr, scratch_ptr, lse_ptr, coef_ptr, K, C, P, width, num_p_blocks,
                   stride_hb, stride_hc, stride_hh, stride_hw,
                   stride_gb, stride_gc, stride_gh, stride_gw,
                   LAYOUT: tl.constexpr, ALIGN: tl.constexpr, C_ALIGN: tl.constexpr,
                   P_ALIGN: tl.constexpr,
                   G_LAYOUT: tl.constexpr, G_ALIGN: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                   SINGLE_K: tl.constexpr, SCRATCH: tl.constexpr, USE_DOT: tl.constexpr,
                   PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """dh[c, p] = sum_k W[k, c] dcam[k, p] + dense[b, c], dense = (W^T g_logits + g_pooled) / P,
    dcam[k, p] = coef[p] * (softmax_k cam[:, p] - 1/K), coef = g_supp / P * mask.

    SINGLE_K (K <= BLOCK_K): the CAM tile is computed once, gives the statistics and dcam, and
    dh is written one channel block at a time. Otherwise a first pass over the class blocks
    gives the logsumexp, a second recomputes each dcam block once and adds W^T dcam into the
    program's own (C, BLOCK_P) slice of an ACC buffer (grad_h itself when it is in ACC, else
    `scratch`, laid out like grad_h), which SCRATCH then converts into grad_h."""
    pid = tl.program_id(0)
    pid_b, pid_p = pid // num_p_blocks, pid % num_p_blocks
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = _in_range(offs_p, P, P_ALIGN)
    sample = h_ptr + _sample_start(pid_b, stride_hb, ALIGN)
    label = tl.load(labels_ptr + pid_b)
    inv_k = 1.0 / (tl.zeros((BLOCK_P,), dtype=ACC) + K)
    if SINGLE_K:
        offs_k = tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        cam = _cam_tile(sample, w_ptr, b_ptr, offs_k, k_ok, offs_p, p_ok, C, width,
                        stride_hc, stride_hh, stride_hw, LAYOUT, ALIGN, C_ALIGN,
                        BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
        lse, cam_total, cam_true = _single_block_statistics(cam, offs_k, k_ok, label,
                                                            BLOCK_P, ACC)
    else:
        lse, cam_total, cam_true = _logsumexp_over_classes(
            sample, w_ptr, b_ptr, label, K, C, offs_p, p_ok, width,
            stride_hc, stride_hh, stride_hw, LAYOUT, ALIGN, C_ALIGN,
            BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
    coef = _suppression_coef(cam_true, tl.load(threshold_ptr + pid_b),
                             tl.load(grad_supp_ptr + pid_b), p_ok, P, ACC)
    # dcam = coef * softmax - coef / K, the reference's two terms (logsumexp's and the mean's),
    # not coef * (softmax - 1/K): with an infinite coef that is inf - inf = NaN, as there.
    coef_over_k = coef * inv_k
    # (B, P) statistics: B * P may pass 2^31; rows start at multiples of P_ALIGN
    pixel_row = tl.multiple_of(pid_b.to(tl.int64) * P, P_ALIGN) + offs_p
    tl.store(lse_ptr + pixel_row, lse, mask=p_ok)
    tl.store(coef_ptr + pixel_row, coef, mask=p_ok)
    g_sample = _sample_start(pid_b, stride_gb, G_ALIGN)
    dense_row = dense_ptr + pid_b.to(tl.int64) * C
    if SINGLE_K:
        dcam = tl.where(k_ok[:, None],
                        coef[None, :] * tl.exp(cam - lse[None, :]) - coef_over_k[None, :], 0.0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = _in_range(offs_c, C, C_ALIGN)
            dense = tl.load(dense_row + offs_c, mask=c_ok, other=0.0).to(ACC)
            acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC) + dense[:, None]
            acc = _accumulate_w_t_dcam(acc, w_ptr, offs_k, k_ok, offs_c, c_ok, C, dcam,
                                       USE_DOT, PRECISION, ACC)
            offsets = g_sample + _tile_offsets(offs_c, offs_p, width, stride_gc, stride_gh,
                                               stride_gw, G_LAYOUT, G_ALIGN)
            tl.store(grad_h_ptr + offsets, acc.to(grad_h_ptr.dtype.element_ty),
                     mask=c_ok[:, None] & p_ok[None, :])
    else:
        # The ACC accumulator: starts at dense, then one read-add-write per class block. Only
        # this program touches these addresses, so no atomics; barriers order its own threads.
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = _in_range(offs_c, C, C_ALIGN)
            dense = tl.load(dense_row + offs_c, mask=c_ok, other=0.0).to(ACC)
            offsets = g_sample + _tile_offsets(offs_c, offs_p, width, stride_gc, stride_gh,
                                               stride_gw, G_LAYOUT, G_ALIGN)
            start = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC) + dense[:, None]
            tl.store(scratch_ptr + offsets, start, mask=c_ok[:, None] & p_ok[None, :])
        tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            offs_kb = k0 + tl.arange(0, BLOCK_K)
            kb_ok = offs_kb < K
            cam_b = _cam_tile(sample, w_ptr, b_ptr, offs_kb, kb_ok, offs_p, p_ok, C, width,
                              stride_hc, stride_hh, stride_hw, LAYOUT, ALIGN, C_ALIGN,
                              BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
            dcam_b = tl.where(kb_ok[:, None],
                              coef[None, :] * tl.exp(cam_b - lse[None, :]) - coef_over_k[None, :],
                              0.0)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = _in_range(offs_c, C, C_ALIGN)
                tile = scratch_ptr + g_sample + _tile_offsets(
                    offs_c, offs_p, width, stride_gc, stride_gh, stride_gw, G_LAYOUT, G_ALIGN)
                tile_ok = c_ok[:, None] & p_ok[None, :]
                acc = tl.load(tile, mask=tile_ok, other=0.0)
                acc = _accumulate_w_t_dcam(acc, w_ptr, offs_kb, kb_ok, offs_c, c_ok, C, dcam_b,
                                           USE_DOT, PRECISION, ACC)
                tl.store(tile, acc, mask=tile_ok)
            tl.debug_barrier()
        if SCRATCH:
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = _in_range(offs_c, C, C_ALIGN)
                offsets = g_sample + _tile_offsets(offs_c, offs_p, width, stride_gc, stride_gh,
                                                   stride_gw, G_LAYOUT, G_ALIGN)
                tile_ok = c_ok[:, None] & p_ok[None, :]
                acc = tl.load(scratch_ptr + offsets, mask=tile_ok, other=0.0)
                tl.store(grad_h_ptr + offsets, acc.to(grad_h_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dcam(cam, lse, coef, inv_k, k_ok, p_ok):
    """dcam[k, p] = coef[p] * softmax_k cam[:, p] - coef[p] / K, the reference's two terms
    (see _grad_h_kernel), 0 on padding lanes."""
    return tl.where(k_ok[:, None] & p_ok[None, :],
                    coef[None, :] * tl.exp(cam - lse[None, :]) - (coef * inv_k)[None, :], 0.0)


@triton.jit
def _accumulate_dw(acc_w, acc_b, dcam, h, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                   ACC: tl.constexpr):
    """One unit's dW[k, c] += sum_p dcam[k, p] h[c, p] and db[k] += sum_p dcam[k, p]; h in ACC."""
    if USE_DOT:
        acc_w += tl.dot(dcam, tl.trans(h), input_precision=PRECISION, out_dtype=ACC)
    else:
        acc_w += tl.sum(dcam[:, None, :] * h[None, :, :], axis=2)
    return acc_w, acc_b + tl.sum(dcam, axis=1)


@triton.jit
def _store_dw_partials(partial_w_ptr, partial_b_ptr, split, K, C, offs_k, k_ok, offs_c, c_ok,
                       acc_w, acc_b, store_bias):
    """A split's partial sums into the (splits, K, C) and (splits, K) buffers; db only where
    store_bias (one program per split and class block writes it)."""
    tl.store(partial_w_ptr + split.to(tl.int64) * K * C + offs_k[:, None] * C + offs_c[None, :],
             acc_w, mask=k_ok[:, None] & c_ok[None, :])
    tl.store(partial_b_ptr + split.to(tl.int64) * K + offs_k, acc_b, mask=k_ok & store_bias)


@triton.jit
def _grad_weight_kernel(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, partial_w_ptr, partial_b_ptr,
                        K, C, P, width, num_p_blocks, num_units, units_per_split,
                        stride_hb, stride_hc, stride_hh, stride_hw,
                        LAYOUT: tl.constexpr, ALIGN: tl.constexpr, C_ALIGN: tl.constexpr,
                   P_ALIGN: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                        USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                        UPCAST: tl.constexpr):
    """Partial sums over one split, a fixed range of (sample, pixel block) units:
    dW[k, c] = sum dcam[k, p] h[c, p], db[k] = sum dcam[k, p]. Splits are on grid axis 0:
    their number grows with B * P (at most _DW_MAX_UNITS units each)."""
    pid_s, pid_k, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = _in_range(offs_c, C, C_ALIGN)
    acc_w = tl.zeros((BLOCK_K, BLOCK_C), dtype=ACC)
    acc_b = tl.zeros((BLOCK_K,), dtype=ACC)
    inv_k = 1.0 / (tl.zeros((BLOCK_P,), dtype=ACC) + K)  # 1/K in ACC
    first = pid_s * units_per_split
    for unit in range(first, tl.minimum(first + units_per_split, num_units)):
        b, offs_p, p_ok = _unit_pixels(unit, num_p_blocks, P, BLOCK_P, P_ALIGN)
        sample = h_ptr + _sample_start(b, stride_hb, ALIGN)
        pixel_row = tl.multiple_of(b.to(tl.int64) * P, P_ALIGN) + offs_p
        coef = tl.load(coef_ptr + pixel_row, mask=p_ok, other=0.0)
        lse = tl.load(lse_ptr + pixel_row, mask=p_ok, other=0.0)
        cam = _cam_tile(sample, w_ptr, b_ptr, offs_k, k_ok, offs_p, p_ok, C, width,
                        stride_hc, stride_hh, stride_hw, LAYOUT, ALIGN, C_ALIGN,
                        BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
        dcam = _dcam(cam, lse, coef, inv_k, k_ok, p_ok)
        h = tl.load(sample + _tile_offsets(offs_c, offs_p, width, stride_hc, stride_hh,
                                           stride_hw, LAYOUT, ALIGN),
                    mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(ACC)
        acc_w, acc_b = _accumulate_dw(acc_w, acc_b, dcam, h, USE_DOT, PRECISION, ACC)
    _store_dw_partials(partial_w_ptr, partial_b_ptr, pid_s, K, C, offs_k, k_ok, offs_c, c_ok,
                       acc_w, acc_b, pid_c == 0)


@triton.jit
def _grad_h_and_weight_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, threshold_ptr, grad_supp_ptr,
                              dense_ptr, grad_h_ptr, partial_w_ptr, partial_b_ptr,
                              K, C, P, width, num_p_blocks, num_units, units_per_split,
                              stride_hb, stride_hc, stride_hh, stride_hw,
                              stride_gb, stride_gc, stride_gh, stride_gw,
                              LAYOUT: tl.constexpr, ALIGN: tl.constexpr, C_ALIGN: tl.constexpr,
                              P_ALIGN: tl.constexpr,
                              G_LAYOUT: tl.constexpr, G_ALIGN: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_P: tl.constexpr, USE_DOT: tl.constexpr,
                              PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """The whole backward in one pass over h, when K <= BLOCK_K and C <= BLOCK_C: one
    (C, BLOCK_P) tile of h per (sample, pixel block) unit, loaded once, gives the CAM, its
    statistics, dcam, dh (written once) and the unit's dW and db terms. The units of a split
    are summed in order into one (BLOCK_K, BLOCK_C) accumulator, as _grad_weight_kernel sums
    them (same splits, same cap), and no (B, P) statistics go through memory. The same
    arithmetic as _grad_h_kernel (SINGLE_K) and _grad_weight_kernel, term for term."""
    pid_s = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = _in_range(offs_c, C, C_ALIGN)
    # The weight and bias are read once per program, not once per unit.
    w = tl.load(w_ptr + offs_k[:, None] * C + offs_c[None, :],
                mask=k_ok[:, None] & c_ok[None, :], other=0.0)
    w_acc = w.to(ACC)
    bias = tl.load(b_ptr + offs_k, mask=k_ok, other=0.0).to(ACC)
    inv_k = 1.0 / (tl.zeros((BLOCK_P,), dtype=ACC) + K)  # 1/K in ACC
    acc_w = tl.zeros((BLOCK_K, BLOCK_C), dtype=ACC)
    acc_b = tl.zeros((BLOCK_K,), dtype=ACC)
    first = pid_s * units_per_split
    for unit in range(first, tl.minimum(first + units_per_split, num_units)):
        b, offs_p, p_ok = _unit_pixels(unit, num_p_blocks, P, BLOCK_P, P_ALIGN)
        tile_ok = c_ok[:, None] & p_ok[None, :]
        sample = h_ptr + _sample_start(b, stride_hb, ALIGN)
        h = tl.load(sample + _tile_offsets(offs_c, offs_p, width, stride_hc, stride_hh,
                                           stride_hw, LAYOUT, ALIGN),
                    mask=tile_ok, other=0.0)
        cam = _w_h(w, h, USE_DOT, PRECISION, ACC, UPCAST) + bias[:, None]
        lse, _, cam_true = _single_block_statistics(cam, offs_k, k_ok,
                                                    tl.load(labels_ptr + b), BLOCK_P, ACC)
        coef = _suppression_coef(cam_true, tl.load(threshold_ptr + b),
                                 tl.load(grad_supp_ptr + b), p_ok, P, ACC)
        dcam = _dcam(cam, lse, coef, inv_k, k_ok, p_ok)
        dense = tl.load(dense_ptr + b.to(tl.int64) * C + offs_c, mask=c_ok, other=0.0).to(ACC)
        grad_h = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC) + dense[:, None]
        grad_h += _w_t_dcam(w_acc, dcam, USE_DOT, PRECISION, ACC)
        acc_w, acc_b = _accumulate_dw(acc_w, acc_b, dcam, h.to(ACC), USE_DOT, PRECISION, ACC)
        tl.store(grad_h_ptr + _sample_start(b, stride_gb, G_ALIGN)
                 + _tile_offsets(offs_c, offs_p, width, stride_gc, stride_gh, stride_gw,
                                 G_LAYOUT, G_ALIGN),
                 grad_h.to(grad_h_ptr.dtype.element_ty), mask=tile_ok)
    _store_dw_partials(partial_w_ptr, partial_b_ptr, pid_s, K, C, offs_k, k_ok, offs_c, c_ok,
                       acc_w, acc_b, True)


# ----------------------------------------------------------------------------------------------
# Launchers

# About this many programs for the pool and dW kernels: a few per SM of an H100 (132 SMs).
_TARGET_PROGRAMS = 1024
# At most this many (sample, pixel block) units per dW split. A split sums its units with a
# chain of dots into one accumulator, and on an H200 a long chain drifted: at B*H*W past 2^31
# (66,560 units per split) dW was 0.93% off in fp16, against 0.054% with 256 units on the same
# data. More splits cost a (splits, K, C) fp32 buffer: with 256 units of 32 pixels it holds
# K/2048 of the bytes of h in fp32, and only inputs past 8M pixels (B*H*W) reach the cap.
_DW_MAX_UNITS = 256
_MAX_ALIGN = 16  # elements: 16 bytes and more for every dtype here


def _pow2_divisor(*values: int) -> int:
    """The largest power of two, at most _MAX_ALIGN, dividing every value (0 counts as any)."""
    align = _MAX_ALIGN
    for value in values:
        while align > 1 and value % align:
            align //= 2
    return align


def _layout(x: Tensor) -> Tuple[int, int, Tuple[int, int, int, int]]:
    """(LAYOUT, ALIGN, strides) of a (B, C, H, W) tensor for _tile_offsets.

    PIXELS_DENSE when pixel (y, x) sits at y * W + x, CHANNELS_DENSE when channels are
    adjacent and pixel p sits at p * S (the strides' last entry becomes S), else STRIDED."""
    _, channels, height, width = x.shape
    stride_b, stride_c, stride_h, stride_w = x.stride()
    if (width == 1 or stride_w == 1) and (height == 1 or stride_h == width):
        return PIXELS_DENSE.value, _pow2_divisor(stride_b, stride_c), x.stride()
    pixel_stride = stride_w if width > 1 else stride_h
    if ((channels == 1 or stride_c == 1) and (width == 1 or stride_w == pixel_stride)
            and (height == 1 or stride_h == width * pixel_stride)):
        return (CHANNELS_DENSE.value, _pow2_divisor(stride_b, pixel_stride),
                (stride_b, stride_c, stride_h, pixel_stride))
    return STRIDED.value, 1, x.stride()


def _config(h: Tensor, num_classes: int):
    channels, pixels = h.shape[1], h.shape[2] * h.shape[3]
    fp64 = h.dtype == torch.float64
    block_k = min(64, max(16, triton.next_power_of_2(num_classes)))
    block_c = 16 if fp64 else min(64, max(16, triton.next_power_of_2(channels)))
    block_p = 16 if (fp64 or pixels < 32) else 32
    layout, align, strides = _layout(h)
    return dict(
        block_k=block_k, block_c=block_c, block_p=block_p,
        layout=layout, align=align, strides=strides,
        # powers of two dividing C and P, for masks the compiler can see are run-constant
        c_align=_pow2_divisor(channels), p_align=_pow2_divisor(pixels),
        # From sm_90 cubins compiled ahead of time (bench/codegen.py, bench/CODEGEN.md), not
        # from timings: the choices under which ptxas spills at no design shape. 64 x 64
        # (K x C) tiles need 8 warps, and so does fp32, whose ieee dots run on FMA units with
        # the whole product in registers. The default 3 pipeline stages spilled 4-16 bytes;
        # the C loop has at most 8 iterations there, so double buffering is enough. The dW
        # kernel (a (BLOCK_K, BLOCK_C) accumulator besides the CAM tile) spills unless it has
        # 8 warps and no pipelining of its loop over (sample, pixel block) units.
        num_warps=8 if block_k * block_c >= 64 * 64 or h.dtype == torch.float32 else 4,
        num_stages=2, num_warps_dw=8, num_stages_dw=1,
        use_dot=not fp64,
        # fp32 stays fp32 in the dot (no TF32) so results match the reference closely.
        precision="ieee" if h.dtype == torch.float32 else "tf32",
        acc=tl.float64 if fp64 else tl.float32,
        acc_dtype=torch.float64 if fp64 else torch.float32,
        # The interpreter's tl.dot mishandles bf16 operands (numpy has no bf16): upcast there.
        upcast=h.dtype == torch.bfloat16 and _backends.triton_interpreted())


def _tile_args(cfg, weight_grad: bool = False):
    """The constexprs and launch options every CAM-tile kernel takes (the dW kernel's own)."""
    launch = ((cfg["num_warps_dw"], cfg["num_stages_dw"]) if weight_grad
              else (cfg["num_warps"], cfg["num_stages"]))
    return dict(BLOCK_K=cfg["block_k"], BLOCK_C=cfg["block_c"], BLOCK_P=cfg["block_p"],
                USE_DOT=cfg["use_dot"], PRECISION=cfg["precision"], ACC=cfg["acc"],
                UPCAST=cfg["upcast"], LAYOUT=cfg["layout"], ALIGN=cfg["align"],
                C_ALIGN=cfg["c_align"], P_ALIGN=cfg["p_align"],
                num_warps=launch[0], num_stages=launch[1])


def _splits(work_items: int, programs_per_split: int,
            max_per_split: Optional[int] = None) -> Tuple[int, int]:
    """(splits, items per split) so that about _TARGET_PROGRAMS programs run, each over a fixed
    contiguous range of work items (a deterministic split), with at most max_per_split items
    per split when given (then more programs run)."""
    splits = max(1, min(work_items, triton.cdiv(_TARGET_PROGRAMS, programs_per_split)))
    per_split = triton.cdiv(work_items, splits)
    if max_per_split is not None:
        per_split = min(per_split, max_per_split)
    return triton.cdiv(work_items, per_split), per_split


def _pool(h: Tensor, cfg) -> Tensor:
    batch, channels, height, width = h.shape
    pixels = height * width
    c_blocks = triton.cdiv(channels, cfg["block_c"])
    splits, blocks_per_split = _splits(triton.cdiv(pixels, cfg["block_p"]), batch * c_blocks)
    partial = torch.empty(batch, splits, channels, device=h.device, dtype=cfg["acc_dtype"])
    _pool_kernel[(batch, c_blocks, splits)](
        h, partial, channels, pixels, width, blocks_per_split, splits, *cfg["strides"],
        LAYOUT=cfg["layout"], ALIGN=cfg["align"], C_ALIGN=cfg["c_align"],
        P_ALIGN=cfg["p_align"], BLOCK_C=cfg["block_c"], BLOCK_P=cfg["block_p"], ACC=cfg["acc"])
    return partial.sum(dim=1) / pixels


def _threshold(logits: Tensor, labels: Tensor, dtype: torch.dtype, pixels: int) -> Tensor:
    """The mask threshold logits[b, y_b] (the GAP of the ground-truth CAM) in the accumulation
    dtype, a fresh contiguous tensor (_supp_finish_kernel raises it in place).

    It is taken from the logits as rounded to h's dtype (the tensor forward returns), so that
    the kernels compare with what the caller sees. With one pixel the ground-truth CAM equals
    its mean exactly, a tie the rounding of two different summation orders would decide at
    random: the threshold is +inf there (every pixel counts).
    """
    threshold = logits.gather(1, labels[:, None])[:, 0].to(dtype).to(logits.dtype)
    if pixels == 1:
        threshold = torch.full_like(threshold, math.inf)
    return threshold.contiguous()


def _one_tile(cfg, num_classes: int, channels: int) -> bool:
    return num_classes <= cfg["block_k"] and channels <= cfg["block_c"]


def one_pass_fits(h: Tensor, num_classes: int) -> bool:
    """Whether exit_head_backward(..., one_pass=True) can run on h: every class and every
    channel in one tile (at the section-8 shapes, the C = 58 exits: the largest maps)."""
    return _one_tile(_config(h, num_classes), num_classes, h.shape[1])


class ForwardOutput(NamedTuple):
    logits: Tensor                # (B, K) in h's dtype
    pooled: Tensor                # (B, C) in h's dtype
    supp: Optional[Tensor]        # (B,) in h's dtype; None without labels
    threshold: Optional[Tensor]   # (B,) in the accumulation dtype: the mask's, for backward


def _suppression(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, logits: Tensor,
                 cfg) -> Tuple[Tensor, Tensor]:
    """(supp (B,) in h's dtype, the mask threshold (B,) in ACC): two launches, h read once.
    weight, bias and labels contiguous; logits (B, K) in ACC."""
    batch, channels, height, width = h.shape
    num_classes, pixels = weight.shape[0], height * width
    num_p_blocks = triton.cdiv(pixels, cfg["block_p"])
    masked, unmasked, min_true = torch.empty(3, batch, num_p_blocks, device=h.device,
                                             dtype=cfg["acc_dtype"])
    threshold = _threshold(logits, labels, h.dtype, pixels)
    _supp_kernel[(batch * num_p_blocks,)](
        h, weight, bias, labels, threshold, masked, unmasked, min_true,
        num_classes, channels, pixels, width, num_p_blocks, *cfg["strides"], **_tile_args(cfg))
    supp = torch.empty(batch, device=h.device, dtype=h.dtype)
    _supp_finish_kernel[(batch,)](masked, unmasked, min_true, threshold, supp, num_p_blocks,
                                  pixels, BLOCK=min(1024, triton.next_power_of_2(num_p_blocks)),
                                  ACC=cfg["acc"])
    return supp, threshold


def exit_head_forward(h: Tensor, weight: Tensor, bias: Tensor,
                      labels: Optional[Tensor]) -> ForwardOutput:
    """(logits (B,K), pooled (B,C), supp (B,) or None, threshold (B,) or None); inputs checked
    by the caller. The threshold is what backward masks with (exit_head_backward's).

    The kernels index weight, bias and labels as dense vectors, so those are made contiguous
    here (a no-op when they are); h may have any strides."""
    batch, channels, height, width = h.shape
    num_classes = weight.shape[0]
    if batch == 0:
        empty = h.new_empty
        with_labels = labels is not None
        return ForwardOutput(empty(0, num_classes), empty(0, channels),
                             empty(0) if with_labels else None,
                             empty(0, dtype=_config(h, num_classes)["acc_dtype"])
                             if with_labels else None)
    weight, bias = weight.contiguous(), bias.contiguous()
    cfg = _config(h, num_classes)
    pooled = _pool(h, cfg)
    logits = torch.addmm(bias.to(cfg["acc_dtype"]), pooled, weight.to(cfg["acc_dtype"]).t())
    supp = threshold = None
    if labels is not None:
        supp, threshold = _suppression(h, weight, bias, labels.contiguous(), logits, cfg)
    return ForwardOutput(logits.to(h.dtype), pooled.to(h.dtype), supp, threshold)


def exit_head_backward(h: Tensor, weight: Tensor, bias: Tensor, labels: Optional[Tensor],
                       grad_logits: Optional[Tensor], grad_pooled: Optional[Tensor],
                       grad_supp: Optional[Tensor], logits: Optional[Tensor] = None,
                       pooled: Optional[Tensor] = None, threshold: Optional[Tensor] = None,
                       one_pass: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_h in h's layout, grad_weight (K,C), grad_bias (K,)); None gradients mean zero.

    pooled and threshold are exit_head_forward's outputs, saved; what is not given is
    recomputed (the threshold by the forward's suppression pass: one more read of h). logits
    serve only that recomputation (computed from pooled when not given).

    one_pass: the whole backward in one kernel (_grad_h_and_weight_kernel), h read once
    instead of twice; only where one_pass_fits. A candidate, off by default until a GPU
    window has timed it against the two kernels (bench/NOTES.md, bench/device_time.py)."""
    batch, channels, height, width = h.shape
    num_classes, pixels = weight.shape[0], height * width
    weight, bias = weight.contiguous(), bias.contiguous()
    cfg = _config(h, num_classes)
    if one_pass and not _one_tile(cfg, num_classes, channels):
        raise ValueError(
            f"exit_head_backward: one_pass needs every class and channel in one tile (K <= 64, "
            f"C <= {cfg['block_c'] if h.dtype == torch.float64 else 64}), got K={num_classes}, "
            f"C={channels}")
    acc = cfg["acc_dtype"]
    w32 = weight.to(acc)
    if pooled is None or batch == 0:
        pooled32 = _pool(h, cfg) if batch else h.new_zeros(0, channels, dtype=acc)
    else:
        pooled32 = pooled.to(acc)
    # The parts that do not involve the CAM: d(logits) and d(pooled) reach h uniformly.
    dense = torch.zeros(batch, channels, device=h.device, dtype=acc)
    grad_weight = torch.zeros(num_classes, channels, device=h.device, dtype=acc)
    grad_bias = torch.zeros(num_classes, device=h.device, dtype=acc)
    if grad_logits is not None:
        g = grad_logits.to(acc)
        dense += g @ w32
        grad_weight += g.t() @ pooled32
        grad_bias += g.sum(dim=0)
    if grad_pooled is not None:
        dense += grad_pooled.to(acc)
    dense /= max(pixels, 1)
    grad_h = torch.empty_like(h)  # keeps h's memory format (channels_last stays so)
    if batch == 0:
        return grad_h, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    if grad_supp is None:
        grad_h.copy_(dense[:, :, None, None].expand_as(h))
        return grad_h, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    if labels is None:
        raise ValueError("exit_head_backward: grad_supp needs the labels")
    labels = labels.contiguous()
    num_p_blocks = triton.cdiv(pixels, cfg["block_p"])
    num_units = batch * num_p_blocks  # (sample, pixel block) units
    if threshold is None:
        logits32 = (logits.to(acc) if logits is not None
                    else torch.addmm(bias.to(acc), pooled32, w32.t()))
        _, threshold = _suppression(h, weight, bias, labels, logits32, cfg)
    threshold = threshold.to(acc).contiguous()
    grad_supp = grad_supp.to(acc).contiguous()
    g_layout, g_align, g_strides = _layout(grad_h)
    # dW and db: each split is a fixed range of (sample, pixel block) units, summed in a fixed
    # order (one_pass fits one K block and one C block: the same splits as two kernels).
    k_blocks = triton.cdiv(num_classes, cfg["block_k"])
    c_blocks = triton.cdiv(channels, cfg["block_c"])
    splits, units_per_split = _splits(num_units, k_blocks * c_blocks, _DW_MAX_UNITS)
    partial_w = torch.empty(splits, num_classes, channels, device=h.device, dtype=acc)
    partial_b = torch.empty(splits, num_classes, device=h.device, dtype=acc)
    if one_pass:
        _grad_h_and_weight_kernel[(splits,)](
            h, weight, bias, labels, threshold, grad_supp, dense, grad_h, partial_w, partial_b,
            num_classes, channels, pixels, width, num_p_blocks, num_units, units_per_split,
            *cfg["strides"], *g_strides, G_LAYOUT=g_layout, G_ALIGN=g_align,
            **_tile_args(cfg, weight_grad=True))
    else:
        lse = torch.empty(batch, pixels, device=h.device, dtype=acc)
        coef = torch.empty_like(lse)
        single_k = k_blocks == 1
        # K > BLOCK_K accumulates dh over class blocks in an ACC buffer laid out like grad_h.
        use_scratch = not single_k and grad_h.dtype != acc
        scratch = torch.empty_like(h, dtype=acc) if use_scratch else grad_h
        assert scratch.stride() == grad_h.stride()
        _grad_h_kernel[(num_units,)](
            h, weight, bias, labels, threshold, grad_supp, dense, grad_h, scratch, lse, coef,
            num_classes, channels, pixels, width, num_p_blocks, *cfg["strides"], *g_strides,
            G_LAYOUT=g_layout, G_ALIGN=g_align, SINGLE_K=single_k, SCRATCH=use_scratch,
            **_tile_args(cfg))
        _grad_weight_kernel[(splits, k_blocks, c_blocks)](
            h, weight, bias, lse, coef, partial_w, partial_b, num_classes, channels, pixels,
            width, num_p_blocks, num_units, units_per_split, *cfg["strides"],
            **_tile_args(cfg, weight_grad=True))
    grad_weight += partial_w.sum(dim=0)
    grad_bias += partial_b.sum(dim=0)
    return grad_h, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@triton.jit
def _cam_kernel(h_ptr, w_ptr, b_ptr, cam_ptr, K, C, P, width, num_p_blocks,
                stride_hb, stride_hc, stride_hh, stride_hw,
                LAYOUT: tl.constexpr, ALIGN: tl.constexpr, C_ALIGN: tl.constexpr,
                P_ALIGN: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                UPCAST: tl.constexpr):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    pid_b, pid_p = pid // num_p_blocks, pid % num_p_blocks
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = _in_range(offs_p, P, P_ALIGN)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    cam = _cam_tile(h_ptr + _sample_start(pid_b, stride_hb, ALIGN), w_ptr, b_ptr, offs_k, k_ok,
                    offs_p, p_ok, C, width, stride_hc, stride_hh, stride_hw, LAYOUT, ALIGN,
                    C_ALIGN, BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
    # (B, K, P) row-major output: K * P alone may pass 2^31, so int64 throughout
    row = tl.multiple_of((pid_b.to(tl.int64) * K + offs_k.to(tl.int64)) * P, P_ALIGN)
    tl.store(cam_ptr + row[:, None] + offs_p[None, :], cam.to(cam_ptr.dtype.element_ty),
             mask=k_ok[:, None] & p_ok[None, :])


def class_activation_maps(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The (B, K, H, W) CAM in h's dtype (for pictures and inference; training never needs it)."""
    batch, channels, height, width = h.shape
    num_classes = weight.shape[0]
    cam = torch.empty(batch, num_classes, height, width, device=h.device, dtype=h.dtype)
    if cam.numel() == 0:
        return cam
    weight, bias = weight.contiguous(), bias.contiguous()
    cfg = _config(h, num_classes)
    num_p_blocks = triton.cdiv(height * width, cfg["block_p"])
    grid = (batch * num_p_blocks, triton.cdiv(num_classes, cfg["block_k"]))
    _cam_kernel[grid](h, weight, bias, cam, num_classes, channels, height * width, width,
                      num_p_blocks, *cfg["strides"], **_tile_args(cfg))
    return cam
