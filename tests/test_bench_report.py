"""bench/report.py computes ratios and bandwidths from pytest-benchmark JSON."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entry(group, impl, median, **extra):
    return {"group": group, "name": f"{group}-{impl}", "stats": {"median": median, "rounds": 5},
            "extra_info": {"impl": impl, "device": extra.pop("device", "GPU-A"),
                           "torch": "2.x", "triton": "3.x", **extra}}


def test_report_renders_ratios_bandwidth_and_keeps_devices_apart(tmp_path):
    data = {"datetime": "2026-11-26T00:00:00", "benchmarks": [
        entry("copy", "copy", 0.001, floor_bytes=2e9),                      # 2000 GB/s
        entry("exit_head fwd 58x40x40 bf16", "eager", 0.004),
        entry("exit_head fwd 58x40x40 bf16", "fused", 0.001, floor_bytes=1e9,
              peak_memory_bytes=2 ** 21),
        entry("inference all_E1", "full_depth", 0.2, images=128),
        entry("inference all_E1", "compaction", 0.1, images=128),
        entry("exit_head fwd 58x40x40 bf16", "eager", 0.003, device="GPU-B"),
        entry("exit_head fwd 58x40x40 bf16", "fused", 0.003, device="GPU-B"),
    ]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), str(path),
                    "--out", str(tmp_path)], check=True)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## GPU-A" in text and "## GPU-B" in text
    assert text.index("## GPU-A") < text.index("## GPU-B")
    gpu_a = text[text.index("## GPU-A"):text.index("## GPU-B")]
    assert "copy bandwidth 2000.0 GB/s" in gpu_a
    assert "| exit_head fwd 58x40x40 bf16 | fused | 1.000 ms | 4.00x | 1000.0 | 50% | 2.0 | - |" \
        in gpu_a
    assert "| inference all_E1 | compaction | 100.000 ms | 2.00x | - | - | - | 1280 |" in gpu_a
    assert "1.00x" in text[text.index("## GPU-B"):]
    assert any(name.endswith(".png") for name in os.listdir(tmp_path))


def _device_time_record(tmp_path):
    """A device-time record with round numbers, built from bench/device_time.py's types."""
    from dataclasses import asdict
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from device_time import Baselines, DeviceTimeRecord, Settings, Timing

    def head(impl, shape, graph, stream, **extra):
        channels, height, width = shape
        floor = 4 * 128 * channels * height * width * 2
        return Timing("exit_head", impl, [128, *shape], "bf16", "channels_last", floor, 0.1,
                      wall_us=stream + 5, stream_us=stream, host_us=stream / 2, graph_us=graph,
                      **extra)

    timings = [
        head("fused", (58, 40, 40), 50.0, 300.0, device_ops_per_call=9.0),
        head("eager", (58, 40, 40), 200.0, 600.0),
        head("compiled", (58, 40, 40), 60.0, 450.0),
        head("fused", (464, 5, 5), 10.0, 300.0),
        head("eager", (464, 5, 5), 40.0, 600.0),
        head("compiled", (464, 5, 5), 20.0, 450.0,
             errors={"profile": "RuntimeError: the profiler broke"}),
        Timing("compact", "occam", [256, 58, 40, 40], "bf16", "channels_last", 1000, 0.1,
               stream_us=50.0, host_syncs_profiler=1.0,
               errors={"graph": "RuntimeError: not capturable: the call synchronises"}),
        Timing("compact", "nonzero_index_select", [256, 58, 40, 40], "bf16", "channels_last",
               1000, 0.1, stream_us=120.0, host_syncs_profiler=2.0),
        Timing("backward", "two_kernels", [128, 58, 40, 40], "bf16", "channels_last",
               47_513_600, 0.1, stream_us=90.0, graph_us=80.0, device_busy_us=75.0),
        Timing("backward", "one_pass", [128, 58, 40, 40], "bf16", "channels_last",
               47_513_600, 0.1, stream_us=70.0, graph_us=50.0),
        # Early exit at the trained distribution: 45, 43 and 40 of 128 leave at E1, E2, E3.
        Timing("inference", "full_depth", [128, 3, 160, 160], "fp32", "channels_last", 0, 0.1,
               stream_us=1500.0, host_us=300.0, graph_us=1100.0, flops=1000.0,
               distribution="trained", exit_counts=[0, 45, 43, 40], host_syncs_profiler=0.0),
        Timing("inference", "compaction", [128, 3, 160, 160], "fp32", "channels_last", 0, 0.1,
               stream_us=2000.0, host_us=1900.0, flops=800.0, distribution="trained",
               exit_counts=[0, 45, 43, 40], host_syncs_profiler=2.0,
               errors={"graph": "RuntimeError: not capturable: the call synchronises"}),
    ] + [Timing("segment", name, [batch, 58, 40, 40], "fp32", "channels_last", 0, 0.1,
                stream_us=graph + 20, host_us=90.0, graph_us=graph, flops=graph * 1e8)
         for name, batch, graph in [("stem+stage0", 128, 400.0), ("stage1+E1", 128, 200.0),
                                    ("stage2+E2", 128, 200.0), ("stage2+E2", 83, 150.0),
                                    ("stage3+E3", 128, 200.0), ("stage3+E3", 40, 100.0)]
    ] + [Timing("training", impl, [128, 3, 160, 160], dtype, layout, 0, 0.1, stream_us=stream,
                host_us=host, device_busy_us=busy, host_syncs_profiler=syncs, width=width,
                cudnn_benchmark=benchmark, peak_bytes=2 ** 30,
                errors={"graph": "RuntimeError: not capturable: Adam keeps its step counts"})
         for impl, dtype, layout, width, benchmark, stream, host, busy, syncs in [
             ("fused", "bf16", "channels_last", 58, False, 40_000.0, 6_000.0, 38_000.0, 0.0),
             ("official", "bf16", "contiguous", 58, False, 160_000.0, 159_000.0, 50_000.0, 9355.0),
             ("fused", "fp32", "channels_last", 58, False, 30_000.0, 5_000.0, 29_000.0, 0.0),
             ("fused", "bf16", "channels_last", 64, False, 20_000.0, 6_000.0, 18_000.0, 0.0),
             ("fused", "bf16", "channels_last", 58, True, 32_000.0, 6_000.0, 30_000.0, 0.0)]]
    record = DeviceTimeRecord(
        "2026-11-28T00:00:00+00:00", {"device": "GPU-A", "torch": "2.x", "triton": "3.x"},
        Settings(False, 50, 5, 128, 256, 10, 0.5),
        Baselines(empty_sync_us=8.0, tiny_kernel_sync_us=15.0, copy_bytes=2 ** 31,
                  copy_us=500.0, copy_gb_per_s=4000.0, profiler_syncs_for_nothing=1.0,
                  profiler_syncs_for_one_item=1.0), timings)
    path = tmp_path / "device_time.json"
    path.write_text(json.dumps(asdict(record)))
    return path


