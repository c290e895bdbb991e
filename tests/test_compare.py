"""`occamnets compare`: the grid, its table, JSON and chart, and resuming without rerunning
finished cells (an interrupted cell continues from its checkpoint)."""
import json
import os
import signal

import pytest

from occamnets import compare as compare_module
from occamnets import train as train_module
from occamnets.cli import main
from occamnets.compare import Cell, CellResult, Comparison, Row, grid, summarise

SMALL = ["--preset", "quick", "--cell-size", "6", "--train-size", "48", "--val-size", "10",
         "--test-size", "20", "--batch-size", "16", "--width", "4", "--device", "cpu",
         "--no-progress"]


def test_grid_puts_ablations_on_occam_rows_only():
    cells = grid(["resnet", "occam"], ["erm", "pgi"], ["none", "no-early-exit"], [0, 1])
    rows = list(dict.fromkeys(c.row for c in cells))
    assert rows == ["resnet-erm", "resnet-pgi", "occam-erm", "occam-erm-no-early-exit",
                    "occam-pgi", "occam-pgi-no-early-exit"]
    assert len(cells) == 2 * len(rows)
    with pytest.raises(ValueError, match="unknown ablation 'no-gates'"):
        grid(["occam"], ["erm"], ["no-gates"], [0])


def test_each_cell_has_its_own_run_and_tensorboard_directory():
    cell = Cell("occam", "sd", "no-exit-weighting", 2)
    config = compare_module.cell_config(cell, "quick", "grid", {"tensorboard": "tb",
                                                                "epochs": 3})
    assert (config.model, config.method, config.seed, config.epochs) == ("occam", "sd", 2, 3)
    assert not config.exit_weighting and config.early_exit
    assert config.run_dir == "grid/occam-sd-no-exit-weighting/seed-2"
    assert config.tensorboard == "tb/occam-sd-no-exit-weighting/seed-2"


def test_rows_average_the_seeds_with_the_sample_std():
    def result(seed, accuracy, shares):
        return CellResult(Cell("occam", "erm", "none", seed), accuracy, shares, 1, 10.0 + seed,
                          40, True, False)
    rows = summarise([result(0, 0.2, [0, 0.5, 0.25, 0.25]), result(1, 0.4, [0, 0.3, 0.25, 0.45]),
                      result(2, 0.3, [0, 0.4, 0.2, 0.4])])
    (row,) = rows
    assert row.test_accuracy_mean == pytest.approx(0.3)
    assert row.test_accuracy_std == pytest.approx(0.1)        # sample std of 0.2, 0.4, 0.3
    assert row.exit_share_mean == pytest.approx([0, 0.4, 0.7 / 3, 1.1 / 3])
    assert row.train_seconds_mean == pytest.approx(11.0) and row.seeds == [0, 1, 2]
    single = summarise([result(0, 0.2, None)])[0]
    assert single.test_accuracy_std is None and single.exit_share_mean is None
    table = Comparison("quick", {"epochs": 2}, rows + [single], [], 1.0).to_markdown()
    assert "Preset `quick` with epochs=2" in table
    assert "| 30.0 ± 10.0 | 40.0 | 23.3 | 36.7 | 11.0 | 40 |" in table
    assert "| E0 share" not in table   # exit 0 takes no samples at inference


