"""Per-exit diagnostics against hand-computed values: ECE and reliability bins, CAM mass on
the object and the official segmentation IoU."""
import math

import pytest
import torch

from occamnets.metrics import (CamAgreementAccumulator, ReliabilityAccumulator,
                               normalise_cams)


def test_ece_and_bins_by_hand():
    acc = ReliabilityAccumulator("cpu", bins=10)
    # Two batches: bins 9 (0.95, 0.91: one right), 5 (0.55: right), 0 (0.05: wrong), and 1.0
    # falls in the last bin; a NaN confidence is left out.
    acc.add(torch.tensor([0.95, 0.55, 0.05]), torch.tensor([True, True, False]))
    acc.add(torch.tensor([0.91, 1.0, float("nan")]), torch.tensor([False, True, True]))
    result = acc.result()
    assert result.counts == [1, 0, 0, 0, 0, 1, 0, 0, 0, 3]
    assert result.confidence[1] is None and result.frequency[1] is None
    assert result.confidence[9] == pytest.approx((0.95 + 0.91 + 1.0) / 3)
    assert result.frequency[9] == pytest.approx(2 / 3)
    expected = (abs(0.05 - 0) + abs(0.55 - 1) + abs(0.95 + 0.91 + 1.0 - 2)) / 5
    assert result.ece == pytest.approx(expected)


def test_perfect_calibration_has_zero_ece():
    acc = ReliabilityAccumulator("cpu", bins=2)
    acc.add(torch.tensor([0.25] * 4 + [0.75] * 4), torch.tensor([1, 0, 0, 0, 1, 1, 1, 0]))
    assert acc.result().ece == pytest.approx(0.0)


def test_cam_agreement_by_hand():
    """One 2x2 CAM [[3, 1], [1, 1]] -> normalised [[~1, 0], [0, 0]]: all its mass on the top
    left cell. The object covers that cell fully and half of the top right one."""
    cams = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]])
    fraction = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    acc = CamAgreementAccumulator("cpu")
    acc.add(cams, fraction)
    result = acc.result()
    assert result.mass_in_object == pytest.approx(1.0)
    assert result.object_area == pytest.approx(1.5 / 4)
    # Object cells (share >= 0.5): top left and top right. At threshold 0 (> 0) the CAM marks
    # the top left only: object IoU 1/2; background cells (bottom row) against the cells
    # called background (all but the top left): IoU 2/3 -> 7/12; the same up to 0.9.
    assert result.iou == pytest.approx(7 / 12) and result.iou_threshold == 0.0
    # A CAM on the background only: no mass on the object, IoU of the best threshold lower.
    other = CamAgreementAccumulator("cpu")
    other.add(torch.tensor([[[0.0, 0.0], [5.0, 0.0]]]), fraction)
    assert other.result().mass_in_object == pytest.approx(0.0)
    assert other.result().iou < 7 / 12


def test_constant_cam_has_no_mass_and_normalisation_matches_the_official():
    acc = CamAgreementAccumulator("cpu")
    acc.add(torch.ones(1, 3, 3), torch.ones(1, 3, 3))
    assert acc.result().mass_in_object is None
    cams = torch.randn(2, 4, 5)
    scaled = normalise_cams(cams)
    low = cams.flatten(1).min(1).values[:, None, None]
    high = cams.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(scaled, (cams - low) / (high - low + 1e-5))
    assert not math.isnan(acc.result().iou)
