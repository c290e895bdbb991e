"""Where a run ran: the device, the library versions and the date, kept in its report so that
every number in it says which card and which builds gave it."""
import dataclasses
import datetime
import platform
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class RunEnvironment:
    device: str                 # the GPU's name, or the CPU's
    torch: str
    triton: Optional[str]       # None: not installed
    cuda: Optional[str]         # the CUDA version torch was built with (None: a CPU build)
    extension: str              # the occam_kernels native build: "cuda", "cpu" or "none"
    date: str                   # ISO date the report was written (UTC)

    def describe(self) -> str:
        return (f"{self.device} (torch {self.torch}, triton {self.triton}, CUDA {self.cuda}, "
                f"native ops: {self.extension}), {self.date}")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def collect_environment(device: torch.device) -> RunEnvironment:
    """The environment of a run on `device` (no GPU work: names and versions only)."""
    from occam_kernels import build_info
    info = build_info()
    name = device_name(device)
    extension = ("cuda" if info["cuda_compiled"] else
                 "cpu" if info["extension_built"] else "none")
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return RunEnvironment(name, torch.__version__, info["triton"], torch.version.cuda,
                          extension, today)
