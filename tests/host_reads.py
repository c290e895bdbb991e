"""A dispatch mode that records the ops which, on CUDA tensors, read a device value on the host.

Each such read stops the host from running ahead of the device (a synchronisation). On CPU
nothing syncs, so the tests record the ops themselves: what a call would read on a GPU.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# A scalar read, or an output whose size depends on the values (bincount's min and max,
# nonzero, boolean masks).
HOST_READING_OPS = {"aten::_local_scalar_dense", "aten::bincount", "aten::nonzero",
                    "aten::masked_select", "aten::_unique", "aten::_unique2",
                    "aten::unique_consecutive", "aten::unique_dim", "aten::repeat_interleave",
                    "aten::equal", "aten::is_nonzero"}


class HostReads(TorchDispatchMode):
    """Records the host-reading ops a call dispatches, and how many times compaction ran (its
    count read is the one early_exit means to make; a custom op is opaque here, so what it
    does inside is not seen). Printing a tensor reads it too, but torch prints with dispatch
    modes off: `str()` and `repr()` of a tensor are recorded as "str(tensor)" by wrapping
    torch's printer while the mode is on."""

    def __init__(self):
        super().__init__()
        self.host_reads, self.compactions = [], 0

    def __enter__(self):
        printer = self._printer = torch._tensor_str._str

        def recorded(tensor, *args, **kwargs):
            self.host_reads.append("str(tensor)")
            return printer(tensor, *args, **kwargs)

        torch._tensor_str._str = recorded
        return super().__enter__()

    def __exit__(self, *exc):
        torch._tensor_str._str = self._printer
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        boolean_index = name.startswith("aten::index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in HOST_READING_OPS or boolean_index:
            self.host_reads.append(name)
        self.compactions += name.startswith("occam::compact")
        return func(*args, **(kwargs or {}))
