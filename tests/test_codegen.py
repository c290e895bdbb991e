"""The Triton kernels compiled ahead of time for sm_90 at the design shapes (bench/codegen.py):
no register spills, and h read / dh written with 16-byte vectors where the rows allow it.

No GPU is needed: Triton's compiler and the ptxas it ships run on CPU. The script runs in a
subprocess without TRITON_INTERPRET (this process has the interpreter on when no GPU is here).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    out = tmp_path_factory.mktemp("codegen") / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "codegen.py"), "--quick",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    reports = json.loads(out.read_text()) if out.exists() else []
    return done, reports


def test_no_kernel_spills_at_a_design_shape(codegen):
    done, reports = codegen
    assert len(reports) > 50, done.stdout[-2000:] + done.stderr[-3000:]
    spilling = [(r["kernel"], r["cases"][0], r["spill_store_bytes"], r["spill_load_bytes"])
                for r in reports if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilling, spilling
    assert done.returncode == 0, done.stderr[-3000:]
    assert {r["kernel"] for r in reports} >= {"_pool_kernel", "_supp_kernel", "_grad_h_kernel",
                                              "_grad_weight_kernel", "_grad_h_and_weight_kernel",
                                              "_cam_kernel", "_compact_kernel"}


def widths(report, kind, pointers):
    """Access widths of the loads or stores through the named pointers."""
    found = set()
    for name, (sizes, _count) in report["accesses"].items():
        access_kind, pointer = name.split()[:2]
        if access_kind == kind and pointer in pointers:
            found.update(sizes)
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_h_moves_in_16_byte_vectors_at_58x40x40(codegen, dtype):
    _, reports = codegen
    case = f"exit_head 58x40x40 K=10 {dtype} contiguous"
    at_shape = {r["kernel"]: r for r in reports if case in r["cases"]}
    # _grad_h_and_weight_kernel: the one-pass backward candidate, compiled where it fits;
    # _supp_finish_kernel reads the (B, P blocks) partial sums, not h
    reading_h = {"_pool_kernel", "_supp_kernel", "_grad_h_kernel", "_grad_weight_kernel",
                 "_grad_h_and_weight_kernel", "_cam_kernel"}
    assert set(at_shape) == reading_h | {"_supp_finish_kernel"}, sorted(at_shape)
    h_pointers = {"sample", "sample_ptr"}
    for kernel in reading_h:
        report = at_shape[kernel]
        assert widths(report, "load", h_pointers) == {16}, (kernel, report["accesses"])
    for kernel in ("_grad_h_kernel", "_grad_h_and_weight_kernel"):
        assert widths(at_shape[kernel], "store", {"grad_h_ptr"}) == {16}, kernel
