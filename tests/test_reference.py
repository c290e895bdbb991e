"""The exit-head reference against an independent naive version, and fp64 gradcheck on it."""
import math

import pytest
import torch

from occam_kernels import class_activation_maps_reference, exit_head_reference


def naive_exit_head(h, weight, bias, labels):
    """Explicit CAM, log_softmax, KL to the uniform distribution, mask: per sample, in loops."""
    batch, channels, height, width = h.shape
    num_classes = weight.shape[0]
    weight = weight.reshape(num_classes, channels)
    logits, pooled, supp = [], [], []
    for b in range(batch):
        cam = torch.stack([(weight[k][:, None, None] * h[b]).sum(0) + bias[k]
                           for k in range(num_classes)])                  # (K, H, W)
        logits.append(cam.mean(dim=(1, 2)))
        pooled.append(h[b].mean(dim=(1, 2)))
        if labels is None:
            continue
        y = int(labels[b])
        log_probs = torch.log_softmax(cam.reshape(num_classes, -1), dim=0)  # (K, P)
        uniform = torch.full_like(log_probs, 1.0 / num_classes)
        kl = (uniform * (uniform.log() - log_probs)).sum(0)                  # (P,)
        mask = (cam[y].reshape(-1) <= cam[y].mean()).to(h.dtype)
        supp.append((mask * kl).sum() / (height * width))
    return (torch.stack(logits), torch.stack(pooled),
            torch.stack(supp) if labels is not None else None)


SHAPES = [(3, 5, 4, 6, 7), (2, 3, 1, 1, 4), (4, 2, 3, 3, 1), (1, 6, 5, 5, 10)]


@pytest.mark.parametrize("batch,channels,height,width,num_classes", SHAPES)
def test_reference_matches_naive(batch, channels, height, width, num_classes):
    generator = torch.Generator().manual_seed(batch * 100 + num_classes)
    h = torch.relu(torch.randn(batch, channels, height, width, generator=generator,
                               dtype=torch.float64))
    weight = torch.randn(num_classes, channels, 1, 1, generator=generator, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    got = exit_head_reference(h, weight, bias, labels)
    want = naive_exit_head(h, weight, bias, labels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    logits, pooled, supp = exit_head_reference(h, weight, None, None)
    assert supp is None
    torch.testing.assert_close(logits, naive_exit_head(h, weight, torch.zeros(num_classes,
                               dtype=torch.float64), None)[0])


def test_suppression_is_zero_for_one_class_and_positive_otherwise():
    h = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    labels = torch.zeros(2, dtype=torch.long)
    _, _, supp = exit_head_reference(h, torch.randn(1, 3, dtype=torch.float64), None, labels)
    assert torch.equal(supp, torch.zeros(2, dtype=torch.float64))   # KL to uniform of K=1 is 0
    _, _, supp = exit_head_reference(h, torch.randn(5, 3, dtype=torch.float64), None, labels)
    assert (supp > 0).all()


def test_cam_gap_equals_logits():
    h = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    weight, bias = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    cam = class_activation_maps_reference(h, weight, bias)
    assert cam.shape == (3, 7, 5, 6)
    torch.testing.assert_close(cam.mean(dim=(2, 3)), exit_head_reference(h, weight, bias)[0])
    conv = torch.nn.functional.conv2d(h, weight[:, :, None, None], bias)
    torch.testing.assert_close(cam, conv)


@pytest.mark.parametrize("batch,channels,height,width,num_classes", SHAPES)
def test_reference_gradcheck(batch, channels, height, width, num_classes):
    generator = torch.Generator().manual_seed(7 + batch)
    h = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(num_classes, channels, generator=generator, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    for tensor in (h, weight, bias):
        tensor.requires_grad_(True)

    def outputs(h, weight, bias):
        return exit_head_reference(h, weight, bias, labels)

    assert torch.autograd.gradcheck(outputs, (h, weight, bias))


def test_reference_backward_matches_design_formulas():
    """Autograd of the reference equals the closed-form backward of DESIGN.md section 3."""
    generator = torch.Generator().manual_seed(3)
    B, C, H, W, K = 3, 4, 3, 5, 6
    P = H * W
    h = torch.randn(B, C, H, W, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(K, C, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(K, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, K, (B,), generator=generator)
    g_logits = torch.randn(B, K, generator=generator, dtype=torch.float64)
    g_pooled = torch.randn(B, C, generator=generator, dtype=torch.float64)
    g_supp = torch.randn(B, generator=generator, dtype=torch.float64)
    logits, pooled, supp = exit_head_reference(h, weight, bias, labels)
    torch.autograd.backward((logits, pooled, supp), (g_logits, g_pooled, g_supp))

    with torch.no_grad():
        cam = (torch.einsum("kc,bcp->bkp", weight, h.flatten(2)) + bias[None, :, None])
        mask = (cam[torch.arange(B), labels] <= logits[torch.arange(B), labels][:, None])
        dcam = g_supp[:, None, None] / P * mask[:, None, :] * (torch.softmax(cam, 1) - 1.0 / K)
        dh = (torch.einsum("kc,bkp->bcp", weight, dcam)
              + ((g_logits @ weight) + g_pooled)[:, :, None] / P).reshape(B, C, H, W)
        dW = torch.einsum("bkp,bcp->kc", dcam, h.flatten(2)) + g_logits.t() @ pooled
        db = dcam.sum(dim=(0, 2)) + g_logits.sum(0)
    torch.testing.assert_close(h.grad, dh)
    torch.testing.assert_close(weight.grad, dW)
    torch.testing.assert_close(bias.grad, db)


def test_one_pixel_map_is_always_suppressed():
    """At H = W = 1 the ground-truth CAM is its own mean, so the mask keeps every sample. The
    threshold once came from the logits, another rounding of W @ h + b: in fp32 on this CPU
    that put 226 of these 512 samples one ulp above it (supp 0), and fp64 on an H200 one
    sample of three in tests/test_exit_head.py."""
    torch.manual_seed(0)
    h = torch.randn(512, 464, 1, 1)
    weight, bias = torch.randn(10, 464), torch.randn(10)
    labels = torch.randint(0, 10, (512,))
    supp = exit_head_reference(h, weight, bias, labels)[2]
    cam = class_activation_maps_reference(h, weight, bias).flatten(1)          # (B, K)
    kl_to_uniform = torch.logsumexp(cam, dim=1) - cam.mean(dim=1) - math.log(10)
    assert torch.equal(supp, kl_to_uniform)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_constant_map_is_suppressed_everywhere(dtype):
    """A stage whose ReLU is dead everywhere (h = 0) makes every CAM its bias: each pixel
    equals the mean, so the mask keeps them all (DESIGN.md section 3: cam <= t). The rounded
    mean of 25 copies of 0.03 fell one ulp below them in fp32 and dropped every pixel."""
    torch.manual_seed(0)
    bias = torch.tensor([0.03, 0.0, -1.0, 0.7])
    weight = torch.randn(4, 8)
    h = torch.zeros(4, 8, 5, 5)
    labels = torch.arange(4)
    h, weight, bias = h.to(dtype), weight.to(dtype), bias.to(dtype)   # the same values in fp64
    want = exit_head_reference(h.double(), weight.double(), bias.double(), labels)[2]
    supp = exit_head_reference(h, weight, bias, labels)[2]
    assert (want > 0.1).all() and (supp > 0.1).all()
    # The reference computes in its input's dtype: bf16 rounds 1.48 (the logsumexp) by 0.008.
    atol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(supp.double(), want, rtol=0, atol=atol)