@pytest.mark.parametrize("content,said", [
    (None, "cannot read"), ("", "cannot read"), ('{"benchmarks": [', "cannot read"),
    ("{}", "is neither pytest-benchmark's JSON nor bench/device_time.py's (KeyError: "
           "'benchmarks')"),
    ("[1, 2]", "(TypeError: a JSON list, not an object)"),
    ('{"kind": "device_time"}', "(KeyError: 'environment')"),
    ('{"benchmarks": []}', "no result in")])
def test_a_file_that_holds_no_result_is_one_line_and_keeps_results_md(tmp_path, content, said):
    """Missing, cut-short or foreign files gave tracebacks; an empty one replaced RESULTS.md
    with its title alone."""
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    (tmp_path / "RESULTS.md").write_text("the last results\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), str(path),
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and said in done.stderr, \
        done.stderr
    assert (tmp_path / "RESULTS.md").read_text() == "the last results\n"


def test_files_of_one_device_are_named_when_merged(tmp_path):
    """Two files of one device (a main and a compiled run) were merged under the first file's
    name and date, their rows alike."""
    paths = []
    for name, impl, day in (("main.json", "fused", "2026-11-27"), ("compiled.json", "compiled",
                                                                   "2026-11-28")):
        path = tmp_path / name
        path.write_text(json.dumps({"datetime": day, "benchmarks": [
            entry("exit_head fwd 58x40x40 bf16", "eager", 0.004),
            entry("exit_head fwd 58x40x40 bf16", impl, 0.002)]}))
        paths.append(str(path))
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), *paths,
                    "--out", str(tmp_path)], check=True)
    text = (tmp_path / "RESULTS.md").read_text()
    assert ("Merged from 2 files: main.json: torch 2.x, triton 3.x, run 2026-11-27; "
            "compiled.json: torch 2.x, triton 3.x, run 2026-11-28") in text
    assert "| exit_head fwd 58x40x40 bf16 | compiled | 2.000 ms | 2.00x | - | - | - | - | " \
        "compiled.json |" in text


