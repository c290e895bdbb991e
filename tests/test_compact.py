"""compact against its reference on every backend usable here (DESIGN.md section 4).

Kernels run on the `device` fixture (conftest.py): the compiled extension's CPU or CUDA
implementation ("native"), and Triton (interpreted on CPU, native on CUDA).
"""
import os

import pytest
import torch

import occam_kernels
from occam_kernels import compact, compact_reference

BACKENDS = ["reference", "native", pytest.param("triton", marks=pytest.mark.triton)]


def resolve(backend, device):
    """'native' is the compiled extension's implementation for the device."""
    return device.type if backend == "native" else backend


def make_input(shape, dtype, device, layout, generator):
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=generator).to(dtype)
    else:
        x = torch.randint(-2**40, 2**40, shape, generator=generator, dtype=dtype)
    x = x.to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        # Every other element of a wider tensor: rows are not dense blocks.
        wide = torch.zeros((shape[0], *shape[1:-1], shape[-1] * 2), dtype=dtype, device=device)
        wide[..., ::2] = x
        x = wide[..., ::2]
        assert not x.is_contiguous()
    elif layout == "offset":
        # Contiguous, but one element into its storage: the data pointer is aligned to the
        # element only (a view into a larger buffer), not to the rows' widest integer.
        flat = torch.zeros(x.numel() + 1, dtype=dtype, device=device)
        flat[1:] = x.flatten()
        x = flat[1:].view(shape)
        assert x.is_contiguous() and x.storage_offset() == 1
    return x


def make_keep(batch, pattern, device, generator):
    if pattern == "random":
        return (torch.rand(batch, generator=generator) < 0.5).to(device)
    return torch.full((batch,), pattern == "all", dtype=torch.bool, device=device)


def check_against_reference(x, keep, index, backend):
    got_x, got_index = compact(x, keep, index, backend=backend)
    want_x, want_index = compact_reference(x, keep, index)
    assert got_x.shape == want_x.shape and got_x.dtype == x.dtype
    assert torch.equal(got_x, want_x)
    assert torch.equal(got_index, want_index)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] > 1:
        assert got_x.is_contiguous(memory_format=torch.channels_last) or backend == "reference"


