"""OccamResNet-18: shapes of section 8, fused against reference on a full training step, and
torch.compile of a training step without graph breaks."""
import os
import sys

import pytest
import torch

from occamnets.losses import OccamLoss
from occamnets.models import OccamNet, occam_resnet18, resnet18

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from benchutils import true_fp32  # noqa: E402


@pytest.mark.parametrize("stem,input_size,shapes", [
    ("7x7", 160, [(58, 40, 40), (116, 20, 20), (232, 10, 10), (464, 5, 5)]),
    ("3x3", 64, [(58, 64, 64), (116, 32, 32), (232, 16, 16), (464, 8, 8)]),
])
def test_exit_shapes_are_those_of_design_section_8(stem, input_size, shapes):
    model = occam_resnet18(10, stem=stem, backend="reference").eval()
    seen = []
    for exit_module in model.exits:
        exit_module.features.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    with torch.no_grad():
        out = model(torch.randn(1, 3, input_size, input_size), return_cams=True)
    assert seen == shapes
    assert [tuple(e.cam.shape[1:]) for e in out.exits] == [(10, h, w) for _, h, w in shapes]
    assert [tuple(l.shape) for l in out.logits] == [(1, 10)] * 4
    assert all(e.supp is None for e in out.exits)  # no labels, no suppression loss
    assert resnet18(10, stem=stem)(torch.randn(2, 3, input_size, input_size)).shape == (2, 10)


def test_first_exit_does_not_train_the_trunk():
    model = occam_resnet18(4, width=8, stem="3x3", backend="reference")
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    (out.exits[0].logits.sum() + out.exits[0].supp.sum()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.stem.parameters())
    assert model.exits[0].cam.weight.grad.abs().sum() > 0


def test_gate_sees_detached_features():
    model = occam_resnet18(4, width=8, stem="3x3", backend="reference")
    out = model(torch.randn(2, 3, 16, 16))
    out.exits[2].gate.sum().backward()
    assert model.exits[2].gate.net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.exits[2].features.parameters())


def training_step(model, x, labels, items):
    loss_fn = OccamLoss(num_items=8, num_classes=model.num_classes).to(x.device)
    loss_fn.on_epoch_start(0)
    loss, parts = loss_fn(model(x, labels), labels, items)
    loss.backward()
    return loss.detach(), parts, {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


@pytest.fixture
def exact_fp32():
    """With TF32 (10-bit) convolutions the backbone turned the heads' ~1e-6 differences into
    4% on some of the stem's weight gradients (H200, 2026-11-27); the comparison is of the
    heads."""
    with true_fp32():
        yield


@pytest.mark.triton
def test_fused_and_reference_training_steps_agree(device, exact_fp32):
    """A full-width OccamResNet-18 step on small images: Triton vs reference exit heads."""
    torch.manual_seed(0)
    reference = occam_resnet18(10, width=58, stem="3x3", backend="reference").to(device)
    fused = occam_resnet18(10, width=58, stem="3x3", backend="triton").to(device)
    fused.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=generator).to(device)
    labels = torch.tensor([1, 7, 3], device=device)
    items = torch.tensor([0, 5, 2], device=device)
    loss_r, parts_r, grads_r = training_step(reference, x, labels, items)
    loss_f, parts_f, grads_f = training_step(fused, x, labels, items)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-4, atol=1e-5)
    for name in parts_r:
        torch.testing.assert_close(parts_f[name], parts_r[name], rtol=1e-4, atol=1e-5)
    assert grads_f.keys() == grads_r.keys()
    # fp32 sums in another order: ~1e-5 apart. The gate's first bias has a zero gradient in
    # exact arithmetic (BatchNorm follows it), so only an absolute bound applies there.
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-3, atol=1e-4,
                                   msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.triton
def test_training_step_compiles_without_graph_breaks(device):
    """torch._dynamo.explain counts graph breaks in forward + OccamLoss; fullgraph compiles."""
    model = occam_resnet18(4, width=8, stem="3x3", backend="triton").to(device)
    loss_fn = OccamLoss(num_items=8, num_classes=4).to(device)
    loss_fn.on_epoch_start(0)

    def forward_and_loss(x, labels, items):
        return loss_fn(model(x, labels), labels, items)[0]

    x = torch.randn(2, 3, 16, 16, device=device)
    labels, items = torch.tensor([0, 3], device=device), torch.tensor([1, 6], device=device)
    explanation = torch._dynamo.explain(forward_and_loss)(x, labels, items)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(forward_and_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(x, labels, items)
    loss.backward()
    assert model.exits[3].cam.weight.grad is not None


def test_generic_occamnet_on_torchvision_backbones():
    import torchvision
    for backbone, channels in ((torchvision.models.resnet18(num_classes=3), [64, 128, 256, 512]),
                               (torchvision.models.mobilenet_v3_small(), [16, 24, 48, 576])):
        model = OccamNet.from_torchvision(backbone, num_classes=5, backend="reference")
        assert [e.cam.in_channels for e in model.exits] == channels
        out = model(torch.randn(2, 3, 64, 64), torch.tensor([0, 4]))
        assert len(out.exits) == 4 and out.exits[3].logits.shape == (2, 5)
        assert all(e.supp.shape == (2,) for e in out.exits)


def test_a_backbone_already_moved_or_cast_is_probed_where_it_is():
    """from_torchvision and OccamNet probe the backbone with an image where its weights are
    (fp64 here stands in for a GPU: a CPU fp32 probe fails on either) and put the exits
    beside it."""
    import torchvision
    backbone = torchvision.models.resnet18(num_classes=3).double()
    model = OccamNet.from_torchvision(backbone, num_classes=5, backend="reference")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    out = model(torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 4]))
    assert out.exits[3].logits.dtype == torch.float64
    features = torchvision.models.mobilenet_v3_small().double()
    model = OccamNet.from_torchvision(features, num_classes=5, backend="reference")
    assert [e.cam.in_channels for e in model.exits] == [16, 24, 48, 576]
