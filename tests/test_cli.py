"""The occamnets command end to end on tiny settings: data, train, resume, eval, predict, viz."""
import os

from occamnets.cli import main


def test_data_command_writes_cache_and_preview(tmp_path, capsys):
    preview = tmp_path / "grid.png"
    code = main(["data", "biased-mnist", "--p-bias", "0.95", "--out", str(tmp_path / "bm"),
                 "--cell-size", "6", "--train-size", "60", "--val-size", "10",
                 "--test-size", "20", "--preview", str(preview)])
    assert code == 0
    assert (tmp_path / "bm" / "meta.json").exists() and preview.stat().st_size > 10000
    assert "train 60, val 10, test 20" in capsys.readouterr().out


def test_data_command_reports_bad_input(tmp_path, capsys):
    assert main(["data", "biased-mnist", "--p-bias", "1.5", "--out", str(tmp_path)]) == 2
    assert "p_bias for digit_color must lie in [0, 1]" in capsys.readouterr().err
    assert main(["data", "biased-mnist", "--out", str(tmp_path), "--mnist-dir",
                 str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_resume_eval_predict_viz(tmp_path, capsys):
    out, data = str(tmp_path / "run"), str(tmp_path / "data")
    common = ["train", "--preset", "quick", "--epochs", "2", "--train-size", "128",
              "--batch-size", "32", "--out", out, "--data-dir", data, "--device", "cpu"]
    assert main(common + ["--max-steps", "3"]) == 0
    assert "continue with --resume" in capsys.readouterr().out
    assert main(common) == 2                       # refuses to overwrite the run
    assert "pass --resume" in capsys.readouterr().err
    assert main(common + ["--resume"]) == 0
    assert "Unbiased test accuracy" in capsys.readouterr().out
    checkpoint = os.path.join(out, "checkpoint.pt")
    assert main(["eval", checkpoint]) == 0
    assert "| digit_color |" in capsys.readouterr().out
    assert main(["predict", checkpoint, "--batch-size", "200"]) == 0
    assert "images/s" in capsys.readouterr().out
    cams, exits = tmp_path / "cams.png", tmp_path / "exits.png"
    assert main(["viz", checkpoint, "--out", str(cams), "--exits-plot", str(exits),
                 "--count", "3"]) == 0
    assert cams.stat().st_size > 10000 and exits.stat().st_size > 5000
