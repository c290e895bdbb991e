"""NaN and inf through the fused exit head: the same positions and the same class (nan, +inf,
-inf) as the PyTorch reference (occam_kernels/reference.py), forward and backward.

The reference is the specification: a sample whose h holds a NaN has a NaN supp there
(mask * kl is 0 * NaN on its unsuppressed pixels), an infinite maximum CAM gives an infinite
logsumexp (torch.logsumexp shifts by 0 then), and 0 * NaN in the backward stays NaN. The other
samples' outputs and input gradients stay finite and equal to the reference.

Shapes are small: on a machine without a GPU the kernels run under the Triton interpreter.
"""
import math

import pytest
import torch

from occam_kernels import class_activation_maps, class_activation_maps_reference, exit_head

pytestmark = [
    pytest.mark.triton,
    # The Triton interpreter computes with numpy, which warns on every NaN/inf it makes:
    # here those values are the point, and the assertions check them.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]

NAN, INF = math.nan, math.inf
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5),
              torch.bfloat16: (5e-2, 5e-2)}


@pytest.fixture(autouse=True, params=["two_kernels", "one_pass"])
def backward_form(request, monkeypatch):
    """Every case through the op's backward (two kernels) and through the one-pass candidate
    (exit_head_backward(..., one_pass=True)) wherever it fits one tile (K > 64 takes the two
    kernels either way). The op imports the launcher when it runs, so patching the module
    reaches it. Returns the one_pass value of every backward launched under the patch."""
    one_pass_calls = []
    if request.param == "one_pass":
        import occam_kernels.triton.exit_head as kernels
        launcher = kernels.exit_head_backward

        def one_pass_where_it_fits(h, weight, *args, **kwargs):
            one_pass_calls.append(kernels.one_pass_fits(h, weight.shape[0]))
            return launcher(h, weight, *args, one_pass=one_pass_calls[-1], **kwargs)
        monkeypatch.setattr(kernels, "exit_head_backward", one_pass_where_it_fits)
    return one_pass_calls


def test_the_one_pass_form_reaches_the_op(backward_form, request, device):
    """The fixture's patch takes effect: under "one_pass" the op's backward ran the candidate."""
    h, weight, bias, labels = make_inputs(3, 4, 2, 3, 5, device)
    compare(h, weight, bias, labels)
    assert backward_form == ([True] if "one_pass" in request.node.callspec.id else [])


def make_inputs(batch, channels, height, width, num_classes, device, dtype=torch.float32,
                seed=0, offset=0.1):
    """h > 0 by default (so inf * h is never 0 * inf); offset=0 keeps the ReLU's zeros."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(batch, channels, height, width, generator=gen)) + offset
    weight = torch.randn(num_classes, channels, generator=gen) / channels ** 0.5
    bias = torch.randn(num_classes, generator=gen) * 0.1
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return (h.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype),
            labels.to(device))


def upstream_grads(batch, channels, num_classes, device, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device, dtype)
            for shape in ((batch, num_classes), (batch, channels), (batch,))]


def run(h, weight, bias, labels, upstream, backend):
    """Outputs (logits, pooled, supp) and gradients (dh, dW, db) of one backend."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, weight, bias)]
    outs = exit_head(*leaves, labels, backend=backend)
    torch.autograd.backward(list(outs), upstream)
    return [t.detach() for t in outs], [t.grad for t in leaves]


