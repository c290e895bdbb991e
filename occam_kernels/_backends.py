"""Which implementations of an op can run on a device, and why the others cannot."""
import contextlib
import importlib
import importlib.util
import os
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")


def _import_extension() -> Tuple[Optional[object], str]:
    try:
        module = importlib.import_module("occam_kernels._C")
    except ImportError as error:
        return None, (f"occam_kernels._C is not built ({error}); build it with "
                      "`pip install --no-build-isolation -e .` from the repository root")
    return module, ""


# Found once at import, so that choosing a backend is plain Python that torch.compile traces.
_EXTENSION, _EXTENSION_ERROR = _import_extension()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
if _EXTENSION is None:
    _CUDA_ERROR = _EXTENSION_ERROR
elif not _EXTENSION.build_info()["cuda_compiled"]:
    _CUDA_ERROR = ("occam_kernels._C was built without CUDA (torch was a CPU build, nvcc was "
                   "missing, or OCCAM_BUILD_CUDA=0); rebuild on a machine with nvcc: "
                   "`OCCAM_BUILD_CUDA=1 pip install --no-build-isolation -e .`")
else:
    _CUDA_ERROR = ""


def load_extension() -> Tuple[Optional[object], str]:
    """(occam_kernels._C, "") when the compiled extension imports, else (None, why not)."""
    return _EXTENSION, _EXTENSION_ERROR


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run on `device`, else a sentence saying why not and what to do."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, these are on {device}"
        return load_extension()[1] or None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, these are on {device}"
        return _CUDA_ERROR or None
    # triton
    if not _TRITON_INSTALLED:
        return "triton is not installed; `pip install triton`"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreted():
            return None
        return ("Triton kernels run on CPU tensors only under its interpreter: set "
                "TRITON_INTERPRET=1 before the first import of triton (slow; for testing)")
    return f"no Triton backend for {device.type} tensors"


def on_device_of(tensor: torch.Tensor):
    """The context a Triton launch needs: the tensor's GPU as the current device. Triton
    launches on the current device's current stream; with the tensors on cuda:1 and cuda:0
    current, the kernel would fault, or (peer access) run unordered with cuda:1's work."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def available_backends(device) -> Dict[str, bool]:
    """Which backends can run on `device`: none on a CUDA device this machine does not have
    (why_unavailable, asked about tensors, knows their device exists)."""
    device = torch.device(device)
    if device.type == "cuda" and not _cuda_device_exists(device):
        return {name: False for name in BACKENDS}
    return {name: why_unavailable(name, device) is None for name in BACKENDS}


def _cuda_device_exists(device: torch.device) -> bool:
    if not torch.cuda.is_available():
        return False
    return device.index is None or device.index < torch.cuda.device_count()


def resolve(requested: str, device: torch.device, preference) -> str:
    """The backend to run: `requested` if it can run, the first usable of `preference` for
    "auto"; a ValueError/RuntimeError naming the reason otherwise."""
    if requested == "auto":
        for name in preference:
            if why_unavailable(name, device) is None:
                return name
        return "reference"
    why = why_unavailable(requested, device)
    if why is not None:
        error = ValueError if requested not in BACKENDS else RuntimeError
        raise error(f"backend {requested!r} is not available: {why}")
    return requested
