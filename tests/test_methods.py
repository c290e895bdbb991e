"""Debiasing methods against hand-computed small cases and the official algorithms' loops;
their composition with OccamLoss; the ablations; the bias groups they read."""
import math

import pytest
import torch
import torch.nn.functional as F

from occamnets.data import bias_groups
from occamnets.losses import OccamLoss
from occamnets.methods import (GroupDRO, GroupUpweighting, Method, PredictiveGroupInvariance,
                               SpectralDecoupling, build_method)
from occamnets.models.outputs import ExitOutput, OccamOutput


def cross_entropy_by_hand(logits, label):
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


# -- groups ------------------------------------------------------------------------------------

def test_groups_are_label_and_attribute_values_with_the_aligned_group_first():
    labels = torch.tensor([1, 1, 0, 1, 0, 1])
    attributes = torch.tensor([[1, 1], [0, 1], [0, 0], [1, 1], [1, 0], [0, 0]])
    groups = bias_groups(labels, attributes, ["colour", "texture"],
                         aligned=attributes == labels[:, None])
    # Class 0: (0, 0) aligned on both, (1, 0) conflicting once. Class 1: (1, 1), then the
    # one-conflict (0, 1), then (0, 0).
    assert groups.keys.tolist() == [[0, 0, 0], [0, 1, 0], [1, 1, 1], [1, 0, 1], [1, 0, 0]]
    assert groups.sizes.tolist() == [1, 1, 2, 1, 1]
    assert groups.index.tolist() == [2, 3, 0, 2, 1, 4]
    assert groups.names()[3] == "label=1, colour=0, texture=1"
    assert groups.names(["cat", "dog"])[3] == "dog, colour=0, texture=1"
    # Not knowing which values are aligned: label, then the values.
    unordered = bias_groups(labels, attributes, ["colour", "texture"])
    assert unordered.keys.tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="attribute columns"):
        bias_groups(labels, attributes, ["colour"])
    empty = bias_groups(labels[:0], attributes[:0], ["colour", "texture"])
    assert empty.count == 0 and empty.index.shape == (0,)


# -- UpWt ----------------------------------------------------------------------------------------

def test_upweighting_multiplies_cross_entropy_by_inverse_group_size_to_the_gamma():
    method = GroupUpweighting(torch.tensor([4, 1]), gamma=0.5)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels, groups = torch.tensor([0, 0]), torch.tensor([0, 1])
    expected = (0.5 * cross_entropy_by_hand([2.0, 0.0], 0)
                + 1.0 * cross_entropy_by_hand([0.0, 1.0], 0)) / 2
    loss = method.reduce(method.sample_loss(logits, labels, groups), groups, 0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_upweighting_weights_sum_per_group_to_size_to_the_one_minus_gamma(gamma):
    sizes = torch.tensor([50, 7, 1, 3])
    method = GroupUpweighting(sizes, gamma)
    index = torch.repeat_interleave(torch.arange(4), sizes)
    per_group = torch.zeros(4).index_add(0, index, method.weights[index])
    assert torch.allclose(per_group, sizes.float() ** (1 - gamma))


# -- GroupDRO ----------------------------------------------------------------------------------

def test_group_dro_weights_follow_the_exponentiated_gradient_update():
    method = GroupDRO(num_groups=3, eta=0.5, num_heads=2)
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    batches = [(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0, 0, 1])),
               (torch.tensor([0.5, 4.0]), torch.tensor([2, 1]))]
    for losses, groups in batches:
        group_loss = torch.zeros(3, dtype=torch.float64)
        for g in range(3):
            members = losses[groups == g].double()
            group_loss[g] = members.mean() if len(members) else 0.0   # absent: loss 0
        q = q * torch.exp(0.5 * group_loss)
        q = q / q.sum()
        loss = method.reduce(losses, groups, head=1)
        assert torch.allclose(method.group_weights[1].double(), q, atol=1e-6)
        assert loss.item() == pytest.approx(float(q @ group_loss), rel=1e-5)
    # The other head's weights are its own.
    assert torch.allclose(method.group_weights[0], torch.full((3,), 1 / 3))


