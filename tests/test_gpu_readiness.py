"""What a GPU host would run: collected with a visible (faked) CUDA device, the test suite has
no interpreted Triton kernel and no Triton test on CPU tensors; and the run refuses to start
when CUDA is visible but the interpreter is forced (conftest.py)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collect_with_fake_gpu(tmp_path, paths=(), scenario=""):
    """Collect in a child pytest with a faked visible GPU (tests/fake_gpu_plugin.py). The
    child starts without the interpreter switch; `scenario` asks the plugin to misuse it."""
    report = tmp_path / "collected.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FAKE_GPU_REPORT=str(report), FAKE_GPU_SCENARIO=scenario,
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"),
                                           env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "fake_gpu_plugin", "-p", "no:cacheprovider", *paths],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    data = json.loads(report.read_text()) if report.exists() else None
    return done, data


def test_fake_gpu_collection_has_no_interpreted_kernel_and_no_triton_on_cpu(tmp_path):
    done, data = collect_with_fake_gpu(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert data["triton_interpret"] is None
    assert "occam_kernels.triton.compact._compact_kernel" in data["kernels"]
    assert "occam_kernels.triton.exit_head._supp_kernel" in data["kernels"]
    interpreted = [name for name, kind in data["kernels"].items() if kind != "JITFunction"]
    assert not interpreted, interpreted
    triton_items = [item for item in data["items"] if item["triton"]]
    assert len(triton_items) > 40, len(triton_items)
    on_cpu = [item["nodeid"] for item in triton_items if item["device"] != "cuda"]
    assert not on_cpu, on_cpu
    # The rest of the suite still runs on CPU too (the compiled extension's CPU backend).
    assert any(item["device"] == "cpu" for item in data["items"])
    assert "deselected" in done.stdout


def test_forced_interpreter_on_a_gpu_host_stops_the_run(tmp_path):
    done, data = collect_with_fake_gpu(tmp_path, scenario="interpreter-exported")
    assert done.returncode != 0 and data is None
    assert "TRITON_INTERPRET=1" in done.stdout + done.stderr


def test_a_module_that_turns_the_interpreter_on_stops_the_run(tmp_path):
    """The defect this guards against: a test module switching the interpreter on at import
    made every kernel of a GPU run interpreted."""
    done, data = collect_with_fake_gpu(tmp_path, paths=["tests/test_exit_head.py"],
                                       scenario="interpreter-set-in-a-module")
    assert done.returncode == 3 and data is None, done.stdout[-2000:] + done.stderr[-2000:]
    assert "defined under the interpreter" in done.stdout + done.stderr
