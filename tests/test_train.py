"""Trainer: a stopped and resumed run ends with exactly the parameters of an uninterrupted one."""
import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

from host_reads import HostReads
from occamnets.config import RunConfig
from occamnets.data.biased_mnist import FACTOR_NAMES
from occamnets.losses import GATE_STATE_PARTS, LOSS_PARTS
from occamnets.data import DeviceSplit
from occamnets.methods import METHODS
from occamnets.checkpoints import read_checkpoint, write_checkpoint
from occamnets.train import (CheckpointMismatch, RunReport, Trainer, TrainingDiverged, batches,
                             steps_per_epoch)


def synthetic_splits(n=48, size=16, classes=4, factors=2):
    generator = torch.Generator().manual_seed(0)
    def split(count):
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                               generator=generator)
        labels = torch.arange(count) % classes
        factor_values = torch.stack([labels, torch.randint(0, classes, (count,),
                                                           generator=generator)], 1)
        values = factor_values[:, :factors]
        return DeviceSplit(images, labels, values, ["colour", "texture"], "cpu",
                           aligned=values == labels[:, None])
    return {"train": split(n), "val": split(16), "val-p0.5": split(16), "test": split(16)}


def config(tmp_path, model="occam", **overrides):
    values = dict(model=model, epochs=2, batch_size=8, width=4, stem="3x3", lr=1e-2,
                  milestones=(1,), device="cpu", backend="reference", progress=False,
                  out_dir=str(tmp_path))
    values.update(overrides)
    return RunConfig(**values)


def test_a_step_cap_at_the_last_step_finishes_the_run(tmp_path, capsys):
    """--max-steps equal to the run's steps stopped after the last step, before the epoch's
    end: no epoch record, no report, and a hint to continue a run that had nothing left."""
    trainer = Trainer(config(tmp_path, epochs=1, max_steps=6), synthetic_splits())
    assert trainer.run() is not None        # 48 images in batches of 8: 6 steps
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]
    # At an earlier epoch's end the cap stops after that epoch's record and checkpoint.
    capped = Trainer(config(tmp_path / "capped", epochs=2, max_steps=6), synthetic_splits())
    assert capped.run() is None and (capped.epoch, capped.step_in_epoch) == (1, 0)
    assert "reached --max-steps 6: stopped after epoch 1 (step 6 in all)" in capsys.readouterr().out
    assert read_checkpoint(str(tmp_path / "capped" / "checkpoint.pt"))["epoch"] == 1


def test_the_epochs_train_loss_is_the_mean_over_its_images(tmp_path):
    """50 images in batches of 8: the last step has 2. The epoch's loss averaged the steps,
    so those 2 images weighed as much as 8."""
    trainer = Trainer(config(tmp_path, epochs=1, log_every=1), synthetic_splits(n=50))
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if r["kind"] == "step"]
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert [r["batch"] for r in steps] == [8] * 6 + [2]
    assert epoch["train_loss"] == pytest.approx(
        sum(r["loss"] * r["batch"] for r in steps) / 50, rel=1e-6)
    assert epoch["train_loss"] != pytest.approx(sum(r["loss"] for r in steps) / 7, rel=1e-6)
    # A checkpoint written before (a sum per step) resumes to the same epoch loss.
    cut = config(tmp_path / "cut", epochs=1, max_steps=4)
    Trainer(cut, synthetic_splits(n=50)).train()
    path = str(tmp_path / "cut" / "checkpoint.pt")
    saved = read_checkpoint(path)
    progress = saved["epoch_progress"]
    progress["loss_sum"] = progress.pop("image_loss_sum") / 8   # 4 steps of 8 images
    write_checkpoint({k: v for k, v in saved.items() if k != "format"}, path)
    Trainer(dataclasses.replace(cut, max_steps=None), synthetic_splits(n=50),
            resume=path).train()
    (resumed,) = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")
                  if '"epoch"' in line and json.loads(line)["kind"] == "epoch"]
    assert resumed["train_loss"] == pytest.approx(epoch["train_loss"], rel=1e-6)


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
    objective_state = full.objective.state_dict()
    assert bool(objective_state) == (model == "occam")  # OccamLoss's state; none for CE
    for (name, a), b in zip(objective_state.items(), third.objective.state_dict().values()):
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


