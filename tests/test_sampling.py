"""Balanced sampling (occamnets/sampling.py): the official `sampling_type: balanced` draws,
each item weighted 1 / (its group's or class's size) ** gamma, with replacement; repeatable
from (seed, epoch) so a resumed run draws the same batches; refused settings named."""
import pytest
import torch

from occamnets.cli import main
from occamnets.config import RunConfig
from occamnets.data import DeviceSplit
from occamnets.sampling import epoch_order, sampling_line, sampling_weights
from occamnets.train import CheckpointMismatch, Trainer
from test_methods_training import TINY, data_dir  # noqa: F401 (a fixture)
from test_train import config, synthetic_splits


def skewed_split(sizes=(1, 3, 12, 48)):
    """One class per size; one bias attribute, constant, so each class is one group."""
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    return DeviceSplit(images, labels, torch.zeros(len(labels), 1, dtype=torch.long),
                       ["place"], "cpu")


@pytest.mark.parametrize("sampling", ["groups", "classes"])
def test_each_item_weighs_one_over_its_groups_size_to_the_gamma(sampling):
    split = skewed_split()
    weights = sampling_weights(sampling, 0.5, split)
    sizes = torch.tensor([1, 3, 12, 48]).double()[split.labels]
    assert torch.allclose(weights, sizes.pow(-0.5))
    assert sampling_weights("uniform", 0.5, split) is None
    with pytest.raises(ValueError, match="unknown sampling 'balanced'"):
        sampling_weights("balanced", 0.5, split)


def test_a_group_is_weighed_by_its_size_not_its_class():
    split = synthetic_splits(n=48)["train"]    # 4 classes x texture values: 16 groups
    weights = sampling_weights("groups", 1.0, split)
    groups = split.groups
    assert torch.allclose(weights, 1 / groups.sizes.double()[groups.index])
    assert len(set(weights.tolist())) > 1     # the groups' sizes differ: so do the weights


def test_gamma_one_draws_every_group_equally_often():
    """Over 40 epochs of 64 draws the one-image group is drawn as often as the 48-image
    group (a permutation draws it once per epoch, 1/64 of the draws)."""
    split = skewed_split()
    weights = sampling_weights("groups", 1.0, split)
    counts = torch.zeros(4)
    for epoch in range(40):
        order = epoch_order(len(split), seed=3, epoch=epoch, device="cpu", weights=weights)
        assert order.shape == (64,)
        counts += torch.bincount(split.labels[order], minlength=4)
    shares = counts / counts.sum()
    assert torch.allclose(shares, torch.full((4,), 0.25), atol=0.03), shares
    gamma0 = sampling_weights("groups", 0.0, split)   # uniform weights, with replacement
    counts = torch.bincount(split.labels[torch.cat([
        epoch_order(64, 3, epoch, "cpu", gamma0) for epoch in range(40)])], minlength=4)
    assert counts[0] < counts[3] / 20


def test_the_order_is_a_function_of_the_seed_and_epoch_and_repeats_items():
    weights = sampling_weights("groups", 1.0, skewed_split())
    first = epoch_order(64, 0, 1, "cpu", weights)
    assert torch.equal(first, epoch_order(64, 0, 1, "cpu", weights))
    assert not torch.equal(first, epoch_order(64, 0, 2, "cpu", weights))
    assert not torch.equal(first, epoch_order(64, 1, 1, "cpu", weights))
    assert len(set(first.tolist())) < 64      # with replacement
    assert torch.equal(epoch_order(64, 0, 1, "cpu"), epoch_order(64, 0, 1, "cpu"))
    assert sorted(epoch_order(64, 0, 1, "cpu").tolist()) == list(range(64))
    with pytest.raises(ValueError, match=r"\(63,\) sampling weights for 64 items"):
        epoch_order(64, 0, 1, "cpu", weights[:63])


def test_more_items_than_torch_multinomial_takes_are_drawn():
    """torch.multinomial refuses more than 2^24 categories: a folder dataset may hold more."""
    count = 2**24 + 8
    weights = torch.ones(count, dtype=torch.float64)
    weights[-1] = 1e6       # the last item: about 6% of the draws
    order = epoch_order(count, 0, 0, "cpu", weights)
    assert order.shape == (count,) and 0 <= int(order.min()) and int(order.max()) < count
    share = float((order == count - 1).double().mean())
    assert share == pytest.approx(1e6 / (count - 1 + 1e6), rel=0.02)