@pytest.mark.parametrize("eta", [40.0, 100.0])
def test_group_dro_weights_stay_finite_at_a_large_eta(eta):
    """exp(eta * 2.3) overflowed float32 from eta 39 (--gdro-eta allows 100): q was inf/inf =
    NaN from the first step. The update is the same normalised product, in log space."""
    method = GroupDRO(num_groups=2, eta=eta)
    losses, groups = torch.tensor([2.3, 2.3, 2.4, 2.4]), torch.tensor([0, 0, 1, 1])
    loss = method.reduce(losses, groups, 0)
    q1 = 1 / (1 + math.exp(eta * 0.1))   # q_0 / (q_0 + q_1) with q uniform before
    assert method.group_weights[0].tolist() == pytest.approx([q1, 1 - q1], rel=1e-4)
    assert loss.item() == pytest.approx(2.3 * q1 + 2.4 * (1 - q1), rel=1e-5)


def test_group_dro_gradient_is_the_weighted_group_means():
    method = GroupDRO(num_groups=2, eta=0.0)     # eta 0: q stays uniform
    losses = torch.tensor([1.0, 2.0, 5.0], requires_grad=True)
    method.reduce(losses, torch.tensor([0, 0, 1]), 0).backward()
    assert losses.grad.tolist() == pytest.approx([0.25, 0.25, 0.5])


# -- SD ------------------------------------------------------------------------------------------

def test_spectral_decoupling_adds_half_lambda_squared_true_logit_distance():
    method = SpectralDecoupling(lambdas=[0.1, 2.0], gammas=[0.0, 1.0], num_groups=2)
    logits = torch.tensor([[3.0, 1.0], [0.5, -0.5]], requires_grad=True)
    labels, groups = torch.tensor([0, 1]), torch.tensor([0, 1])
    losses = method.sample_loss(logits, labels, groups)
    expected = [cross_entropy_by_hand([3.0, 1.0], 0) + 0.5 * 0.1 * 3.0 ** 2,
                cross_entropy_by_hand([0.5, -0.5], 1) + 0.5 * 2.0 * (-0.5 - 1.0) ** 2]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    # The penalty acts on the true-class logit only: lambda * (logit - gamma) on top of CE's.
    losses.sum().backward()
    ce_grad = torch.softmax(logits.detach(), 1) - F.one_hot(labels, 2)
    penalty_grad = logits.grad - ce_grad
    assert torch.allclose(penalty_grad, torch.tensor([[0.3, 0.0], [0.0, -3.0]]), atol=1e-6)


def test_spectral_decoupling_needs_one_value_or_one_per_group():
    SpectralDecoupling([0.1], [0.0], num_groups=5)
    with pytest.raises(ValueError, match="one lambda or one per training group \\(5\\)"):
        SpectralDecoupling([0.1, 0.2], [0.0], num_groups=5)


# -- PGI -----------------------------------------------------------------------------------------

def official_invariance_loss(logits, labels, groups, weight, num_classes, eps=1e-12):
    """The official calc_invariance_loss's loop (trainers/pgi_trainer.py), rewritten here."""
    total = 0.0
    for label in torch.unique(labels):
        members = torch.where(labels == label)[0].tolist()
        member_groups = [int(groups[i]) for i in members]
        present = sorted(set(member_groups))
        if len(present) < 2:
            continue
        if len(present) == 2:
            first = [i for i, g in zip(members, member_groups) if g == present[0]]
            second = [i for i, g in zip(members, member_groups) if g == present[1]]
        else:
            middle = present[len(present) // 2]
            first = [i for i, g in zip(members, member_groups) if g <= middle]
            second = [i for i, g in zip(members, member_groups) if g > middle]
        p0 = torch.softmax(logits[first], 1).mean(0).clamp(eps, 1 - eps)
        p1 = torch.softmax(logits[second], 1).mean(0).clamp(eps, 1 - eps)
        total = total + weight * (p1 * torch.log(p1 / p0)).mean() / num_classes
    return total


def test_pgi_on_a_hand_computed_case():
    # Class 0 has groups 0 and 1 (one sample each); class 1 a single group (no term).
    method = PredictiveGroupInvariance(weight=2.0, num_groups=3, num_classes=2)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [1.0, 2.0]])
    labels, groups = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])
    p0, p1 = [0.5, 0.5], [0.75, 0.25]
    kl_mean = sum(b * math.log(b / a) for a, b in zip(p0, p1)) / 2
    expected = 2.0 * 1.0 * kl_mean / 2          # weight x ramp x mean over K / K
    assert method.penalty(logits, labels, groups, progress=1.0).item() == pytest.approx(
        expected, rel=1e-6)
    # Warm-up: a quarter of the way through the run, a quarter of the weight.
    assert method.penalty(logits, labels, groups, 0.25).item() == pytest.approx(expected / 4)


