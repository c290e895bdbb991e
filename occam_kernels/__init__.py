"""occam_kernels: fused kernels of OccamNets (exit head, sample compaction) and their references.

Public ops dispatch to the compiled extension (csrc/), Triton, or the pure-PyTorch reference
(`backend=`); `build_info()` says which are usable here.
"""
from ._build_info import build_info
from .ops import (ExitHeadOutput, available_backends, class_activation_maps, compact,
                  exit_head)
from .reference import (class_activation_maps_reference, compact_reference,
                        exit_head_reference)

__all__ = ["ExitHeadOutput", "available_backends", "build_info", "class_activation_maps",
           "compact", "exit_head", "compact_reference",
           "exit_head_reference", "class_activation_maps_reference"]
