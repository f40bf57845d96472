#!/usr/bin/env python3
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Time ``common.metrics`` HD95 + ASSD against MONAI's metrics on one large synthetic pair.

The pair is two overlapping, smoothly perturbed ellipsoids in a volume of ``--size`` (default
256 256 200) with anisotropic spacing. Each contender is timed best-of-``--repeats`` in the same run:

- ours: ``hd95(..., convention="max")`` + ``assd(...)`` (two separate calls, as a user would make
  them) and ``case_metrics`` (one call; surface distances computed once, plus DSC);
- MONAI: ``HausdorffDistanceMetric(percentile=95)`` + ``SurfaceDistanceMetric(symmetric=True)``.

Prints one JSON object with times (s), values (mm) and the differences ours - MONAI.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def perturbed_ellipsoid(
    shape: tuple[int, int, int],
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
    amplitude: float,
    freqs: tuple[float, float, float],
) -> np.ndarray:
    """Bool mask of an ellipsoid (radii in voxels) whose implicit function is perturbed by a smooth wave."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    g = [(grids[i].astype(np.float32) - centre[i]) / radii[i] for i in range(3)]
    f = g[0] ** 2 + g[1] ** 2 + g[2] ** 2
    wave = np.sin(freqs[0] * g[0]) * np.sin(freqs[1] * g[1]) * np.cos(freqs[2] * g[2])
    return (f + amplitude * wave) < 1.0


def make_pair(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = shape
    ref = perturbed_ellipsoid(shape, (x * 0.5, y * 0.5, z * 0.5), (x * 0.30, y * 0.25, z * 0.30), 0.15, (5.0, 7.0, 3.0))
    pred = perturbed_ellipsoid(
        shape, (x * 0.53, y * 0.48, z * 0.52), (x * 0.28, y * 0.27, z * 0.28), 0.20, (6.0, 4.0, 5.0)
    )
    return pred, ref


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=(256, 256, 200), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.5), metavar=("SX", "SY", "SZ"))
    parser.add_argument("--repeats", type=int, default=3, help="best-of-N timing (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for MONAI (default 1)")
    args = parser.parse_args()

    from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

    from common.metrics import assd, case_metrics, hd95

    torch.set_num_threads(args.threads)
    shape = tuple(args.size)
    spacing = tuple(args.spacing)
    pred, ref = make_pair(shape)  # type: ignore[arg-type]

    def ours_separate() -> tuple[float, float]:
        return hd95(pred, ref, spacing, convention="max"), assd(pred, ref, spacing)

    def ours_case() -> tuple[float, float]:
        row = case_metrics(pred, ref, spacing)
        return row["hd95"], row["assd"]

    yp = torch.from_numpy(pred)[None, None].float()
    yt = torch.from_numpy(ref)[None, None].float()

    def monai_pair() -> tuple[float, float]:
        hd = HausdorffDistanceMetric(include_background=True, percentile=95)
        sd = SurfaceDistanceMetric(include_background=True, symmetric=True)
        h = hd(yp, yt, spacing=spacing)
        s = sd(yp, yt, spacing=spacing)
        return float(h.item()), float(s.item())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_monai, (m_hd, m_assd) = best_of(monai_pair, args.repeats)
        t_ours, (o_hd, o_assd) = best_of(ours_separate, args.repeats)
        t_case, (c_hd, c_assd) = best_of(ours_case, args.repeats)

    result = {
        "size": list(shape),
        "spacing_mm": list(spacing),
        "voxels_pred": int(pred.sum()),
        "voxels_ref": int(ref.sum()),
        "repeats": args.repeats,
        "time_s": {
            "ours_hd95_plus_assd": round(t_ours, 4),
            "ours_case_metrics": round(t_case, 4),
            "monai_hausdorff95_plus_surface_symmetric": round(t_monai, 4),
            "speedup_monai_over_ours": round(t_monai / t_ours, 2),
        },
        "values_mm": {"ours_hd95_max": o_hd, "ours_assd": o_assd, "monai_hd95": m_hd, "monai_assd": m_assd},
        "diff_ours_minus_monai_mm": {"hd95": o_hd - m_hd, "assd": o_assd - m_assd},
        "case_metrics_matches_separate": bool(c_hd == o_hd and c_assd == o_assd),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
