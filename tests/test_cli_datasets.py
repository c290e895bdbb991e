"""The occamnets command on the real datasets' fixtures (tests/dataset_fixtures.py): `data
check`, `train --dataset ... --preset quick --max-steps 5` for each, a whole run's report with
every split and its bias groups, eval, viz and predict on the checkpoint, and a resumed run
augmenting as the uninterrupted one."""
import glob
import json
import os
import shutil
import threading

import pytest
import torch

import dataset_fixtures as fixtures
from occamnets.cli import main
from occamnets.config import RunConfig
from occamnets.train import Trainer

HEADLINE = {"coco-on-places": "sgtest", "bar": "test", "celeba": "test", "folder": "test"}


@pytest.mark.parametrize("name", list(fixtures.WRITERS))
def test_train_five_steps_then_eval_each_dataset(name, roots, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the default cache (data/) and run (runs/) directories
    assert main(["train", "--dataset", name, "--root", roots[name], "--preset", "quick",
                 "--max-steps", "5", "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    # CelebA's quick preset is one epoch, 2 steps of the fixture: it ends with its report.
    ended = "Worst-group accuracy" if name == "celeba" else "reached --max-steps 5"
    assert ended in printed and "32 px" in printed
    assert os.path.isfile("runs/occam/checkpoint.pt")
    (cache,) = glob.glob(f"data/{name}-32px-*")
    assert os.path.isfile(os.path.join(cache, "meta.json"))
    assert main(["eval", "runs/occam/checkpoint.pt"]) == 0
    printed = capsys.readouterr().out
    assert f"Accuracy on {HEADLINE[name]}" in printed and "Worst-group accuracy" in printed
    # No digit masks here: no CAM-on-the-digit columns (they were headed, and all "-").
    assert "ECE of the gate %" in printed and "digit" not in printed
    if name == "folder":
        # A class renamed in the CSV since training renumbers the sorted names (cat, dog ->
        # dog, tabby): every label would shift under the model, so eval refuses.
        renamed = shutil.copytree(roots[name], tmp_path / "renamed")
        csv = renamed / "metadata.csv"
        csv.write_text(csv.read_text().replace(",cat,", ",tabby,"))
        assert main(["eval", "runs/occam/checkpoint.pt", "--root", str(renamed)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "(dog, tabby) are not the ones" in error
        assert "trained on (cat, dog)" in error


def test_a_run_on_splits_assigned_by_another_rule_is_not_evaluated(roots, tmp_path, capsys):
    """A CSV without a split column was split by a permutation of its rows before
    2026-11-29, by a hash of the paths since: a run of the old rule evaluated on the new
    splits would be judged mostly on images it trained on."""
    root = fixtures.write_folder(str(tmp_path / "f"), counts=(("all", 50),), with_split=False)
    out = str(tmp_path / "run")
    assert main(["train", "--dataset", "folder", "--root", root, "--preset", "quick",
                 "--max-steps", "2", "--device", "cpu", "--no-progress", "--out", out,
                 "--data-dir", str(tmp_path / "cache")]) == 0
    checkpoint = os.path.join(out, "checkpoint.pt")
    assert main(["eval", checkpoint]) == 0
    capsys.readouterr()
    state = torch.load(checkpoint, weights_only=True)
    del state["split_rule"]                        # as the previous version wrote it
    torch.save(state, checkpoint)
    for argv in (["eval", checkpoint], ["train", "--out", out, "--resume"]):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1, error
        assert "trained on splits assigned otherwise (a permutation of the CSV's rows" in error


def test_a_whole_coco_on_places_run_reports_every_split(roots, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--dataset", "coco-on-places", "--root", roots["coco-on-places"],
                 "--preset", "quick", "--epochs", "1", "--milestones", "1", "--out", out,
                 "--data-dir", str(tmp_path / "cache"), "--device", "cpu",
                 "--no-progress"]) == 0
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["test"]["split"] == "sgtest" and report["val"]["split"] == "valsgtest"
    assert list(report["others"]) == ["validtest", "valoodtest", "idtest", "oodtest"]
    idtest = report["others"]["idtest"]
    assert idtest["group_count"] == 18 and len(idtest["groups"]) == 18
    assert idtest["worst_group"]["accuracy"] == min(g["accuracy"] for g in idtest["groups"])
    assert set(idtest["factors"]) == {"background"}
    markdown = open(os.path.join(out, "report.md")).read()
    assert "# OccamResNet-18 on COCO-on-Places" in markdown
    assert "## oodtest: objects on backgrounds never seen in training" in markdown
    assert "| boat, background=0 |" in markdown
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert "val_accuracy" in metrics[-1]
    capsys.readouterr()
    cams = tmp_path / "cams.png"
    assert main(["viz", os.path.join(out, "checkpoint.pt"), "--out", str(cams),
                 "--count", "2"]) == 0
    assert cams.stat().st_size > 5000


def test_bar_has_no_validation_and_predicts_image_files(roots, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--dataset", "bar", "--root", roots["bar"], "--preset", "quick",
                 "--epochs", "1", "--milestones", "1", "--out", out, "--model", "resnet",
                 "--data-dir", str(tmp_path / "cache"), "--device", "cpu",
                 "--no-progress"]) == 0
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["val"] is None and report["others"] == {}
    assert report["test"]["group_count"] == 6   # no bias labels: the groups are the classes
    capsys.readouterr()
    images = os.path.join(roots["bar"], "test")
    assert main(["predict", os.path.join(out, "checkpoint.pt"), images, "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == 12 and all(0 <= p["label"] < 6 for p in predictions)
    from occamnets.data.bar import CLASSES
    assert all(p["class_name"] == CLASSES[p["label"]] for p in predictions)


def test_data_check_counts_lists_problems_and_draws(roots, tmp_path, capsys):
    preview = tmp_path / "preview.png"
    assert main(["data", "check", "celeba", "--root", roots["celeba"], "--preview",
                 str(preview), "--image-size", "48"]) == 0
    printed = capsys.readouterr().out
    assert "| train | 40 | 4 |" in printed and "All files present and readable." in printed
    assert "blond, male=1" in printed and preview.stat().st_size > 10000
    broken = str(tmp_path / "bar")
    shutil.copytree(roots["bar"], broken)
    open(os.path.join(broken, "test", "diving_7.jpg"), "wb").write(b"truncated")
    assert main(["data", "check", "bar", "--root", broken, "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    test = next(s for s in result["splits"] if s["name"] == "test")
    assert [os.path.basename(name) for name, _ in test["unreadable"]] == ["diving_7.jpg"]
    assert main(["data", "check", "bar", "--root", str(tmp_path / "none")]) == 2
    assert "alinlab/BAR" in capsys.readouterr().err
    # No training image readable: the check's exit code 1 and a note, not matplotlib's error.
    unreadable = fixtures.write_folder(tmp_path / "unreadable",
                                       counts=(("train", 2), ("val", 2), ("test", 2)))
    for n in (0, 1):
        open(os.path.join(unreadable, "images", f"{n:04d}.png"), "wb").write(b"not a png")
    assert main(["data", "check", "folder", "--root", unreadable, "--preview",
                 str(tmp_path / "none.png")]) == 1
    said = capsys.readouterr().err
    assert "no preview: none of the train images could be read" in said, said
    assert not (tmp_path / "none.png").exists()
    assert main(["train", "--dataset", "celeba", "--preset", "quick"]) == 2
    assert "needs its directory: --root DIR" in capsys.readouterr().err


def test_a_resumed_run_augments_as_the_uninterrupted_one(roots, tmp_path):
    def config(out, max_steps):
        return RunConfig.from_preset("quick", dataset="folder", data_root=roots["folder"],
                                     bias_columns=("place",), out_dir=str(tmp_path / out),
                                     data_dir=str(tmp_path / "cache"), device="cpu",
                                     progress=False, max_steps=max_steps, epochs=2)
    whole = Trainer(config("whole", None))
    whole.train()
    first = Trainer(config("parts", 3))
    first.train()
    resumed = Trainer(config("parts", None), resume=first.checkpoint_path)
    resumed.train()
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_streamed_run_trains_as_a_cached_one(roots, tmp_path, monkeypatch):
    """Above the cache limit the images are decoded per batch, the next batch in the
    background: the same pixels, so the same weights."""
    from occamnets.data import image_cache

    def config(out, limit):
        return RunConfig.from_preset("quick", dataset="bar", data_root=roots["bar"],
                                     out_dir=str(tmp_path / out), data_dir=str(tmp_path / out),
                                     device="cpu", progress=False, epochs=2, batch_size=8,
                                     cache_limit_gb=limit)
    cached = Trainer(config("cached", 8.0))
    cached.train()
    decoded = []
    real = image_cache.decode_rows
    monkeypatch.setattr(image_cache, "decode_rows", lambda split, rows, *a: decoded.append(
        (len(rows), threading.current_thread() is threading.main_thread()))
        or real(split, rows, *a))
    streamed = Trainer(config("streamed", 0.0))
    assert isinstance(streamed.splits["train"], image_cache.StreamingSplit)
    streamed.train()
    # Two epochs of 36 images in batches of 8, 8, 8, 8 and 4, each decoded once (all but
    # the first of an epoch in the background while the one before trains); nothing cached.
    assert sorted(size for size, _ in decoded) == [4, 4] + [8] * 8
    assert sum(in_main for _, in_main in decoded) == 2
    assert not glob.glob(str(tmp_path / "streamed" / "*.npy"))
    for name, value in cached.model.state_dict().items():
        assert torch.equal(value, streamed.model.state_dict()[name]), name


def test_compare_on_a_real_dataset_tabulates_the_worst_group(roots, tmp_path, capsys,
                                                             monkeypatch):
    out = str(tmp_path / "grid")
    assert main(["compare", "--dataset", "folder", "--root", roots["folder"], "--bias-columns",
                 "place", "--models", "resnet", "--methods", "erm,upwt", "--preset", "quick",
                 "--epochs", "1", "--milestones", "1", "--out", out, "--device", "cpu",
                 "--no-progress", "--data-dir", str(tmp_path / "cache")]) == 0
    # The upweighting cell says which groups it weighs (the ERM cell reads none).
    assert capsys.readouterr().out.count("bias groups (upwt reads them): label x place, ") == 1
    table = open(os.path.join(out, "compare.md")).read()
    assert "| test acc % | worst group % |" in table
    cells = json.loads(open(os.path.join(out, "compare.json")).read())["cells"]
    reports = [json.loads(open(os.path.join(out, f"resnet-{m}", "seed-0", "report.json")).read())
               for m in ("erm", "upwt")]
    assert [c["worst_group_accuracy"] for c in cells] == [
        r["test"]["worst_group"]["accuracy"] for r in reports]

    # Read again: the check of the training split reads the CSV alone, no image (it decoded
    # the whole split into the cache, with the CPU's decoder); a cell whose checkpoint was
    # deleted keeps its report (it was trained again from scratch).
    import occamnets.data.real_splits as real_splits
    monkeypatch.setattr(real_splits, "load_cached", lambda *a, **k: pytest.fail("decoded"))
    os.remove(os.path.join(out, "resnet-upwt", "seed-0", "checkpoint.pt"))
    capsys.readouterr()
    assert main(["compare", "--dataset", "folder", "--root", roots["folder"], "--bias-columns",
                 "place", "--models", "resnet", "--methods", "erm,upwt", "--preset", "quick",
                 "--epochs", "1", "--milestones", "1", "--out", out, "--device", "cpu",
                 "--no-progress", "--data-dir", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.count("finished before") == 2
    monkeypatch.undo()

    # Another dataset under the same --out: its finished cells were read as this one's (the
    # identity leaves the data's location out). "dog" renamed "emu" keeps every label (cat,
    # emu sort as cat, dog did), so only the class names tell the two apart.
    def compare_on(root):
        argv = ["compare", "--dataset", "folder", "--root", str(root), "--bias-columns",
                "place", "--models", "resnet", "--methods", "erm,upwt", "--preset", "quick",
                "--epochs", "1", "--milestones", "1", "--out", out, "--device", "cpu",
                "--no-progress", "--data-dir", str(tmp_path / "cache")]
        return main(argv)
    other = shutil.copytree(roots["folder"], tmp_path / "other")
    csv = other / "metadata.csv"
    csv.write_text(csv.read_text().replace(",dog,", ",emu,"))
    capsys.readouterr()
    assert compare_on(other) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "classes (cat, emu) are not the ones" in error
    # The same dataset moved: each cell is evaluated again where it is now, not retrained.
    moved = shutil.copytree(roots["folder"], tmp_path / "moved")
    assert compare_on(moved) == 0
    assert "finished before" not in capsys.readouterr().out
    for m in ("erm", "upwt"):
        report = json.loads(open(os.path.join(out, f"resnet-{m}", "seed-0", "report.json")).read())
        assert report["config"]["data_root"] == str(moved)
        assert report["steps"] == reports[0]["steps"]
    # Its CSV edited since (training rows' place flipped): the finished cells were read and
    # their stale accuracies printed. They resume now, and the checkpoint names the change.
    lines = (moved / "metadata.csv").read_text().splitlines()
    header = lines[0].split(",")
    place, split = header.index("place"), header.index("split")
    flipped = 0
    for i, line in enumerate(lines[1:], 1):
        values = line.split(",")
        if values[split] == "train" and flipped < 5:
            values[place] = str(1 - int(values[place]))
            lines[i], flipped = ",".join(values), flipped + 1
    (moved / "metadata.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert compare_on(moved) == 2
    printed = capsys.readouterr()
    assert "finished before" not in printed.out
    assert printed.err.count("\n") == 1 and "trained on another training split" in printed.err


def test_viz_beside_wants_the_same_images_and_classes_and_titles_each_model(roots, tmp_path,
                                                                             capsys,
                                                                             monkeypatch):
    """Another dataset's model with as many classes was drawn under the first's class names;
    a model whose bias columns were given rather than found (the same images) was refused;
    two OccamNets had the same column title."""
    import occamnets.viz as viz_module

    def train(name, root, *extra):
        out = str(tmp_path / name)
        assert main(["train", "--dataset", "folder", "--root", str(root), "--preset", "quick",
                     "--max-steps", "1", "--device", "cpu", "--no-progress", "--out", out,
                     "--data-dir", str(tmp_path / f"cache-{name}"), *extra]) == 0
        return os.path.join(out, "checkpoint.pt")
    first = train("occam-erm", roots["folder"])
    given = train("occam-sd", roots["folder"], "--bias-columns", "place", "--method", "sd")
    other = shutil.copytree(roots["folder"], tmp_path / "other")
    csv = other / "metadata.csv"
    csv.write_text(csv.read_text().replace(",dog,", ",emu,"))
    renamed = train("renamed", other)
    capsys.readouterr()
    picture = str(tmp_path / "beside.png")
    assert main(["viz", first, "--beside", renamed, "--out", picture, "--count", "2"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--beside" in error and "(cat, emu) are not the ones" in error
    drawn = []
    monkeypatch.setattr(viz_module, "save_cam_comparison",
                        lambda path, pictures, *a: drawn.append([t for t, _ in pictures]))
    assert main(["viz", first, "--beside", given, "--out", picture, "--count", "2"]) == 0
    assert drawn == [["OccamResNet\noccam-erm", "OccamResNet\noccam-sd"]]


def test_the_model_predicts_every_class_of_the_dataset(roots, tmp_path):
    """BAR without any throwing image still has six classes: the head is sized by the
    dataset's class list, not by the largest label seen."""
    root = str(tmp_path / "bar")
    shutil.copytree(roots["bar"], root)
    for path in glob.glob(os.path.join(root, "*", "throwing_*.jpg")):
        os.remove(path)
    trainer = Trainer(RunConfig.from_preset(
        "quick", dataset="bar", data_root=root, out_dir=str(tmp_path / "run"),
        data_dir=str(tmp_path / "cache"), device="cpu", progress=False, max_steps=1,
        batch_size=8))
    assert trainer.num_classes == 6 and trainer.model.num_classes == 6
