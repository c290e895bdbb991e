"""The official code's per-exit diagnostics, accumulated on the device over a split:

- calibration: expected calibration error over 10 equal-width confidence bins, of the class
  softmax (top-label confidence against "the prediction is right") and of the gate (p(exit)
  against "this exit's prediction is right", the binary form netcal measures); the bins are
  kept for reliability diagrams;
- CAM agreement with the object: how much of the ground-truth class's CAM lies on the object
  (Biased MNIST: the digit's pixels), and the official segmentation IoU.

Accumulators add batches with tensor ops only; `result()` reads the device once.
"""
import dataclasses
from typing import List, Optional

import torch
from torch import Tensor

ECE_BINS = 10
# The official SegmentationMetrics thresholds the min-max normalised CAM at 0, 0.1, ..., 0.9
# and reports the best threshold's IoU.
IOU_THRESHOLDS = tuple(i / 10 for i in range(10))
# A CAM cell counts as object for the IoU when the object covers at least half of its pixels.
OBJECT_CELL_SHARE = 0.5


@dataclasses.dataclass
class Reliability:
    """Calibration over equal-width bins of [0, 1]: per bin the sample count, the mean
    confidence and the observed frequency (None for an empty bin); ECE is the count-weighted
    mean of |frequency - confidence|."""
    ece: float
    counts: List[int]
    confidence: List[Optional[float]]
    frequency: List[Optional[float]]


class ReliabilityAccumulator:
    def __init__(self, device, bins: int = ECE_BINS):
        self.bins = bins
        self.sums = torch.zeros(3, bins, dtype=torch.float64, device=device)

    def add(self, confidence: Tensor, outcome: Tensor) -> None:
        """confidence (B,) in [0, 1]; outcome (B,) bool or 0/1. Non-finite confidences are
        left out (the evaluator counts them)."""
        # Non-finite samples weigh 0 (no boolean indexing: it would read the count on the host).
        finite = torch.isfinite(confidence)
        confidence = torch.where(finite, confidence.double(), 0.0)
        weight = finite.double()
        index = (confidence.clamp(0, 1) * self.bins).long().clamp_max(self.bins - 1)
        values = torch.stack([weight, confidence * weight, outcome.double() * weight])
        self.sums.index_add_(1, index, values)

    def result(self) -> Reliability:
        counts, confidence, outcome = self.sums.tolist()
        total = sum(counts)
        ece = sum(abs(o - c) for c, o in zip(confidence, outcome)) / total if total else float("nan")
        return Reliability(ece, [int(n) for n in counts],
                           [c / n if n else None for c, n in zip(confidence, counts)],
                           [o / n if n else None for o, n in zip(outcome, counts)])


@dataclasses.dataclass
class CamAgreement:
    """How a CAM (of the ground-truth class) agrees with the object's mask.

    mass_in_object: mean over samples of the share of the min-max normalised CAM's mass that
        lies on the object (each cell weighted by the share of its pixels on the object);
    object_area: mean share of the image the object covers: what a uniform CAM would score;
    iou, iou_threshold: the official segmentation metric: the CAM normalised to [0, 1] and
        thresholded (> t, t in 0, 0.1, ..., 0.9) against the object's cells, IoU of object
        and of background averaged, at the best threshold. Counts are summed over the split
        (the official averages per-batch IoUs, which depends on the batch size).
    """
    mass_in_object: Optional[float]
    object_area: float
    iou: float
    iou_threshold: float


def normalise_cams(cams: Tensor, eps: float = 1e-5) -> Tensor:
    """(B, h, w) -> each map min-max scaled to [0, 1) (the official `normalize`)."""
    flat = cams.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    return (cams - low[:, None, None]) / (high - low + eps)[:, None, None]


class CamAgreementAccumulator:
    def __init__(self, device, thresholds=IOU_THRESHOLDS):
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32, device=device)
        # mass share sum, samples with mass, object area sum
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.samples = 0
        # per threshold: cells both predicted and object, cells predicted; object cells, cells
        self.hits = torch.zeros(2, len(thresholds), dtype=torch.float64, device=device)
        self.object_cells = torch.zeros((), dtype=torch.float64, device=device)
        self.cells = 0

    def add(self, cams: Tensor, object_fraction: Tensor) -> None:
        """cams (B, h, w) of the ground-truth class; object_fraction (B, h, w) in [0, 1]."""
        weights = normalise_cams(cams.float())
        mass = weights.sum((1, 2))
        has_mass = mass > 0
        share = (weights * object_fraction).sum((1, 2)) / mass.clamp_min(1e-12)
        self.sums += torch.stack([torch.where(has_mass, share, 0.0).double().sum(),
                                  has_mass.double().sum(),
                                  object_fraction.double().mean((1, 2)).sum()])
        self.samples += cams.shape[0]
        obj = (object_fraction >= OBJECT_CELL_SHARE).flatten(1)[:, None]          # (B, 1, P)
        predicted = weights.flatten(1)[:, None] > self.thresholds[None, :, None]  # (B, T, P)
        # Two reductions; the rest of the confusion matrix follows from the totals.
        self.hits += torch.stack([(predicted & obj).sum((0, 2)), predicted.sum((0, 2))]).double()
        self.object_cells += obj.sum()
        self.cells += obj.numel()

    def result(self) -> CamAgreement:
        share_sum, with_mass, area_sum, object_cells = torch.cat(
            [self.sums, self.object_cells[None]]).tolist()
        samples, best_iou, best_threshold = self.samples, float("nan"), float("nan")
        for threshold, tp, predicted in zip(self.thresholds.tolist(), *self.hits.tolist()):
            fp, fn = predicted - tp, object_cells - tp
            tn = self.cells - tp - fp - fn
            parts = [tp / (tp + fp + fn) if tp + fp + fn else None,
                     tn / (tn + fn + fp) if tn + fn + fp else None]
            parts = [p for p in parts if p is not None]
            iou = sum(parts) / len(parts) if parts else float("nan")
            if iou == iou and not iou <= best_iou:  # a number, and the first or a better one
                best_iou, best_threshold = iou, round(threshold, 6)
        return CamAgreement(share_sum / with_mass if with_mass else None,
                            area_sum / samples if samples else float("nan"),
                            best_iou, best_threshold)
