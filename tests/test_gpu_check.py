"""bench/gpu_check.sh in its CPU smoke mode: every step of a GPU window runs (tiny shapes, Triton
interpreted), so the script a GPU window depends on cannot rot between windows."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["build", "environment", "correctness", "native_errors", "device_time", "sanitize_target",
         "sanitize_triton", "timings", "profile", "timings_compiled", "report"]


def expected_steps():
    """The smoke inherits the environment: with OCCAM_OFFICIAL naming a checkout (as
    `make test-host-stack` sets it when .official/ exists) the script adds its step against the
    official training code after `profile`."""
    if not os.environ.get("OCCAM_OFFICIAL"):
        return STEPS
    at = STEPS.index("profile") + 1
    return STEPS[:at] + ["official_training"] + STEPS[at:]


def window_environment() -> dict:
    """This process's environment as a window's script would see it: without the variables of
    an xdist worker (`make test`), which would make the script's own pytest-benchmark runs
    believe they are workers and disable themselves (the timings would come back empty)."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith("PYTEST_XDIST_")}


def test_gpu_check_smoke_runs_every_step(tmp_path):
    out = tmp_path / "gpu_check"
    done = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--smoke",
                           str(out)], cwd=ROOT,
                          env={**window_environment(), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600)
    log = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, log
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == expected_steps(), log
    assert all(s[1] == "pass" for s in steps), steps
    # The table comes last.
    assert done.stdout.splitlines()[-1] == f"{len(steps)}/{len(steps)} steps passed", \
        done.stdout[-800:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["correctness"]) == {"exit_head", "one_pass", "cam", "compact", "predict",
                                           "large_index"}
    assert all(g["passed"] == g["total"] > 0 for g in summary["correctness"].values())
    # The many-classes groups take the multi-block path (more than 64 classes) in the smoke too.
    cases = json.loads((out / "correctness.json").read_text())
    classes = [int(re.search(r" K=(\d+) ", c["case"])[1]) for c in cases
               if c["group"] == "exit_head"]
    assert any(k > 64 for k in classes) and 40 in classes, [c["case"] for c in cases]
    assert summary["environment"]["smoke"] is True
    assert any(line.startswith("exit_head forward_backward 58x64x64") and "compiled" in line
               for line in summary["headlines"]), summary["headlines"]
    assert any(line.startswith("copy") for line in summary["headlines"])
    # The timings JSON comes back trimmed (no per-round data) and the profile names the op.
    bench = json.loads((out / "bench_main.json").read_text())
    assert bench["benchmarks"] and all("data" not in b["stats"] for b in bench["benchmarks"])
    # Named as what ran: pytest-benchmark compare must not rank them beside a GPU's cases.
    assert all("(CPU smoke" in b["group"] for b in bench["benchmarks"]), bench["benchmarks"][0]
    # Every device-time case got a number by the methods a CPU has, and the report shows them.
    device_time = json.loads((out / "device_time.json").read_text())
    assert device_time["kind"] == "device_time" and device_time["settings"]["smoke"] is True
    parts = {(t["part"], t["impl"]) for t in device_time["timings"]}
    assert {("exit_head", "fused"), ("exit_head", "eager"), ("exit_head", "compiled"),
            ("compact", "occam"), ("compact", "nonzero_index_select"),
            ("training", "fused"), ("backward", "two_kernels"), ("backward", "one_pass"),
            ("inference", "full_depth"), ("inference", "compaction"),
            ("segment", "stem+stage0"), ("segment", "stage3+E3")} <= parts
    assert all(t["stream_us"] > 0 and t["wall_us"] > 0 for t in device_time["timings"])
    assert "## Device time on" in (out / "RESULTS.md").read_text()
    assert any(line.startswith("- fused >= 3x eager") for line in summary["device_time"])
    assert any(line.startswith("  backward ") and "one pass" in line
               for line in summary["device_time"]), summary["device_time"]
    # Our training step, and the target line (with the official step's number or the reason
    # it has none).
    assert any(line.startswith("  training bf16 fused width ") for line in summary["device_time"])
    assert ("  issue 16's targets below: computed from a CPU smoke run, not verdicts"
            in summary["device_time"])
    assert any(line.startswith("- training step >= 5x the official code's (bf16")
               for line in summary["device_time"]), summary["device_time"]
    # Early exit against both ceilings: the segments were timed at the batch sizes the forced
    # exit counts give them, so the device-time ceiling has a number.
    early = [line for line in summary["device_time"] if line.startswith("- early-exit")]
    assert len(early) == 1 and re.search(r"FLOPs \d+\.\d\dx, device time \d+\.\d\dx \(stream\)",
                                         early[0]), summary["device_time"]
    profile = json.loads((out / "profile.json").read_text())
    assert any(row["kernel"].startswith("occam::exit_head_fused")
               for rows in profile.values() for row in rows), profile


def test_a_step_named_in_occam_skip_steps_is_recorded_and_not_run(tmp_path):
    """bench/steps.sh: a skipped step leaves no log and a "skipped" row; a name that only
    contains a skipped one (or is contained in it) still runs."""
    script = (f"set -u; out={tmp_path}; : > $out/steps.tsv; budget=100; start=$SECONDS; "
              f"reserve=0; script_name=t; source {ROOT}/bench/steps.sh; "
              "run_step tests 5 touch $out/tests_ran; run_step tests_b 5 true; "
              "run_step test 5 true; run_step other 5 false")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OCCAM_SKIP_STEPS": "x,tests other"})
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert rows == [["tests", "skipped"], ["tests_b", "pass"], ["test", "pass"],
                    ["other", "skipped"]]
    assert not (tmp_path / "tests_ran").exists() and not (tmp_path / "tests.log").exists()


def test_limit_scale_multiplies_each_limit_within_the_budget(tmp_path):
    """The smoke modes' limit_scale: a step's limit is scaled, then still clipped to what is
    left of the budget."""
    script = (f"set -u; out={tmp_path}; : > $out/steps.tsv; budget=100; start=$SECONDS; "
              f"reserve=0; script_name=t; limit_scale=3; source {ROOT}/bench/steps.sh; "
              "run_step short 5 true; run_step long 40 true")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("short", "pass"), ("long", "pass")]
    assert int(rows[0][3]) == 15 and 95 <= int(rows[1][3]) <= 100, rows


def test_every_test_file_the_gpu_check_names_exists():
    script = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
    named = set(re.findall(r"tests/\w+\.py", script))
    assert named, "the GPU check names no test files any more: update this test"
    assert not {path for path in named if not os.path.isfile(os.path.join(ROOT, path))}


def test_native_errors_shows_the_first_frames_of_a_crash(monkeypatch, capsys):
    """A process killed by a signal (the H200's SIGSEGV) is reported with the frames from the
    signal on, not the thousands of characters of template names after them."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check

    def fake_run(command, **kwargs):
        if command[0] == "cuda-gdb":
            return subprocess.CompletedProcess(command, 0, stderr="", stdout=(
                "[thread noise]\nProgram received signal SIGSEGV, Segmentation fault.\n"
                "#0  occam::check_compact_inputs (x=...)\n"))
        return subprocess.CompletedProcess(command, -11)

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/" + name)
    assert gpu_check.native_errors() == 1
    printed = capsys.readouterr().out
    assert "signal 11" in printed and "#0  occam::check_compact_inputs" in printed
    assert "[thread noise]" not in printed
