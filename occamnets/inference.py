"""Early-exit inference (DESIGN.md section 6).

A sample stops at the first exit among E1..E(last-1) whose gate is >= threshold, otherwise at
the last exit; exit 0 is never used. With compaction each later stage runs only on the
samples still active: `occam_kernels.compact` gathers them after every exit (one host read
of the count per exit, which the next stage needs to launch anyway).
"""
from typing import NamedTuple

import torch
from torch import Tensor

import occam_kernels


class Prediction(NamedTuple):
    logits: Tensor        # (B, K) float32, from the exit each sample took
    exit_index: Tensor    # (B,) int64, in 1..num_exits-1
    exit_counts: Tensor   # (num_exits,) int64; entry 0 is always 0


def _check(model, x: Tensor) -> None:
    if model.training:
        raise RuntimeError("predict needs the model in eval mode (BatchNorm must use its running "
                           "statistics): call model.eval() first")
    if x.dim() != 4:
        raise ValueError(f"predict expects images (B, C, H, W), got {tuple(x.shape)}")
    if model.num_exits < 2:
        raise ValueError("early-exit inference needs at least two exits (exit 0 is not used)")


@torch.no_grad()
def predict(model, x: Tensor, compaction: bool = True, threshold: float = 0.5,
            backend: str = "auto") -> Prediction:
    """Early-exit predictions of an OccamNet for a batch of images.

    compaction=False evaluates every exit on every sample and selects afterwards: the same
    result, used as the check and the speed baseline.
    """
    _check(model, x)
    last = model.num_exits - 1
    batch = x.shape[0]
    logits_out = torch.zeros(batch, model.num_classes, device=x.device)
    exit_out = torch.full((batch,), last, dtype=torch.int64, device=x.device)
    features = model.stages[0](model.stem(x))
    if not compaction:
        for t in range(1, last + 1):
            features = model.stages[t](features)
            out = model.run_exit(t, features)
            undecided = exit_out == last
            take = undecided & (out["gate"] >= threshold) if t < last else undecided
            logits_out = torch.where(take[:, None], out["logits"].float(), logits_out)
            exit_out = torch.where(take & (t < last), torch.full_like(exit_out, t), exit_out)
        return Prediction(logits_out, exit_out, _counts(exit_out, model.num_exits))

    index = torch.arange(batch, device=x.device)
    for t in range(1, last + 1):
        if features.shape[0] == 0:
            break  # everyone has exited
        features = model.stages[t](features)
        out = model.run_exit(t, features)
        logits = out["logits"].float()
        if t == last:
            logits_out[index] = logits
            break
        done = out["gate"] >= threshold
        # Write the finished rows at their original positions without reading `done` on the host.
        logits_out[index] = torch.where(done[:, None], logits, logits_out[index])
        exit_out[index] = torch.where(done, torch.full_like(index, t), exit_out[index])
        features, index = occam_kernels.compact(features, ~done, index, backend=backend)
    return Prediction(logits_out, exit_out, _counts(exit_out, model.num_exits))


def _counts(exit_index: Tensor, num_exits: int) -> Tensor:
    return torch.bincount(exit_index, minlength=num_exits)
