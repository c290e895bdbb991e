"""build_info(): what the compiled part was built with and which backends run now."""
import importlib.util
from typing import Any, Dict

import torch

from . import _backends


def build_info() -> Dict[str, Any]:
    """A dict: whether occam_kernels._C was built and with CUDA (for which architectures, with
    which nvcc and torch), the torch and triton of this process, and the usable backends per
    device ("cpu", and "cuda" when a GPU is visible)."""
    module, why = _backends.load_extension()
    info: Dict[str, Any] = {"extension_built": module is not None}
    if module is not None:
        info.update(module.build_info())
    else:
        info.update(cuda_compiled=False, cuda_archs=None, nvcc_version=None, torch_version=None,
                    extension_error=why)
    info["torch_runtime"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["triton"] = (importlib.import_module("triton").__version__
                      if importlib.util.find_spec("triton") else None)
    info["triton_interpreter"] = _backends.triton_interpreted()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["backends"] = {device: [name for name, ok in
                                 _backends.available_backends(device).items() if ok]
                        for device in devices}
    return info