def test_compare_writes_table_json_chart_and_reruns_no_finished_cell(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--models", "resnet,occam", "--methods", "erm,gdro", "--seeds", "2",
            "--max-steps", "2", "--out", "grid"] + SMALL
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[8/8] occam-gdro seed 1: unbiased test accuracy" in printed
    assert "reached --max-steps" not in printed      # the budget, not news
    table = (tmp_path / "grid" / "compare.md").read_text()
    assert table.count("| OccamResNet-18 |") == 2 and table.count("| ResNet-18 baseline |") == 2
    assert "± " in table and "2 (cut)" in table
    saved = json.loads((tmp_path / "grid" / "compare.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["resnet-erm", "resnet-gdro", "occam-erm",
                                                  "occam-gdro"]
    assert len(saved["cells"]) == 8 and all(c["steps"] == 2 for c in saved["cells"])
    assert (tmp_path / "grid" / "compare.png").stat().st_size > 5000
    report = json.loads((tmp_path / "grid" / "occam-gdro" / "seed-1" / "report.json").read_text())
    assert report["config"]["method"] == "gdro" and report["config"]["seed"] == 1

    # Again: every cell is read, none trained; the table is the same.
    monkeypatch.setattr(compare_module, "Trainer",
                        lambda *a, **k: pytest.fail("a finished cell was trained again"))
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished before") == 8
    again = (tmp_path / "grid" / "compare.md").read_text()
    assert again.split("\n\n")[0] == table.split("\n\n")[0]
    # The same data found through --data-dir alone (its settings adopted, renders_per_digit
    # resolved where the first call left it None): the same cells, read.
    (data_dir,) = (tmp_path / "data").iterdir()
    without_data_options = argv[:argv.index("--cell-size")] + argv[argv.index("--batch-size"):]
    assert main(without_data_options + ["--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out.count("finished before") == 8


def test_an_interrupted_grid_continues_where_it_stopped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--models", "occam", "--methods", "erm,sd", "--epochs", "1",
            "--out", "grid"] + SMALL
    real_step = train_module.Trainer._train_step
    trained = []

    def step_then_interrupt(self, rows, following=None):
        trained.append(self.config.method)
        if self.config.method == "sd" and self.global_step == 1:
            self.stop_signal = signal.SIGINT          # as Ctrl-C during the second step
        return real_step(self, rows, following)
    monkeypatch.setattr(train_module.Trainer, "_train_step", step_then_interrupt)
    assert main(argv) == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().out
    assert trained == ["erm"] * 3 + ["sd"] * 2
    assert (tmp_path / "grid" / "occam-sd" / "seed-0" / "checkpoint.pt").exists()
    assert not (tmp_path / "grid" / "compare.md").exists()

    trained.clear()
    assert main(argv) == 0          # erm is read; sd continues at its third step
    assert trained == ["sd"]
    saved = json.loads((tmp_path / "grid" / "compare.json").read_text())
    assert [c["reused"] for c in saved["cells"]] == [True, False]
    assert all(c["complete"] and c["steps"] == 3 for c in saved["cells"])


def test_an_interruption_outside_training_says_how_to_continue(tmp_path, capsys, monkeypatch):
    """Ctrl-C while a cell's data was read (before its training could catch it) said only
    'interrupted'."""
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(compare_module, "Trainer", interrupted)
    assert main(["compare", "--models", "occam", "--out", "grid"] + SMALL) == 130
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "interrupted; the finished cells are kept: run the same `occamnets compare" in error
    assert "--out grid ...` again to continue" in error


def test_compare_refuses_bad_lists(capsys):
    assert main(["compare", "--methods", "erm,jtt"]) == 2
    assert "'jtt' is not one of erm, upwt, gdro, sd, pgi" in capsys.readouterr().err


def test_the_chart_names_cut_rows_and_changed_settings_and_clears_its_error_bars(tmp_path,
                                                                              monkeypatch):
    """The chart said only "(quick preset)" for a grid run with other epochs and a step cap,
    drew cut rows like finished ones, printed each mean on its error bar, and promised error
    bars where one seed has none."""
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib")
    import occamnets.viz as viz
    drawn = {}
    real_save = viz._save

    def keep(fig, path, dpi):
        drawn["ax"] = fig.axes[0]
        drawn["texts"] = [(t.get_text(), t.xy[0]) for t in fig.axes[0].texts]
        drawn["title"], drawn["xlabel"] = fig.axes[0].get_title(), fig.axes[0].get_xlabel()
        drawn["labels"] = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        return real_save(fig, path, dpi)
    monkeypatch.setattr(viz, "_save", keep)

    def row(name, mean, std, complete):
        return Row(name, "occam", "erm", "none", [0, 1], mean, std, None, None, 1.0, 40, complete)
    comparison = Comparison("quick", {"epochs": 2, "max_steps": 40, "progress": False},
                            [row("occam erm", 0.3, 0.1, False), row("occam gdro", 0.5, 0.02, True)],
                            [], 1.0)
    comparison.save_chart(str(tmp_path / "chart.png"))
    assert os.path.getsize(tmp_path / "chart.png") > 0
    assert drawn["title"] == "Unbiased test accuracy (quick preset; also set: epochs, max_steps)"
    assert drawn["labels"] == ["occam erm (cut)", "occam gdro"]
    assert drawn["texts"] == [("30.0", pytest.approx(40.0)), ("50.0", pytest.approx(52.0))]
    assert "error bars: std over seeds" in drawn["xlabel"]
    one_seed = Comparison("quick", {}, [row("occam erm", 0.3, None, True)], [], 1.0)
    one_seed.save_chart(str(tmp_path / "one.png"))
    assert drawn["xlabel"] == "accuracy % (one seed: no error bars)"
    assert drawn["title"] == "Unbiased test accuracy (quick preset)"


def test_a_model_has_one_colour_in_every_chart(tmp_path, monkeypatch):
    """An ablation grid (OccamResNet rows only) drew OccamResNet in the colour a methods grid
    gives the ResNet baseline: side by side in the README, the two charts disagreed."""
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib")
    import occamnets.viz as viz
    colours = []
    real_save = viz._save

    def keep(fig, path, dpi):
        colours.append([tuple(bar.get_facecolor()) for bar in fig.axes[0].patches])
        return real_save(fig, path, dpi)
    monkeypatch.setattr(viz, "_save", keep)

    def row(model):
        return Row(model, model, "erm", "none", [0], 0.3, None, None, None, 1.0, 40, True)
    Comparison("quick", {}, [row("resnet"), row("occam")], [], 1.0).save_chart(
        str(tmp_path / "both.png"))
    Comparison("quick", {}, [row("occam")], [], 1.0).save_chart(str(tmp_path / "occam.png"))
    Comparison("quick", {}, [row("resnet")], [], 1.0).save_chart(str(tmp_path / "resnet.png"))
    (resnet, occam), (occam_alone,), (resnet_alone,) = colours
    assert resnet != occam and occam_alone == occam and resnet_alone == resnet
