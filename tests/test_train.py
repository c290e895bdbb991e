"""Trainer: a stopped and resumed run ends with exactly the parameters of an uninterrupted one."""
import pytest
import torch

from occamnets.train import CheckpointMismatch, Split, TrainConfig, Trainer


def synthetic_splits(n=48, size=16, classes=4, factors=2):
    generator = torch.Generator().manual_seed(0)
    def split(count):
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                               generator=generator)
        labels = torch.arange(count) % classes
        factor_values = torch.stack([labels, torch.randint(0, classes, (count,),
                                                           generator=generator)], 1)
        return Split(images, labels, factor_values[:, :factors], ["colour", "texture"], "cpu")
    return {"train": split(n), "val": split(16), "test": split(16)}


def config(tmp_path, model="occam", **overrides):
    values = dict(model=model, epochs=2, batch_size=8, width=4, input_size=64, lr=1e-2,
                  milestones=(1,), device="cpu", backend="reference", progress=False,
                  out_dir=str(tmp_path))
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("model", ["occam", "resnet"])
def test_resume_gives_exactly_the_uninterrupted_parameters(tmp_path, model):
    splits = synthetic_splits()
    full = Trainer(config(tmp_path / "full", model), splits)
    full.train()

    # 6 steps per epoch: stop mid-way through the first epoch, then again in the second.
    first = Trainer(config(tmp_path / "cut", model, max_steps=4), splits)
    first.train()
    assert first.epoch == 0 and first.step_in_epoch == 4
    second = Trainer(config(tmp_path / "cut", model, max_steps=9), splits)
    second.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    second.train()
    assert second.epoch == 1 and second.step_in_epoch == 3
    third = Trainer(config(tmp_path / "cut", model), splits)
    third.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    third.train()

    for (name, a), b in zip(full.model.state_dict().items(), third.model.state_dict().values()):
        assert torch.equal(a, b), name
    if model == "occam":
        for (name, a), b in zip(full.loss_fn.state_dict().items(),
                                third.loss_fn.state_dict().values()):
            assert torch.equal(a, b), name


def test_checkpoint_from_another_config_is_refused(tmp_path):
    splits = synthetic_splits()
    Trainer(config(tmp_path, max_steps=1), splits).train()
    other = Trainer(config(tmp_path, width=8), splits)
    with pytest.raises(CheckpointMismatch, match="width: checkpoint 4 vs now 8"):
        other.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    resnet = Trainer(config(tmp_path, model="resnet"), splits)
    with pytest.raises(CheckpointMismatch, match="model: checkpoint 'occam' vs now 'resnet'"):
        resnet.load_checkpoint(str(tmp_path / "checkpoint.pt"))


def test_report_has_exits_and_bias_groups(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=1), synthetic_splits())
    report = trainer.run()
    test = report["test"]
    assert 0 <= test["accuracy"] <= 1
    assert len(test["exit_share"]) == 4 and abs(sum(test["exit_share"]) - 1) < 1e-6
    assert test["exit_share"][0] == 0
    assert set(test["factors"]) == {"colour", "texture"}
    assert (tmp_path / "report.md").read_text().startswith("# occam on Biased MNIST")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"val_accuracy"' in lines[0]