def test_the_line_says_how_often_the_largest_and_smallest_groups_are_drawn():
    split = skewed_split()
    line = sampling_line("classes", 1.0, split, sampling_weights("classes", 1.0, split))
    # gamma 1: each of the 4 classes expects a quarter of the 64 draws.
    assert ("sampling by class (each image weighted 1 / class size ^ 1, 64 draws per epoch "
            "with replacement): the largest class (48 images, drawn 48 times by a permutation) "
            "expects 16.0 draws per epoch, the smallest (1) 16.0") in line
    # The one image of the smallest class: drawn with chance 1 - (1 - 1/4) ** 64; each of the
    # 48 of the largest with 1 - (1 - 1/192) ** 64.
    drawn = (1 + 3 * (1 - (1 - 1 / 12) ** 64) + 12 * (1 - (1 - 1 / 48) ** 64)
             + 48 * (1 - (1 - 1 / 192) ** 64)) / 64
    assert f"about {100 * drawn:.0f}% of the images" in line
    assert sampling_line("uniform", 1.0, split, sampling_weights("uniform", 1.0, split)) is None


def test_a_balanced_run_trains_on_the_drawn_batches_and_resumes_exactly(tmp_path, monkeypatch):
    splits = synthetic_splits()
    seen = []
    real_batch = type(splits["train"]).batch

    def recording(split, rows, channels_last=False):
        if split is splits["train"]:
            seen.append(rows.clone())
        return real_batch(split, rows, channels_last)
    monkeypatch.setattr(type(splits["train"]), "batch", recording)
    full = Trainer(config(tmp_path / "full", sampling="groups", sampling_gamma=1.0), splits)
    full.train()
    weights = sampling_weights("groups", 1.0, splits["train"])
    drawn = torch.cat([epoch_order(48, 0, epoch, "cpu", weights) for epoch in range(2)])
    assert torch.equal(torch.cat(seen), drawn)
    monkeypatch.undo()

    first = Trainer(config(tmp_path / "cut", sampling="groups", sampling_gamma=1.0,
                           max_steps=4), splits)
    first.train()
    rest = Trainer(config(tmp_path / "cut", sampling="groups", sampling_gamma=1.0), splits)
    rest.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    rest.train()
    for (name, a), b in zip(full.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(full.objective.state_dict().items(),
                            rest.objective.state_dict().values()):
        assert torch.equal(a, b), name
    uniform = Trainer(config(tmp_path / "cut", sampling="uniform"), splits)
    with pytest.raises(CheckpointMismatch, match="sampling: checkpoint 'groups' vs now 'uniform'"):
        uniform.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))


def test_gamma_decides_a_resume_only_where_the_draws_read_it():
    assert RunConfig().identity() == RunConfig(sampling_gamma=2.0).identity()
    assert (RunConfig(sampling="groups").identity()
            != RunConfig(sampling="groups", sampling_gamma=2.0).identity())
    with pytest.raises(ValueError, match="unknown sampling 'balanced'"):
        RunConfig(sampling="balanced")


def test_balanced_sampling_from_the_command_line(tmp_path, data_dir, capsys):  # noqa: F811
    out = str(tmp_path / "run")
    assert main(["train", "--data-dir", data_dir, "--out", out, "--method", "gdro",
                 "--sampling", "groups", "--sampling-gamma", "1"] + TINY) == 0
    printed = capsys.readouterr().out
    assert "method: gdro (eta 0.01), group-balanced sampling (gamma 1)" in printed
    assert "sampling by bias group (each image weighted 1 / group size ^ 1, 48 draws" in printed
    assert "group-balanced sampling (gamma 1)" in (tmp_path / "run" / "report.md").read_text()
    assert main(["train", "--out", out, "--resume", "--sampling-gamma", "0.5"]) == 2
    assert "sampling_gamma: checkpoint 1.0 vs now 0.5" in capsys.readouterr().err
    assert main(["train", "--sampling-gamma", "1", "--out", str(tmp_path / "r")] + TINY) == 2
    assert ("--sampling-gamma weighs balanced draws (--sampling groups or classes); this run "
            "draws a permutation") in capsys.readouterr().err
    assert main(["train", "--sampling", "balanced", "--out", str(tmp_path / "r")] + TINY) == 2
    assert "invalid choice: 'balanced'" in capsys.readouterr().err
