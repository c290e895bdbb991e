"""The raw Triton launchers of occam_kernels/triton/exit_head.py (no autograd, no custom op)
against an explicit PyTorch version of DESIGN.md section 3, written here.

Every test runs on the `device` fixture (conftest.py): CPU under the Triton interpreter when
no GPU is visible, so shapes are small; CUDA natively when one is. The explicit version
materialises the CAM with einsum and differentiates it with autograd in float64; the kernels
must agree with it without ever writing the CAM.
"""
import math

import pytest
import torch

from occam_kernels.triton.exit_head import (class_activation_maps, exit_head_backward,
                                            exit_head_forward, one_pass_fits)

pytestmark = pytest.mark.triton

# (rtol, atol) against the float64 formulas of the same (already rounded) inputs. Gradients
# are compared with atol scaled by their magnitude (low-precision sums).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


# ------------------------------------------------------------------------------------------
# The explicit formulas


def explicit_cam(h, weight, bias):
    return torch.einsum("kc,bchw->bkhw", weight, h) + bias[None, :, None, None]


def explicit_exit_head(h, weight, bias, labels):
    """(logits, pooled, supp) from the explicit (B, K, P) CAM, in the inputs' dtype."""
    cam = explicit_cam(h, weight, bias).flatten(2)                      # (B, K, P)
    pooled = h.mean(dim=(2, 3))
    logits = cam.mean(dim=2)                                            # GAP of the CAM
    if labels is None:
        return logits, pooled, None
    cam_true = cam[torch.arange(h.shape[0], device=h.device), labels]   # (B, P)
    # threshold = logits[b, y_b], the mean of the ground-truth CAM row (written as that mean
    # so that P = 1, where the two are equal, is an exact tie: every pixel is suppressed).
    threshold = cam_true.mean(dim=1, keepdim=True)
    mask = (cam_true <= threshold).to(cam.dtype).detach()
    num_classes = weight.shape[0]
    kl = torch.logsumexp(cam, dim=1) - cam.mean(dim=1) - math.log(num_classes)
    return logits, pooled, (mask * kl).mean(dim=1)


def explicit_grads(h, weight, bias, labels, g_logits, g_pooled, g_supp):
    """Autograd of the explicit version in float64: (dh, dW, db)."""
    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (h, weight, bias))
    logits, pooled, supp = explicit_exit_head(h64, w64, b64, labels)
    outs, grads = [], []
    for out, g in ((logits, g_logits), (pooled, g_pooled), (supp, g_supp)):
        if g is not None:
            outs.append(out)
            grads.append(g.double())
    if not outs:
        return torch.zeros_like(h64), torch.zeros_like(w64), torch.zeros_like(b64)
    return torch.autograd.grad(outs, (h64, w64, b64), grads, allow_unused=True)


# ------------------------------------------------------------------------------------------
# Inputs


def make_inputs(batch, channels, height, width, num_classes, dtype, device, layout="contiguous",
                seed=0):
    gen = torch.Generator().manual_seed(seed)
    # The layout is made on the device: .to(device) of a strided view would be contiguous.
    h = torch.relu(torch.randn(batch, channels, height, width, generator=gen)).to(device, dtype)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        wide = torch.zeros(batch, 2 * channels, height, width + 3, device=device, dtype=dtype)
        wide[:, ::2, :, 1:width + 1] = h
        h = wide[:, ::2, :, 1:width + 1]
    elif layout == "transposed":
        h = h.transpose(2, 3).contiguous().transpose(2, 3)
    assert layout == "contiguous" or not h.is_contiguous() or height * width == 1
    weight = torch.randn(num_classes, channels, generator=gen) / channels ** 0.5
    bias = torch.randn(num_classes, generator=gen) * 0.1
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return h, weight.to(device, dtype), bias.to(device, dtype), labels.to(device)


def upstream(batch, channels, num_classes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, num_classes, generator=gen), torch.randn(batch, channels, generator=gen),
            torch.rand(batch, generator=gen) + 0.5)


def assert_close(got, want, dtype, scale_by_magnitude=False):
    rtol, atol = TOLERANCES[dtype]
    if scale_by_magnitude:
        atol = atol * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double().cpu(), want.detach().double().cpu(), rtol=rtol,
                               atol=atol)