def test_the_same_data_written_two_ways_resumes():
    """renders_per_digit None and the number it comes to, one p_bias and the same per factor:
    the same images, so the same run (a cached dataset adopted through --data-dir gives the
    resolved values; `compare` refused to continue or reuse its cells over it)."""
    from occamnets.train import check_resumable
    given = RunConfig.from_preset("quick", train_size=64, val_size=10, test_size=20)
    resolved = given.with_dataset(given.biased_mnist())
    assert given.renders_per_digit is None and resolved.renders_per_digit == 1
    check_resumable(given, resolved)
    check_resumable(given, dataclasses.replace(
        given, p_bias={name: given.p_bias for name in FACTOR_NAMES}))
    with pytest.raises(CheckpointMismatch, match="renders_per_digit: checkpoint 1 vs now 2"):
        check_resumable(given, dataclasses.replace(given, renders_per_digit=2))
    with pytest.raises(CheckpointMismatch, match="p_bias: checkpoint 0.9 vs now 0.8"):
        check_resumable(given, dataclasses.replace(given, p_bias=0.8))

def test_report_has_exits_and_bias_groups(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=1), synthetic_splits())
    report = trainer.run()
    test = report.test
    assert 0 <= test.accuracy <= 1
    assert len(test.exit_share) == 4 and abs(sum(test.exit_share) - 1) < 1e-6
    assert test.exit_share[0] == 0 and sum(test.exit_counts) == 16
    assert test.full_depth_images_per_s > 0
    assert set(test.factors) == {"colour", "texture"}
    assert report.val.factors == {} and report.val.full_depth_images_per_s is None
    assert (tmp_path / "report.md").read_text().startswith("# OccamResNet-18 on Biased MNIST")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert RunConfig.from_dict(saved["config"]) == trainer.config
    assert saved["test"]["exit_share"] == test.exit_share
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"val_accuracy"' in lines[0] and '"val-p0.5_accuracy"' in lines[0]
    assert report.others["val-p0.5"].split == "val-p0.5" and "no model selection" in report.model_selection
    markdown = (tmp_path / "report.md").read_text()
    assert "## val-p0.5: validation with p_bias 0.5" in markdown
    # Biased MNIST's groups are mostly single images: per factor, not per group.
    assert "no model selection" in markdown and "Worst-group accuracy" not in markdown
    assert "ECE of the gate" in markdown and (tmp_path / "reliability.png").stat().st_size > 0
    assert [d["name"] for d in saved["test"]["diagnostics"]] == ["E0", "E1", "E2", "E3"]
    # Read back typed, the report is the one written; it names where it ran.
    assert RunReport.from_dict(saved) == report
    assert report.environment.torch == torch.__version__ and report.environment.device
    assert report.environment.extension in ("cuda", "cpu", "none")
    assert f"Ran on {report.environment.device}" in markdown
    del saved["environment"]   # a report from before environments were kept
    assert RunReport.from_dict(saved).environment is None
    with pytest.raises(ValueError, match="no field colour"):
        RunReport.from_dict(dict(saved, colour="red"))


@pytest.mark.parametrize("items,batch,sizes", [
    (48, 8, [8] * 6), (50, 8, [8] * 6 + [2]),
    (49, 8, [8] * 5 + [9]),           # one item left over joins the batch before it
    (5, 8, [5]), (1, 8, [1])])
def test_one_process_sees_every_item_once_the_last_batch_ragged(items, batch, sizes):
    order = torch.randperm(items)
    got = list(batches(order, batch))
    assert [len(rows) for _, rows in got] == sizes == [len(r) for _, r in got]
    assert steps_per_epoch(items, batch) == len(sizes)
    assert torch.equal(torch.cat([rows for _, rows in got]), order)
    assert [len(rows) for _, rows in batches(order, batch, start=len(sizes) - 1)] == sizes[-1:]


