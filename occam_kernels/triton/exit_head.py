"""Triton kernels of the fused exit head (DESIGN.md section 3), without autograd.

Training never materialises the (B, K, H, W) CAM: every kernel recomputes the CAM tile it
needs, cam[k, p] = W[k, :] @ h[:, p] + b[k], from a (C, BLOCK_P) slice of h.

Forward, two launches:
  _pool_kernel      grid (B, C blocks): pooled[b, c] = mean_p h[b, c, p]     (reads h once)
  logits = pooled @ W.T + b and the threshold logits[b, y_b]: a (B, C) x (C, K) matmul in torch
  _supp_kernel      grid (B, P blocks): per pixel block, the CAM over all K (online
                    logsumexp over K blocks), KL to uniform, the mask cam[y] <= threshold;
                    writes one partial sum per (b, P block)                 (reads h once)
Backward, two launches (the terms without the CAM, W^T g_logits, g_logits^T pooled, are torch
matmuls on (B, K) and (B, C) tensors):
  _grad_h_kernel    grid (B, P blocks): recomputes the CAM tile, writes dh once and the
                    per-pixel logsumexp and mask coefficient (B, P) for the next kernel.
                    K <= BLOCK_K: one CAM tile gives the statistics and dcam. K > BLOCK_K: a
                    logsumexp pass over the class blocks, then each dcam block is recomputed
                    once and W^T dcam is added into the program's own (C, BLOCK_P) slice of an
                    fp32 buffer (grad_h itself for fp32/fp64), cast into grad_h at the end.
  _grad_weight_kernel grid (K blocks, C blocks, splits of B): dW and db partial sums per
                    split (a fixed range of samples), written to a (splits, K, C) buffer and
                    reduced afterwards with torch.sum
No float atomics anywhere and every reduction has a fixed order, so equal inputs give bitwise
equal outputs. Accumulation is fp32 (fp64 for fp64 inputs; that path uses
broadcast-multiply-sum instead of tl.dot, which has no fp64 form on every GPU, so gradcheck
can run on the kernels). fp32 dots use input_precision="ieee" (no TF32).

The mask threshold is logits[b, y_b] as rounded to h's dtype (what forward returns and the
caller saves), so forward and backward mask the same pixels; with P = 1 the mask is all ones
(the ground-truth CAM equals its own mean: a tie, decided exactly rather than by rounding).

Block sizes (a heuristic, not autotuned, so the interpreter and the GPU run the same code):
BLOCK_K = next power of two of K clamped to [16, 64] (K = 10 is one block); BLOCK_C likewise
clamped to [16, 64] (16 for fp64); BLOCK_P = 32 when P >= 32 else 16 (16 for fp64). tl.dot
needs every dimension >= 16, which these bounds guarantee; padding lanes are masked.
num_warps = 8 for 64 x 64 (K x C) tiles (4 otherwise), and for the dW kernel from 16 x 64 up:
chosen from the register counts of sm_90 cubins compiled ahead of time, not from timings.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import _backends


@triton.jit
def _cam_tile(h_sample_ptr, w_ptr, b_ptr, offs_k, k_ok, p_offset, p_ok, C, stride_hc,
              BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
              USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
              UPCAST: tl.constexpr):
    """cam[k, p] for a (BLOCK_K, BLOCK_P) tile: W[k, :] @ h[:, p] + b[k], looping over C."""
    acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        w = tl.load(w_ptr + offs_k[:, None] * C + offs_c[None, :],
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        h = tl.load(h_sample_ptr + offs_c[:, None] * stride_hc + p_offset[None, :],
                    mask=c_ok[:, None] & p_ok[None, :], other=0.0)
        if USE_DOT:
            if UPCAST:
                w, h = w.to(ACC), h.to(ACC)
            acc += tl.dot(w, h, input_precision=PRECISION, out_dtype=ACC)
        else:
            acc += tl.sum(w.to(ACC)[:, :, None] * h.to(ACC)[None, :, :], axis=1)
    bias = tl.load(b_ptr + offs_k, mask=k_ok, other=0.0).to(ACC)
    return acc + bias[:, None]


@triton.jit
def _pixel_offsets(pid_p, P, width, stride_hh, stride_hw, BLOCK_P: tl.constexpr):
    """Pixel indices of a block and their memory offsets (h may be strided or channels_last)."""
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    p_offset = (offs_p // width).to(tl.int64) * stride_hh + (offs_p % width).to(tl.int64) * stride_hw
    return offs_p, p_ok, p_offset


@triton.jit
def _class_block_update(cam, offs_k, k_ok, label, running_max, running_sum, cam_total, cam_true):
    """Folds one (BLOCK_K, BLOCK_P) CAM block into the per-pixel online logsumexp (running max
    and rescaled sum of exponentials), the sum over classes and the ground-truth row."""
    cam_for_max = tl.where(k_ok[:, None], cam, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(cam_for_max, axis=0))
    running_sum = (running_sum * tl.exp(running_max - new_max)
                   + tl.sum(tl.exp(cam_for_max - new_max[None, :]), axis=0))
    cam_total += tl.sum(tl.where(k_ok[:, None], cam, 0.0), axis=0)
    cam_true += tl.sum(tl.where((offs_k == label)[:, None], cam, 0.0), axis=0)
    return new_max, running_sum, cam_total, cam_true


@triton.jit
def _logsumexp_over_classes(h_sample_ptr, w_ptr, b_ptr, label, K, C, p_offset, p_ok, stride_hc,
                            BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                            USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                            UPCAST: tl.constexpr):
    """Per pixel: logsumexp_k cam, sum_k cam and the ground-truth row cam[label], over K blocks
    (only one CAM block of BLOCK_K classes lives in registers at a time)."""
    running_max = tl.full((BLOCK_P,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_P,), dtype=ACC)
    cam_total = tl.zeros((BLOCK_P,), dtype=ACC)
    cam_true = tl.zeros((BLOCK_P,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        cam = _cam_tile(h_sample_ptr, w_ptr, b_ptr, offs_k, k_ok, p_offset, p_ok, C, stride_hc,
                        BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
        running_max, running_sum, cam_total, cam_true = _class_block_update(
            cam, offs_k, k_ok, label, running_max, running_sum, cam_total, cam_true)
    return running_max + tl.log(running_sum), cam_total, cam_true


@triton.jit
def _pool_kernel(h_ptr, pooled_ptr, C, P, width, stride_hb, stride_hc, stride_hh, stride_hw,
                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    sample = h_ptr + pid_b.to(tl.int64) * stride_hb
    acc = tl.zeros((BLOCK_C,), dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        p_offset = (offs_p // width).to(tl.int64) * stride_hh + (offs_p % width).to(tl.int64) * stride_hw
        h = tl.load(sample + offs_c[:, None] * stride_hc + p_offset[None, :],
                    mask=c_ok[:, None] & p_ok[None, :], other=0.0)
        acc += tl.sum(h.to(ACC), axis=1)
    tl.store(pooled_ptr + pid_b * C + offs_c, acc / P, mask=c_ok)


@triton.jit
def _supp_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, threshold_ptr, partial_ptr, K, C, P, width,
                 num_p_blocks, stride_hb, stride_hc, stride_hh, stride_hw,
                 BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                 USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                 UPCAST: tl.constexpr):
    """One partial sum per (sample, pixel block): sum_p m[p] (lse_k cam - mean_k cam - log K)."""
    pid_b, pid_p = tl.program_id(0), tl.program_id(1)
    offs_p, p_ok, p_offset = _pixel_offsets(pid_p, P, width, stride_hh, stride_hw, BLOCK_P)
    sample = h_ptr + pid_b.to(tl.int64) * stride_hb
    label = tl.load(labels_ptr + pid_b)
    lse, cam_total, cam_true = _logsumexp_over_classes(
        sample, w_ptr, b_ptr, label, K, C, p_offset, p_ok, stride_hc,
        BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
    suppressed = p_ok & (cam_true <= tl.load(threshold_ptr + pid_b))
    num_classes = tl.zeros((BLOCK_P,), dtype=ACC) + K  # K in ACC: 1/K and log K exact to ACC
    kl_to_uniform = lse - cam_total / num_classes - tl.log(num_classes)
    tl.store(partial_ptr + pid_b * num_p_blocks + pid_p,
             tl.sum(tl.where(suppressed, kl_to_uniform, 0.0), axis=0))


@triton.jit
def _accumulate_w_t_dcam(acc, w_ptr, offs_k, k_ok, offs_c, c_ok, C, dcam,
                         USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc[c, p] += sum_k W[k, c] dcam[k, p] for one (BLOCK_K, BLOCK_C) block of W."""
    w = tl.load(w_ptr + offs_k[:, None] * C + offs_c[None, :],
                mask=k_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
    if USE_DOT:
        acc += tl.dot(tl.trans(w), dcam, input_precision=PRECISION, out_dtype=ACC)
    else:
        acc += tl.sum(w[:, :, None] * dcam[:, None, :], axis=0)
    return acc


@triton.jit
def _grad_h_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, threshold_ptr, grad_supp_ptr, dense_ptr,
                   grad_h_ptr, scratch_ptr, lse_ptr, coef_ptr, K, C, P, width,
                   stride_hb, stride_hc, stride_hh, stride_hw,
                   stride_gb, stride_gc, stride_gh, stride_gw,
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
    pid_b, pid_p = tl.program_id(0), tl.program_id(1)
    offs_p, p_ok, p_offset = _pixel_offsets(pid_p, P, width, stride_hh, stride_hw, BLOCK_P)
    sample = h_ptr + pid_b.to(tl.int64) * stride_hb
    label = tl.load(labels_ptr + pid_b)
    inv_k = 1.0 / (tl.zeros((BLOCK_P,), dtype=ACC) + K)
    if SINGLE_K:
        offs_k = tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        cam = _cam_tile(sample, w_ptr, b_ptr, offs_k, k_ok, p_offset, p_ok, C, stride_hc,
                        BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
        running_max, running_sum, cam_total, cam_true = _class_block_update(
            cam, offs_k, k_ok, label, tl.full((BLOCK_P,), float("-inf"), dtype=ACC),
            tl.zeros((BLOCK_P,), dtype=ACC), tl.zeros((BLOCK_P,), dtype=ACC),
            tl.zeros((BLOCK_P,), dtype=ACC))
        lse = running_max + tl.log(running_sum)
    else:
        lse, cam_total, cam_true = _logsumexp_over_classes(
            sample, w_ptr, b_ptr, label, K, C, p_offset, p_ok, stride_hc,
            BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
    suppressed = p_ok & (cam_true <= tl.load(threshold_ptr + pid_b))
    grad_supp = tl.load(grad_supp_ptr + pid_b).to(ACC)
    coef = tl.where(suppressed, grad_supp / P, 0.0)
    tl.store(lse_ptr + pid_b * P + offs_p, lse, mask=p_ok)
    tl.store(coef_ptr + pid_b * P + offs_p, coef, mask=p_ok)
    g_offset = (pid_b.to(tl.int64) * stride_gb + (offs_p // width).to(tl.int64) * stride_gh
                + (offs_p % width).to(tl.int64) * stride_gw)
    if SINGLE_K:
        dcam = tl.where(k_ok[:, None], coef[None, :] * (tl.exp(cam - lse[None, :]) - inv_k[None, :]),
                        0.0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            dense = tl.load(dense_ptr + pid_b * C + offs_c, mask=c_ok, other=0.0).to(ACC)
            acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC) + dense[:, None]
            acc = _accumulate_w_t_dcam(acc, w_ptr, offs_k, k_ok, offs_c, c_ok, C, dcam,
                                       USE_DOT, PRECISION, ACC)
            tl.store(grad_h_ptr + offs_c[:, None] * stride_gc + g_offset[None, :],
                     acc.to(grad_h_ptr.dtype.element_ty), mask=c_ok[:, None] & p_ok[None, :])
    else:
        # The ACC accumulator: starts at dense, then one read-add-write per class block. Only
        # this program touches these addresses, so no atomics; barriers order its own threads.
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            dense = tl.load(dense_ptr + pid_b * C + offs_c, mask=c_ok, other=0.0).to(ACC)
            tl.store(scratch_ptr + offs_c[:, None] * stride_gc + g_offset[None, :],
                     tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC) + dense[:, None],
                     mask=c_ok[:, None] & p_ok[None, :])
        tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            offs_kb = k0 + tl.arange(0, BLOCK_K)
            kb_ok = offs_kb < K
            cam_b = _cam_tile(sample, w_ptr, b_ptr, offs_kb, kb_ok, p_offset, p_ok, C, stride_hc,
                              BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
            dcam_b = tl.where(kb_ok[:, None],
                              coef[None, :] * (tl.exp(cam_b - lse[None, :]) - inv_k[None, :]), 0.0)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = offs_c < C
                tile = scratch_ptr + offs_c[:, None] * stride_gc + g_offset[None, :]
                tile_ok = c_ok[:, None] & p_ok[None, :]
                acc = tl.load(tile, mask=tile_ok, other=0.0)
                acc = _accumulate_w_t_dcam(acc, w_ptr, offs_kb, kb_ok, offs_c, c_ok, C, dcam_b,
                                           USE_DOT, PRECISION, ACC)
                tl.store(tile, acc, mask=tile_ok)
            tl.debug_barrier()
        if SCRATCH:
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_ok = offs_c < C
                offsets = offs_c[:, None] * stride_gc + g_offset[None, :]
                tile_ok = c_ok[:, None] & p_ok[None, :]
                acc = tl.load(scratch_ptr + offsets, mask=tile_ok, other=0.0)
                tl.store(grad_h_ptr + offsets, acc.to(grad_h_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _grad_weight_kernel(h_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, partial_w_ptr, partial_b_ptr,
                        B, K, C, P, width, samples_per_split,
                        stride_hb, stride_hc, stride_hh, stride_hw,
                        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                        USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                        UPCAST: tl.constexpr):
    """Partial sums over one split of the batch: dW[k, c] = sum dcam[k, p] h[c, p], db = sum dcam."""
    pid_k, pid_c, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc_w = tl.zeros((BLOCK_K, BLOCK_C), dtype=ACC)
    acc_b = tl.zeros((BLOCK_K,), dtype=ACC)
    inv_k = 1.0 / (tl.zeros((BLOCK_K, BLOCK_P), dtype=ACC) + K)  # 1/K in ACC
    first = pid_s * samples_per_split
    for b in range(first, tl.minimum(first + samples_per_split, B)):
        sample = h_ptr + tl.cast(b, tl.int64) * stride_hb
        for p0 in range(0, P, BLOCK_P):
            offs_p, p_ok, p_offset = _pixel_offsets(p0 // BLOCK_P, P, width, stride_hh, stride_hw,
                                                    BLOCK_P)
            coef = tl.load(coef_ptr + b * P + offs_p, mask=p_ok, other=0.0)
            lse = tl.load(lse_ptr + b * P + offs_p, mask=p_ok, other=0.0)
            cam = _cam_tile(sample, w_ptr, b_ptr, offs_k, k_ok, p_offset, p_ok, C, stride_hc,
                            BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
            dcam = tl.where(k_ok[:, None] & p_ok[None, :],
                            coef[None, :] * (tl.exp(cam - lse[None, :]) - inv_k), 0.0)
            h = tl.load(sample + offs_c[:, None] * stride_hc + p_offset[None, :],
                        mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(ACC)
            if USE_DOT:
                acc_w += tl.dot(dcam, tl.trans(h), input_precision=PRECISION, out_dtype=ACC)
            else:
                acc_w += tl.sum(dcam[:, None, :] * h[None, :, :], axis=2)
            acc_b += tl.sum(dcam, axis=1)
    base = pid_s.to(tl.int64) * K * C
    tl.store(partial_w_ptr + base + offs_k[:, None] * C + offs_c[None, :], acc_w,
             mask=k_ok[:, None] & c_ok[None, :])
    if pid_c == 0:
        tl.store(partial_b_ptr + pid_s * K + offs_k, acc_b, mask=k_ok)


# ----------------------------------------------------------------------------------------------
# Launchers


def _config(h: Tensor, num_classes: int):
    channels, pixels = h.shape[1], h.shape[2] * h.shape[3]
    fp64 = h.dtype == torch.float64
    block_k = min(64, max(16, triton.next_power_of_2(num_classes)))
    block_c = 16 if fp64 else min(64, max(16, triton.next_power_of_2(channels)))
    block_p = 16 if (fp64 or pixels < 32) else 32
    return dict(
        block_k=block_k, block_c=block_c, block_p=block_p,
        # Register use read from sm_90 cubins compiled ahead of time (fp16, 4 warps): 64-class
        # tiles reach 254-255 registers per thread, 16-class tiles 70-146; the dW kernel holds
        # a (BLOCK_K, BLOCK_C) accumulator besides the CAM tile (216 at 16 x 64). 8 warps there.
        num_warps=8 if block_k * block_c >= 64 * 64 else 4,
        num_warps_dw=8 if block_k * block_c >= 16 * 64 else 4,
        use_dot=not fp64,
        # fp32 stays fp32 in the dot (no TF32) so results match the reference closely.
        precision="ieee" if h.dtype == torch.float32 else "tf32",
        acc=tl.float64 if fp64 else tl.float32,
        acc_dtype=torch.float64 if fp64 else torch.float32,
        # The interpreter's tl.dot mishandles bf16 operands (numpy has no bf16): upcast there.
        upcast=h.dtype == torch.bfloat16 and _backends.triton_interpreted())


def _pool(h: Tensor, cfg) -> Tensor:
    batch, channels, height, width = h.shape
    pooled = torch.empty(batch, channels, device=h.device, dtype=cfg["acc_dtype"])
    grid = (batch, triton.cdiv(channels, cfg["block_c"]))
    _pool_kernel[grid](h, pooled, channels, height * width, width, *h.stride(),
                       BLOCK_C=cfg["block_c"], BLOCK_P=cfg["block_p"], ACC=cfg["acc"])
    return pooled


def _threshold(logits: Tensor, labels: Tensor, dtype: torch.dtype, pixels: int) -> Tensor:
    """The mask threshold logits[b, y_b] (the GAP of the ground-truth CAM) in the accumulation
    dtype, contiguous.

    It is taken from the logits as rounded to h's dtype (the tensor forward returns and the
    caller saves for backward), so forward and backward suppress exactly the same pixels. With
    one pixel the ground-truth CAM equals its mean exactly, a tie the rounding of two different
    summation orders would decide at random: the threshold is +inf there (every pixel counts).
    """
    threshold = logits.gather(1, labels[:, None])[:, 0].to(dtype).to(logits.dtype)
    if pixels == 1:
        threshold = torch.full_like(threshold, math.inf)
    return threshold.contiguous()


def exit_head_forward(h: Tensor, weight: Tensor, bias: Tensor,
                      labels: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(logits (B,K), pooled (B,C), supp (B,) or None) in h's dtype; inputs checked by the caller."""
    batch, channels, height, width = h.shape
    num_classes, pixels = weight.shape[0], height * width
    if batch == 0:
        empty = h.new_empty
        return empty(0, num_classes), empty(0, channels), (empty(0) if labels is not None else None)
    cfg = _config(h, num_classes)
    pooled = _pool(h, cfg)
    logits = torch.addmm(bias.to(cfg["acc_dtype"]), pooled, weight.to(cfg["acc_dtype"]).t())
    supp = None
    if labels is not None:
        num_p_blocks = triton.cdiv(pixels, cfg["block_p"])
        partial = torch.empty(batch, num_p_blocks, device=h.device, dtype=cfg["acc_dtype"])
        _supp_kernel[(batch, num_p_blocks)](
            h, weight, bias, labels, _threshold(logits, labels, h.dtype, pixels), partial,
            num_classes, channels, pixels, width, num_p_blocks, *h.stride(),
            BLOCK_K=cfg["block_k"], BLOCK_C=cfg["block_c"], BLOCK_P=cfg["block_p"],
            USE_DOT=cfg["use_dot"], PRECISION=cfg["precision"], ACC=cfg["acc"],
            UPCAST=cfg["upcast"], num_warps=cfg["num_warps"])
        supp = (partial.sum(dim=1) / pixels).to(h.dtype)
    return logits.to(h.dtype), pooled.to(h.dtype), supp


def exit_head_backward(h: Tensor, weight: Tensor, bias: Tensor, labels: Optional[Tensor],
                       grad_logits: Optional[Tensor], grad_pooled: Optional[Tensor],
                       grad_supp: Optional[Tensor], logits: Optional[Tensor] = None,
                       pooled: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_h in h's layout, grad_weight (K,C), grad_bias (K,)); None gradients mean zero."""
    batch, channels, height, width = h.shape
    num_classes, pixels = weight.shape[0], height * width
    cfg = _config(h, num_classes)
    acc = cfg["acc_dtype"]
    w32 = weight.to(acc)
    if pooled is None or logits is None or batch == 0:
        pooled32 = _pool(h, cfg) if batch else h.new_zeros(0, channels, dtype=acc)
        logits32 = torch.addmm(bias.to(acc), pooled32, w32.t())
    else:
        pooled32, logits32 = pooled.to(acc), logits.to(acc)
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
    lse = torch.empty(batch, pixels, device=h.device, dtype=acc)
    coef = torch.empty_like(lse)
    num_p_blocks = triton.cdiv(pixels, cfg["block_p"])
    common = dict(BLOCK_K=cfg["block_k"], BLOCK_C=cfg["block_c"], BLOCK_P=cfg["block_p"],
                  USE_DOT=cfg["use_dot"], PRECISION=cfg["precision"], ACC=cfg["acc"],
                  UPCAST=cfg["upcast"])
    single_k = num_classes <= cfg["block_k"]
    # K > BLOCK_K accumulates dh over class blocks in an ACC buffer laid out like grad_h.
    use_scratch = not single_k and grad_h.dtype != acc
    scratch = torch.empty_like(h, dtype=acc) if use_scratch else grad_h
    assert scratch.stride() == grad_h.stride()
    _grad_h_kernel[(batch, num_p_blocks)](
        h, weight, bias, labels, _threshold(logits32, labels, h.dtype, pixels),
        grad_supp.to(acc).contiguous(), dense, grad_h, scratch, lse, coef, num_classes, channels,
        pixels, width, *h.stride(), *grad_h.stride(), SINGLE_K=single_k, SCRATCH=use_scratch,
        num_warps=cfg["num_warps"], **common)
    k_blocks = triton.cdiv(num_classes, cfg["block_k"])
    c_blocks = triton.cdiv(channels, cfg["block_c"])
    # Enough programs to fill a GPU; each split is a fixed range of samples (deterministic).
    splits = max(1, min(batch, 256 // (k_blocks * c_blocks)))
    samples_per_split = triton.cdiv(batch, splits)
    splits = triton.cdiv(batch, samples_per_split)
    partial_w = torch.empty(splits, num_classes, channels, device=h.device, dtype=acc)
    partial_b = torch.empty(splits, num_classes, device=h.device, dtype=acc)
    _grad_weight_kernel[(k_blocks, c_blocks, splits)](
        h, weight, bias, lse, coef, partial_w, partial_b, batch, num_classes, channels, pixels,
        width, samples_per_split, *h.stride(), num_warps=cfg["num_warps_dw"], **common)
    grad_weight += partial_w.sum(dim=0)
    grad_bias += partial_b.sum(dim=0)
    return grad_h, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@triton.jit
def _cam_kernel(h_ptr, w_ptr, b_ptr, cam_ptr, K, C, P, width,
                stride_hb, stride_hc, stride_hh, stride_hw,
                BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                UPCAST: tl.constexpr):
    pid_b, pid_k, pid_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p, p_ok, p_offset = _pixel_offsets(pid_p, P, width, stride_hh, stride_hw, BLOCK_P)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    cam = _cam_tile(h_ptr + pid_b.to(tl.int64) * stride_hb, w_ptr, b_ptr, offs_k, k_ok, p_offset,
                    p_ok, C, stride_hc, BLOCK_K, BLOCK_C, BLOCK_P, USE_DOT, PRECISION, ACC, UPCAST)
    out = cam_ptr + pid_b.to(tl.int64) * K * P + offs_k[:, None] * P + offs_p[None, :]
    tl.store(out, cam.to(cam_ptr.dtype.element_ty), mask=k_ok[:, None] & p_ok[None, :])


def class_activation_maps(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The (B, K, H, W) CAM in h's dtype (for pictures and inference; training never needs it)."""
    batch, channels, height, width = h.shape
    num_classes = weight.shape[0]
    cam = torch.empty(batch, num_classes, height, width, device=h.device, dtype=h.dtype)
    if cam.numel() == 0:
        return cam
    cfg = _config(h, num_classes)
    grid = (batch, triton.cdiv(num_classes, cfg["block_k"]),
            triton.cdiv(height * width, cfg["block_p"]))
    _cam_kernel[grid](h, weight, bias, cam, num_classes, channels, height * width, width,
                      *h.stride(), BLOCK_K=cfg["block_k"], BLOCK_C=cfg["block_c"],
                      BLOCK_P=cfg["block_p"], USE_DOT=cfg["use_dot"],
                      PRECISION=cfg["precision"], ACC=cfg["acc"], UPCAST=cfg["upcast"],
                      num_warps=cfg["num_warps"])
    return cam
