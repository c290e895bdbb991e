"""OccamLoss against hand-computed values, and its state over batches and epochs (DESIGN.md 5)."""
import math

import pytest
import torch
import torch.nn.functional as F

from occamnets.losses import OccamLoss, _last_copy
from occamnets.models import ExitOutput, OccamOutput, occam_resnet18


def output(logits, gates, supp):
    def exit_output(l, g, s):
        l = torch.as_tensor(l, dtype=torch.float32)
        s = None if s is None else torch.as_tensor(s, dtype=torch.float32)
        g = torch.as_tensor(g, dtype=torch.float32)
        return ExitOutput(l, g, torch.logit(g), torch.zeros(l.shape[0], 1), s, None)
    return OccamOutput(tuple(exit_output(*values) for values in zip(logits, gates, supp)))


def test_components_equal_hand_computed_values():
    loss = OccamLoss(num_items=10, num_classes=2, num_exits=2, taus=(0.5, 0.6))
    loss.on_epoch_start(0)
    out = output(logits=[[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [3.0, 0.0]]],
                 gates=[[0.7, 0.4], [0.2, 0.9]], supp=[[0.3, 0.5], [0.1, 0.2]])
    labels, items = torch.tensor([0, 0]), torch.tensor([3, 7])
    total, parts = loss(out, labels, items)

    # Exit 0: w = p(y|x)^3 normalised by the running max (this batch's max).
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.e)]
    ce = [-math.log(q) for q in p]
    w = [q ** 3 for q in p]
    w = [v / (max(w) + 1e-5) for v in w]
    main0 = sum((wi + 0.1) * c for wi, c in zip(w, ce)) / 2
    # Gate 0: predictions [0, 1] -> targets [1, 0]; one of each, so equal balanced weights.
    balanced = (1 / (1 + 1e-5)) ** 0.5
    gate0 = balanced * (-math.log(0.7) - math.log(1 - 0.4)) / 2
    supp0 = 0.1 * (0.3 + 0.5) / 2
    # Exit 1: w = 1 - gate_0, normalised by its max; targets [1, 1] (both predict class 0).
    p1 = [math.exp(1) / (math.exp(1) + 1), math.exp(3) / (math.exp(3) + 1)]
    ce1 = [-math.log(q) for q in p1]
    w1 = [1 - 0.7, 1 - 0.4]
    w1 = [v / (max(w1) + 1e-5) for v in w1]
    main1 = sum((wi + 0.1) * c for wi, c in zip(w1, ce1)) / 2
    # All targets are "exit": continue count 0 -> its weight never applies; exit weight 1/(1+eps).
    gate1 = balanced * (-math.log(0.2) - math.log(0.9)) / 2
    supp1 = 0.1 * (0.1 + 0.2) / 2
    want = {"main/E0": main0, "gate/E0": gate0, "supp/E0": supp0,
            "main/E1": main1, "gate/E1": gate1, "supp/E1": supp1}
    for name, value in want.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-5), name
    assert total.item() == pytest.approx(sum(want.values()), rel=1e-5)


def test_unbalanced_gate_targets_are_reweighted():
    loss = OccamLoss(num_items=4, num_classes=2, num_exits=1, taus=(0.5,))
    loss.on_epoch_start(0)
    # Predictions [0, 0, 0, 1] against labels all 0: targets [1, 1, 1, 0].
    out = output(logits=[[[1.0, 0.0]] * 3 + [[0.0, 1.0]]], gates=[[0.5] * 4], supp=[[0.0] * 4])
    _, parts = loss(out, torch.zeros(4, dtype=torch.long), torch.arange(4))
    exit_weight = (1 / (1 + 1e-5)) ** 0.5
    continue_weight = (1 / (1 / 3 + 1e-5)) ** 0.5
    want = (3 * exit_weight + continue_weight) * math.log(2) / 4
    assert parts["gate/E0"].item() == pytest.approx(want, rel=1e-5)


def run_batch(loss, correct_pattern, items, gate=0.5, num_classes=2):
    """One batch for a single-exit loss where exit 0 is correct exactly where the pattern says."""
    labels = torch.zeros(len(items), dtype=torch.long)
    logits = [[1.0, 0.0] if ok else [0.0, 1.0] for ok in correct_pattern]
    out = output(logits=[logits], gates=[[gate] * len(items)], supp=[[0.0] * len(items)])
    return loss(out, labels, torch.tensor(items))