def test_a_smoke_runs_targets_are_marked_as_no_verdict(tmp_path):
    """A CPU smoke run's report said '(missed)' of GPU targets from tiny CPU shapes."""
    path = _device_time_record(tmp_path)
    record = json.loads(path.read_text())
    record["settings"]["smoke"] = True
    path.write_text(json.dumps(record))
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), str(path),
                    "--out", str(tmp_path)], check=True)
    targets = (tmp_path / "RESULTS.md").read_text().split("### Issue 16's targets on this run")[1]
    assert targets.lstrip().startswith("Computed from a CPU smoke run (tiny shapes, one call "
                                       "per method) to show the computation works: not verdicts")


def test_device_time_report_gives_ratios_bandwidth_and_the_issue_targets(tmp_path):
    path = _device_time_record(tmp_path)
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), str(path),
                    "--out", str(tmp_path), "--trim"], check=True)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Device time on GPU-A" in text
    # graph: eager 200 / fused 50 = 4x, compiled 60 / 50 = 1.2x; the floor 95,027,200 bytes in
    # 50 us is 1,900.5 GB/s, 48% of 4,000; stream 600 / 300 and 450 / 300.
    assert ("| 58x40x40 | 50.0 | 200.0 | 60.0 | 4.00x | 1.20x | 48% | 300.0 | 600.0 | 450.0 | "
            "2.00x | 1.50x | 150.0 | 305.0 | 9.0 / - / - |") in text
    assert "- fused >= 3x eager (bf16, device time): met at 2 of 2 shapes; the least 4.00x" in text
    assert ("- fused >= 1.5x compiled (bf16, device time): met at 1 of 2 shapes; the least "
            "1.20x at 58x40x40") in text
    assert "- fused >= 60% of the copy bandwidth at 58x40x40 bf16: 48% (missed)" in text
    assert "- fused >= 60% of the copy bandwidth at 58x64x64 bf16: no number" in text
    assert ("- compaction bf16: occam >= 2x nonzero+index_select at 1 of 1 shapes (the least "
            "2.40x at 58x40x40); host syncs per call [1.0]") in text
    # The backward candidate: 80 / 50 us; its floor (2 x bytes(h)) 47,513,600 bytes in 80 us
    # is 594 GB/s, 15% of 4,000, and in 50 us 24%.
    assert "| 58x40x40 | bf16 | channels_last | 80.0 | 50.0 | 1.60x | 75.0 | - | 15% | 24% |" in text
    # Early exit: 1500 / 2000 us measured; FLOPs 1000 / 800; device time summed from the
    # segments: (400 + 3 x 200) / (400 + 200 + 150 (83 samples) + 100 (40 samples)).
    assert ("| trained | [0, 45, 43, 40] | 1,100 | 1,500 | 2,000 | 1,900 | 0.75x | 1.25x | "
            "1.18x (graph) | 0.0 / 2.0 |") in text
    assert "| stage2+E2 | 83 | 15 | 150.0 | 170.0 | 90.0 | 100.0 |" in text
    assert ("- early-exit inference >= 2x full depth (missed) at the trained distribution "
            "[0, 45, 43, 40]: compaction 0.75x full depth; ceilings: FLOPs 1.25x, device time "
            "1.18x (graph)") in text
    # The training step: 160,000 / 40,000 us is 4x the official's in bf16, 128 images in
    # 40 ms 3,200 per second; no official fp32 step here. The probes against ours in bf16:
    # width 64 40,000 / 20,000, cuDNN's benchmarking 40,000 / 32,000.
    assert ("| bf16 | fused | channels_last | 58 | 40,000 | 6,000 | 38,000 | 3,200 | 0.0 | - | "
            "1,024 | 4.00x |") in text
    assert ("| bf16 | official | contiguous | 58 | 160,000 | 159,000 | 50,000 | 800 | 9,355 | - "
            "| 1,024 | - |") in text
    assert "| fp32 | fused | channels_last | 58 | 30,000 |" in text
    assert "| width 64 | bf16 | 64 | 20,000 | 18,000 | 6,400 | 2.00x |" in text
    assert "| cudnn.benchmark on | bf16 | 58 | 32,000 | 30,000 | 4,000 | 1.25x |" in text
    assert ("- training step >= 5x the official code's (bf16, stream time): 4.00x (missed); ours "
            "40,000 us, the official 160,000 us; host syncs per step (profiler) 0.0 / 9,355") in text
    # A method that failed is listed with its reason; an expected gap (no graph for a call
    # that syncs) is not.
    assert "464x5x5 bf16 channels_last compiled, profile: RuntimeError: the profiler broke" in text
    assert "not capturable" not in text
    # --trim leaves a device-time record as it was (it has no per-round data).
    assert json.loads(path.read_text())["timings"][0]["graph_us"] == 50.0


