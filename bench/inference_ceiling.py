"""The compute ceiling of early-exit inference: how much faster than full depth it could be if
time were proportional to floating-point work, at a given exit distribution.

    python bench/inference_ceiling.py [--width 58] [--size 160] [--stem 7x7] [--batch 128]

Early exit with compaction (DESIGN.md section 6) runs the stem and the stages before the first
inference exit on every sample, then stage t and exit t only on the samples still active; the
full-depth baseline runs every stage and every inference exit on every sample. Work per sample
is counted once per segment (torch.utils.flop_counter: convolutions and matmuls, 2 FLOPs per
multiply-add) on a CPU twin of the model with the reference exit heads: the architecture, not
the backend, decides it. The ratio full / early is the speed-up early exit would give if time
followed that arithmetic. It is not a strict bound. Segments that run at different
efficiencies (misaligned channel counts, small maps, small batches after compaction) and work
the counter does not see (elementwise ops, launches) move a measured ratio either way;
compaction and host syncs lower it. On a CPU at the smoke sizes, where each op's fixed cost
dominates, everyone leaving at E1 measured 2.12x against a ceiling of 1.92x (2026-11-28).
bench/device_time.py's inference part measures the segments' device times, the ceiling that
counts those efficiencies in.
"""
import argparse
import json
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class SegmentWork:
    """FLOPs per sample of each inference segment: `before` is the stem and the stages before
    the first inference exit (no exit runs there); `exits[i]` is stage first+i and its exit."""
    first_inference_exit: int
    before: float
    exits: List[float]

    @property
    def full_depth(self) -> float:
        return self.before + sum(self.exits)

    @property
    def num_exits(self) -> int:
        return self.first_inference_exit + len(self.exits)


def _counted(fn, *args):
    """(FLOPs, output) of fn(*args)."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return float(counter.get_total_flops()), out


@torch.no_grad()
def segment_work(model, image_size: int) -> SegmentWork:
    """Count one sample's work per segment of `model` (an OccamNet on the CPU, in eval mode)."""
    if model.training:
        raise RuntimeError("segment_work needs the model in eval mode (call model.eval())")
    first = model.first_inference_exit
    before, features = _counted(model.stem, torch.zeros(1, 3, image_size, image_size))
    for t in range(first):
        flops, features = _counted(model.stages[t], features)
        before += flops
    exits = []
    for t in range(first, model.num_exits):
        stage_flops, features = _counted(model.stages[t], features)
        exits.append(stage_flops + _counted(model.exits[t], features)[0])
    return SegmentWork(first, before, exits)


def active_counts(batch: int, exit_counts: Sequence[int], first: int) -> List[int]:
    """Samples that run each inference segment under compaction, from the per-exit counts of
    an early-exit pass (EarlyExitOutput.exit_counts: one per exit, zero below `first`)."""
    counts = list(exit_counts)[first:]
    if sum(counts) != batch or min(counts, default=0) < 0:
        raise ValueError(f"exit counts {list(exit_counts)} do not split a batch of {batch}")
    active, left = [], batch
    for count in counts:
        active.append(left)
        left -= count
    return active


def early_exit_work(work: SegmentWork, batch: int, exit_counts: Sequence[int]) -> float:
    active = active_counts(batch, exit_counts, work.first_inference_exit)
    return batch * work.before + sum(n * w for n, w in zip(active, work.exits))


def flop_ceiling(work: SegmentWork, batch: int, exit_counts: Sequence[int]) -> float:
    """Full-depth work over early-exit work at these exit counts (>= 1)."""
    return batch * work.full_depth / early_exit_work(work, batch, exit_counts)


def counts_from_shares(batch: int, shares: Sequence[float], first: int,
                       num_exits: int) -> List[int]:
    """Per-exit counts (zero below `first`) that split a batch by `shares` of the inference
    exits, the way bench/benchutils.force_exit_distribution forces them: each exit in turn
    takes round(share / (share of the batch still left) * samples still active), capped at
    what is active, and the last exit takes the rest."""
    if len(shares) != num_exits - first:
        raise ValueError(f"{len(shares)} shares for exits {first}..{num_exits - 1}")
    counts, active, left = [0] * first, batch, 1.0
    for share in shares[:-1]:
        count = int(round(min(1.0, share / left) * active)) if left > 0 else 0
        counts.append(count)
        active -= count
        left -= share
    return counts + [active]


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1 (0 divided by zero or broke a convolution)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_positive.__name__ = "int"   # argparse's "invalid int value: 'abc'"


def main(argv=None) -> None:
    from occamnets.models import occam_resnet18
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=_positive, default=58)
    parser.add_argument("--size", type=_positive, default=160)
    parser.add_argument("--stem", default="7x7", choices=["7x7", "3x3"])
    parser.add_argument("--batch", type=_positive, default=128)
    parser.add_argument("--classes", type=_positive, default=10)
    parser.add_argument("--first-inference-exit", type=int, default=1,
                        help="the first exit early exit may leave at (the paper's: 1)")
    args = parser.parse_args(argv)
    model = occam_resnet18(args.classes, width=args.width, stem=args.stem,
                           backend="reference").eval()
    if not 0 <= args.first_inference_exit < model.num_exits - 1:
        parser.error(f"--first-inference-exit must lie in [0, {model.num_exits - 2}]")
    model.first_inference_exit = args.first_inference_exit
    work = segment_work(model, args.size)
    first = work.first_inference_exit
    print(f"OccamResNet-18 width {args.width}, {args.size} px, stem {args.stem}, "
          f"{args.classes} classes; MFLOPs per sample:")
    rows = [(f"stem and stages before E{first}", work.before)]
    rows += [(f"stage {first + i} and exit E{first + i}", w) for i, w in enumerate(work.exits)]
    rows.append(("full depth", work.full_depth))
    for name, flops in rows:
        print(f"  {name:<30}{flops / 1e6:9.1f}")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "trained_exit_distribution.json")) as handle:
        kept = json.load(handle)
    later = len(work.exits) - 1
    distributions = {f"all at E{first}": [1.0] + [0.0] * later}
    if later == 2:  # the forced distributions of bench/bench_end_to_end.py: E1, E2, E3
        distributions["50/30/20"] = [0.5, 0.3, 0.2]
    if kept["first_inference_exit"] == first:
        distributions[f"trained ({kept['preset']} preset, bench/trained_exit_distribution."
                      f"json)"] = kept["exit_share"][first:]
    distributions["none early"] = [0.0] * later + [1.0]
    print(f"FLOP ceiling of early exit over full depth, batch {args.batch}:")
    for name, shares in distributions.items():
        counts = counts_from_shares(args.batch, shares, first, model.num_exits)
        print(f"  {name}: exit counts {counts}, {flop_ceiling(work, args.batch, counts):.2f}x")


if __name__ == "__main__":
    main()
