"""Where Triton runs in the test and benchmark suites, decided once for tests/ and bench/.

Triton reads TRITON_INTERPRET when a kernel is defined, so the choice is made here, before any
test module imports a kernel, and nowhere else: the interpreter (numpy on CPU tensors) only
when no CUDA device is visible. On a CUDA host an interpreted kernel would make a green run
hollow, so the run stops loudly, before any test, if that happens anyway.

Tests that run a Triton kernel carry the `triton` marker and take the `device` fixture: they
run on CPU under the interpreter without a GPU, and on CUDA natively with one, where their
CPU cases are deselected. The rule is checked at collection on every host, so a test that
breaks it fails in CI rather than on the next GPU.

Under pytest-xdist (`make test` runs two workers) it also starts the longest files first; see
`LONGEST_FILES`.
"""
import importlib
import os
import pkgutil

import pytest
import torch

# The files that took longest alone (--durations, one process, 2026-11-28: the GPU-check smoke
# 281 s, the repro-window tests 113 s, torchrun 72 s, the official-training parity 37 s, the
# codegen compile 35 s), run first: xdist hands out whole files (--dist loadfile), and one of
# these started last would leave the other worker idle while it runs. Only the order changes.
LONGEST_FILES = ["tests/test_gpu_check.py", "tests/test_repro_window.py",
                 "tests/test_distributed.py", "tests/test_official_training_parity.py",
                 "tests/test_codegen.py"]

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def kernel_modules():
    """Every module of occam_kernels.triton, imported (the ops import them lazily)."""
    import occam_kernels.triton
    return [importlib.import_module(f"occam_kernels.triton.{info.name}")
            for info in pkgutil.iter_modules(occam_kernels.triton.__path__)]


def interpreted_kernels():
    """Names of the Triton kernels of occam_kernels defined as interpreter functions."""
    from triton.runtime.interpreter import InterpretedFunction
    return [f"{module.__name__}.{attr}" for module in kernel_modules()
            for attr, value in vars(module).items() if isinstance(value, InterpretedFunction)]


def pytest_configure(config):
    if HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError(
            "a CUDA device is visible but TRITON_INTERPRET=1: every Triton kernel would run "
            "under the interpreter on CPU tensors and the run would prove nothing about the "
            "GPU. Unset TRITON_INTERPRET.")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    keep, deselected = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        runs_triton = item.get_closest_marker("triton") is not None
        if runs_triton and "device" not in params:
            raise pytest.UsageError(
                f"{item.nodeid} is marked triton but does not take the `device` fixture: it "
                "would run Triton on CPU tensors on a GPU host (see conftest.py)")
        if HAS_CUDA and runs_triton and params.get("device") == "cpu":
            deselected.append(item)  # Triton on CPU tensors needs the interpreter
            continue
        if not HAS_CUDA and item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(
                reason="needs a CUDA GPU: none is visible on this machine"))
        keep.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = sorted(keep, key=lambda item: file_rank(item.nodeid))


def file_rank(nodeid: str) -> int:
    """0, 1, ... for LONGEST_FILES in their order, then every other file (sorted() is stable,
    so the rest keep the order they were collected in)."""
    path = nodeid.split("::")[0]
    return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)


def pytest_collection_finish(session):
    if not HAS_CUDA:
        return
    interpreted = interpreted_kernels()
    if interpreted or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.exit("a CUDA device is visible but Triton kernels were defined under the "
                    f"interpreter ({', '.join(interpreted) or 'TRITON_INTERPRET=1'}): something "
                    "set TRITON_INTERPRET during collection; the run would prove nothing about "
                    "the GPU", returncode=3)
