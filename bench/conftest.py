"""Without a GPU the suites run once per case on CPU, Triton under its interpreter, which must
be chosen before triton is first imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