@pytest.mark.parametrize("seed", range(5))
def test_pgi_matches_the_official_loop_on_random_batches(seed):
    generator = torch.Generator().manual_seed(seed)
    classes, num_groups, batch = 3, 9, 40
    labels = torch.randint(0, classes, (batch,), generator=generator)
    groups = torch.randint(0, num_groups, (batch,), generator=generator)
    logits = torch.randn(batch, classes, generator=generator, dtype=torch.float64)
    method = PredictiveGroupInvariance(weight=50.0, num_groups=num_groups, num_classes=classes)
    ours = method.penalty(logits, labels, groups, progress=0.7)
    theirs = official_invariance_loss(logits, labels, groups, 50.0 * 0.7, classes)
    assert ours.item() == pytest.approx(float(theirs), rel=1e-5)


# -- composition with OccamLoss, and the ablations ---------------------------------------------

def occam_output(logits, gate_logits):
    exits = []
    for z, g in zip(logits, gate_logits):
        exits.append(ExitOutput(logits=z, gate=torch.sigmoid(g), gate_logit=g,
                                pooled=torch.zeros(z.shape[0], 1),
                                supp=torch.full((z.shape[0],), 0.5), cam=None))
    return OccamOutput(tuple(exits))


def test_a_method_replaces_cross_entropy_inside_the_exit_weighting():
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])]
    gates = [torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])]
    labels, items, groups = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1])
    upweighting = GroupUpweighting(torch.tensor([4, 1]), gamma=1.0, num_heads=2)
    erm = OccamLoss(2, 2, num_exits=2, taus=(0.5, 0.5))
    weighted = OccamLoss(2, 2, num_exits=2, taus=(0.5, 0.5), method=upweighting)
    _, plain = erm(occam_output(logits, gates), labels, items)
    _, parts = weighted(occam_output(logits, gates), labels, items, groups)
    # Exit 1's weights are (1 - gate_0) normalised by their max, plus 0.1.
    previous = 1 - torch.sigmoid(gates[0])
    weight = previous / (previous.max() + 1e-5) + 0.1
    ce = F.cross_entropy(logits[1], labels, reduction="none")
    assert parts["main/E1"].item() == pytest.approx((weight * ce * torch.tensor(
        [0.25, 1.0])).mean().item(), rel=1e-6)
    assert plain["main/E1"].item() == pytest.approx((weight * ce).mean().item(), rel=1e-6)
    assert parts["gate/E1"] == plain["gate/E1"] and parts["supp/E0"] == plain["supp/E0"]
    with pytest.raises(ValueError, match="needs each sample's bias group"):
        weighted(occam_output(logits, gates), labels, items)


def test_without_exit_weighting_each_exit_takes_the_plain_method_loss():
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])]
    gates = [torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])]
    labels, items = torch.tensor([0, 1]), torch.tensor([0, 1])
    loss = OccamLoss(2, 2, num_exits=2, taus=(0.5, 0.5), exit_weighting=False)
    _, parts = loss(occam_output(logits, gates), labels, items)
    for t in range(2):
        assert parts[f"main/E{t}"].item() == pytest.approx(
            F.cross_entropy(logits[t], labels).item(), rel=1e-6)


def test_build_method_takes_the_official_per_model_defaults():
    sizes = torch.tensor([3, 1])
    sd = {m: build_method("sd", model=m, group_sizes=sizes, num_classes=2, num_heads=1)
          for m in ("resnet", "occam")}
    assert sd["resnet"].lambdas.tolist() == pytest.approx([0.1, 0.1])
    assert sd["occam"].lambdas.tolist() == pytest.approx([1e-3, 1e-3])
    pgi = build_method("pgi", model="occam", group_sizes=sizes, num_classes=2, num_heads=4)
    assert pgi.weight == 50.0 and pgi.num_heads == 4
    assert build_method("pgi", model="resnet", group_sizes=sizes, num_classes=2,
                        num_heads=1).weight == 100.0
    upwt = build_method("upwt", model="resnet", group_sizes=sizes, num_classes=2, num_heads=1)
    assert upwt.weights.tolist() == pytest.approx([1 / 3, 1.0])
    assert type(build_method("erm", model="resnet", group_sizes=sizes, num_classes=2,
                             num_heads=1)) is Method
    with pytest.raises(ValueError, match="unknown method 'jtt'"):
        build_method("jtt", model="resnet", group_sizes=sizes, num_classes=2, num_heads=1)
