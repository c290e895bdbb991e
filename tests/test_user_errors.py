"""Every mistake a user can make on the command line ends in one line on stderr that names the
problem and the fix, with exit code 2, never a traceback; nothing half-written is left
behind; a checkpoint cannot run code; interruptions lose nothing.

Each case here failed before the reliability work (issue 13): it printed a traceback, or
worse, exited 0 having done something other than asked.
"""
import json
import os
import pickle
import signal

import numpy as np
import pytest
import torch

from occamnets import files as files_module
from occamnets import train as train_module
from occamnets.checkpoints import read_checkpoint
from occamnets.cli import main
from occamnets.config import RunConfig
from occamnets.data import biased_mnist, catalog
from occamnets.data.image_cache import load_cached
from occamnets.evaluate import classify
from occamnets.models import occam_resnet18
from occamnets.train import Trainer

from dataset_fixtures import write_folder, write_mnist
from test_train import config as trainer_config, synthetic_splits

TINY_DATA = ["--cell-size", "6", "--train-size", "64", "--val-size", "10", "--test-size", "20"]
TINY_RUN = ["--preset", "quick", "--epochs", "1", "--batch-size", "32", "--width", "4",
            "--device", "cpu", "--no-progress"]


def one_line_error(capsys, *needles):
    """The command's stderr: a single line holding every needle, no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out = str(root / "run")
    assert main(["train", "--out", out, "--data-dir", str(root / "data")]
                + TINY_DATA + TINY_RUN) == 0
    return os.path.join(out, "checkpoint.pt")


# -- numeric options: refused at parse time, naming the option and the allowed range ----------

@pytest.mark.parametrize("argv,needle", [
    (["data", "biased-mnist", "--train-size", "-5"], "argument --train-size: must be in [1, 10000000], got -5"),
    (["data", "biased-mnist", "--test-size", "-1"], "argument --test-size: must be in [1, 10000000], got -1"),
    (["data", "biased-mnist", "--val-size", "-3"], "argument --val-size: must be in [1, 10000000], got -3"),
    (["data", "biased-mnist", "--cell-size", "2"], "argument --cell-size: must be in [4, 256], got 2"),
    (["train", "--train-size", "-5"], "argument --train-size: must be in [1, 10000000], got -5"),
    (["train", "--train-size", "0"], "argument --train-size: must be in [1, 10000000], got 0"),
    (["train", "--epochs", "-1"], "argument --epochs: must be in [1, 100000], got -1"),
    (["train", "--batch-size", "0"], "argument --batch-size: must be in [2, 1000000], got 0"),
    (["train", "--batch-size", "-4"], "argument --batch-size: must be in [2, 1000000], got -4"),
    (["train", "--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["train", "--lr", "0"], "argument --lr: must be in (0, 10], got 0.0"),
    (["train", "--p-bias", "1.5"], "argument --p-bias: must be in [0, 1], got 1.5"),
    (["train", "--taus", "0.5", "0.6", "0.7", "2"], "argument --taus: must be in [0, 1], got 2.0"),
    (["train", "--exit-threshold", "-0.1"], "argument --exit-threshold: must be in [0, 1]"),
    (["train", "--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    (["train", "--checkpoint-every", "-2"], "argument --checkpoint-every: must be in [0, 1000000000000]"),
    (["train", "--width", "x"], "argument --width: invalid int value: 'x'"),
    (["train", "--width", "100000000"], "argument --width: must be in [1, 4096]"),
    (["train", "--cell-size", "100000"], "argument --cell-size: must be in [4, 256]"),
    (["train", "--train-size", "99999999999"], "argument --train-size: must be in [1, 10000000]"),
    (["train", "--lr", "1e300"], "argument --lr: must be in (0, 10], got 1e+300"),
    (["train", "--weight-decay", "1e300"], "argument --weight-decay: must be in [0, 10]"),
    (["train", "--lr-gamma", "1e300"], "argument --lr-gamma: must be in (0, 10]"),
    (["train", "--seed", "99999999999999999999"], "argument --seed: must be in [0, 4294967295]"),
    (["data", "biased-mnist", "--seed", "-3"], "argument --seed: must be in [0, 4294967295]"),
    (["eval", "x.pt", "--batch-size", "nan"], "argument --batch-size: invalid int value: 'nan'"),
    (["predict", "x.pt", "--threshold", "abc"], "argument --threshold: invalid float value"),
    (["eval", "x.pt", "--batch-size", "0"], "argument --batch-size: must be in [1, 1000000000], got 0"),
    (["predict", "x.pt", "--threshold", "1.5"], "argument --threshold: must be in [0, 1], got 1.5"),
    (["viz", "x.pt", "--count", "0"], "argument --count: must be in [1, 1000000000], got 0"),
])
def test_bad_numbers_are_refused_at_parse_time(argv, needle, capsys):
    assert main(argv) == 2
    one_line_error(capsys, needle, "--help")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_batch_of_one_image_is_refused_before_any_directory(tmp_path, capsys, monkeypatch,
                                                            command):
    """BatchNorm (a ResNet's, an OccamNet's gates) cannot train on one image: refused with
    the reason, not torch's error after a run directory was made."""
    monkeypatch.setattr(biased_mnist, "generate", lambda *a, **k: pytest.fail("data made"))
    out = tmp_path / "run"
    assert main([command, "--batch-size", "1", "--out", str(out), "--device", "cpu",
                 "--data-dir", str(tmp_path / "data")]) == 2
    one_line_error(capsys, "argument --batch-size: must be in [2, 1000000], got 1: BatchNorm",
                   "cannot train on one image per batch")
    assert not out.exists()
    with pytest.raises(ValueError, match="batch_size must be in .2, 1000000., got 1: BatchNorm"):
        RunConfig(model="resnet", batch_size=1)


