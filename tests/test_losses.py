# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The training loss (common.losses.LogitRangeBound): the paper's soft Dice where every voxel's logit spread is
within the limit, plus the spread beyond it; a saturated network (the collapsed state) gets a gradient back."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss

from common.losses import LogitRangeBound, logit_range_excess


def _dice() -> DiceLoss:
    return DiceLoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)


def test_inside_the_range_it_is_the_papers_loss_exactly():
    torch.manual_seed(0)
    z = torch.randn(2, 2, 4, 4, 4) * 5  # spreads well below 20
    z = z.clamp(-9.9, 9.9)
    y = (torch.rand(2, 1, 4, 4, 4) > 0.5).float()
    assert torch.equal(LogitRangeBound(_dice(), 20.0)(z, y), _dice()(z, y))
    assert torch.equal(LogitRangeBound(_dice(), None)(z * 100, y), _dice()(z * 100, y))  # no bound: the paper's


def test_the_excess_is_the_spread_beyond_the_limit_averaged_over_voxels():
    z = torch.zeros(1, 3, 2, 2, 2)
    z[0, 1] = 30.0  # spread 30 on every voxel
    z[0, 2, 0, 0, 0] = -10.0  # one voxel: spread 40
    # (7 voxels x 10 + 1 voxel x 20) / 8
    assert float(logit_range_excess(z, 20.0)) == pytest.approx((7 * 10 + 20) / 8)
    with pytest.raises(ValueError, match="C >= 2"):
        logit_range_excess(torch.zeros(1, 1, 2, 2, 2), 20.0)
    with pytest.raises(ValueError, match="max_range"):
        LogitRangeBound(_dice(), -1.0)


def test_a_saturated_network_gets_a_gradient_back():
    """Every voxel predicted background with margin 2e4: the soft Dice's gradient is exactly zero, the bound's is
    -1/N on the background logit and +1/N on the foreground one (N voxels), pulling the spread back."""
    z = torch.zeros(1, 2, 4, 4, 4)
    z[0, 0], z[0, 1] = 1e4, -1e4
    y = torch.zeros(1, 1, 4, 4, 4)
    y[..., :2] = 1
    z1 = z.clone().requires_grad_(True)
    _dice()(z1, y).backward()
    assert float(z1.grad.abs().max()) == 0.0
    z2 = z.clone().requires_grad_(True)
    LogitRangeBound(_dice(), 20.0)(z2, y).backward()
    n = 4 * 4 * 4
    assert torch.allclose(z2.grad[0, 0], torch.full((4, 4, 4), 1.0 / n))
    assert torch.allclose(z2.grad[0, 1], torch.full((4, 4, 4), -1.0 / n))