def check_against_explicit(shape, dtype, device, layout="contiguous", give_saved=True,
                           drop=(), seed=0, one_pass=False):
    batch, channels, height, width, num_classes = shape
    h, weight, bias, labels = make_inputs(*shape, dtype=dtype, device=device, layout=layout,
                                          seed=seed)
    h64, w64, b64 = (t.double() for t in (h, weight, bias))
    # forward
    logits, pooled, supp, threshold = exit_head_forward(h, weight, bias, labels)
    want_logits, want_pooled, want_supp = explicit_exit_head(h64, w64, b64, labels)
    for got, want in ((logits, want_logits), (pooled, want_pooled), (supp, want_supp)):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, dtype)
    # backward
    g_logits, g_pooled, g_supp = upstream(batch, channels, num_classes)
    grads = {"logits": g_logits, "pooled": g_pooled, "supp": g_supp}
    for name in drop:
        grads[name] = None
    grads = {k: (None if g is None else g.to(device, dtype)) for k, g in grads.items()}
    saved = dict(logits=logits, pooled=pooled, threshold=threshold) if give_saved else {}
    dh, dw, db = exit_head_backward(h, weight, bias, labels, grads["logits"], grads["pooled"],
                                    grads["supp"], one_pass=one_pass, **saved)
    want = explicit_grads(h, weight, bias, labels, grads["logits"], grads["pooled"], grads["supp"])
    for got, ref, like in zip((dh, dw, db), want, (h, weight, bias)):
        assert got.dtype == dtype and got.shape == like.shape
        assert_close(got, ref, dtype, scale_by_magnitude=True)
    # h's memory layout: the same strides when h is dense, else contiguous (torch.empty_like)
    assert dh.stride() == (h.stride() if layout != "sliced" else h.contiguous().stride())
    return h, weight, bias, labels


# ------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("shape", [
    (3, 5, 3, 5, 7),        # odd everything, P = 15 (not a power of two)
    (2, 3, 2, 3, 1),        # K = 1: the KL is identically zero, only logits/pooled matter
    (2, 3, 2, 2, 1000),     # K = 1000: 16 class blocks, the online logsumexp across them
    (2, 4, 1, 1, 6),        # H = W = 1: every pixel ties with the threshold
    (2, 70, 5, 8, 70),      # C and K over one block (64) each, P = 40 over one pixel block (32)
])
def test_fp32_shapes(shape, device):
    check_against_explicit(shape, torch.float32, device)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_fp32_layouts(layout, device):
    check_against_explicit((3, 5, 3, 5, 7), torch.float32, device, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype, device):
    check_against_explicit((3, 5, 3, 5, 7), dtype, device)
    check_against_explicit((2, 6, 4, 3, 9), dtype, device, layout="channels_last", seed=3)
    # K > 64: dh accumulates over class blocks in an fp32 buffer, then is cast to dtype.
    check_against_explicit((2, 6, 3, 3, 70), dtype, device, layout="channels_last", seed=4)


def test_fp64_tight_and_multi_block(device):
    # fp64 takes the broadcast-multiply path (BLOCK_C = 16): C = 20 is two channel blocks.
    check_against_explicit((3, 5, 3, 5, 7), torch.float64, device)
    check_against_explicit((2, 20, 3, 7, 70), torch.float64, device, layout="sliced")


def test_backward_without_saved_logits_and_pooled(device):
    check_against_explicit((3, 5, 3, 5, 7), torch.float32, device, give_saved=False)
    check_against_explicit((3, 5, 3, 5, 7), torch.float16, device, give_saved=False)


@pytest.mark.parametrize("drop", [("logits",), ("pooled",), ("logits", "pooled"),
                                  ("supp",), ("logits", "pooled", "supp")])
def test_absent_gradients(drop, device):
    check_against_explicit((2, 5, 3, 3, 7), torch.float32, device, drop=drop)


def test_without_labels(device):
    h, weight, bias, _ = make_inputs(2, 5, 3, 4, 6, torch.float32, device)
    logits, pooled, supp, threshold = exit_head_forward(h, weight, bias, None)
    assert supp is None and threshold is None
    assert supp is None
    want_logits, want_pooled, _ = explicit_exit_head(h.double(), weight.double(), bias.double(),
                                                     None)
    assert_close(logits, want_logits, torch.float32)
    assert_close(pooled, want_pooled, torch.float32)
    g_logits, g_pooled, _ = (g.to(device) for g in upstream(2, 5, 6))
    dh, dw, db = exit_head_backward(h, weight, bias, None, g_logits, g_pooled, None)
    want = explicit_grads(h, weight, bias, None, g_logits, g_pooled, None)
    for got, ref in zip((dh, dw, db), want):
        assert_close(got, ref, torch.float32, scale_by_magnitude=True)