def test_processes_take_equal_whole_batches_and_drop_the_tail():
    order = torch.randperm(50)
    per_rank = [list(batches(order, 8, rank=r, world=2)) for r in range(2)]
    assert steps_per_epoch(50, 8, world=2) == 3
    assert all(len(rows) == 8 for rank in per_rank for _, rows in rank)
    seen = torch.cat([rows for rank in per_rank for _, rows in rank])
    assert len(set(seen.tolist())) == 48  # disjoint; 2 items (this permutation's tail) dropped


def test_metrics_log_every_loss_component(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=1, log_every=2), synthetic_splits(n=50))
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["global_step"] for r in steps] == [2, 4, 6]   # 7 steps: 6 of 8, one of 2
    assert [r["batch"] for r in steps] == [8, 8, 8]
    parts = [k for k in steps[0] if k.split("/")[0] in LOSS_PARTS]
    assert sorted(parts) == sorted(f"{p}/E{t}" for p in LOSS_PARTS for t in range(4))
    state = sorted(k for k in steps[0] if k.split("/")[0] in GATE_STATE_PARTS)
    assert state == sorted(f"{p}/E{t}" for p in GATE_STATE_PARTS for t in range(4))
    assert len(parts) + len(state) == len([k for k in steps[0] if "/E" in k])
    for r in steps:
        assert r["loss"] == pytest.approx(sum(r[k] for k in parts), rel=1e-5)
        # The first epoch always refreshes (min_epochs 1); the rest are shares of a batch of 8.
        assert all(r[f"refreshing/E{t}"] == 1.0 for t in range(4))
        assert all(r[f"{p}/E{t}"] * 8 == round(r[f"{p}/E{t}"] * 8)
                   for p in ("exit_targets", "gate_open") for t in range(4))
        assert all(0 <= r[f"train_acc/E{t}"] <= 1 for t in range(4))
    seconds = [r["epoch_seconds"] for r in steps]
    assert 0 < seconds[0] < seconds[1] < seconds[2]   # the epoch's training time so far
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 1
    # Where the validation images left, as the evaluation counts them.
    val = trainer.evaluate("val", per_factor=False, diagnostics=False, per_group=False,
                           per_exit=False)
    for prefix in ("val", "val-p0.5"):
        shares = [epochs[0][f"{prefix}_exit_share/E{t}"] for t in range(4)]
        assert sum(shares) == pytest.approx(1.0) and shares[0] == 0.0   # E0: not at inference
    assert [epochs[0][f"val_exit_share/E{t}"] for t in range(4)] == val.exit_share
    assert [epochs[0][f"val_exit_accuracy/E{t}"] for t in range(4)] == val.exit_accuracy_taken


def test_a_resnet_run_logs_no_gate_state(tmp_path):
    trainer = Trainer(config(tmp_path, model="resnet", epochs=1, log_every=2),
                      synthetic_splits(n=16))
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and not any("/E" in key for r in records for key in r)


def test_two_runs_with_the_same_settings_end_with_identical_weights(tmp_path):
    """What the README promises about repeating a run on one machine (same torch build and
    thread count): the same seed gives the same weights, bit for bit."""
    splits = synthetic_splits()
    runs = [Trainer(config(tmp_path / name, epochs=1), splits) for name in ("a", "b")]
    for run in runs:
        run.train()
    for (name, a), b in zip(runs[0].model.state_dict().items(),
                            runs[1].model.state_dict().values()):
        assert torch.equal(a, b), name
    other = Trainer(config(tmp_path / "c", epochs=1, seed=1), splits)
    other.train()
    assert not all(torch.equal(a, b) for a, b in zip(runs[0].model.state_dict().values(),
                                                     other.model.state_dict().values()))


