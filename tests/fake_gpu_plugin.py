"""A pytest plugin that makes a CUDA device look visible, for checking what a GPU host would
collect (tests/test_gpu_readiness.py): `pytest -p fake_gpu_plugin --collect-only`.

Loaded with -p, it runs before conftest.py, so the conftest's decision (no interpreter when
CUDA is visible) is the one a GPU host makes. After collection it writes, to the path in
FAKE_GPU_REPORT, which Triton kernels were defined and how, and every collected test with its
markers and device.

FAKE_GPU_SCENARIO plays, in that child process only, the two mistakes conftest.py must stop:
"interpreter-exported" (the user exported the interpreter switch before the run) and
"interpreter-set-in-a-module" (a test module switches it on at import, the original defect).
"""
import importlib
import json
import os
import pkgutil

import pytest
import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1

_SCENARIO = os.environ.get("FAKE_GPU_SCENARIO", "")
if _SCENARIO == "interpreter-exported":
    os.environ["TRITON_INTERPRET"] = "1"  # the mistake under test, in this child process only


def pytest_collectstart(collector):
    # Before the first test module is imported, as that module's own first line would.
    if _SCENARIO == "interpreter-set-in-a-module" and isinstance(collector, pytest.Module):
        os.environ["TRITON_INTERPRET"] = "1"  # the mistake under test, in this child only


def pytest_collection_finish(session):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    import occam_kernels.triton
    kernels = {}
    for info in pkgutil.iter_modules(occam_kernels.triton.__path__):
        module = importlib.import_module(f"occam_kernels.triton.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, (InterpretedFunction, JITFunction)):
                kernels[f"{module.__name__}.{attr}"] = type(value).__name__
    items = []
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        items.append({"nodeid": item.nodeid,
                      "triton": item.get_closest_marker("triton") is not None,
                      "device": str(params["device"]) if "device" in params else None})
    with open(os.environ["FAKE_GPU_REPORT"], "w") as handle:
        json.dump({"triton_interpret": os.environ.get("TRITON_INTERPRET"), "kernels": kernels,
                   "items": items}, handle)
