"""What the models return: one typed record per exit, one for the whole OccamNet, one for
early-exit inference. NamedTuples, so DDP, torch.compile and pytree walk them as tensors."""
from typing import NamedTuple, Optional, Tuple

from torch import Tensor


class ExitOutput(NamedTuple):
    logits: Tensor             # (B, K): GAP of the CAM
    gate: Tensor               # (B,): p(exit | x) = sigmoid(gate_logit), in [0, 1]
    gate_logit: Tensor         # (B,) fp32 even under autocast: the gate loss reads this
    pooled: Tensor             # (B, C): GAP of the CAM network's output
    supp: Optional[Tensor]     # (B,): CAM-suppression loss per sample; None without labels
    cam: Optional[Tensor]      # (B, K, H, W) when asked for (return_cams=True), else None


class OccamOutput(NamedTuple):
    """Every exit's output, exit 0 first."""
    exits: Tuple[ExitOutput, ...]

    @property
    def logits(self) -> Tuple[Tensor, ...]:
        return tuple(e.logits for e in self.exits)

    @property
    def gates(self) -> Tuple[Tensor, ...]:
        return tuple(e.gate for e in self.exits)


class EarlyExitOutput(NamedTuple):
    logits: Tensor        # (B, K) float32, from the exit each sample took
    exit_index: Tensor    # (B,) int64, in first_inference_exit..num_exits-1
    exit_counts: Tensor   # (num_exits,) int64; zero below first_inference_exit
    nonfinite: Tensor     # (B,) bool: a gate it consulted, or the logits it got, not finite
