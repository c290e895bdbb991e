"""The public exit_head / class_activation_maps ops against the reference (DESIGN.md section 3).

Every test runs its kernels on the `device` fixture: CPU under the Triton interpreter when no
GPU is visible (so shapes are small), CUDA natively when one is (conftest.py).
"""
import re

import pytest
import torch

from occam_kernels import (class_activation_maps, class_activation_maps_reference, exit_head,
                           exit_head_reference)

pytestmark = pytest.mark.triton

TOLERANCES = {  # (rtol, atol) against the fp64 reference of the same (rounded) inputs
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def make_inputs(batch, channels, height, width, num_classes, dtype, layout="contiguous",
                seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    cast = dict(dtype=dtype, device=device)
    # The layout is made on the target device: .to(device) of a strided view is contiguous.
    h = torch.relu(torch.randn(batch, channels, height, width, generator=generator)).to(**cast)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        wide = torch.zeros(batch, channels * 2, height, width + 3, **cast)
        wide[:, ::2, :, 1:width + 1] = h
        h = wide[:, ::2, :, 1:width + 1]
        assert not h.is_contiguous()
    weight = torch.randn(num_classes, channels, generator=generator) / channels ** 0.5
    bias = torch.randn(num_classes, generator=generator) * 0.1
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    return h, weight.to(**cast), bias.to(**cast), labels.to(device)


def forward_backward(h, weight, bias, labels, backend, seed=1):
    h = h.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True)
    out = exit_head(h, weight, bias, labels, backend=backend)
    generator = torch.Generator().manual_seed(seed)
    grads = [torch.randn(t.shape, generator=generator).to(t.device, t.dtype) for t in out
             if t is not None]
    torch.autograd.backward([t for t in out if t is not None], grads)
    return [t for t in out if t is not None], (h.grad, weight.grad, bias.grad), grads


def compare_with_reference(shape, dtype, layout="contiguous", with_labels=True, device="cpu"):
    h, weight, bias, labels = make_inputs(*shape, dtype=dtype, layout=layout, device=device)
    check_against_reference(h, weight, bias, labels if with_labels else None,
                            strides_kept=layout != "strided")


def check_against_reference(h, weight, bias, labels, strides_kept=True):
    """The fused op's outputs and gradients against the fp64 reference; returns the reference's
    outputs."""
    dtype = h.dtype
    outs, grads, upstream = forward_backward(h, weight, bias, labels, "triton")
    # The reference in fp64 on the same (rounded) inputs is the specification.
    h64, w64, b64 = (t.double() for t in (h, weight, bias))
    h64.requires_grad_(True), w64.requires_grad_(True), b64.requires_grad_(True)
    want = [t for t in exit_head_reference(h64, w64, b64, labels) if t is not None]
    torch.autograd.backward(want, [g.double() for g in upstream])
    rtol, atol = TOLERANCES[dtype]
    for got, ref in zip(outs, want):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref.detach(), rtol=rtol, atol=atol)
    for got, ref in zip(grads, (h64.grad, w64.grad, b64.grad)):
        assert got.dtype == dtype
        scale = max(1.0, ref.abs().max().item())  # low-precision sums: relative to magnitude
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * scale)
    assert grads[0].stride() == h.stride() or not strides_kept
    return want