def test_targets_refresh_in_first_epoch_and_while_accuracy_is_low_then_freeze():
    loss = OccamLoss(num_items=6, num_classes=2, num_exits=1, taus=(0.5,))
    loss.on_epoch_start(0)
    run_batch(loss, [True, True, True], [0, 1, 2])          # accuracy 1.0 but first epoch
    assert loss.gate_targets[0, :3].tolist() == [1, 1, 1]
    run_batch(loss, [False, False, False], [0, 1, 2])       # still first epoch: refreshed
    assert loss.gate_targets[0, :3].tolist() == [0, 0, 0]

    loss.on_epoch_start(1)
    run_batch(loss, [True, True, True], [0, 1, 2])          # accuracy 1.0 > 0.5: frozen
    assert loss.gate_targets[0, :3].tolist() == [0, 0, 0]
    run_batch(loss, [True], [3])                            # a new item gets its target anyway
    assert loss.gate_targets[0, 3].item() == 1
    # Within the epoch: 4 correct of 4 so far; 6 wrong more -> 4/10 = 0.4 <= 0.5: refreshed.
    run_batch(loss, [False] * 6, [0, 1, 2, 3, 4, 5])
    assert loss.gate_targets[0].tolist() == [0] * 6

    loss.on_epoch_start(2)                                  # accuracy counts start again
    run_batch(loss, [True, True], [0, 1])                   # 1.0 > 0.5: frozen at 0
    assert loss.gate_targets[0, :2].tolist() == [0, 0]
    run_batch(loss, [False, False, True], [0, 1, 2])        # 3/5 = 0.6 > 0.5: still frozen
    assert loss.gate_targets[0, :3].tolist() == [0, 0, 0]


def test_mean_per_class_accuracy_decides_refresh():
    # Class 0 all correct, class 1 all wrong: mean per class 0.5 <= 0.5 refreshes, although
    # the plain accuracy (3 of 4) is 0.75.
    loss = OccamLoss(num_items=4, num_classes=2, num_exits=1, taus=(0.5,))
    loss.on_epoch_start(0)
    run_batch(loss, [False] * 4, [0, 1, 2, 3])
    loss.on_epoch_start(1)
    labels = torch.tensor([0, 0, 0, 1])
    out = output(logits=[[[1.0, 0.0]] * 3 + [[1.0, 0.0]]], gates=[[0.5] * 4], supp=[[0.0] * 4])
    loss(out, labels, torch.arange(4))
    assert loss.gate_targets[0].tolist() == [1, 1, 1, 0]