def test_settings_that_cannot_train_are_refused_before_any_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(biased_mnist, "generate", lambda *a, **k: pytest.fail("data made"))
    out = ["--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")]
    # A batch larger than the training split trained zero steps and reported success.
    assert main(["train", "--batch-size", "1000"] + out + TINY_DATA[:4] + TINY_RUN[:4]) == 2
    one_line_error(capsys, "a batch of 1000 images is more than the training split (64 images)",
                   "--batch-size")
    assert main(["train", "--milestones", "5", "3"] + out + TINY_RUN) == 2
    one_line_error(capsys, "milestones must increase, got (5, 3)")
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("argv,needle", [
    # --image-size trained Biased MNIST at 5 x cell_size px all the same.
    (["--image-size", "64"], "--image-size is for a dataset read from a directory; Biased "
                             "MNIST is generated (its images are 5 x --cell-size px)"),
    (["--momentum", "0.5", "--nesterov"],
     "--momentum and --nesterov are for --optimizer sgd; this run's optimizer is adam"),
    (["--model", "resnet", "--gate-weight", "2", "--taus", "0.1", "0.2", "0.3", "0.4"],
     "--gate-weight and --taus are for --model occam (OccamResNet-18's exits and their "
     "losses); this run's model is resnet"),
    (["--warmup-start-lr", "1e-4"], "--warmup-start-lr is for a warm-up (--warmup-epochs 1 or "
                                    "more); this run has none"),
    (["--dataset", "bar", "--root", "r", "--cell-size", "6", "--bias-columns", "x"],
     "--cell-size is for --dataset biased-mnist; this run's dataset is bar; --bias-columns is "
     "for --dataset folder; BAR's bias attributes are fixed"),
    # What the seed's ablations switch off.
    (["--no-early-exit", "--exit-threshold", "0.9"],
     "--exit-threshold chooses where inference leaves early; this run has --no-early-exit"),
    (["--no-cam-suppression", "--supp-weight", "0.3"],
     "--supp-weight is the CAM suppression loss's weight; this run has --no-cam-suppression"),
    (["--no-exit-weighting", "--gamma0", "2", "--weight-offset", "0.2"],
     "--gamma0 and --weight-offset are for the output predictor's weighting of the main loss; "
     "this run has --no-exit-weighting"),
    (["--model", "resnet", "--exit-threshold", "0.9"],
     "--exit-threshold is for --model occam"),
])
def test_a_setting_the_run_never_reads_is_refused(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(biased_mnist, "generate", lambda *a, **k: pytest.fail("data made"))
    # A fresh data directory and one step: without the check this fails at once.
    assert main(["train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
                 "--max-steps", "1"] + argv) == 2
    one_line_error(capsys, needle)
    assert not os.path.exists(tmp_path / "run")


def test_a_grid_refuses_only_what_none_of_its_cells_reads(tmp_path, capsys, monkeypatch):
    """--gate-weight with an OccamResNet row is read by those cells: the grid goes on (to its
    training, stopped here); with ResNet rows only, nothing reads it."""
    from occamnets import compare

    def no_training(*args, **kwargs):
        raise RuntimeError("the grid would train")
    monkeypatch.setattr(compare, "run_comparison", no_training)
    grid = ["compare", "--out", str(tmp_path / "grid"), "--gate-weight", "2"]
    assert main(grid + ["--models", "resnet"]) == 2
    one_line_error(capsys, "--gate-weight is for --model occam")
    with pytest.raises(RuntimeError, match="the grid would train"):
        main(grid + ["--models", "resnet,occam", "--debug"])
    # An ablation is a row of OccamResNet's: with ResNet rows only, nothing reads it.
    ablation = ["compare", "--out", str(tmp_path / "grid"), "--ablations", "no-early-exit"]
    assert main(ablation + ["--models", "resnet"]) == 2
    one_line_error(capsys, "--ablations are OccamResNet-18's (--models occam); this grid's "
                           "models are resnet")
    # --exit-threshold: read by the grid's cell with early exit, not by one without.
    threshold = ["compare", "--out", str(tmp_path / "grid"), "--models", "occam",
                 "--exit-threshold", "0.9"]
    assert main(threshold + ["--ablations", "no-early-exit"]) == 2
    one_line_error(capsys, "--exit-threshold chooses where inference leaves early")
    with pytest.raises(RuntimeError, match="the grid would train"):
        main(threshold + ["--ablations", "none,no-early-exit", "--debug"])


def test_every_setting_is_read_by_some_run():
    """Each of unused_settings' rules leaves a run that reads the setting (no option is
    refused everywhere)."""
    from occamnets.config import OCCAM_FIELDS, REAL_DATA_FIELDS, SGD_FIELDS, DATA_FIELDS
    readers = [RunConfig(), RunConfig(optimizer="sgd", warmup_epochs=1, warmup_start_lr=1e-4),
               RunConfig(dataset="folder", image_size=64)]
    names = ["warmup_start_lr", "bias_columns", *SGD_FIELDS, *OCCAM_FIELDS, *DATA_FIELDS,
             *REAL_DATA_FIELDS]
    unused_everywhere = set(names).intersection(*(r.unused_settings(names) for r in readers))
    assert not unused_everywhere

def test_a_gpu_that_is_not_there(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--device", "cuda", "--out", str(tmp_path)] + TINY_DATA) == 2
    one_line_error(capsys, "device 'cuda' asked for, but torch sees no CUDA GPU here")


def test_run_directories_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(biased_mnist, "generate", lambda *a, **k: pytest.fail("data made"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", "--out", str(a_file)] + TINY_DATA + TINY_RUN) == 2
    one_line_error(capsys, f"the run directory {a_file} is a file: choose another --out")
    assert main(["train", "--out", str(a_file / "run")] + TINY_DATA + TINY_RUN) == 2
    one_line_error(capsys, "cannot write to the run directory", "Not a directory",
                   "choose another --out")

    def read_only(*args, **kwargs):  # the tests run as root, which writes anywhere
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(files_module.tempfile, "TemporaryFile", read_only)
    assert main(["train", "--out", str(tmp_path / "ro")] + TINY_DATA + TINY_RUN) == 2
    one_line_error(capsys, "cannot write to the run directory", "Permission denied")


# -- checkpoints ------------------------------------------------------------------------------

class _RunsCode:
    """Unpickling it would call os.system: what a crafted checkpoint does."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_does_not_run_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": 2, "config": {}, "model": {}, "num_classes": 10,
                "payload": _RunsCode(marker)}, crafted)
    with open(tmp_path / "plain.pkl", "wb") as handle:   # the same with plain pickle
        pickle.dump(_RunsCode(tmp_path / "control"), handle)
    with open(tmp_path / "plain.pkl", "rb") as handle:
        pickle.load(handle)
    assert (tmp_path / "control").exists()               # the payload works...
    for command in ("eval", "predict", "viz"):
        assert main([command, str(crafted)]) == 2
        one_line_error(capsys, "holds objects other than tensors and plain data",
                       "could run code")
    assert not marker.exists()                            # ...and did not run


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b"not a checkpoint at all", "is not a checkpoint torch can read"),
])
def test_empty_and_foreign_files(tmp_path, capsys, content, needle):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    assert main(["eval", str(path)]) == 2
    one_line_error(capsys, needle)


def test_truncated_old_and_foreign_checkpoints(trained, tmp_path, capsys):
    data = open(trained, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    assert main(["eval", str(truncated)]) == 2
    one_line_error(capsys, "is not a checkpoint torch can read", "truncated")
    state = read_checkpoint(trained)
    old = dict(state)
    del old["format"]
    old["rng"] = {"numpy": np.random.get_state()}       # as checkpoints held before format 2
    torch.save(old, tmp_path / "old.pt")
    assert main(["eval", str(tmp_path / "old.pt")]) == 2
    one_line_error(capsys, "holds objects other than tensors and plain data")
    del old["rng"]
    torch.save(old, tmp_path / "old2.pt")
    assert main(["eval", str(tmp_path / "old2.pt")]) == 2
    one_line_error(capsys, "was written by occamnets before checkpoint format 2")
    torch.save({"state_dict": state["model"]}, tmp_path / "foreign.pt")
    assert main(["eval", str(tmp_path / "foreign.pt")]) == 2
    one_line_error(capsys, "is not an occamnets checkpoint (it has no format, config, model, "
                           "num_classes)")
    # Edited parts: each was a TypeError traceback from deep in the model's construction.
    for name, edit, needle in [
            ("taus", dict(config=dict(state["config"], taus=5)), "wrong type"),
            ("p_bias", dict(config=dict(state["config"], p_bias="x")), "wrong type"),
            ("config", dict(config=[1, 2]), "the config is a list, not a table of settings"),
            ("model", dict(model=[1, 2]), "its model is not a table of tensors"),
            ("classes", dict(num_classes="10"), "num_classes is '10'")]:
        torch.save(dict(state, **edit), tmp_path / f"{name}.pt")
        assert main(["eval", str(tmp_path / f"{name}.pt")]) == 2
        one_line_error(capsys, f"{tmp_path / name}.pt", needle)
    # A newer version's checkpoint is not damaged: no advice to delete it.
    newer_run = tmp_path / "newer"
    newer_run.mkdir()
    for edit, needle in [(dict(format=3), "has checkpoint format 3"),
                         (dict(config=dict(state["config"], sharpness=2)),
                          "settings this version of occamnets does not know: sharpness")]:
        torch.save(dict(state, **edit), newer_run / "checkpoint.pt")
        assert main(["train", "--out", str(newer_run), "--resume"]) == 2
        assert "rm " not in one_line_error(capsys, needle)
    model_only = {k: state[k] for k in ("format", "config", "model", "num_classes")}
    run = tmp_path / "model-only"
    run.mkdir()
    torch.save(model_only, run / "checkpoint.pt")
    assert main(["train", "--out", str(run), "--resume"]) == 2
    one_line_error(capsys, "holds a model but not the training state to resume")


def test_a_corrupt_checkpoint_in_a_run_says_how_to_start_over(trained, tmp_path, capsys):
    run = tmp_path / "my run"   # the rm it suggests quotes the path for the shell
    run.mkdir()
    data = open(trained, "rb").read()
    (run / "checkpoint.pt").write_bytes(data[:1000])
    for argv in (TINY_DATA + TINY_RUN, ["--resume"]):
        assert main(["train", "--out", str(run)] + argv) == 2
        one_line_error(capsys, "truncated", f"rm '{run / 'checkpoint.pt'}'",
                       "another --out")
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    one_line_error(capsys, "--resume: no checkpoint at", "leave --resume out")
    assert main(["train", "--out", str(run), "--resume", "--preset", "paper"]) == 2
    one_line_error(capsys, "--preset with --resume", "leave --preset out")


def test_checkpoints_hold_only_plain_data(trained):
    state = torch.load(trained, weights_only=True)  # raises if anything else is in it
    assert state["format"] == 2 and isinstance(state["config"], dict)


# -- data sources -----------------------------------------------------------------------------

def _mnist_dir(root, labels_high=10):
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 100), ("t10k", 30)):
        write_mnist(root, rng.integers(0, 255, (count, 28, 28)), np.arange(count) % labels_high,
                    compress=True, split_prefix=prefix)
    return root


def test_broken_mnist_directories(tmp_path, capsys):
    common = ["data", "biased-mnist", "--cell-size", "6", "--train-size", "40", "--val-size",
              "5", "--test-size", "10"]
    truncated = _mnist_dir(tmp_path / "truncated")
    path = truncated / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    assert main(common + ["--mnist-dir", str(truncated), "--out", str(tmp_path / "a")]) == 2
    one_line_error(capsys, "train-images-idx3-ubyte.gz")
    bad_labels = _mnist_dir(tmp_path / "labels", labels_high=12)
    assert main(common + ["--mnist-dir", str(bad_labels), "--out", str(tmp_path / "b")]) == 2
    one_line_error(capsys, "labels-idx1-ubyte")


def test_too_many_images_names_the_options(tmp_path, capsys):
    assert main(["data", "biased-mnist", "--cell-size", "6", "--val-size", "10", "--test-size",
                 "5000", "--renders-per-digit", "1", "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "--renders-per-digit", "--mnist-dir")


# -- eval and predict -------------------------------------------------------------------------

def test_eval_names_the_split_it_judged(trained, capsys):
    assert main(["eval", trained, "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "Unbiased" not in out and "unbiased" not in out
    assert "validation, biased like training (p_bias 0.9)" in out
    assert main(["eval", trained]) == 0
    assert "the unbiased test split" in capsys.readouterr().out


def test_eval_json(trained, capsys):
    assert main(["eval", trained, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["images"] == 20
    assert 0 <= result["accuracy"] <= 1 and len(result["exit_share"]) == 4


def test_eval_json_stays_json_when_the_split_is_regenerated(trained, tmp_path, capsys):
    """The regeneration note went to stdout, before the JSON; a directory holding other files
    (here the run's own) had the dataset's dozens of files written among them."""
    assert main(["eval", trained, "--json", "--data-dir", str(tmp_path / "fresh")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 20
    assert os.path.isfile(tmp_path / "fresh" / "meta.json")
    run_dir = os.path.dirname(trained)
    before = sorted(os.listdir(run_dir))
    assert main(["eval", trained, "--data-dir", run_dir]) == 2
    one_line_error(capsys, f"{run_dir} holds other files (", "and no Biased MNIST: give the "
                   "dataset a directory of its own")
    assert sorted(os.listdir(run_dir)) == before


def test_another_programs_meta_json_is_never_overwritten(trained, tmp_path, capsys):
    """A directory holding another program's meta.json (and its files) was taken for a broken
    cache: its meta.json and train_images.npy were replaced without --force."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "meta.json").write_text('{"name": "my project"}')
    (theirs / "test_images.npy").write_bytes(b"their array")
    before = {name: (theirs / name).read_bytes() for name in os.listdir(theirs)}
    assert main(["eval", trained, "--data-dir", str(theirs)]) == 2
    one_line_error(capsys, f"{theirs} holds a meta.json that no Biased MNIST wrote: give the "
                   "dataset a directory of its own, or replace it with `occamnets data "
                   "biased-mnist --force --out")
    assert {name: (theirs / name).read_bytes() for name in os.listdir(theirs)} == before
    # A meta.json of ours gone bad (no JSON at all), among our files only, is regenerated.
    ours = tmp_path / "ours"
    assert main(["eval", trained, "--data-dir", str(ours)]) == 0
    (ours / "meta.json").write_text('{"config": {"seed"')
    capsys.readouterr()
    assert main(["eval", trained, "--data-dir", str(ours)]) == 0
    assert "unreadable meta.json" in capsys.readouterr().out
    assert json.loads((ours / "meta.json").read_text())["config"]


def test_a_biased_mnist_and_a_real_datasets_cache_never_overwrite_each_other(trained, tmp_path,
                                                                             capsys):
    """Both write meta.json and {split}_images.npy: a folder run's eval given a Biased MNIST
    directory as --data-dir replaced its test images and meta.json, and the next Biased
    MNIST command regenerated over a real dataset's cache."""
    bm_dir, cache_dir = tmp_path / "bm", tmp_path / "decoded"
    assert main(["eval", trained, "--data-dir", str(bm_dir)]) == 0
    capsys.readouterr()
    before = {name: (bm_dir / name).read_bytes() for name in os.listdir(bm_dir)}
    index = catalog.find("folder", write_folder(str(tmp_path / "folder")))
    with pytest.raises(ValueError, match="holds another dataset .its meta.json is not a "
                       "decoded-image cache's"):
        load_cached(index, ["test"], str(bm_dir), 16, None)
    assert {name: (bm_dir / name).read_bytes() for name in os.listdir(bm_dir)} == before
    load_cached(index, ["test"], str(cache_dir), 16, None)
    cached = sorted(os.listdir(cache_dir))
    assert main(["eval", trained, "--data-dir", str(cache_dir)]) == 2
    one_line_error(capsys, f"{cache_dir} holds the decoded images of folder, not a Biased "
                   "MNIST")
    assert sorted(os.listdir(cache_dir)) == cached
    (cache_dir / "features.npy").write_bytes(b"")   # a user's own array: no collision
    load_cached(index, ["test"], str(cache_dir), 16, None)
    (bm_dir / "meta.json").unlink()   # a Biased MNIST cut short: its arrays are not ours either
    with pytest.raises(ValueError, match="holds a Biased MNIST.s arrays .test_digit_ids.npy, test_digit_masks.npy"):
        load_cached(index, ["test"], str(bm_dir), 16, None)


def test_results_checks_its_outputs_and_the_runs_before_it_draws(trained, tmp_path, capsys):
    """--gates-plot took any suffix (PNG data in gates.jpg); runs that cannot be compared got
    their gates plot written, then exit 2; --out naming a directory was refused naming a
    temporary file the user never gave."""
    run = os.path.dirname(trained)
    argv = ["results", "--resnet", run, "--occam", run]
    assert main(argv + ["--out", str(tmp_path / "page.md"), "--gates-plot",
                        str(tmp_path / "gates.jpg")]) == 2
    one_line_error(capsys, "--gates-plot", "ending in .png")
    assert main(argv + ["--out", str(tmp_path)]) == 2
    one_line_error(capsys, f"--out {tmp_path} is a directory: give a file name")
    assert main(argv + ["--out", str(tmp_path / "page.md"), "--gates-plot",
                        str(tmp_path / "gates.png")]) == 2
    one_line_error(capsys, "give a resnet and an occam run")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content,needle", [
    ("{}", "KeyError: 'config'"), ("[]", "KeyError"), ('{"model": "occam", "con', "JSONDecodeError")])
def test_results_names_a_report_it_cannot_read(tmp_path, capsys, content, needle):
    """An empty, foreign or cut-short report.json gave a KeyError traceback, or the parser's
    position without the file's name."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(content)
    assert main(["results", "--resnet", str(run), "--occam", str(run), "--out",
                 str(tmp_path / "page.md")]) == 2
    one_line_error(capsys, f"{run / 'report.json'} is not a readable run report", needle,
                   f"occamnets train --out {run} --resume")
    assert not (tmp_path / "page.md").exists()


def test_predict_folders_sizes_and_json(trained, tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (30, 30), (200, 30, 30)).save(folder / "a.png")     # the training size
    Image.new("RGB", (64, 48), (30, 30, 200)).save(folder / "b.jpg")     # another size
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", trained, str(folder), "--json"]) == 0
    captured = capsys.readouterr()
    predictions = json.loads(captured.out)
    assert [os.path.basename(p["path"]) for p in predictions] == ["a.png", "b.jpg"]
    assert all(0 <= p["label"] < 10 and 0 < p["confidence"] <= 1 and p["exit"] in (1, 2, 3)
               for p in predictions)
    assert "1 of 2 images were resized to 30x30 px" in captured.err
    assert main(["predict", trained, str(tmp_path / "missing.png")]) == 2
    one_line_error(capsys, "no such image file or directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", trained, str(empty)]) == 2
    one_line_error(capsys, "holds no image files")
    (empty / "cat").mkdir()   # a folder per class: said, as they are not searched
    assert main(["predict", trained, str(empty)]) == 2
    one_line_error(capsys, "holds no image files", "subfolders are not searched: give them "
                   f"({empty / 'cat'})")
    # Images beside such subfolders: the subfolders' images were passed over silently.
    Image.new("RGB", (30, 30), (20, 30, 200)).save(empty / "cat" / "c.png")
    (empty / "notes").mkdir()                      # no images in it: not worth a word
    assert main(["predict", trained, str(folder), str(empty / "cat")]) == 0
    assert "not searched" not in capsys.readouterr().err
    (folder / "cat").mkdir()
    Image.new("RGB", (30, 30), (20, 30, 200)).save(folder / "cat" / "c.png")
    assert main(["predict", trained, str(folder)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert (f"note: 1 subfolder(s) with images are not searched ({folder / 'cat'}): give them "
            "too to read their images") in captured.err
    assert main(["predict", trained, str(folder / "notes.txt")]) == 2
    one_line_error(capsys, "cannot read", "notes.txt")



def test_predict_reports_unreadable_files_and_goes_on(trained, tmp_path, capsys):
    """One damaged file among good ones costs only its own line: the others are classified,
    in order, and the exit code (1) says that not every file was read."""
    from PIL import Image
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (30, 30), (200, 30, 30)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(folder / "c.png")
    Image.new("RGB", (30, 30), (30, 30, 200)).save(folder / "d.png")
    assert main(["predict", trained, str(folder), "--batch-size", "2"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(folder / f"{n}.png") for n in "abcd"]
    assert "class" in lines[0] and "class" in lines[3]
    assert lines[1].startswith(f"{folder / 'b.png'}: not read: not readable as an image")
    assert lines[2] == (f"{folder / 'c.png'}: not read: has 16-bit pixels; the model reads "
                        f"8-bit images: convert it to 8 bits per channel")
    assert "Traceback" not in captured.err
    assert "2 of 4 files could not be read" in captured.err
    assert main(["predict", trained, str(folder), "--json"]) == 1
    predictions = json.loads(capsys.readouterr().out)
    assert [p["error"] is None for p in predictions] == [True, False, False, True]
    assert predictions[1]["label"] is None and "not readable" in predictions[1]["error"]
    assert all(0 <= predictions[i]["label"] < 10 for i in (0, 3))
    # Nothing readable: one line (the first file's problem), as for a single file.
    assert main(["predict", trained, str(folder / "b.png"), str(folder / "c.png")]) == 2
    one_line_error(capsys, "none of the 2 files could be read", "b.png")


def test_predict_classifies_while_it_reads(trained, tmp_path, capsys, monkeypatch):
    """Files are read a batch ahead of the model, not all before it: the first batch is
    classified before the third is read (a folder of photos is not held whole), and its
    lines are printed before the next batch is classified (they came all at the end: a
    Ctrl-C lost every prediction made)."""
    import occamnets.data.loaders as loaders
    import occamnets.evaluate as evaluate_module
    from PIL import Image
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (30, 30), (20 * i, 30, 200)).save(folder / f"{i}.png")
    read, read_when_classified, printed, printed_when_classified = [], [], [], []
    real_read_rgb, real_classify = loaders.read_rgb, evaluate_module.classify
    monkeypatch.setattr(loaders, "read_rgb", lambda path: read.append(path) or real_read_rgb(path))

    def classify(*args, **kwargs):
        read_when_classified.append(len(read))
        printed.extend(capsys.readouterr().out.splitlines())
        printed_when_classified.append(len(printed))
        return real_classify(*args, **kwargs)
    monkeypatch.setattr(evaluate_module, "classify", classify)
    assert main(["predict", trained, str(folder), "--batch-size", "2"]) == 0
    printed.extend(capsys.readouterr().out.splitlines())
    assert len(printed) == 10 and len(read) == 10
    assert len(read_when_classified) == 5 and read_when_classified[0] <= 4
    assert printed_when_classified == [0, 2, 4, 6, 8]   # each batch said before the next
    assert printed[0].startswith(f"{folder / '0.png'}: class ")

def test_classify_refuses_images_outside_the_training_range():
    model = occam_resnet18(10, width=4).eval()
    with torch.no_grad():
        classify(model, torch.rand(2, 3, 16, 16))
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\] as in training, got values "
                                             r"in \[0, 255\]"):
            classify(model, torch.rand(2, 3, 16, 16) * 0 + torch.tensor(255.0).expand(2, 3, 16, 16)
                     * (torch.arange(16) > 0).float())
        with pytest.raises(ValueError, match="float"):
            classify(model, torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


# -- CLI conveniences -------------------------------------------------------------------------

def test_version_help_and_debug(capsys, tmp_path):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("occamnets ")
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    text = " ".join(text.split())
    assert "quick preset: 64" in text and "images per step" in text
    assert "in [2, 1000000]" in text and "Adam's learning rate (in (0, 10]" in text
    assert main(["eval", "--help"]) == 0
    assert "images per batch (in [1, 1000000000]) (default: 256)" in " ".join(
        capsys.readouterr().out.split())
    for command, needle in (("viz", "images in the picture (in [1, 1000000000])"),
                            ("compare", "N-1 (in [1, 1000])"), ("predict", "this (in [0, 1];")):
        assert main([command, "--help"]) == 0   # each option's range, as the train options'
        assert needle in " ".join(capsys.readouterr().out.split()), command
    with pytest.raises(FileNotFoundError):
        main(["eval", str(tmp_path / "nowhere.pt"), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "eval", str(tmp_path / "nowhere.pt")])


def test_demo_into_a_directory_of_another_preset_refuses_before_making_data(tmp_path, capsys,
                                                                             monkeypatch):
    quick = RunConfig.from_preset("quick", model="occam", out_dir=str(tmp_path / "occam"),
                                  data_dir=str(tmp_path / "data"), width=4)
    os.makedirs(quick.run_dir)
    splits = synthetic_splits()
    trainer = Trainer(trainer_config(tmp_path / "occam", max_steps=1), splits)
    trainer.train()
    monkeypatch.setattr(biased_mnist, "generate", lambda *a, **k: pytest.fail("data made"))
    assert main(["demo", "--out", str(tmp_path), "--preset", "paper"]) == 2
    one_line_error(capsys, "holds a demo run that cannot be continued with the paper preset",
                   "choose another --out")


# -- interruptions and crash safety -----------------------------------------------------------

def _signal_at_step(monkeypatch, signum, at_step):
    real_step = Trainer._train_step

    def step(self, rows, following=None):
        result = real_step(self, rows, following)
        if self.global_step + 1 == at_step:
            os.kill(os.getpid(), signum)
        return result
    monkeypatch.setattr(Trainer, "_train_step", step)


@pytest.mark.parametrize("signum,code,reason", [(signal.SIGTERM, 143, "SIGTERM received"),
                                                (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_signals_write_a_checkpoint_and_stop_cleanly(tmp_path, capsys, monkeypatch, signum,
                                                     code, reason):
    out = str(tmp_path / "run")
    argv = ["train", "--out", out, "--data-dir", str(tmp_path / "data"), "--epochs", "2",
            "--batch-size", "8"] + TINY_DATA + TINY_RUN[6:]
    _signal_at_step(monkeypatch, signum, 3)
    assert main(argv) == code
    printed = capsys.readouterr()
    assert f"{reason}: stopped at epoch 1 step 3" in printed.out
    assert "Traceback" not in printed.err
    state = read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    monkeypatch.undo()
    assert main(["train", "--out", out, "--resume"]) == 0


def test_a_signal_during_the_last_validation_stops_before_the_report(tmp_path, capsys,
                                                                     monkeypatch):
    """Ctrl-C while the last epoch is validated: the epoch's checkpoint is written and the run
    stops there (the report, another pass over the test split, was written regardless); the
    report comes with --resume, and a Ctrl-C during it says so again."""
    out = str(tmp_path / "run")
    argv = ["train", "--out", out, "--data-dir", str(tmp_path / "data"), "--epochs", "1",
            "--batch-size", "16"] + TINY_DATA + TINY_RUN[6:]
    real_evaluate = Trainer.evaluate

    def evaluate(self, split_name="test", **kwargs):
        if split_name == "val" and not self.interrupted:
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(self, split_name, **kwargs)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert main(argv) == 130
    printed = capsys.readouterr()
    assert "interrupted (Ctrl-C): stopped after the last epoch (1) (step 4 in all)" in printed.out
    assert "write the report with `occamnets train --out" in printed.out
    assert "Traceback" not in printed.err
    assert not os.path.exists(os.path.join(out, "report.json"))
    state = read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 4)
    # Ctrl-C while the resumed run evaluates the test split for its report.
    def interrupted_evaluate(self, split_name="test", **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "evaluate", interrupted_evaluate)
    assert main(["train", "--out", out, "--resume"]) == 130
    printed = capsys.readouterr()
    assert "stopped before the report was written; " in printed.out
    assert "holds the finished run: write the report with `occamnets train" in printed.out
    assert "occamnets train: interrupted" in printed.err and "Traceback" not in printed.err
    monkeypatch.undo()
    assert main(["train", "--out", out, "--resume"]) == 0
    assert os.path.exists(os.path.join(out, "report.json"))


def test_periodic_checkpoints_and_one_consistent_metrics_file_across_a_crash(tmp_path):
    """A crash after the last checkpoint: the resumed run rewrites the steps since, and
    metrics.jsonl ends as the uninterrupted run's (no step or epoch twice, the same losses)."""
    splits = synthetic_splits(n=50)
    full = Trainer(trainer_config(tmp_path / "full", log_every=1), splits)
    full.train()

    cut = trainer_config(tmp_path / "cut", log_every=1, checkpoint_every=4)
    first = Trainer(dataclasses_replace(cut, max_steps=6), splits)
    first.train()   # checkpoints at steps 4 and 6
    saved = read_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    assert saved["global_step"] == 6
    # The crash: steps 7..9 ran and were logged, then the process died before a checkpoint.
    crashed = Trainer(dataclasses_replace(cut, max_steps=9), splits,
                      resume=str(tmp_path / "cut" / "checkpoint.pt"))
    crashed.train()
    train_module.write_checkpoint({k: v for k, v in saved.items() if k != "format"},
                                  str(tmp_path / "cut" / "checkpoint.pt"))
    resumed = Trainer(cut, splits, resume=str(tmp_path / "cut" / "checkpoint.pt"))
    resumed.train()

    def records(path):
        return [{k: v for k, v in json.loads(line).items()
                 if "images_per_s" not in k and k not in ("train_seconds", "epoch_seconds")}
                for line in open(path)]
    ours, theirs = records(tmp_path / "cut" / "metrics.jsonl"), records(
        tmp_path / "full" / "metrics.jsonl")
    steps = [r["global_step"] for r in ours if r["kind"] == "step"]
    assert steps == sorted(set(steps)) == list(range(1, 15))
    assert [r["epoch"] for r in ours if r["kind"] == "epoch"] == [1, 2]
    assert ours == theirs   # the interrupted epoch's train_loss counts every step once


def dataclasses_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def test_failed_writes_leave_no_temporary_files(tmp_path, monkeypatch):
    splits = synthetic_splits()
    trainer = Trainer(trainer_config(tmp_path, max_steps=1), splits)

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        trainer.train()
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [".lock"]   # the run directory's lock, nothing else
    # A writer killed outright cannot clean up: the next start removes what it left.
    stale = tmp_path / "checkpoint.pt.tmp-999999"
    stale.write_bytes(b"x" * 100)
    Trainer(trainer_config(tmp_path, max_steps=1), splits)
    assert not stale.exists()


def test_progress_bar_counts_the_steps_done(tmp_path, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total, description, enabled, initial=0):
            self.n, self.total, self.updates = initial, total, []
            bars.append(self)

        def update(self, count):
            self.n += count
            self.updates.append(self.n)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass
    monkeypatch.setattr(train_module, "progress_bar", Bar)
    Trainer(trainer_config(tmp_path, epochs=1, progress=True), synthetic_splits()).train()
    assert bars[0].total == 6 and bars[0].updates == [1, 2, 3, 4, 5, 6]


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (make test "
                                              "installs it)")
    events = tmp_path / "tb"
    trainer = Trainer(trainer_config(tmp_path / "run", epochs=1, log_every=2,
                                     tensorboard=str(events)), synthetic_splits())
    trainer.train()
    writer = trainer.events
    trainer.close()   # the writer's thread ends with the run (compare ran one per cell)
    assert trainer.events is None and writer.file_writer is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert "epoch/train_loss" in tags and "step/loss" in tags and "step/gate/E1" in tags
    assert "step/epoch_seconds" in tags and "epoch/device" not in tags
    assert [e.step for e in accumulator.Scalars("step/loss")] == [2, 4, 6]


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    argv = ["train", "--out", out, "--data-dir", str(tmp_path / "data"), "--epochs", "2",
            "--batch-size", "32"] + TINY_DATA + TINY_RUN[6:]
    assert main(argv + ["--max-steps", "2"]) == 0        # the first epoch, checkpointed
    real_step = Trainer._train_step

    def diverging(self, rows, following=None):
        loss, parts = real_step(self, rows, following)
        return loss * float("nan"), parts
    monkeypatch.setattr(Trainer, "_train_step", diverging)
    assert main(["train", "--out", out, "--resume"]) == 2
    error = one_line_error(capsys, "training diverged: the loss was nan in epoch 2", "lower --lr")
    assert "--no-bf16" not in error   # bf16 autocast never applies on the CPU
    kept = read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (kept["epoch"], kept["step_in_epoch"], kept["global_step"]) == (1, 0, 2)
    # The results page said to resume it, which replays the same steps into the same NaN.
    from occamnets.results_page import read_run
    with pytest.raises(ValueError, match="its training diverged .the loss was nan in epoch "
                                         "2.; start a new run with a lower --lr"):
        read_run(out)


def test_cache_directories_are_keyed_by_every_data_setting():
    base = RunConfig()
    others = [RunConfig(train_size=100), RunConfig(val_size=100), RunConfig(test_size=100),
              RunConfig(renders_per_digit=3), RunConfig(data_seed=1), RunConfig(p_bias=0.5),
              RunConfig(cell_size=6)]
    directories = {c.dataset_dir for c in [base] + others}
    assert len(directories) == len(others) + 1


# -- found by a review acting as a new user ---------------------------------------------------

def test_devices_this_package_does_not_run_on(tmp_path, capsys):
    for device in ("mps", "meta", "xla"):
        assert main(["train", "--device", device, "--out", str(tmp_path / device)]) == 2
        one_line_error(capsys, f"device '{device}' is not supported: use auto, cpu, cuda or cuda:N")
    assert main(["train", "--device", "gpu", "--out", str(tmp_path / "gpu")]) == 2
    one_line_error(capsys, "unknown device 'gpu': use auto, cpu, cuda or cuda:N")
    assert not list(tmp_path.iterdir())                  # refused before any directory


def test_predict_images_that_would_be_misread(trained, tmp_path, capsys, monkeypatch):
    from PIL import Image
    wide = tmp_path / "g16.png"
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(wide)
    assert main(["predict", trained, str(wide)]) == 2
    one_line_error(capsys, "has 16-bit pixels", "convert it to 8 bits")
    big = tmp_path / "big.png"
    Image.new("RGB", (30, 30)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # 900 pixels: a "decompression bomb"
    assert main(["predict", trained, str(big)]) == 2
    one_line_error(capsys, "cannot read", "big.png")


def test_options_are_never_abbreviated(tmp_path, capsys, monkeypatch):
    """A prefix of an option is no option: `compare --seed 3` was taken as --seeds 3 (three
    runs of seeds 0..2, not seed 3). The error names the command whose --help lists them."""
    import occamnets.compare as compare_module
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare_module, "run_comparison",
                        lambda *a, **k: pytest.fail("a grid ran"))
    assert main(["compare", "--seed", "3"]) == 2
    one_line_error(capsys, "occamnets compare: unrecognized arguments: --seed 3",
                   "see `occamnets compare --help`")
    assert main(["predict", "x.pt", "--thresh", "0.5"]) == 2
    one_line_error(capsys, "occamnets predict: unrecognized arguments: --thresh 0.5")
    assert main(["data", "biased-mnist", "--p-bia", "0.9"]) == 2
    one_line_error(capsys, "see `occamnets data biased-mnist --help`")

def test_predict_options_before_or_after_the_images(trained, tmp_path, capsys):
    from PIL import Image
    image = tmp_path / "a.png"
    Image.new("RGB", (30, 30), (0, 90, 200)).save(image)
    assert main(["predict", trained, "--device", "cpu", str(image), "--json"]) == 0
    assert [p["path"] for p in json.loads(capsys.readouterr().out)] == [str(image)]
    assert main(["predict", trained, str(image), "--split", "val"]) == 2
    one_line_error(capsys, "--split, --data-dir and --root choose a split to time")
    assert main(["predict", trained, str(image), "--bogus"]) == 2
    one_line_error(capsys, "unrecognized arguments: --bogus")


def test_picture_paths_are_checked_before_the_work(trained, tmp_path, capsys, monkeypatch):
    import occamnets.evaluate as evaluate_module
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    assert main(["eval", trained, "--reliability", str(tmp_path)]) == 2
    one_line_error(capsys, "--reliability", "give a file name ending in .png")
    assert main(["viz", trained, "--out", str(tmp_path / "cams")]) == 2
    one_line_error(capsys, "--out", "ending in .png")
    same = str(tmp_path / "c.png")
    assert main(["viz", trained, "--out", same, "--exits-plot", same]) == 2
    one_line_error(capsys, "--out and --exits-plot name the same file")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["viz", trained, "--out", str(a_file / "c.png")]) == 2
    one_line_error(capsys, "cannot write there")
    # Refused after the picture's path was checked: no directory of it is left behind.
    assert main(["viz", str(tmp_path / "missing.pt"), "--out",
                 str(tmp_path / "new" / "sub" / "c.png")]) == 2
    one_line_error(capsys, "missing.pt")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert main(["viz", trained, "--out", str(tmp_path / "all.png"), "--count", "500"]) == 0
    assert "the test split has 20 images: drawing them all" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_resume_cannot_undo_epochs_or_change_the_process_count(trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    state = read_checkpoint(trained)
    torch.save(dict(state), run / "checkpoint.pt")
    assert state["epoch"] == 1 and state["world"] == 1
    assert main(["train", "--out", str(run), "--resume", "--epochs", "1"]) == 0  # nothing to do
    capsys.readouterr()
    torch.save(dict(state, epoch=3), run / "checkpoint.pt")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 2
    one_line_error(capsys, "has trained 3 epochs already", "--epochs 3 or more")
    torch.save(dict(state, world=2), run / "checkpoint.pt")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 2
    one_line_error(capsys, "trained on 2 process(es), now 1", "--nproc_per_node=2")


def test_one_training_process_per_run_directory(tmp_path):
    import subprocess
    import sys
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"h = open({str(tmp_path / '.lock')!r}, 'a'); fcntl.lockf(h, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="another occamnets process is training in"):
            Trainer(trainer_config(tmp_path), synthetic_splits())
    finally:
        holder.kill()
        holder.wait()
    Trainer(trainer_config(tmp_path), synthetic_splits())   # free again


def test_a_run_that_never_started_leaves_no_directory(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out = tmp_path / "new-run"
    assert main(["train", "--out", str(out), "--tensorboard", str(a_file)] + TINY_DATA
                + TINY_RUN) == 2
    one_line_error(capsys, "--tensorboard", "is a file: give a directory")
    assert not out.exists()


def test_divergence_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path, capsys,
                                                                      monkeypatch):
    real_step = Trainer._train_step
    monkeypatch.setattr(Trainer, "_train_step", lambda self, rows, following=None: (
        lambda loss_parts: (loss_parts[0] * float("inf"), loss_parts[1]))(
            real_step(self, rows, following)))
    assert main(["train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")]
                + TINY_DATA + TINY_RUN) == 2
    one_line_error(capsys, "training diverged: the loss was inf in epoch 1",
                   "no checkpoint was written", "loss weights")


def test_sigterm_and_memory_errors_outside_training(trained, capsys, monkeypatch):
    import occamnets.evaluate as evaluate_module

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(evaluate_module, "evaluate", terminated)
    assert main(["eval", trained]) == 143
    one_line_error(capsys, "occamnets eval: stopped by SIGTERM")

    def no_memory(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(evaluate_module, "evaluate", no_memory)
    assert main(["eval", trained]) == 2
    one_line_error(capsys, "out of memory", "--batch-size")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_demo_docs_that_is_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(biased_mnist, "generate", lambda *a, **k: pytest.fail("data made"))
    a_file = tmp_path / "docs"
    a_file.write_text("x")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--docs", str(a_file)]) == 2
    one_line_error(capsys, "--docs", "is a file: give a directory")


def test_the_hint_to_continue_a_torchrun_run_names_torchrun(trained, tmp_path):
    """`results` on an unfinished run trained by two processes told the user to run plain
    `occamnets train --resume`, which that run refuses (trained on 2 processes, now 1)."""
    import torch

    from occamnets.checkpoints import resume_command
    from occamnets.results_page import read_run
    run = tmp_path / "ddp run"
    run.mkdir()
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["world"] = checkpoint["local_world"] = 2
    torch.save(checkpoint, run / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"continue it with `torchrun --nproc_per_node=2 -m "
                                         r"occamnets.cli train --out '.*ddp run' --resume`"):
        read_run(str(run))
    checkpoint["world"], checkpoint["local_world"] = 8, 4   # two nodes of four
    torch.save(checkpoint, run / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"`torchrun --nnodes=2 --nproc_per_node=4 -m"):
        read_run(str(run))
    assert resume_command("r", 8, per_node=4) == (
        "`torchrun --nnodes=2 --nproc_per_node=4 -m occamnets.cli train --out r --resume` "
        "(8 processes in all, as before, with the same rendezvous options)")
    assert resume_command("r") == "`occamnets train --out r --resume`"
