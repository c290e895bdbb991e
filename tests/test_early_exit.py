"""OccamNet.early_exit: with compaction it equals full-depth evaluation (DESIGN.md section 6)."""
import os
import sys

import pytest
import torch

from occamnets.models import occam_resnet18

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from benchutils import force_exit_distribution  # noqa: E402
from host_reads import HostReads  # noqa: E402


def small_model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = occam_resnet18(num_classes=5, width=8, stem="3x3", backend="reference")
    return model.to(device).eval()


def force_gates(model, pattern, x):
    """'all_e1' (everyone exits at E1), 'none' (nobody exits early), 'mixed' (40/30/30% of x
    at E1/E2/E3, by thresholds halfway between samples: features computed on a compacted
    batch may differ in the last bits, which must not flip a decision)."""
    if pattern == "mixed":
        force_exit_distribution(model, x, (0.4, 0.3, 0.3))
        return
    for t, exit_module in enumerate(model.exits):
        last = exit_module.gate.net[-1]
        with torch.no_grad():
            if pattern == "all_e1":
                last.weight.zero_(), last.bias.fill_(20.0 if t == 1 else -20.0)
            else:
                last.weight.zero_(), last.bias.fill_(-20.0)


def select_after_full_evaluation(model, x, threshold=0.5):
    """Independent baseline: every exit on every sample, then the first E1.. gate that fires."""
    out = model(x)
    last = model.num_exits - 1
    exit_index = torch.full((x.shape[0],), last, device=x.device)
    for i in range(x.shape[0]):
        for t in range(1, last):
            if out.exits[t].gate[i] >= threshold:
                exit_index[i] = t
                break
    logits = torch.stack([out.exits[int(t)].logits[i] for i, t in enumerate(exit_index)]) \
        if x.shape[0] else torch.zeros(0, model.num_classes, device=x.device)
    return logits, exit_index


@pytest.mark.parametrize("pattern", ["all_e1", "none", "mixed"])
@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("backend", ["native", pytest.param("triton", marks=pytest.mark.triton),
                                     "reference"])
def test_compaction_equals_full_evaluation(pattern, batch, backend, device):
    """Compaction backends: the extension's for the device ("native"), Triton, the reference."""
    model = small_model(device=device)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(device)
    force_gates(model, pattern, x)
    want_logits, want_exit = select_after_full_evaluation(model, x)
    backend = device.type if backend == "native" else backend
    for compaction in (True, False):
        got = model.early_exit(x, compaction=compaction, compaction_backend=backend)
        assert torch.equal(got.exit_index, want_exit)
        assert torch.equal(got.logits.argmax(1), want_logits.argmax(1))
        torch.testing.assert_close(got.logits, want_logits, rtol=1e-5, atol=1e-6)
        assert got.exit_counts.tolist() == torch.bincount(want_exit.cpu(), minlength=4).tolist()
        assert got.exit_counts[0] == 0
    if pattern == "all_e1" and batch:
        assert (got.exit_index == 1).all()
    if pattern == "none" and batch:
        assert (got.exit_index == 3).all()


def test_forced_distribution_takes_the_asked_shares():
    model = small_model()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    force_gates(model, "mixed", x)
    # round(0.4 * 64) = 26 at E1, then 0.3 / 0.6 of the 38 left at E2, the rest at E3
    assert model.early_exit(x).exit_counts.tolist() == [0, 26, 19, 19]


def test_compaction_skips_exit_zero_and_later_stages_when_all_exit():
    model = small_model()
    force_gates(model, "all_e1", None)
    calls = []
    for t, module in enumerate(list(model.stages) + list(model.exits)):
        module.register_forward_hook(lambda m, i, o, t=t: calls.append(t))
    model.early_exit(torch.randn(3, 3, 32, 32))
    # stages 0 and 1 (ids 0, 1) and exit 1 (id 5): no exit 0 (id 4), no stage 2/3.
    assert sorted(calls) == [0, 1, 5]


def test_early_exit_refuses_train_mode_and_bad_inputs():
    model = small_model().train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.early_exit(torch.randn(2, 3, 32, 32))
    model.eval()
    with pytest.raises(ValueError, match=r"images \(B, C, H, W\)"):
        model.early_exit(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="float images, got torch.uint8"):
        model.early_exit(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    model.first_inference_exit = model.num_exits - 1
    with pytest.raises(ValueError, match="needs an exit before the last"):
        model.early_exit(torch.randn(2, 3, 32, 32))


def test_first_inference_exit_is_where_early_exit_starts():
    """first_inference_exit=2: exits 0 and 1 never run at inference, shares start at E2."""
    model = small_model()
    model.first_inference_exit = 2
    force_gates(model, "all_e1", None)          # E1 would take everyone, but is not used
    calls = []
    for t, module in enumerate(model.exits):
        module.register_forward_hook(lambda m, i, o, t=t: calls.append(t))
    got = model.early_exit(torch.randn(5, 3, 32, 32))
    assert got.exit_counts.tolist() == [0, 0, 0, 5] and sorted(set(calls)) == [2, 3]


class _ScriptedGate(torch.nn.Module):
    """A gate returning fixed logits, one per sample of the batch it was made for."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, pooled):
        return self.logits[:pooled.shape[0]].to(pooled.device)


@pytest.mark.parametrize("compaction", [True, False])
def test_nonfinite_gates_and_logits_are_flagged_never_silently_routed(compaction):
    """E1's gate: NaN for sample 0, fires for 1 and 2, not for 3; E2 never fires. Sample 2's
    image is NaN, so the logits it leaves with are NaN too."""
    model = small_model()
    nan = float("nan")
    model.exits[1].gate = _ScriptedGate([nan, 30.0, 30.0, -30.0])
    model.exits[2].gate = _ScriptedGate([-30.0] * 4)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[2] = nan
    got = model.early_exit(x, compaction=compaction)
    assert got.exit_index.tolist() == [3, 1, 1, 3]   # a NaN gate never fires
    assert got.nonfinite.tolist() == [True, False, True, False]


def test_threshold_is_compared_in_float64():
    """A gate of exactly float32(0.7) is below the threshold 0.7 (float64), as the official
    Python comparison decides; in float32 the two would be equal and the gate would fire."""
    model = small_model()
    logit = torch.logit(torch.tensor(0.7))           # float32
    model.exits[1].gate = _ScriptedGate([logit.item()])
    model.exits[2].gate = _ScriptedGate([-30.0])
    assert torch.sigmoid(logit) == torch.tensor(0.7)  # equal in float32: would fire there
    got = model.early_exit(torch.randn(1, 3, 32, 32), threshold=0.7)
    assert got.exit_index.tolist() == [3]


@pytest.mark.parametrize("compaction", [True, False])
def test_early_exit_reads_the_device_only_for_compaction_counts(compaction):
    """On a GPU every host read stops the host from running ahead. early_exit makes one per
    compaction (DESIGN.md section 4) and none without compaction; torch.bincount for the exit
    counts made two more per call (its min and max), found by reading torch's CUDA source."""
    model = small_model()
    x = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    force_gates(model, "mixed", x)
    with HostReads() as seen:
        got = model.early_exit(x, compaction=compaction, compaction_backend="cpu")
    assert got.exit_counts.tolist() == torch.bincount(got.exit_index, minlength=4).tolist()
    assert seen.host_reads == []
    assert seen.compactions == (2 if compaction else 0)  # after E1 and E2; E3 is the last