class _KernelExitHead(torch.autograd.Function):
    """The launchers as an autograd.Function, so gradcheck differentiates the kernels."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, one_pass):
        logits, pooled, supp, threshold = exit_head_forward(h, weight, bias, labels)
        ctx.save_for_backward(h, weight, bias, labels, logits, pooled, threshold)
        ctx.one_pass = one_pass
        return logits, pooled, supp

    @staticmethod
    def backward(ctx, g_logits, g_pooled, g_supp):
        h, weight, bias, labels, logits, pooled, threshold = ctx.saved_tensors
        dh, dw, db = exit_head_backward(h, weight, bias, labels, g_logits, g_pooled, g_supp,
                                        logits=logits, pooled=pooled, threshold=threshold,
                                        one_pass=ctx.one_pass)
        return dh, dw, db, None, None


@pytest.mark.parametrize("one_pass", [False, True], ids=["two_kernels", "one_pass"])
def test_gradcheck_fp64(one_pass, device):
    h, weight, bias, labels = make_inputs(2, 3, 2, 3, 4, torch.float64, device, seed=5)
    inputs = tuple(t.detach().requires_grad_(True) for t in (h, weight, bias))
    # eps well below the gap between any ground-truth CAM value and its threshold: the mask
    # is piecewise constant and must not flip under the finite differences.
    cam_true = explicit_cam(h, weight, bias).flatten(2)[torch.arange(2, device=device), labels]
    gap = (cam_true - cam_true.mean(dim=1, keepdim=True)).abs().min().item()
    assert gap > 1e-4
    assert torch.autograd.gradcheck(
        lambda h, w, b: _KernelExitHead.apply(h, w, b, labels, one_pass), inputs, eps=1e-6,
        atol=1e-7)


def test_backward_is_bitwise_deterministic(device):
    h, weight, bias, labels = make_inputs(5, 6, 3, 4, 70, torch.float32, device, seed=2)
    logits, pooled, _, threshold = exit_head_forward(h, weight, bias, labels)
    g_logits, g_pooled, g_supp = (g.to(device) for g in upstream(5, 6, 70))
    runs = [exit_head_backward(h, weight, bias, labels, g_logits, g_pooled, g_supp,
                               logits=logits, pooled=pooled, threshold=threshold)
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    forwards = [exit_head_forward(h, weight, bias, labels) for _ in range(2)]
    for first, second in zip(*forwards):
        assert torch.equal(first, second)


@pytest.mark.parametrize("shape, dtype, layout", [
    ((2, 5, 3, 4, 7), torch.float32, "contiguous"),
    ((2, 3, 1, 1, 1), torch.float32, "channels_last"),
    ((1, 3, 2, 3, 1000), torch.float32, "sliced"),
    ((2, 5, 3, 4, 7), torch.float16, "channels_last"),
    ((2, 5, 3, 4, 7), torch.bfloat16, "contiguous"),
    ((2, 20, 3, 4, 7), torch.float64, "transposed"),
])
def test_class_activation_maps(shape, dtype, layout, device):
    h, weight, bias, _ = make_inputs(*shape, dtype=dtype, device=device, layout=layout)
    cam = class_activation_maps(h, weight, bias)
    assert cam.dtype == dtype and cam.shape == (shape[0], shape[4], shape[2], shape[3])
    assert_close(cam, explicit_cam(h.double(), weight.double(), bias.double()), dtype)


def test_split_reductions_cover_every_pixel_once(device, monkeypatch):
    """The pool and dW kernels split their pixel loops over programs (fixed ranges, summed in
    a fixed order). A small program target forces several pixel blocks per pool split and
    several (sample, pixel block) units per dW split, which small shapes never reach."""
    import occam_kernels.triton.exit_head as kernels
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 3)
    for layout in ("contiguous", "channels_last"):
        h, *_ = check_against_explicit((3, 5, 9, 11, 7), torch.float32, device, layout=layout)
    # 99 pixels = 4 blocks of 32. Pool: 3 samples x 1 channel block already reach the target,
    # so one split runs all 4 blocks. dW: 3 x 4 units over 3 splits of 4.
    assert kernels._splits(4, 3) == (1, 4) and kernels._splits(12, 1) == (3, 4)


def test_dw_splits_are_capped(device, monkeypatch):
    """A dW split sums its units with a chain of dots; on an H200 a chain of 66,560 units
    left dW 0.93% off in fp16 (0.054% at 256). Past the cap more splits run, on grid axis 0,
    and every unit is still summed once: here 4 units per split instead of 12."""
    import occam_kernels.triton.exit_head as kernels
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(kernels, "_DW_MAX_UNITS", 4)
    assert kernels._splits(12, 1, 4) == (3, 4) and kernels._splits(13, 1, 4) == (4, 4)
    assert kernels._splits(12, 1) == (1, 12)
    check_against_explicit((3, 5, 9, 11, 7), torch.float32, device)   # 3 x 4 units


KERNELS = ("_pool_kernel", "_supp_kernel", "_supp_finish_kernel", "_grad_h_kernel",
           "_grad_weight_kernel", "_grad_h_and_weight_kernel")


def record_launches(monkeypatch):
    """(the kernels module, {kernel name: grid}) with every kernel replaced by a stand-in
    that records its grid and runs nothing."""
    import occam_kernels.triton.exit_head as kernels
    grids = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids[self.name] = grid
            return launch

    for name in KERNELS:
        monkeypatch.setattr(kernels, name, Recorder(name))
    return kernels, grids


def design_exit_zeros(device):
    """h, weight, bias, labels of the first exit at the design shape (B=128, C=58, 40x40,
    K=10), zeros: for launch grids only."""
    h = torch.zeros(128, 58, 40, 40, device=device)
    weight, bias = torch.zeros(10, 58, device=device), torch.zeros(10, device=device)
    return h, weight, bias, torch.zeros(128, dtype=torch.long, device=device)


def test_design_shape_launches_enough_programs(device, monkeypatch):
    """At the first exit (B=128, C=58, 40x40) the pool and dW kernels ran 128 programs each,
    one per sample, looping over all 1,600 pixels; now about _TARGET_PROGRAMS. The grids are
    read from the launchers without running the kernels (a recording stand-in)."""
    kernels, grids = record_launches(monkeypatch)
    h, weight, bias, labels = design_exit_zeros(device)
    kernels.exit_head_forward(h, weight, bias, labels)
    kernels.exit_head_backward(h, weight, bias, labels, None, None, torch.ones(128, device=device))
    assert "_grad_h_and_weight_kernel" not in grids   # the one-pass form is opt-in
    programs = {name: math.prod(grid) for name, grid in grids.items()}
    assert programs["_pool_kernel"] >= 512 and programs["_grad_weight_kernel"] >= 512, programs
    assert programs["_supp_kernel"] == programs["_grad_h_kernel"] == 128 * 50   # B x P blocks
    assert programs["_supp_finish_kernel"] == 128   # one per sample
    assert all(len(grid) == 1 or max(grid[1:]) <= 65535 for grid in grids.values()), grids


# ------------------------------------------------------------------------------------------
# The one-pass backward (a candidate, opt-in): dh, dW and db from one read of h


@pytest.mark.parametrize("shape, dtype, layout", [
    ((3, 5, 3, 5, 7), torch.float32, "contiguous"),     # odd sizes, P = 15
    ((2, 3, 2, 3, 1), torch.float32, "channels_last"),  # K = 1
    ((2, 4, 1, 1, 6), torch.float32, "contiguous"),     # H = W = 1
    ((2, 64, 5, 8, 16), torch.float32, "channels_last"),  # C and K at one tile, 2 pixel blocks
    ((2, 5, 3, 5, 7), torch.float32, "transposed"),
    ((3, 5, 3, 5, 7), torch.float16, "sliced"),
    ((2, 6, 4, 3, 9), torch.bfloat16, "channels_last"),
    ((2, 16, 3, 5, 7), torch.float64, "contiguous"),    # fp64: BLOCK_C = 16, no tl.dot
])
def test_one_pass_matches_explicit(shape, dtype, layout, device):
    check_against_explicit(shape, dtype, device, layout=layout, one_pass=True)


def test_one_pass_without_saved_logits_and_pooled(device):
    check_against_explicit((3, 5, 3, 5, 7), torch.float32, device, give_saved=False,
                           one_pass=True)


def test_one_pass_splits_cover_every_unit_once(device, monkeypatch):
    """Several (sample, pixel block) units per program, and the cap on units per split."""
    import occam_kernels.triton.exit_head as kernels
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(kernels, "_DW_MAX_UNITS", 4)
    for layout in ("contiguous", "channels_last"):   # 3 x 4 units over 3 splits of 4
        check_against_explicit((3, 5, 9, 11, 7), torch.float32, device, layout=layout,
                               one_pass=True)


def test_one_pass_agrees_with_two_kernels_and_repeats_bitwise(device):
    h, weight, bias, labels = make_inputs(3, 6, 7, 5, 9, torch.float32, device, seed=6)
    logits, pooled, _, threshold = exit_head_forward(h, weight, bias, labels)
    g_logits, g_pooled, g_supp = (g.to(device) for g in upstream(3, 6, 9))

    def backward(one_pass):
        return exit_head_backward(h, weight, bias, labels, g_logits, g_pooled, g_supp,
                                  logits=logits, pooled=pooled, threshold=threshold,
                                  one_pass=one_pass)
    first, second, two_kernels = backward(True), backward(True), backward(False)
    for a, b, c in zip(first, second, two_kernels):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels, num_classes", [(70, 7), (5, 70)])
def test_one_pass_refuses_what_one_tile_cannot_hold(channels, num_classes, device):
    h, weight, bias, labels = make_inputs(2, channels, 2, 2, num_classes, torch.float32, device)
    assert not one_pass_fits(h, num_classes)
    for grad_supp in (torch.ones(2, device=device), None):  # refused with or without a CAM term
        with pytest.raises(ValueError, match=r"one tile \(K <= 64, C <= 64\)"):
            exit_head_backward(h, weight, bias, labels, None, None, grad_supp, one_pass=True)


def test_one_pass_is_one_launch_instead_of_two(device, monkeypatch):
    """At the first exit's design shape: the one-pass kernel alone, on the dW kernel's grid
    (915 splits of 7 of the 6,400 (sample, pixel block) units), not the two kernels."""
    kernels, grids = record_launches(monkeypatch)
    h, weight, bias, labels = design_exit_zeros(device)
    saved = dict(logits=torch.zeros(128, 10, device=device),    # else the pool and the
                 pooled=torch.zeros(128, 58, device=device),    # suppression kernels run
                 threshold=torch.zeros(128, device=device))
    kernels.exit_head_backward(h, weight, bias, labels, None, None,
                               torch.ones(128, device=device), one_pass=True, **saved)
    assert grids == {"_grad_h_and_weight_kernel": (915,)}, grids


def test_one_pass_fits_the_c58_design_exits(device):
    """The C = 58 exits (58x40x40, 58x64x64: the largest maps) fit one tile at K = 10 in the
    training dtypes; C = 116 does not."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert one_pass_fits(torch.empty(1, 58, 2, 2, dtype=dtype, device=device), 10)
        assert not one_pass_fits(torch.empty(1, 116, 2, 2, dtype=dtype, device=device), 10)


