"""Which input check of torch.ops.occam.compact crashes on the GPU host, each in its own process."""
import subprocess, sys
PRE = "import torch, occam_kernels\n"
CASES = {
    "cpu_float_keep": "torch.ops.occam.compact(torch.randn(3, 2), torch.ones(3), torch.arange(3))",
    "cpu_keep_shape": "torch.ops.occam.compact(torch.randn(3, 2), torch.ones(2, dtype=torch.bool), torch.arange(3))",
    "cpu_index_dtype": "torch.ops.occam.compact(torch.randn(3, 2), torch.ones(3, dtype=torch.bool), torch.arange(3.0))",
    "cpu_index_shape": "torch.ops.occam.compact(torch.randn(3, 2), torch.ones(3, dtype=torch.bool), torch.arange(2))",
    "cpu_good": "print(torch.ops.occam.compact(torch.randn(3, 2), torch.ones(3, dtype=torch.bool), torch.arange(3)))",
    "cpu_keep_shape_no_grad": "with torch.no_grad():\n    torch.ops.occam.compact(torch.randn(3, 2), torch.ones(2, dtype=torch.bool), torch.arange(3))",
    "cuda_keep_shape": "torch.ops.occam.compact(torch.randn(3, 2, device='cuda'), torch.ones(2, dtype=torch.bool, device='cuda'), torch.arange(3, device='cuda'))",
    "cuda_float_keep": "torch.ops.occam.compact(torch.randn(3, 2, device='cuda'), torch.ones(3, device='cuda'), torch.arange(3, device='cuda'))",
    "cpu_both_as_test": "import pytest\ntry:\n    torch.ops.occam.compact(torch.randn(3, 2), torch.ones(3), torch.arange(3))\nexcept RuntimeError as e: print('first ok', str(e)[:80])\ntorch.ops.occam.compact(torch.randn(3, 2), torch.ones(2, dtype=torch.bool), torch.arange(3))",
}
PYTESTS = {
    "pytest_alone": ["tests/test_compact.py::test_native_op_checks_inputs_itself"],
    "pytest_opcheck_then": ["tests/test_compact.py", "-k", "opcheck or native_op"],
    "pytest_compile_then": ["tests/test_compact.py", "-k", "compiles or native_op"],
    "pytest_reject_then": ["tests/test_compact.py", "-k", "rejects or unavailable or native_op"],
}
crashed = None
for name, args in PYTESTS.items():
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider"] + args
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    print(f"== {name}: rc {r.returncode}\n{r.stdout.strip()[-800:]}\n{r.stderr.strip()[-800:]}", flush=True)
    if r.returncode < 0 or r.returncode > 2:
        crashed = crashed or cmd
if crashed:
    g = subprocess.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 30", "--args"] + crashed,
                       capture_output=True, text=True, timeout=120)
    print(f"-- cuda-gdb backtrace of {crashed}:\n{g.stdout[-6000:]}\n{g.stderr[-1000:]}", flush=True)
for name, body in CASES.items():
    code = PRE + "try:\n" + "\n".join("    " + l for l in body.splitlines()) + \
        "\nexcept Exception as e:\n    print(type(e).__name__, str(e).splitlines()[0][:200])\n"
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                       text=True, timeout=60)
    print(f"== {name}: rc {r.returncode}\n{r.stdout.strip()}\n{r.stderr.strip()[-1500:]}", flush=True)
    if (r.returncode < 0 or r.returncode > 1) and not crashed:
        try:
            g = subprocess.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args",
                                sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=100)
            print(f"-- cuda-gdb backtrace of {name}:\n{g.stdout[-5000:]}\n{g.stderr[-1500:]}",
                  flush=True)
        except Exception as e:
            print("cuda-gdb failed:", e)