@pytest.mark.parametrize("shape", [
    (3, 5, 3, 5, 7),      # odd everything
    (2, 4, 3, 3, 1),      # K = 1
    (2, 3, 1, 1, 5),      # H = W = 1
    (2, 3, 2, 2, 1000),   # K = 1000
    (2, 20, 4, 4, 17),    # several channel and class blocks
])
def test_fused_matches_reference_fp32(shape, device):
    compare_with_reference(shape, torch.float32, device=device)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_fused_matches_reference_layouts(layout, device):
    compare_with_reference((3, 6, 4, 5, 4), torch.float32, layout=layout, device=device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fused_matches_reference_dtypes(dtype, device):
    compare_with_reference((3, 6, 3, 5, 4), dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("expanded", [False, True], ids=["dense", "expanded"])
def test_a_constant_map_is_suppressed_everywhere(dtype, expanded, device):
    """h constant over the pixels (a dead ReLU stage gives h = relu(bias)): the ground-truth
    CAM ties every pixel with its mean, so every pixel counts. The kernels' threshold,
    logits[b, y_b], is another rounding of that mean; it fell 1 ulp below the CAM for some
    samples and dropped every pixel: supp and the CAM term of the gradients were 0 there."""
    # Seed 0: 1 of the 4 samples lost its CAM term in fp32, 2 in fp16, 3 in bf16.
    generator = torch.Generator().manual_seed(0)
    batch, channels, height, width, num_classes = 4, 6, 5, 7, 5   # 35 pixels: 3 blocks
    cast = dict(dtype=dtype, device=device)
    h = (2 * torch.rand(batch, channels, 1, 1, generator=generator)).to(**cast)
    h = h.expand(-1, -1, height, width)                 # stride 0 over the pixels
    if not expanded:
        h = h.contiguous()
    # Weights large enough that supp is far above the fp16 and bf16 tolerances.
    weight = (2 * torch.randn(num_classes, channels, generator=generator)).to(**cast)
    bias = torch.randn(num_classes, generator=generator).to(**cast)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    want = check_against_reference(h, weight, bias, labels, strides_kept=not expanded)
    assert (want[2] > 0.2).all(), want[2]   # every sample has a CAM term to lose


def test_fused_without_labels(device):
    compare_with_reference((3, 6, 3, 5, 4), torch.float32, with_labels=False, device=device)
    h, weight, bias, _ = make_inputs(2, 3, 2, 2, 4, torch.float32, device=device)
    assert exit_head(h, weight, bias, backend="triton").supp is None


def test_fused_gradcheck_fp64(device):
    h, weight, bias, labels = make_inputs(2, 3, 2, 3, 4, torch.float64, device=device)
    inputs = [t.requires_grad_(True) for t in (h, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: tuple(exit_head(h, w, b, labels, backend="triton")), inputs)


def test_fused_is_bitwise_deterministic(device):
    h, weight, bias, labels = make_inputs(4, 6, 3, 3, 5, torch.float32, seed=3, device=device)
    first = forward_backward(h, weight, bias, labels, "triton")
    second = forward_backward(h, weight, bias, labels, "triton")
    for a, b in zip(first[0] + list(first[1]), second[0] + list(second[1])):
        assert torch.equal(a, b)


def test_conv_weight_and_no_bias(device):
    h, weight, _, labels = make_inputs(2, 3, 2, 2, 4, torch.float32, device=device)
    conv = weight[:, :, None, None]
    for got, want in zip(exit_head(h, conv, None, labels, backend="triton"),
                         exit_head_reference(h, weight, None, labels)):
        torch.testing.assert_close(got, want)


def test_training_saves_no_cam_sized_tensor(device):
    """Autograd keeps h, weights, labels and pooled: nothing of shape (B, K, H, W)."""
    batch, channels, height, width, num_classes = 3, 4, 5, 6, 7
    h, weight, bias, labels = make_inputs(batch, channels, height, width, num_classes,
                                          torch.float32, device=device)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    h.requires_grad_(True), weight.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = exit_head(h, weight, bias, labels, backend="triton")
        (out.logits.sum() + out.supp.sum()).backward()
    assert saved, "the fused op saved nothing: the hook did not see it"
    cam_numel = batch * num_classes * height * width
    assert all(torch.Size(s).numel() < cam_numel or s == tuple(h.shape) for s in saved), saved
    # The same check catches the reference, which does keep the CAM.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        exit_head(h, weight, bias, labels, backend="reference")
    assert any(torch.Size(s).numel() >= cam_numel and s != tuple(h.shape) for s in saved)


def test_logits_may_be_edited_in_place_as_the_reference_allows(device):
    """Temperature scaling in place (`logits /= T`) then backward: the fused op saved its own
    logits, which backward never reads, and refused it; the reference took it."""
    h, weight, bias, labels = make_inputs(3, 5, 3, 4, 6, torch.float64, device=device)
    grads = {}
    for backend in ("reference", "triton"):
        leaf = h.clone().requires_grad_(True)
        out = exit_head(leaf, weight, bias, labels, backend=backend)
        out.logits.div_(2.0)
        (out.logits.logsumexp(1).sum() + out.supp.sum()).backward()
        grads[backend] = leaf.grad
    torch.testing.assert_close(grads["triton"], grads["reference"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_enclosing_autocast_does_not_lower_the_fused_ops_precision(dtype, device):
    """The fused op accumulates in fp32 (DESIGN.md section 3): under autocast its logits were
    the product of a bf16-rounded pooled, and its weight gradient a bf16 matmul."""
    h, weight, bias, labels = make_inputs(4, 40, 3, 3, 6, dtype, device=device)

    def run(autocast):
        leaves = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = exit_head(*leaves, labels, backend="triton")
            (out.logits.float().logsumexp(1).sum() + out.supp.float().sum()).backward()
        return [out.logits, out.pooled, out.supp] + [t.grad for t in leaves]

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


def test_every_launch_runs_with_the_inputs_gpu_current(device, monkeypatch):
    """Triton launches on the current device: with h on cuda:1 and cuda:0 current, the
    kernels faulted or ran unordered with cuda:1's stream. Each custom op enters
    on_device_of(h) (a CUDA device guard on a GPU) around its launches."""
    from occam_kernels import _backends, compact
    entered = []
    real = _backends.on_device_of
    monkeypatch.setattr(_backends, "on_device_of",
                        lambda tensor: entered.append(tensor.shape) or real(tensor))
    h, weight, bias, labels = make_inputs(2, 3, 2, 3, 4, torch.float32, device=device)
    h.requires_grad_(True)
    out = exit_head(h, weight, bias, labels, backend="triton")
    (out.logits.sum() + out.supp.sum()).backward()
    class_activation_maps(h.detach(), weight, bias, backend="triton")
    compact(h.detach(), labels > 1, backend="triton")
    assert entered == [h.shape] * 4   # forward, backward, CAMs, compaction


def test_opcheck_fused_ops(device):
    h, weight, bias, labels = make_inputs(2, 3, 2, 3, 4, torch.float32, device=device)
    weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.occam.exit_head_fused, (h, weight, bias, labels))
    torch.library.opcheck(torch.ops.occam.exit_head_fused, (h, weight, bias, None))
    logits, pooled, _, threshold = torch.ops.occam.exit_head_fused(h, weight.detach(), bias,
                                                                   labels)
    grads = (torch.randn_like(logits), torch.randn_like(pooled), torch.randn(2, device=device))
    torch.library.opcheck(torch.ops.occam.exit_head_fused_backward,
                          (h, weight.detach(), bias, labels, pooled, threshold, *grads))
    torch.library.opcheck(torch.ops.occam.class_activation_maps_fused, (h, weight, bias))


def test_compiles_fullgraph(device):
    h, weight, bias, labels = make_inputs(2, 3, 2, 3, 4, torch.float32, device=device)

    def loss(h, weight, bias, labels):
        out = exit_head(h, weight, bias, labels, backend="triton")
        return out.logits.logsumexp(1).mean() + 0.1 * out.supp.mean() + out.pooled.mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h, weight, bias, labels), loss(h, weight, bias, labels))


def test_class_activation_maps_match_reference(device):
    for shape, layout in (((2, 5, 3, 4, 6), "contiguous"), ((2, 3, 1, 1, 1), "channels_last")):
        h, weight, bias, _ = make_inputs(*shape, torch.float32, layout=layout, device=device)
        got = class_activation_maps(h, weight, bias, backend="triton")
        torch.testing.assert_close(got, class_activation_maps_reference(h, weight, bias))
        torch.testing.assert_close(class_activation_maps(h, weight, bias),
                                   class_activation_maps_reference(h, weight, bias))


# Every way in to the exit head: the public op on each backend, the reference (the
# specification), and the custom op under the Triton backend, which anyone may call as
# torch.ops.occam.exit_head_fused (it read labels and threshold past their buffers when given
# a short labels tensor).
EXIT_HEAD_ENTRIES = {
    "exit_head-reference": lambda *args: exit_head(*args, backend="reference"),
    "exit_head-triton": lambda *args: exit_head(*args, backend="triton"),
    "exit_head_reference": exit_head_reference,
    "occam::exit_head_fused": lambda *args: torch.ops.occam.exit_head_fused(*args),
}


@pytest.mark.parametrize("entry", list(EXIT_HEAD_ENTRIES))
def test_bad_input_is_named(entry, device):
    h, weight, bias, labels = make_inputs(2, 3, 2, 2, 4, torch.float32, device=device)
    python_api = entry != "occam::exit_head_fused"   # torch's schema refuses non-tensors there
    cases = [
        ((h[0], weight, bias, labels), ValueError, "4-D"),
        ((h, weight[:, :2], bias, labels), ValueError, "input channels"),
        ((h, weight, bias[:3], labels), ValueError, "bias must have shape"),
        ((h, weight.double(), bias, labels), TypeError, "weight is torch.float64"),
        ((h, weight, bias, labels.int()), TypeError, "labels must be int64"),
        ((h, weight, bias, labels[:1]), ValueError, r"labels must have shape \(2,\)"),
        ((h.long(), weight, bias, labels), TypeError, "h must be float"),
        ((h[:, :0], weight[:, :0], bias, labels), ValueError, r"at least one channel \(C >= 1\)"),
    ]
    if python_api:
        cases += [((h, weight.to("meta"), bias, labels), ValueError, "weight is on meta"),
                  ((h, None, bias, labels), TypeError, "weight must be a tensor, got NoneType"),
                  ((h, weight, bias, [1, 3]), TypeError, "labels must be a tensor, got list")]
    if device.type == "cpu":
        # On CUDA the range check is a device-side assert (no host sync), which ends the
        # process's CUDA context: it cannot be caught in-process, so it is checked on CPU.
        cases += [((h, weight, bias, torch.tensor(v)), RuntimeError, r"labels must lie in \[0, 4\)")
                  for v in ([0, 4], [-1, 0])]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            EXIT_HEAD_ENTRIES[entry](*args)


def test_the_custom_ops_check_what_their_kernels_index_by(device):
    """The backward and CAM ops, called directly, refuse what their kernels would read past:
    a short gradient or threshold, a weight of other channels, a short bias (each was taken,
    broadcast or read beyond its buffer)."""
    h, weight, bias, labels = make_inputs(2, 3, 2, 2, 4, torch.float32, device=device)
    _, pooled, _, threshold = torch.ops.occam.exit_head_fused(h, weight, bias, labels)
    backward = torch.ops.occam.exit_head_fused_backward
    ones = dict(device=device)
    for grads, message in (((None, torch.ones(1, 3, **ones), None), r"grad_pooled must have shape \(2, 3\)"),
                           ((None, None, torch.ones(1, **ones)), r"grad_supp must have shape \(2,\)"),
                           ((torch.ones(2, 5, **ones), None, None), r"grad_logits must have shape \(2, 4\)")):
        with pytest.raises(ValueError, match=message):
            backward(h, weight, bias, labels, pooled, threshold, *grads)
    with pytest.raises(ValueError, match=r"threshold must have shape \(2,\)"):
        backward(h, weight, bias, labels, pooled, threshold[:1], None, None,
                 torch.ones(2, **ones))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        backward(h, weight, bias, labels[:1], pooled, threshold, None, None, None)
    cams = torch.ops.occam.class_activation_maps_fused
    with pytest.raises(ValueError, match="occam::class_activation_maps_fused: weight has 5 input"):
        cams(h, torch.randn(4, 5, **ones), bias)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        cams(h, weight, bias[:2])
    # The public CAM op names itself, not the exit head.
    with pytest.raises(ValueError, match="^class_activation_maps: h must be a 4-D"):
        class_activation_maps(h[0], weight)
    with pytest.raises(ValueError, match="^class_activation_maps_reference: weight has"):
        class_activation_maps_reference(h, weight[:, :2])


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_empty_spatial_dims_are_named(backend, device):
    """H or W = 0 made every output NaN (a mean over 0 pixels): a ValueError naming the shape,
    on every backend, with or without labels, an empty batch included."""
    weight, bias = torch.randn(4, 3, device=device), torch.randn(4, device=device)
    for shape in ((2, 3, 0, 0), (2, 3, 0, 4), (2, 3, 4, 0), (0, 3, 0, 0)):
        h = torch.rand(shape, device=device)
        for labels in (torch.zeros(shape[0], dtype=torch.long, device=device), None):
            with pytest.raises(ValueError, match=re.escape(
                    f"exit_head: h must have H, W >= 1, got {shape}")):
                exit_head(h, weight, bias, labels, backend=backend)


@pytest.mark.parametrize("with_labels", [True, False])
def test_empty_batch_gives_empty_outputs_on_every_backend(with_labels, device):
    """B = 0 (nobody continues after a compaction) is an ordinary case: empty outputs of the
    right shapes, dtype and device, an empty dh and zero dW and db, the same on all backends."""
    results = []
    for backend in ("reference", "triton"):
        h = torch.rand(0, 3, 2, 5, device=device, requires_grad=True)
        weight = torch.randn(4, 3, device=device, requires_grad=True)
        bias = torch.randn(4, device=device, requires_grad=True)
        labels = torch.zeros(0, dtype=torch.long, device=device) if with_labels else None
        out = exit_head(h, weight, bias, labels, backend=backend)
        assert tuple(out.logits.shape) == (0, 4) and tuple(out.pooled.shape) == (0, 3)
        assert (out.supp is None) != with_labels
        assert out.supp is None or tuple(out.supp.shape) == (0,)
        for t in out:
            assert t is None or (t.dtype == h.dtype and t.device == h.device)
        loss = out.logits.sum() + out.pooled.sum() + (out.supp.sum() if with_labels else 0)
        loss.backward()
        assert tuple(h.grad.shape) == (0, 3, 2, 5)
        assert torch.equal(weight.grad, torch.zeros_like(weight))
        assert torch.equal(bias.grad, torch.zeros_like(bias))
        results.append([t for t in out if t is not None])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_matches_reference_at_a_design_shape(dtype, device):
    """B=128 at the first exit's shape, K=1000, a 1x1 map; bench/gpu_check.sh covers the rest."""
    for shape in ((128, 58, 40, 40, 10), (5, 7, 3, 5, 1000), (3, 464, 1, 1, 10)):
        for layout in ("contiguous", "channels_last", "strided"):
            compare_with_reference(shape, dtype, layout=layout, device=device)


def test_strided_labels_are_read_as_values(device):
    """labels[::2] is a view with stride 2: the kernels must see the values, not the storage
    (read as dense it once gave supp [0.59, 0.95, 0.0, 0.51] for [0.59, 0.27, 0.68, 1.01])."""
    h, weight, bias, labels = make_inputs(4, 5, 3, 4, 6, torch.float32, seed=7, device=device)
    wide = torch.stack([labels, (labels + 3) % 6], dim=1).flatten()   # labels at even positions
    strided = wide[::2]
    assert strided.stride() == (2,) and torch.equal(strided, labels)
    got = exit_head(h, weight, bias, strided, backend="triton")
    want = exit_head_reference(h, weight, bias, labels)
    torch.testing.assert_close(got.supp, want[2], rtol=1e-4, atol=1e-5)
    h.requires_grad_(True)
    exit_head(h, weight, bias, strided, backend="triton").supp.sum().backward()
    grad_strided = h.grad.clone()
    h.grad = None
    exit_head_reference(h, weight, bias, labels)[2].sum().backward()
    torch.testing.assert_close(grad_strided, h.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_offsets_past_2_31(device):
    """B*H*W and K*H*W beyond 2^31 (int32 offsets would wrap): bench/gpu_check.py's check,
    which compares the last samples and classes with the fp64 reference. About 30 GB."""
    import os
    import sys
    if torch.cuda.get_device_properties(device).total_memory < 48 * 2 ** 30:
        pytest.skip("needs a GPU with 48 GB or more (about 30 GB of tensors)")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    from gpu_check import large_index_checks
    checks = large_index_checks(device, smoke=False)
    assert len(checks) == 2 and all(check.passed for check in checks), checks
