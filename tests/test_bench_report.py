"""bench/report.py computes ratios and bandwidths from pytest-benchmark JSON."""
import json
import os
import subprocess
import sys

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