def test_a_run_resumed_at_its_step_cap_takes_no_further_step(tmp_path):
    splits = synthetic_splits()
    Trainer(config(tmp_path, max_steps=3), splits).train()
    again = Trainer(config(tmp_path, max_steps=3), splits,
                    resume=str(tmp_path / "checkpoint.pt"))
    again.train()
    assert again.global_step == 3 and again.step_in_epoch == 3


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", ["occam", "resnet"])
def test_a_training_step_reads_nothing_from_the_device_on_the_host(tmp_path, model, method):
    """On a GPU one host read per step would stop the host from queueing the next step's
    kernels while the device works (the official OccamTrainer reads 81 values per sample in
    its training step, bench/NOTES.md). Ours reads none: the batch, the forward, every
    method's loss and the backward, in fp32 and under bf16 autocast (the GPU's default).
    The optimizer is torch's: its step counts live on the host, so its reads are not device
    reads and are left out."""
    trainer = Trainer(config(tmp_path, model=model, method=method), synthetic_splits())
    optimizer_step = trainer.optimizer.step

    def optimizer_step_unwatched(*args, **kwargs):
        with _disable_current_modes():
            return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = optimizer_step_unwatched
    rows = torch.arange(8)
    for autocast in (False, True):
        trainer.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        trainer._train_step(rows)  # first steps build state (PGI's, the gate targets)
        with HostReads() as seen:
            trainer._train_step(rows, following=rows)
        assert seen.host_reads == [], (autocast, seen.host_reads)


def test_a_run_saved_with_more_gpus_visible_resumes_with_fewer(monkeypatch):
    """A checkpoint holds every visible GPU's generator; resumed under a narrower
    CUDA_VISIBLE_DEVICES only the visible ones are set (torch raises IndexError past them).
    No GPU here: torch.cuda's answers are stood in for."""
    from occamnets import train
    state = train.rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8) + i for i in range(2)]   # saved on 2
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    train.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], state["cuda"][0])


def _weights_go_nan(monkeypatch, at_step: int, after: bool = False):
    """From global step `at_step` on, the weights are NaN: before that step (its loss is NaN)
    or, `after`, set after its update (its loss still finite), as an overflow would leave them."""
    real_step = Trainer._train_step

    def step(self, rows, following=None):
        if self.global_step == at_step and not after:
            with torch.no_grad():
                for parameter in self.model.parameters():
                    parameter.fill_(float("nan"))
        result = real_step(self, rows, following)
        if self.global_step == at_step and after:
            with torch.no_grad():
                for parameter in self.model.parameters():
                    parameter.fill_(float("nan"))
        return result
    monkeypatch.setattr(Trainer, "_train_step", step)


def test_a_periodic_checkpoint_is_not_written_over_by_a_diverged_state(tmp_path, monkeypatch):
    _weights_go_nan(monkeypatch, at_step=8)       # epoch 2's third step (6 steps per epoch)
    trainer = Trainer(config(tmp_path, checkpoint_every=2), synthetic_splits())
    with pytest.raises(TrainingDiverged, match=r"the loss was nan in epoch 2; .*checkpoint.pt "
                                               r"still holds the last finite state \(step 8\)"):
        trainer.train()
    kept = read_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert kept["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("after", [False, True])
def test_a_step_cap_writes_no_checkpoint_of_a_diverged_state(tmp_path, monkeypatch, after):
    _weights_go_nan(monkeypatch, at_step=3 if after else 2, after=after)
    trainer = Trainer(config(tmp_path, max_steps=4), synthetic_splits())
    what = "the weights became NaN or infinite" if after else "the loss was nan"
    with pytest.raises(TrainingDiverged, match=f"{what} in epoch 1; no checkpoint was written"):
        trainer.train()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_run_stopped_in_its_second_epoch_cannot_be_resumed_as_one_epoch(tmp_path):
    splits = synthetic_splits()   # 6 steps per epoch
    Trainer(config(tmp_path, epochs=2, max_steps=9), splits).train()
    with pytest.raises(ValueError, match="has trained 1 epoch and part of epoch 2 already; "
                                         "--epochs 1 cannot undo them: give --epochs 2 or more"):
        Trainer(config(tmp_path, epochs=1), splits, resume=str(tmp_path / "checkpoint.pt"))
    resumed = Trainer(config(tmp_path, epochs=2), splits, resume=str(tmp_path / "checkpoint.pt"))
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 3)


