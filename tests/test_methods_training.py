"""Methods and ablations in training: every one trains from the command line on both models,
is recorded in the checkpoint and the report, and a resume with other settings is refused;
PGI's gradient reaches the feature extractor only; GroupDRO's state resumes exactly."""
import json
import os

import pytest
import torch

from occamnets.cli import main
from occamnets.evaluate import load_model
from occamnets.methods import METHODS
from occamnets.train import CheckpointMismatch, Trainer
from test_train import config, synthetic_splits

TINY = ["--preset", "quick", "--cell-size", "6", "--train-size", "48", "--val-size", "10",
        "--test-size", "20", "--epochs", "1", "--batch-size", "16", "--width", "4",
        "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("methods") / "data")
    assert main(["data", "biased-mnist", "--out", directory, "--cell-size", "6",
                 "--train-size", "48", "--val-size", "10", "--test-size", "20"]) == 0
    return directory


CASES = ([(model, method, []) for model in ("resnet", "occam") for method in METHODS]
         + [("occam", "erm", ["--no-early-exit"]), ("occam", "erm", ["--no-cam-suppression"]),
            ("occam", "erm", ["--no-exit-weighting"])])


@pytest.mark.parametrize("model,method,ablation", CASES,
                         ids=[f"{m}-{x}{''.join(a)}" for m, x, a in CASES])
def test_every_method_and_ablation_trains_from_the_command_line(tmp_path, data_dir, capsys,
                                                                model, method, ablation):
    out = tmp_path / "run"
    assert main(["train", "--model", model, "--method", method, "--data-dir", data_dir,
                 "--out", str(out)] + ablation + TINY) == 0
    printed = capsys.readouterr().out
    assert f"method: {method}" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == method and report["complete"]
    assert report["train_seconds"] > 0 and report["steps"] == 3
    _, saved = load_model(str(out / "checkpoint.pt"))
    assert saved.method == method
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in steps)
    if ablation == ["--no-early-exit"]:
        assert report["test"]["exit_share"] == [0.0, 0.0, 0.0, 1.0]
        markdown = (out / "report.md").read_text()
        assert "no early exit" in markdown and "last-exit (no early exit) inference" in markdown
    if ablation == ["--no-cam-suppression"]:
        assert saved.effective_supp_weight == 0.0 and "no CAM suppression" in printed


def test_a_resume_with_another_method_or_ablation_is_refused(tmp_path, data_dir, capsys):
    out = str(tmp_path / "run")
    argv = ["train", "--data-dir", data_dir, "--out", out, "--method", "upwt"] + TINY
    assert main(argv + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--method", "sd"]) == 2
    assert "method: checkpoint 'upwt' vs now 'sd'" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--no-exit-weighting"]) == 2
    assert "exit_weighting: checkpoint True vs now False" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--upwt-gamma", "0.5"]) == 2
    assert "upwt_gamma: checkpoint 1.0 vs now 0.5" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume"]) == 0    # the same settings go on


def test_ablations_are_refused_on_the_resnet(tmp_path, capsys):
    assert main(["train", "--model", "resnet", "--no-early-exit", "--out",
                 str(tmp_path / "r")] + TINY) == 2
    assert "the ResNet-18 baseline has none" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("model", ["resnet", "occam"])
def test_pgi_gradient_reaches_the_feature_extractor_only(tmp_path, model):
    """One step's gradients with PGI and with ERM: equal on the heads (the penalty does not
    reach them), different on the features (it does)."""
    splits = synthetic_splits()
    gradients = {}
    for method in ("erm", "pgi"):
        trainer = Trainer(config(tmp_path / method, model, method=method, pgi_weight=1e6),
                          splits)
        trainer.optimizer.step = lambda: None           # keep the gradients, not the update
        trainer.objective.on_epoch_start(0)
        trainer._train_step(torch.arange(8))
        gradients[method] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                             if p.grad is not None}
    heads = [n for n in gradients["erm"] if n.startswith(("fc.", "exits."))]
    features = [n for n in gradients["erm"] if n.startswith(("stem.", "stages."))]
    assert heads and features
    for name in heads:
        assert torch.equal(gradients["erm"][name], gradients["pgi"][name]), name
    assert any(not torch.allclose(gradients["erm"][n], gradients["pgi"][n]) for n in features)


