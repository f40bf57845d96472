# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The training loss: the paper's negative soft Dice, kept inside the range of logits where float32 can see it.

:class:`LogitRangeBound` wraps a segmentation loss of logits (the bundles' ``loss``, MONAI's ``DiceLoss`` with
softmax: the paper's) and adds, per voxel, how far the spread of its logits ``max_c z_c - min_c z_c`` goes beyond
``max_range``, averaged over the voxels::

    loss(z, y) = base(z, y) + weight * mean_voxels( relu(max_c z_c - min_c z_c - max_range) )

Why (docs/benchmarks.md, "Training collapse"; the bundles' docs/training_stability.md). The paper's network has no
normalisation layer, so nothing bounds its logits. Trained with Adam on the soft Dice they grow (margins of 30-60
after a few hundred steps at the quick settings) until one step pushes every voxel of a block beyond a margin of
about 100, where float32's softmax is exactly 0 and 1: the soft Dice then passes exactly zero gradient
(``dp/dz = p (1 - p) = 0``), and nothing can move the network again (a run collapsed to all background or all
foreground). The term above is zero while every voxel's logit spread is at most ``max_range``. With the default 20
the softmax of a two-class voxel is within ``e^-20 = 2e-9`` of 0 or 1 there: beyond 17 float32 rounds the
probability to exactly 1, so the soft Dice is the same number whatever the logits do beyond it; the bound only acts
where the paper's loss is flat in float32. Its gradient never passes through the softmax, so a network whose logits
left the range is pulled back into it instead of being stuck.

``max_range`` None or 0 gives ``base`` unchanged (the paper's loss exactly).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["LogitRangeBound", "logit_range_excess"]


def logit_range_excess(logits: torch.Tensor, max_range: float) -> torch.Tensor:
    """Mean over the voxels of ``relu(max_c z_c - min_c z_c - max_range)``, in float32.

    ``logits``: ``(B, C, ...)`` with ``C >= 2`` classes along dimension 1; returns a scalar tensor."""
    if logits.dim() < 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, C, ...) with C >= 2 classes, got shape {tuple(logits.shape)}.")
    z = logits.float()
    spread = z.amax(dim=1) - z.amin(dim=1)
    return torch.relu(spread - float(max_range)).mean()


class LogitRangeBound(nn.Module):
    """``base(logits, target) + weight * logit_range_excess(logits, max_range)`` (see the module docstring).

    Args:
        loss: the loss of logits and targets to bound (the bundles' ``@loss``, the paper's soft Dice).
        max_range: the largest logit spread per voxel that costs nothing (default 20; None or 0: no bound).
        weight: the cost per unit of spread beyond ``max_range``, per voxel, in the loss's own units (default 1).

    ``forward(input, target)``: ``input`` the logits ``(B, C, D, H, W)``, ``target`` as ``loss`` takes it.
    """

    def __init__(self, loss: nn.Module, max_range: float | None = 20.0, weight: float = 1.0) -> None:
        super().__init__()
        if max_range is not None and not float(max_range) >= 0:
            raise ValueError(f"max_range must be >= 0 or None, got {max_range}.")
        if not float(weight) >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}.")
        self.loss = loss
        self.max_range = float(max_range) if max_range else None
        self.weight = float(weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self.loss(input, target)
        if self.max_range is None or self.weight == 0:
            return out
        return out + self.weight * logit_range_excess(input, self.max_range)