def test_each_epoch_record_holds_the_learning_rate_it_trained_with(tmp_path, monkeypatch):
    used = []
    real_step = Trainer._train_step

    def step(self, rows, following=None):
        used.append((self.epoch + 1, self.optimizer.param_groups[0]["lr"]))
        return real_step(self, rows, following)
    monkeypatch.setattr(Trainer, "_train_step", step)
    Trainer(config(tmp_path, model="resnet", epochs=2, milestones=(1,), lr=1e-2),
            synthetic_splits(n=16)).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["epoch"], r["lr"]) for r in records if r["kind"] == "epoch"]
    assert logged == sorted(set(used)) == [(1, 1e-2), (2, pytest.approx(1e-3))]


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path, capsys):
    """... said in one line (a Python warning took two, the second a line of our source)."""
    splits = synthetic_splits()   # 6 steps per epoch: epoch 1's record, then 1 step more
    Trainer(config(tmp_path, model="resnet", max_steps=7), splits).train()
    metrics = tmp_path / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"kind": "epoch", "epoch": 2, "glo')   # the crash
    capsys.readouterr()
    Trainer(config(tmp_path, model="resnet"), splits, resume=str(tmp_path / "checkpoint.pt"))
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "metrics.jsonl: its last line (2) is not a whole " \
        "record" in said, said
    assert metrics.read_text() == whole
    metrics.write_text(whole + "{not json\n" + whole)
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a JSON record: repair or "
                                         r"delete that line"):
        Trainer(config(tmp_path, model="resnet"), splits, resume=str(tmp_path / "checkpoint.pt"))


@pytest.mark.parametrize("change", ["count", "labels"])
def test_a_checkpoint_is_not_resumed_on_another_training_split(tmp_path, change):
    """The run's identity leaves the data's location out, so a resume could meet other data:
    OccamLoss's per-item gate targets once failed to load with torch's state-dict traceback
    (another item count), or applied silently to other items (the same count)."""
    Trainer(config(tmp_path, max_steps=2), synthetic_splits()).train()
    path = str(tmp_path / "checkpoint.pt")
    other = synthetic_splits(n=56) if change == "count" else synthetic_splits()
    if change == "labels":
        other["train"].labels[:2] = other["train"].labels[:2].flip(0)
    expected = ("48 items, now 56" if change == "count"
                else "48 items, now as many with other labels")
    with pytest.raises(CheckpointMismatch, match=f"another training split \\({expected}"):
        Trainer(config(tmp_path, max_steps=4), other).load_checkpoint(path)
    if change == "count":
        # A checkpoint from before the fingerprint: the gate targets' sizes, in one line.
        old = read_checkpoint(path, mmap=False)
        del old["train_split"]
        write_checkpoint(old, path)
        with pytest.raises(CheckpointMismatch, match="its training state does not fit"):
            Trainer(config(tmp_path, max_steps=4), other).load_checkpoint(path)
    same = Trainer(config(tmp_path, max_steps=4), synthetic_splits())
    same.load_checkpoint(path)
    assert same.global_step == 2


def test_no_periodic_checkpoint_between_an_epochs_last_step_and_its_record(tmp_path,
                                                                          monkeypatch):
    """--checkpoint-every landing on an epoch's last step wrote a checkpoint before the
    epoch's record: a crash right after the record resumed before it, and TensorBoard (which
    keeps events up to the checkpoint's step) held that epoch twice."""
    saved = []
    real_save = Trainer.save_checkpoint

    def recording(self):
        saved.append((self.epoch, self.step_in_epoch))
        return real_save(self)
    monkeypatch.setattr(Trainer, "save_checkpoint", recording)
    # 48 images in batches of 8: 6 steps per epoch; every 3 steps: steps 3 and 6 of each.
    Trainer(config(tmp_path, epochs=2, checkpoint_every=3), synthetic_splits()).train()
    assert saved == [(0, 3), (1, 0), (1, 3), (2, 0)]