def run_matrix(device, backends):
    generator = torch.Generator().manual_seed(0)
    cases = []
    for batch in (0, 1, 7, 33):
        for pattern in ("random", "all", "none"):
            cases.append(((batch, 5, 3, 4), torch.float32, "contiguous", pattern))
    for dtype in (torch.float16, torch.bfloat16, torch.int64, torch.float32):
        cases.append(((9, 6, 5, 3), dtype, "channels_last", "random"))
        cases.append(((9, 7), dtype, "strided", "random"))
        cases.append(((9,), dtype, "contiguous", "random"))
    cases.append(((5, 3, 1, 1), torch.float16, "contiguous", "random"))   # 6-byte rows
    for dtype in (torch.float32, torch.float16, torch.int64):
        cases.append(((9, 2), dtype, "offset", "random"))
        cases.append(((9, 6, 5, 3), dtype, "offset", "random"))
    cases.append(((5, 0, 2), torch.float32, "contiguous", "random"))      # empty rows
    for shape, dtype, layout, pattern in cases:
        x = make_input(shape, dtype, device, layout, generator)
        keep = make_keep(shape[0], pattern, device, generator)
        index = torch.randperm(shape[0], generator=generator).to(device) * 10 + 3
        for backend in backends:
            check_against_reference(x, keep, index, backend)
            check_against_reference(x, keep, None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_matches_reference(backend, device):
    run_matrix(device, ["reference", resolve(backend, device)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_keeps_rows_whose_keep_byte_is_any_nonzero(backend, device):
    """A 0/255 (or any byte) mask viewed as bool: x[keep] keeps every nonzero byte. The CPU
    extension added the bytes, counted 3 rows for [2, 0, 1, 0] and returned an unwritten one."""
    generator = torch.Generator().manual_seed(2)
    for batch in (4, 70):   # 70: past Triton's 16-row blocks
        bytes_ = torch.randint(0, 4, (batch,), generator=generator, dtype=torch.uint8) * 85
        bytes_[:4] = torch.tensor([2, 0, 1, 0], dtype=torch.uint8)
        keep = bytes_.to(device).view(torch.bool)
        x = torch.randn(batch, 3, generator=generator).to(device)
        index = torch.arange(batch, device=device)
        got_x, got_index = compact(x, keep, backend=resolve(backend, device))
        want = bytes_ != 0
        assert torch.equal(got_index.cpu(), index.cpu()[want])
        assert torch.equal(got_x.cpu(), x.cpu()[want])


@pytest.mark.cuda
@pytest.mark.triton
def test_compact_cuda_large_batch_and_row(device):
    """3,000 rows of a sliced stage output: more rows and wider rows than one block."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 58, 40, 40, generator=generator)[:, :, :7].to(device)
    keep = (torch.rand(3000, generator=generator) < 0.3).to(device)
    for backend in ("cuda", "triton"):
        check_against_reference(x, keep, None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_gradient_scatters_back(backend, device):
    x = torch.randn(6, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    keep = torch.tensor([True, False, True, True, False, False], device=device)
    kept, _ = compact(x, keep, backend=resolve(backend, device))
    weights = torch.arange(1, 4, dtype=torch.float64, device=device)[:, None, None]
    (kept * weights).sum().backward()
    want = torch.zeros_like(x)
    want[keep] = weights.expand(3, 3, 2)
    assert torch.equal(x.grad, want)


@pytest.mark.parametrize("op_name", ["compact", pytest.param("compact_triton",
                                                             marks=pytest.mark.triton)])
def test_opcheck(op_name, device):
    op = getattr(torch.ops.occam, op_name)
    generator = torch.Generator().manual_seed(2)
    samples = [
        (torch.randn(7, 3, 4, 5, generator=generator), torch.rand(7, generator=generator) < 0.5),
        (torch.randn(7, 3, 4, 5, generator=generator).contiguous(memory_format=torch.channels_last),
         torch.rand(7, generator=generator) < 0.5),
        (torch.randn(4, 2, dtype=torch.float64).requires_grad_(True),
         torch.tensor([True, True, False, True])),
        (torch.randn(0, 3), torch.zeros(0, dtype=torch.bool)),
    ]
    for x, keep in samples:
        x = x.detach().to(device).requires_grad_(x.requires_grad)  # keeps channels_last
        torch.library.opcheck(op, (x, keep.to(device), torch.arange(x.shape[0], device=device)))


def test_compact_compiles_with_dynamic_output():
    def keep_positive_rows(x):
        kept, index = compact(x, x[:, 0] > 0, backend="cpu")
        return kept * 2, index

    compiled = torch.compile(keep_positive_rows, fullgraph=True, backend="eager")
    x = torch.randn(11, 4)
    got, got_index = compiled(x)
    assert torch.equal(got, x[x[:, 0] > 0] * 2)
    assert torch.equal(got_index, torch.nonzero(x[:, 0] > 0)[:, 0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compact_rejects_bad_input(backend):
    # Input checks come before any kernel: nothing here runs Triton.
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="keep must be a bool tensor"):
        compact(x, torch.ones(4, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match=r"keep must have shape \(4,\)"):
        compact(x, torch.ones(5, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="index must be an int64"):
        compact(x, torch.ones(4, dtype=torch.bool), torch.arange(4.0), backend=backend)
    with pytest.raises(ValueError, match="one device"):
        compact(x, torch.ones(4, dtype=torch.bool, device="meta"), backend=backend)


def test_compact_names_unavailable_backends():
    x, keep = torch.randn(3, 2), torch.ones(3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="'cuda' backend runs on CUDA tensors"):
        compact(x, keep, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        compact(x, keep, backend="fast")


def test_available_backends_says_none_run_on_a_missing_cuda_device():
    """It reported cuda and triton as available for "cuda" on a machine without a GPU."""
    missing = f"cuda:{torch.cuda.device_count()}"   # one past the last device, or cuda:0
    assert not any(occam_kernels.available_backends(missing).values())
    assert occam_kernels.available_backends("cpu")["reference"]


def test_on_device_of_makes_the_tensors_gpu_current():
    """What the Triton ops enter around their launches (test_exit_head.py checks they do)."""
    from occam_kernels._backends import on_device_of

    class OnSecondGpu:
        is_cuda, device = True, torch.device("cuda", 1)
    assert on_device_of(OnSecondGpu()).idx == 1      # entered only on a GPU host
    assert not hasattr(on_device_of(torch.zeros(1)), "idx")   # CPU: a null context


def test_the_triton_op_and_the_reference_check_inputs_themselves():
    """Reachable directly: the Triton op wrote index entries past a short index's end and
    read past a short keep (a different row count per run); the reference took an int keep
    as row numbers."""
    x = torch.arange(6.0).reshape(3, 2)
    with pytest.raises(ValueError, match=r"occam::compact_triton: index must be an int64 "
                                         r"tensor of shape \(3,\)"):
        torch.ops.occam.compact_triton(x, torch.tensor([True, False, True]), torch.arange(2))
    with pytest.raises(ValueError, match=r"keep must have shape \(3,\)"):
        torch.ops.occam.compact_triton(x, torch.tensor([True, False]), torch.arange(3))
    with pytest.raises(TypeError, match="compact_reference: keep must be a bool tensor"):
        compact_reference(x, torch.tensor([1, 0, 1]))
    with pytest.raises(TypeError, match="compact: index must be a tensor, got list"):
        compact(x, torch.ones(3, dtype=torch.bool), [0, 1, 2])
    with pytest.raises(ValueError, match="x must be a tensor with a batch dimension, got list"):
        compact([1, 2, 3], torch.ones(3, dtype=torch.bool))


def test_native_op_checks_inputs_itself():
    # The C++ op is reachable through torch.ops directly: it must validate too.
    with pytest.raises(RuntimeError, match="keep must be a bool tensor"):
        torch.ops.occam.compact(torch.randn(3, 2), torch.ones(3), torch.arange(3))
    with pytest.raises(RuntimeError, match="keep must have shape"):
        torch.ops.occam.compact(torch.randn(3, 2), torch.ones(2, dtype=torch.bool),
                                torch.arange(3))


def test_build_info_reports_the_build():
    info = occam_kernels.build_info()
    assert info["extension_built"], info.get("extension_error")
    assert info["torch_version"] == torch.__version__
    assert "cpu" in info["backends"]["cpu"] and "reference" in info["backends"]["cpu"]
    if info["cuda_compiled"]:
        # setup.py's default, or what OCCAM_CUDA_ARCHS asked for (gpu_check.sh: the local GPU)
        wanted = os.environ.get("OCCAM_CUDA_ARCHS", "8.0;9.0+PTX")
        assert info["cuda_archs"] == wanted
        assert info["nvcc_version"].startswith("V")


def test_cuda_part_compiled_wherever_nvcc_is():
    import shutil
    nvcc_here = (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
                 or os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"),
                                                "bin", "nvcc")))
    wanted = (torch.version.cuda is not None and nvcc_here
              and os.environ.get("OCCAM_BUILD_CUDA") != "0")
    if not wanted:
        pytest.skip("no nvcc or a CPU-only torch here: the CPU-only build is expected")
    assert occam_kernels.build_info()["cuda_compiled"]