def test_trim_and_results_md_never_leave_a_half_written_file(tmp_path, monkeypatch):
    import pytest
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import report
    path = tmp_path / "run.json"
    data = {"datetime": "x", "benchmarks": [dict(entry("copy", "copy", 0.001, floor_bytes=8))]}
    data["benchmarks"][0]["stats"]["data"] = [0.001] * 100
    path.write_text(json.dumps(data))

    def interrupted_dump(obj, handle, **options):   # Ctrl-C halfway through the rewrite
        handle.write(json.dumps(obj, **options)[:40])
        raise KeyboardInterrupt
    monkeypatch.setattr(report.json, "dump", interrupted_dump)
    with pytest.raises(KeyboardInterrupt):
        report.trim(str(path))
    assert json.loads(path.read_text()) == data and os.listdir(tmp_path) == ["run.json"]
    monkeypatch.undo()
    report.trim(str(path))
    assert "data" not in json.loads(path.read_text())["benchmarks"][0]["stats"]

    class CutShort(str):   # the page's text fails while RESULTS.md is being written
        def __add__(self, other):
            raise KeyboardInterrupt
    (tmp_path / "RESULTS.md").write_text("the last complete page\n")
    monkeypatch.setattr(report, "render", lambda *args: CutShort("page"))
    with pytest.raises(KeyboardInterrupt):
        report.main([str(path), "--out", str(tmp_path)])
    assert (tmp_path / "RESULTS.md").read_text() == "the last complete page\n"
    assert sorted(os.listdir(tmp_path)) == ["RESULTS.md", "run.json"]


def _report_module():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import report
    return report


def test_merged_files_each_take_their_own_baseline_and_keep_their_series(tmp_path,
                                                                          monkeypatch):
    """Rows of a second file were compared with the first file's baseline, and in the plot the
    second file's ratios overwrote the first's under one name, its baseline drawn as a series."""
    report = _report_module()
    paths = []
    for name, eager in (("day1.json", 0.004), ("day2.json", 0.002)):
        path = tmp_path / name
        path.write_text(json.dumps({"datetime": name, "benchmarks": [
            entry("exit_head fwd 58x40x40 bf16", "eager", eager),
            entry("exit_head fwd 58x40x40 bf16", "fused", 0.001)]}))
        paths.append(str(path))
    compiled = tmp_path / "compiled.json"   # gpu_check's compiled run holds no eager of its own
    compiled.write_text(json.dumps({"datetime": "c", "benchmarks": [
        entry("exit_head fwd 58x40x40 bf16", "compiled", 0.0005)]}))
    plotted = {}
    monkeypatch.setattr(report, "plot_ratios",
                        lambda device, suite, baseline, ratios, out, **_: plotted.update(ratios))
    monkeypatch.setattr(report, "_HAS_MATPLOTLIB", True)
    text = report.render(report.load(paths + [str(compiled)]), str(tmp_path))
    assert "| exit_head fwd 58x40x40 bf16 | fused | 1.000 ms | 4.00x | - | - | - | - | day1.json |" \
        in text
    assert "| exit_head fwd 58x40x40 bf16 | fused | 1.000 ms | 2.00x | - | - | - | - | day2.json |" \
        in text
    assert "| compiled | 0.500 ms | 8.00x* |" in text
    assert "\\* compiled.json's rows are over eager of day1.json (another run of this device)." \
        in text
    assert plotted == {"fused [day1.json]": {"exit_head fwd 58x40x40 bf16": 4.0},
                       "fused [day2.json]": {"exit_head fwd 58x40x40 bf16": 2.0},
                       "compiled (over day1.json)": {"exit_head fwd 58x40x40 bf16": 8.0}}


def test_ratio_plot_marks_smoke_writes_missing_cases_and_keeps_tiny_ratios_visible():
    """A CPU smoke plot's title claimed nothing about its shapes, a missing case was a zero bar,
    and 0.005x beside 250x drew no visible bar on a linear axis."""
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    report = _report_module()
    ratios = {"fused": {"a": 0.005, "b": 250.0}, "compiled": {"a": 2.0}}
    fig = report.ratio_figure("cpu", "exit_head", "eager", ratios, smoke=True)
    ax = fig.axes[0]
    assert "CPU smoke run" in ax.get_title() and ax.get_xscale() == "log"
    ends = sorted(round(bar.get_x() + bar.get_width(), 6) for bar in ax.patches)
    starts = {round(bar.get_x(), 6) for bar in ax.patches if bar.get_width() > 0}
    assert ends == [0.005, 2.0, 250.0] and starts == {1.0}   # three bars from 1x, none for b
    words = [t.get_text().strip() for t in ax.texts]
    assert "n/a (compiled)" in words and "0.005x" in words and "250x" in words
    plt.close(fig)