def assert_same(got, want, rtol, atol, what):
    """Equal non-finite positions and classes, finite values within tolerance."""
    got = got.double()
    for name, test in (("nan", torch.isnan), ("+inf", torch.isposinf),
                       ("-inf", torch.isneginf)):
        assert torch.equal(test(got), test(want)), (
            f"{what}: {name} positions differ\n got {got}\nwant {want}")
    finite = want[torch.isfinite(want)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def compare(h, weight, bias, labels, upstream=None):
    """The fused op against the float64 reference of the same inputs; returns the fused
    (outputs, gradients) for checks of which samples stay finite."""
    if upstream is None:
        upstream = upstream_grads(h.shape[0], h.shape[1], weight.shape[0], h.device, h.dtype)
    outs, grads = run(h, weight, bias, labels, upstream, "triton")
    want_outs, want_grads = run(h.double(), weight.double(), bias.double(), labels,
                                [g.double() for g in upstream], "reference")
    rtol, atol = TOLERANCES[h.dtype]
    for name, got, want in zip(("logits", "pooled", "supp", "dh", "dW", "db"),
                               outs + grads, want_outs + want_grads):
        assert got.dtype == h.dtype
        assert_same(got, want, rtol, atol, name)
    return outs, grads


def assert_other_samples_finite(outs, grads, bad):
    """Every output and input gradient of the samples other than `bad` is finite."""
    for name, t in zip(("logits", "pooled", "supp", "dh"), outs + grads[:1]):
        others = torch.cat([t[:bad], t[bad + 1:]])
        assert torch.isfinite(others).all(), f"{name} of the other samples: {t}"


# K = 17 pads one block of 32 classes; K = 70 is two blocks of 64 (the online logsumexp
# across them; the two kernels only: one pass needs one block)
@pytest.mark.parametrize("num_classes", [5, 17, 70])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_in_one_sample_of_h(value, num_classes, device):
    """Bug report: a NaN in one sample's h gave supp = 0 there (the reference gives NaN)."""
    h, weight, bias, labels = make_inputs(3, 4, 2, 3, num_classes, device)
    h[1, 2, 1, 0] = value
    outs, grads = compare(h, weight, bias, labels)
    assert not torch.isfinite(outs[2][1]), outs[2]
    assert_other_samples_finite(outs, grads, bad=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_nan_in_h_other_dtypes(dtype, device):
    """bf16 (fp32 accumulation) and fp64 (the broadcast-multiply-sum path, no tl.dot)."""
    h, weight, bias, labels = make_inputs(3, 4, 2, 3, 5, device, dtype=dtype)
    h[0, 1, 0, 2] = NAN
    outs, grads = compare(h, weight, bias, labels)
    assert torch.isnan(outs[2][0])
    assert_other_samples_finite(outs, grads, bad=0)


def test_nan_in_one_weight_row(device):
    """Bug report: a NaN row of the weight gave supp [0, 0, nan, nan] (the reference: all nan;
    the samples whose label is that row suppress no pixel, and 0 * NaN is NaN)."""
    h, weight, bias, _ = make_inputs(4, 4, 2, 3, 5, device, offset=0.0)  # NaN * 0 too
    assert (h == 0).any()
    labels = torch.tensor([3, 3, 0, 1], device=device)
    weight[3] = NAN
    outs, _ = compare(h, weight, bias, labels)
    assert torch.isnan(outs[2]).all(), outs[2]


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_weight_entry(value, device):
    h, weight, bias, _ = make_inputs(3, 4, 2, 3, 5, device)
    labels = torch.tensor([2, 0, 4], device=device)
    weight[2, 1] = value
    compare(h, weight, bias, labels)


@pytest.mark.parametrize("value", [INF, -INF])
def test_infinite_bias(value, device):
    """bias[k] = +inf: cam[k] is +inf everywhere, so lse is +inf (not inf - inf = NaN) and the
    other classes' softmax is 0: their dW and db rows stay finite. bias[k] = -inf for the
    labelled class: every pixel is suppressed and kl is +inf, so supp is +inf, grads finite."""
    h, weight, bias, _ = make_inputs(3, 4, 2, 3, 5, device)
    labels = torch.tensor([1, 1, 3], device=device)
    bias[1] = value
    outs, grads = compare(h, weight, bias, labels)
    if value < 0:
        assert torch.isposinf(outs[2][:2]).all() and torch.isfinite(grads[0]).all()
    else:
        assert torch.isfinite(grads[1][0]).all() and torch.isnan(grads[1][1]).all()


def test_a_whole_class_block_at_minus_inf(device):
    """K = 17 is two class blocks of 16: the first block is -inf at every pixel. The online
    logsumexp must not turn that block into -inf - (-inf) = NaN (the reference: finite lse,
    supp +inf where the label is in the -inf block, finite gradients)."""
    h, weight, bias, _ = make_inputs(2, 3, 2, 2, 17, device)
    labels = torch.tensor([4, 16], device=device)
    bias[:16] = -INF
    outs, grads = compare(h, weight, bias, labels)
    assert torch.isposinf(outs[2][0]) and torch.isfinite(grads[0]).all()


def test_one_pixel_nan(device):
    """H = W = 1: the kernels' threshold is +inf there (a tie decided exactly); a NaN CAM
    still must not be counted as suppressed nor dropped."""
    h, weight, bias, labels = make_inputs(3, 4, 1, 1, 5, device)
    h[2, 0, 0, 0] = NAN
    outs, grads = compare(h, weight, bias, labels)
    assert torch.isnan(outs[2][2])
    assert_other_samples_finite(outs, grads, bad=2)


@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_upstream_gradient_of_supp(value, device):
    """grad_supp[b] non-finite reaches every pixel of sample b, the unsuppressed ones too
    (the reference multiplies it by the 0/1 mask: 0 * NaN and 0 * inf are NaN)."""
    h, weight, bias, labels = make_inputs(3, 4, 2, 3, 5, device)
    upstream = upstream_grads(3, 4, 5, device, torch.float32)
    upstream[2][1] = value
    _, grads = compare(h, weight, bias, labels, upstream=upstream)
    assert torch.isfinite(torch.cat([grads[0][:1], grads[0][2:]])).all()


@pytest.mark.parametrize("used", ["logits", "pooled", "logits+pooled"])
def test_supp_left_out_of_the_loss_adds_nothing(used, device):
    """With labels but a loss on logits and/or pooled only, the reference never
    differentiates supp: dh of a sample with a NaN pixel is finite there (dense terms only).
    Zeros materialised for g_supp would run the CAM term and give 0 * NaN = NaN."""
    h, weight, bias, labels = make_inputs(3, 4, 2, 3, 5, device)
    h[1, 2, 1, 0] = NAN
    grads = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (h, weight, bias)]
        out = exit_head(*leaves, labels, backend=backend)
        loss = sum(getattr(out, name).sum() for name in used.split("+"))
        loss.backward()
        # a loss on pooled alone leaves the reference's weight and bias out of the graph
        grads.append([torch.zeros_like(t) if t.grad is None else t.grad for t in leaves])
    for name, got, want in zip(("dh", "dW", "db"), *grads):
        assert_same(got, want, *TOLERANCES[torch.float32], name)
    assert torch.isfinite(grads[0][0]).all()


def test_class_activation_maps_keep_nan(device):
    h, weight, bias, _ = make_inputs(2, 4, 2, 3, 5, device)
    h[1, 0, 1, 1] = NAN
    weight[2, 3] = INF
    got = class_activation_maps(h, weight, bias, backend="triton")
    want = class_activation_maps_reference(h.double(), weight.double(), bias.double())
    assert_same(got, want, *TOLERANCES[torch.float32], "cam")