def test_running_max_is_kept_within_an_epoch_and_reset_at_the_next():
    loss = OccamLoss(num_items=4, num_classes=2, num_exits=2, taus=(0.5, 0.5))
    loss.on_epoch_start(0)
    out = output(logits=[[[0.0, 0.0]] * 2] * 2, gates=[[0.2, 0.6], [0.5, 0.5]], supp=[[0.0] * 2] * 2)
    loss(out, torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert loss.max_weight.tolist() == pytest.approx([0.125, 0.8])   # 0.5^3, 1 - 0.2
    out = output(logits=[[[0.0, 0.0]] * 2] * 2, gates=[[0.9, 0.9], [0.5, 0.5]],
                 supp=[[0.0] * 2] * 2)
    _, parts = loss(out, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert loss.max_weight.tolist() == pytest.approx([0.125, 0.8])   # 0.1 < 0.8: kept
    ce = math.log(2)
    assert parts["main/E1"].item() == pytest.approx((0.1 / (0.8 + 1e-5) + 0.1) * ce, rel=1e-5)
    loss.on_epoch_start(1)
    assert loss.max_weight.tolist() == [0.0, 0.0]
    loss(out, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert loss.max_weight.tolist() == pytest.approx([0.125, 0.1])


def test_state_round_trips_through_state_dict():
    loss = OccamLoss(num_items=5, num_classes=2, num_exits=1, taus=(0.5,))
    loss.on_epoch_start(3)
    run_batch(loss, [True, False], [1, 4])
    restored = OccamLoss(num_items=5, num_classes=2, num_exits=1, taus=(0.5,))
    restored.load_state_dict(loss.state_dict())
    for name, buffer in loss.named_buffers():
        assert torch.equal(buffer, dict(restored.named_buffers())[name]), name
    assert restored.epoch.item() == 3


def test_an_item_twice_in_a_batch_stores_its_last_copys_target():
    """Balanced sampling draws with replacement: item 3 comes three times, right, wrong, right
    (its last copy), item 5 twice, right then wrong. Each copy trains on its own correctness
    and counts in the gate's balance; the stored target is the last copy's, as the official's
    dict written in batch order keeps (a scatter of every copy leaves the device's choice)."""
    loss = OccamLoss(num_items=8, num_classes=2, num_exits=1, taus=(0.5,))
    loss.on_epoch_start(0)
    items = torch.tensor([5, 3, 3, 1, 5, 3])
    labels = torch.zeros(6, dtype=torch.long)
    right, wrong = [2.0, 0.0], [0.0, 2.0]
    out = output(logits=[[right, right, wrong, right, wrong, right]], gates=[[0.5] * 6],
                 supp=[[0.0] * 6])
    _, parts = loss(out, labels, items)
    assert parts["exit_targets/E0"].item() == pytest.approx(4 / 6)   # every copy counted
    assert loss.has_target[0].tolist() == [i in (1, 3, 5) for i in range(8)]
    assert loss.gate_targets[0, [1, 3, 5]].tolist() == [1.0, 1.0, 0.0]
    # After the first epoch, with accuracy above tau: every copy reads the stored target.
    loss.on_epoch_start(1)
    out = output(logits=[[right, right, right]], gates=[[0.5] * 3], supp=[[0.0] * 3])
    _, parts = loss(out, torch.zeros(3, dtype=torch.long), torch.tensor([5, 5, 3]))
    assert parts["refreshing/E0"].item() == 0
    assert parts["exit_targets/E0"].item() == pytest.approx(1 / 3)   # 5's stored 0, twice
    assert loss.gate_targets[0, [3, 5]].tolist() == [1.0, 0.0]


def test_every_copy_of_an_item_is_written_with_its_last_copys_value():
    """The stored targets must not depend on which of several writes to one index a device
    does last (CUDA's scatter does not say): every copy's position gets the last copy's."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        size = int(torch.randint(1, 24, (), generator=generator))
        items = torch.randint(0, 8, (size,), generator=generator).tolist()
        want = [max(j for j, other in enumerate(items) if other == item) for item in items]
        assert _last_copy(torch.tensor(items), 8).tolist() == want, items


def test_errors_are_named():
    loss = OccamLoss(num_items=4, num_classes=2, num_exits=1, taus=(0.5,))
    out = output(logits=[[[1.0, 0.0]] * 2], gates=[[0.5] * 2], supp=[[0.0] * 2])
    with pytest.raises(RuntimeError, match=r"item indices must lie in \[0, 4\)"):
        loss(out, torch.tensor([0, 1]), torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 2\)"):
        loss(out, torch.tensor([0, 2]), torch.tensor([0, 1]))
    assert not loss.has_target.any()  # refused before any state changed
    with pytest.raises(ValueError, match="predicts 2 classes, the loss expects 3"):
        OccamLoss(num_items=4, num_classes=3, num_exits=1, taus=(0.5,))(
            out, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one tau per exit"):
        OccamLoss(num_items=4, num_classes=2, num_exits=2, taus=(0.5,))
    with pytest.raises(ValueError, match="call the model with labels"):
        loss(output(logits=[[[1.0, 0.0]] * 2], gates=[[0.5] * 2], supp=[None]),
             torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_no_python_loop_over_samples_and_no_host_sync():
    """The state update is vectorised: a large batch costs a handful of ops, no .item()."""
    loss = OccamLoss(num_items=10000, num_classes=10, num_exits=1, taus=(0.5,))
    loss.on_epoch_start(1)
    batch = 4096
    out = output([torch.randn(batch, 10)], [torch.rand(batch)], [torch.rand(batch)])
    calls = []
    original = torch.Tensor.item
    torch.Tensor.item = lambda self: calls.append(1) or original(self)
    try:
        loss(out, torch.randint(0, 10, (batch,)), torch.randperm(10000)[:batch])
    finally:
        torch.Tensor.item = original
    assert not calls


def test_saturated_gate_keeps_its_gradient_under_bf16_autocast():
    """A gate sure to exit (p rounds to exactly 1.0) on a sample its exit gets wrong: the BCE
    from the fp32 logit is softplus(20) with gradient 1, where BCE on the rounded sigmoid is
    clamped at 100 with gradient 0."""
    torch.manual_seed(0)
    model = occam_resnet18(4, width=8, stem="3x3", backend="reference")
    with torch.no_grad():
        for exit_module in model.exits:
            exit_module.gate.net[-1].weight.zero_()
            exit_module.gate.net[-1].bias.fill_(20.0)
            exit_module.cam.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))  # predicts 0
    x, labels, items = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 1]), torch.arange(4)
    loss_fn = OccamLoss(num_items=4, num_classes=4)
    loss_fn.on_epoch_start(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels)
        loss, parts = loss_fn(out, labels, items)
    assert all(e.gate_logit.dtype == torch.float32 for e in out.exits)
    assert all(bool((e.gate == 1.0).all()) for e in out.exits)
    loss.backward()
    for t, exit_module in enumerate(model.exits):
        assert parts[f"gate/E{t}"].item() == pytest.approx(20.0, abs=1e-3)
        # d(mean BCE)/d(bias) = mean(sigmoid(20) - 0) = 1 (balance weight 1: all "continue")
        assert exit_module.gate.net[-1].bias.grad.item() == pytest.approx(1.0, abs=1e-3)
    # What the gate got from BCE on its bf16 probability before: no gradient, a loss of 100.
    logit = torch.full((1,), 20.0, dtype=torch.bfloat16, requires_grad=True)
    rounded = F.binary_cross_entropy(torch.sigmoid(logit).float(), torch.zeros(1))
    rounded.backward()
    assert rounded.item() == 100.0 and logit.grad.item() == 0.0