def test_a_constant_map_masks_the_same_pixels_in_every_backward(device):
    """h constant over the pixels: forward raises the threshold to the CAM's own value where
    rounding put it below every pixel (tests/test_exit_head.py checks that against the
    reference). The two-kernel and one-pass backwards mask with the threshold forward saved,
    and a backward not given it recomputes the same one."""
    generator = torch.Generator().manual_seed(0)
    h = (2 * torch.rand(4, 6, 1, 1, generator=generator)).expand(-1, -1, 5, 7).contiguous()
    weight = 2 * torch.randn(5, 6, generator=generator)
    bias = torch.randn(5, generator=generator)
    labels = torch.randint(0, 5, (4,), generator=generator)
    h, weight, bias, labels = (t.to(device) for t in (h, weight, bias, labels))
    logits, pooled, supp, threshold = exit_head_forward(h, weight, bias, labels)
    raw = logits.gather(1, labels[:, None])[:, 0].float()
    assert (threshold > raw).any(), "no sample's threshold was raised: the case is not tested"
    g_logits, g_pooled, g_supp = (g.to(device) for g in upstream(4, 6, 5))

    def backward(**kwargs):
        return exit_head_backward(h, weight, bias, labels, g_logits, g_pooled, g_supp,
                                  logits=logits, pooled=pooled, **kwargs)
    two_kernels = backward(threshold=threshold)
    for a, b in zip(two_kernels, backward()):   # recomputed: the same threshold, bitwise
        assert torch.equal(a, b)
    for a, b in zip(two_kernels, backward(threshold=threshold, one_pass=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Without the raised threshold, the CAM term of dh would vanish for those samples.
    dropped = backward(threshold=raw)[0]
    assert not torch.allclose(dropped, two_kernels[0], rtol=1e-5, atol=1e-6)