def test_group_dro_state_resumes_exactly(tmp_path):
    splits = synthetic_splits()
    full = Trainer(config(tmp_path / "full", method="gdro", gdro_eta=0.5), splits)
    full.train()
    first = Trainer(config(tmp_path / "cut", method="gdro", gdro_eta=0.5, max_steps=4), splits)
    first.train()
    second = Trainer(config(tmp_path / "cut", method="gdro", gdro_eta=0.5), splits)
    second.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    second.train()
    weights = full.objective.state_dict()["method.group_weights"]
    assert not torch.allclose(weights, weights[:, :1].expand_as(weights))  # it moved
    assert torch.equal(weights, second.objective.state_dict()["method.group_weights"])
    for (name, a), b in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointMismatch, match="gdro_eta: checkpoint 0.5 vs now 0.01"):
        Trainer(config(tmp_path / "other", method="gdro"), splits).load_checkpoint(
            str(tmp_path / "cut" / "checkpoint.pt"))


def test_the_dataset_metadata_lists_the_groups_and_their_sizes(data_dir):
    with open(os.path.join(data_dir, "meta.json")) as handle:
        meta = json.load(handle)
    with open(os.path.join(data_dir, meta["groups_file"])) as handle:
        groups = [json.loads(line) for line in handle]
    for split, size in meta["sizes"].items():
        listed = [g for g in groups if g["split"] == split]
        assert len(listed) == meta["groups"][split] > 0
        assert [g["group"] for g in listed] == list(range(len(listed)))
        assert sum(g["size"] for g in listed) == size
        assert set(listed[0]) == {"split", "group", "label", "digit_color", "digit_scale",
                                  "digit_position", "texture", "texture_color", "letters",
                                  "letter_color", "size"}


def test_only_the_chosen_methods_settings_decide_whether_a_run_continues():
    from occamnets.config import RunConfig
    erm = RunConfig(model="resnet")
    assert erm.identity() == RunConfig(model="resnet", pgi_weight=3.0, sd_gammas=(1.0,)).identity()
    # The default written out is the default.
    assert (RunConfig(model="resnet", method="sd").identity()
            == RunConfig(model="resnet", method="sd", sd_lambdas=(0.1,)).identity())
    assert (RunConfig(model="occam", method="sd").identity()
            != RunConfig(model="occam", method="sd", sd_lambdas=(0.1,)).identity())


def test_a_setting_of_another_method_is_refused(tmp_path, capsys):
    assert main(["train", "--method", "erm", "--pgi-weight", "3", "--out",
                 str(tmp_path / "r")] + TINY) == 2
    assert "--pgi-weight is for --method pgi; this run's method is erm" in capsys.readouterr().err


def test_a_run_says_which_bias_groups_its_method_reads():
    """Nothing said which groups a method read; on data without bias attributes PGI trained
    as ERM under its own name, and upweighting and GroupDRO weighed the classes, silently."""
    from test_train import synthetic_splits

    from occamnets.data import DeviceSplit
    from occamnets.methods import build_method
    from occamnets.train import training_groups_line
    with_attributes = synthetic_splits(factors=2)["train"]
    without = DeviceSplit(with_attributes.images, with_attributes.labels,
                          with_attributes.factors[:, :0], [], "cpu")
    def method(name, split):
        return build_method(name, model="resnet", group_sizes=split.groups.sizes,
                            num_classes=4, num_heads=1)
    assert training_groups_line(method("erm", with_attributes), with_attributes) is None
    line = training_groups_line(method("pgi", with_attributes), with_attributes)
    groups = with_attributes.groups
    assert line.startswith(f"bias groups (pgi reads them): {' x '.join(groups.columns)}, "
                           f"{groups.count} in the training split ({int(groups.sizes.min())} to "
                           f"{int(groups.sizes.max())} images each; the smallest: ")
    assert "every class is one group" not in line
    alone = training_groups_line(method("pgi", without), without)
    assert alone.endswith("every class is one group (no bias attributes), so its penalty is 0 "
                          "on every batch: this run trains as ERM does")
    assert training_groups_line(method("upwt", without), without).endswith(
        "so it balances the classes")
