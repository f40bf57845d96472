# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Tests of common.metrics against values worked out by hand (and MONAI where definitions agree)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from common.metrics import (
    LesionCounts,
    assd,
    case_metrics,
    dice,
    hd95,
    lesion_f1,
    per_class_metrics,
    summarize,
    surface_distances,
)


def _box(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def _vox(shape, *points):
    m = np.zeros(shape, dtype=bool)
    for p in points:
        m[p] = True
    return m


# ------------------------------------------------------------------------------------------------
# distances: hand-computed cases
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "edt", "kdtree"])
@pytest.mark.parametrize("k, exp_hd95, exp_assd, exp_dice", [(1, 2.0, 17 / 28, 0.75), (2, 4.0, 45 / 28, 0.5)])
def test_cubes_offset_along_axis0(method, k, exp_hd95, exp_assd, exp_dice):
    # A = 4x4x4 cube, i in [2,6); B = A shifted by k voxels along axis 0; spacing (2.0, 0.5, 1.0) mm.
    # Surface of a 4x4x4 cube = 64 - 8 interior = 56 voxels: the 12 "rim" lateral (j,k) positions
    # (on the 4x4 perimeter) at every i (48) + the 4 "core" lateral positions at the two end faces (8).
    # Write A's local i as 0..3 and B's as k..k+3.
    # k=1, A -> B:  rim i=0 -> (1,j,k) is B's end face: 1*2.0 = 2.0 (12 voxels; every B voxel has i>=1)
    #               core i=0 -> (1,j,k) B end face: 2.0 (4)
    #               rim i=1..3 -> they are B rim voxels: 0 (36)
    #               core i=3 -> inside B's interior; nearest B surface: along axis 0 (4,j,k) 2.0, along
    #               axis 1 to the rim 1*0.5 = 0.5, along axis 2 1*1.0 -> 0.5 (4)
    #   -> [0 x36, 0.5 x4, 2.0 x16]; B -> A is the mirror image (i -> 4-i), same multiset.
    #   HD95: 56 sorted values, linear index 0.95*55 = 52.25 falls in the 2.0 block (40..55) -> 2.0;
    #   pooled: 112 values, index 105.45 in the 2.0 block (80..111) -> 2.0.
    #   ASSD = 2 * (4*0.5 + 16*2.0) / 112 = 68/112 = 17/28.  Dice = 2*48/128 = 0.75.
    # k=2, A -> B:  rim/core i=0 -> (2,j,k) B face: 2*2.0 = 4.0 (16); rim i=1 -> 2.0 (12);
    #               rim i=2,3 -> 0 (24); core i=3 -> B interior, lateral 0.5 (4)
    #   -> [0 x24, 0.5 x4, 2.0 x12, 4.0 x16]; symmetric. HD95: index 52.25 in the 4.0 block -> 4.0.
    #   ASSD = 2 * (2 + 24 + 64) / 112 = 180/112 = 45/28.  Dice = 2*32/128 = 0.5.
    shape, spacing = (12, 8, 8), (2.0, 0.5, 1.0)
    a = _box(shape, (2, 2, 2), (6, 6, 6))
    b = _box(shape, (2 + k, 2, 2), (6 + k, 6, 6))
    d_ab, d_ba = surface_distances(a, b, spacing, method=method)
    assert d_ab.size == 56 and d_ba.size == 56
    assert sorted(d_ab.tolist()) == pytest.approx(sorted(d_ba.tolist()))
    assert hd95(a, b, spacing) == pytest.approx(exp_hd95, abs=1e-12)
    assert hd95(a, b, spacing, convention="pooled") == pytest.approx(exp_hd95, abs=1e-12)
    assert assd(a, b, spacing) == pytest.approx(exp_assd, abs=1e-12)
    assert dice(a, b) == pytest.approx(exp_dice)


def test_separated_slabs_offset_along_axis0():
    # Two 2x3x3 slabs (every voxel is surface), A at i in {2,3}, B at i in {5,6}: offset k=3 voxels.
    # Every B voxel has i>=5, so a voxel of A at i is (5-i)*sx from B, reached straight across:
    # i=2 -> 3*2.0 = 6.0 (9 voxels), i=3 -> 2*2.0 = 4.0 (9). B -> A mirrors it.
    # HD95: 18 sorted [4.0 x9, 6.0 x9], index 0.95*17 = 16.15 -> 6.0 (pooled: index 33.25 -> 6.0).
    # ASSD = (9*6 + 9*4) * 2 / 36 = 5.0.  Dice = 0.
    shape, spacing = (10, 6, 6), (2.0, 0.7, 0.3)
    a = _box(shape, (2, 1, 1), (4, 4, 4))
    b = _box(shape, (5, 1, 1), (7, 4, 4))
    assert hd95(a, b, spacing) == pytest.approx(6.0)
    assert hd95(a, b, spacing, "pooled") == pytest.approx(6.0)
    assert assd(a, b, spacing) == pytest.approx(5.0)
    assert dice(a, b) == 0.0


@pytest.mark.parametrize(
    "p, r, spacing, expected",
    [
        ((1, 2, 3), (4, 4, 3), (1.0, 2.0, 7.0), 5.0),  # offsets (3, 2, 0) voxels -> (3.0, 4.0, 0) mm
        ((1, 2, 3), (1, 2, 5), (1.0, 2.0, 7.0), 14.0),  # 2 voxels along axis 2 at 7 mm
        ((0, 0, 0), (5, 5, 5), (0.5, 0.5, 0.5), 2.5 * math.sqrt(3)),  # on the array corner
    ],
)
def test_single_voxel_pair(p, r, spacing, expected):
    shape = (6, 6, 8)
    a, b = _vox(shape, p), _vox(shape, r)
    assert hd95(a, b, spacing) == pytest.approx(expected)
    assert hd95(a, b, spacing, "pooled") == pytest.approx(expected)
    assert assd(a, b, spacing) == pytest.approx(expected)
    assert dice(a, b) == 0.0
    assert hd95(a, a, spacing) == 0.0 and assd(a, a, spacing) == 0.0 and dice(a, a) == 1.0


def test_max_vs_pooled_conventions_asymmetric_lines():
    # pred: a line of 10 voxels along axis 2 (z = 0..9), ref: its first 5 voxels (z = 0..4);
    # every voxel of a line is surface. spacing (0.5, 0.7, 2.0).
    # pred -> ref: z=0..4 -> 0, z=5..9 -> (z-4)*2.0 = 2, 4, 6, 8, 10.   ref -> pred: 0 x5.
    # "max": p95([0,0,0,0,0,2,4,6,8,10]): index 0.95*9 = 8.55 -> 8 + 0.55*(10-8) = 9.1; p95(ref->pred)
    #        = 0; max -> 9.1.
    # "pooled": 15 values [0 x10, 2, 4, 6, 8, 10]: index 0.95*14 = 13.3 -> 8 + 0.3*2 = 8.6.
    # ASSD = (2+4+6+8+10) / 15 = 2.0.  Dice = 2*5/15 = 2/3.
    shape, spacing = (5, 5, 12), (0.5, 0.7, 2.0)
    pred = _box(shape, (2, 2, 0), (3, 3, 10))
    ref = _box(shape, (2, 2, 0), (3, 3, 5))
    assert hd95(pred, ref, spacing, convention="max") == pytest.approx(9.1)
    assert hd95(pred, ref, spacing, convention="pooled") == pytest.approx(8.6)
    assert hd95(ref, pred, spacing, convention="max") == pytest.approx(9.1)  # symmetric in its arguments
    assert assd(pred, ref, spacing) == pytest.approx(2.0)
    assert dice(pred, ref) == pytest.approx(2 / 3)


def test_array_border_voxels_are_surface():
    # pred fills the whole 4x4x4 array; ref = pred without the slab i=3. spacing (0.5, 2.0, 3.0).
    # Border voxels count as having an outside neighbour, so pred's surface is the 56 border voxels
    # and ref's (a 3x4x4 block) is 48 - 4 = 44 (only (1,j,k), j,k in {1,2} is interior).
    # pred -> ref: the 16 voxels at i=3 -> (2,j,k) 0.5 each; the other 40 are ref surface -> 0.
    # ref -> pred: the 4 voxels (2,j,k), j,k in {1,2}, are pred-interior -> (3,j,k) at 0.5; 40 -> 0.
    # ASSD = (16*0.5 + 4*0.5) / (56 + 44) = 0.1.  HD95 ("max"): p95 of [0 x40, 0.5 x16] at index
    # 52.25 -> 0.5 and of [0 x40, 0.5 x4] at index 40.85 -> 0.5 -> 0.5.
    spacing = (0.5, 2.0, 3.0)
    pred = np.ones((4, 4, 4), dtype=bool)
    ref = pred.copy()
    ref[3] = False
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    assert (d_pr.size, d_rp.size) == (56, 44)
    assert assd(pred, ref, spacing) == pytest.approx(0.1)
    assert hd95(pred, ref, spacing) == pytest.approx(0.5)


def test_sphere_vs_shifted_sphere():
    # Two identical digital spheres (radius 6 voxels), the second shifted by d = 2 voxels along axis 1,
    # isotropic spacing s = 1.5 mm. Translating by d*s maps each surface voxel of one onto a surface
    # voxel of the other, so every directed distance is <= d*s = 3.0; the pole of the first sphere at
    # the lowest axis-1 index is exactly d*s from everything in the second -> the Hausdorff distance
    # (max over all distances) is exactly 3.0. HD95 and ASSD lie in (0, 3.0]. The configuration is
    # symmetric under the reflection along axis 1 that swaps the spheres, so both directed
    # distributions are equal and the "max" and "pooled" conventions agree.
    s, d, radius = 1.5, 2, 6
    zz, yy, xx = np.mgrid[:24, :24, :24]
    a = (zz - 12) ** 2 + (yy - 11) ** 2 + (xx - 12) ** 2 <= radius**2
    b = (zz - 12) ** 2 + (yy - 11 - d) ** 2 + (xx - 12) ** 2 <= radius**2
    d_ab, d_ba = surface_distances(a, b, (s, s, s))
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(d * s)
    assert np.allclose(np.sort(d_ab), np.sort(d_ba))
    h_max, h_pooled, sd = hd95(a, b, (s, s, s)), hd95(a, b, (s, s, s), "pooled"), assd(a, b, (s, s, s))
    assert 0 < sd < h_max <= d * s
    assert h_max == pytest.approx(h_pooled)
    assert 0 < dice(a, b) < 1
    # translation invariance: moving both spheres changes nothing
    a2, b2 = np.roll(a, 3, axis=2), np.roll(b, 3, axis=2)
    assert hd95(a2, b2, (s, s, s)) == pytest.approx(h_max) and assd(a2, b2, (s, s, s)) == pytest.approx(sd)


def test_empty_masks():
    shape, spacing = (6, 6, 6), (1.0, 1.0, 2.0)
    empty = np.zeros(shape, dtype=bool)
    one = _vox(shape, (2, 2, 2))
    assert dice(empty, empty) == 1.0
    assert hd95(empty, empty, spacing) == 0.0 and hd95(empty, empty, spacing, "pooled") == 0.0
    assert assd(empty, empty, spacing) == 0.0
    for p, r in ((one, empty), (empty, one)):
        assert dice(p, r) == 0.0
        assert hd95(p, r, spacing) == math.inf and hd95(p, r, spacing, "pooled") == math.inf
        assert assd(p, r, spacing) == math.inf
    row = case_metrics(empty, one, spacing, lesion=True)
    assert row["empty_pred"] is True and row["empty_ref"] is False
    assert row["hd95"] == math.inf and row["assd"] == math.inf and row["dice"] == 0.0
    assert (row["tp"], row["fp"], row["fn"], row["f1"]) == (0, 0, 1, 0.0)


# ------------------------------------------------------------------------------------------------
# lesion-count F1
# ------------------------------------------------------------------------------------------------


def test_lesion_diagonal_voxels_are_one_lesion():
    shape = (8, 8, 8)
    ref = _vox(shape, (2, 2, 2), (3, 3, 3))  # touch only at a corner: one 26-connected lesion
    assert tuple(lesion_f1(np.zeros(shape, bool), ref)) == (0, 0, 1, 0.0)  # one FN, not two
    assert tuple(lesion_f1(_vox(shape, (3, 3, 3)), ref)) == (1, 0, 0, 1.0)  # hitting one voxel = TP
    # a diagonal pair as prediction away from any lesion is one FP
    far = _vox(shape, (6, 6, 6), (7, 7, 7))
    assert tuple(lesion_f1(far, ref)) == (0, 1, 1, 0.0)


def test_lesion_counts_constructed_set():
    shape = (20, 20, 20)
    ref = np.zeros(shape, dtype=bool)
    ref[2, 2, 2] = ref[3, 3, 3] = True  # L1: diagonal pair, one lesion
    ref[8:10, 2:4, 2:4] = True  # L2
    ref[8:10, 6:8, 2:4] = True  # L3 (gap of two voxels along axis 1 from L2: separate)
    ref[15, 15, 15] = True  # L4: missed -> FN
    pred = np.zeros(shape, dtype=bool)
    pred[8:10, 3:7, 2:4] = True  # P1 bridges L2 and L3 -> both TP
    pred[3, 3, 3] = True  # P2 overlaps L1 in one voxel -> TP
    pred[15:17, 2:4, 10:12] = True  # P3 isolated blob -> FP
    res = lesion_f1(pred, ref)
    assert isinstance(res, LesionCounts)
    tp, fp, fn, f1 = res  # unpacks as a 4-tuple
    # TP = L1, L2, L3; FP = P3; FN = L4; F1 = 2*3 / (2*3 + 1 + 1) = 0.75
    assert (tp, fp, fn) == (3, 1, 1)
    assert f1 == pytest.approx(0.75)
    # a prediction overlapping two lesions alone -> 2 TP, no FP
    only_p1 = np.zeros(shape, dtype=bool)
    only_p1[8:10, 3:7, 2:4] = True
    ref_23 = np.zeros(shape, dtype=bool)
    ref_23[8:10, 2:4, 2:4] = ref_23[8:10, 6:8, 2:4] = True
    assert tuple(lesion_f1(only_p1, ref_23)) == (2, 0, 0, 1.0)


def test_lesion_both_empty():
    e = np.zeros((5, 5, 5), dtype=np.uint8)
    assert tuple(lesion_f1(e, e)) == (0, 0, 0, 1.0)


# ------------------------------------------------------------------------------------------------
# input handling
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_helpful_errors():
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    sp = (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4, 4\).*\(4, 4, 5\)"):
        dice(a, np.zeros((4, 4, 5)))
    bad = a.copy()
    bad[0, 0, 0] = 2
    with pytest.raises(ValueError, match=r"pred must be a binary mask.*2"):
        hd95(bad, a, sp)
    half = np.full((4, 4, 4), 0.5)
    with pytest.raises(ValueError, match=r"ref must be a binary mask.*0\.5"):
        assd(a, half, sp)
    with pytest.raises(ValueError, match=r"3D"):
        dice(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"ref must be a 3D.*\(1, 4, 4, 4\)"):
        dice(a, a[None])
    for spacing in [(1.0, 1.0), (1.0, -1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0), "abc", None]:
        with pytest.raises(ValueError, match="spacing must be three positive finite numbers"):
            hd95(a, a, spacing)
    with pytest.raises(ValueError, match="convention"):
        hd95(a, a, sp, convention="mean")
    with pytest.raises(ValueError, match=r"pred_labels must be an integer label map.*0\.5"):
        per_class_metrics(np.full((4, 4, 4), 0.5), a, sp, classes=[1])


def test_torch_tensors_accepted():
    shape, spacing = (12, 8, 8), (2.0, 0.5, 1.0)
    a = _box(shape, (2, 2, 2), (6, 6, 6))
    b = _box(shape, (3, 2, 2), (7, 6, 6))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b).float().requires_grad_(True)
    assert dice(ta, tb) == pytest.approx(0.75)
    assert hd95(ta, tb, torch.tensor(spacing)) == pytest.approx(2.0)
    assert assd(ta, tb, spacing) == pytest.approx(17 / 28)
    assert tuple(lesion_f1(ta.int(), tb.long())) == (1, 0, 0, 1.0)
    rows = per_class_metrics(torch.from_numpy(a.astype(np.int64) * 2), torch.from_numpy(b * 2), spacing, [2])
    assert rows[2]["dice"] == pytest.approx(0.75)


def test_per_class_metrics():
    shape, spacing = (10, 10, 10), (1.0, 1.0, 1.0)
    ref = np.zeros(shape, dtype=np.int64)
    ref[1:4, 1:4, 1:4] = 1
    ref[6:8, 6:8, 6:8] = 2
    pred = np.zeros(shape, dtype=np.int64)
    pred[1:4, 1:4, 1:4] = 1  # class 1 perfect, class 2 missed
    out = per_class_metrics(pred, ref, spacing, classes=(1, 2), lesion=True)
    assert list(out) == [1, 2]
    assert out[1]["dice"] == 1.0 and out[1]["hd95"] == 0.0 and out[1]["assd"] == 0.0 and out[1]["f1"] == 1.0
    assert out[2]["dice"] == 0.0 and out[2]["hd95"] == math.inf and out[2]["empty_pred"] is True
    assert (out[2]["tp"], out[2]["fp"], out[2]["fn"]) == (0, 0, 1)
    assert "tp" not in per_class_metrics(pred, ref, spacing, classes=[1])[1]


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------


def test_summarize_counts_inf_cases():
    rows = [
        {"dice": 0.8, "hd95": 2.0, "assd": 1.0, "empty_pred": False, "empty_ref": False},
        {"dice": 0.6, "hd95": 4.0, "assd": 3.0, "empty_pred": False, "empty_ref": False},
        {"dice": 0.0, "hd95": math.inf, "assd": math.inf, "empty_pred": True, "empty_ref": False},
        {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "empty_pred": True, "empty_ref": True},
    ]
    s = summarize(rows)
    assert s["n_cases"] == 4 and s["n_empty_pred"] == 2 and s["n_empty_ref"] == 1 and s["n_both_empty"] == 1
    assert s["dice"]["mean"] == pytest.approx(0.6) and s["dice"]["n_inf"] == 0
    assert s["dice"]["std"] == pytest.approx(np.std([0.8, 0.6, 0.0, 1.0]))
    assert s["hd95"]["n_inf"] == 1 and s["hd95"]["n_finite"] == 3
    assert s["hd95"]["mean"] == math.inf and s["hd95"]["std"] == math.inf
    assert s["hd95"]["mean_finite"] == pytest.approx(2.0)  # (2 + 4 + 0) / 3
    assert s["assd"]["mean_finite"] == pytest.approx(4 / 3)
    assert s["assd"]["std_finite"] == pytest.approx(np.std([1.0, 3.0, 0.0]))
    assert "conventions" in s
    with pytest.raises(ValueError, match="NaN"):
        summarize([{**rows[0], "hd95": math.nan}])
    with pytest.raises(ValueError, match="lacks"):
        summarize([{"dice": 1.0}])
    with pytest.raises(ValueError, match="at least one case"):
        summarize([])


def test_summarize_rows_from_case_metrics():
    shape, spacing = (8, 8, 8), (1.0, 1.0, 1.0)
    one, empty = _vox(shape, (4, 4, 4)), np.zeros(shape, bool)
    rows = [case_metrics(one, one, spacing, lesion=True), case_metrics(empty, one, spacing, lesion=True)]
    s = summarize(rows, metrics=("dice", "hd95", "assd", "f1"))
    assert s["n_cases"] == 2 and s["hd95"]["n_inf"] == 1 and s["f1"]["mean"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# agreement with MONAI where the definitions agree
# ------------------------------------------------------------------------------------------------


def _random_blob_pair(seed, shape=(40, 36, 30), sigma=2.5, level=0.52):
    """A reference of random smooth blobs and a prediction from the same field, perturbed (overlapping)."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.random(shape), sigma)
    noise = ndimage.gaussian_filter(rng.random(shape), sigma) - 0.5
    return base + 0.5 * noise > level, base > level


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_monai_on_random_blobs(seed):
    # MONAI 1.6.1 (metrics/utils.py): get_mask_edges(spacing=None) crops to the union with a 1-voxel
    # margin and takes seg ^ binary_erosion(seg) (cross structure, border_value 0) -- the same surface
    # as ours; distances are exact Euclidean (KD-tree) with the spacing, returned as float32. Its HD95
    # is the max of the two directed torch.quantile(d, 0.95) (linear interpolation, like np.percentile),
    # i.e. our "max"; its symmetric ASD is torch.cat(both directions).mean(), i.e. the pooled mean =
    # our ASSD (not the average of the two directed means).
    # Float32 caveat: torch.quantile on float32 distances computes the interpolation position
    # 0.95*(n-1) in float32, which shifts HD95 by up to ~1e-5 mm when the two neighbouring distances
    # differ. So HD95 is checked (a) to 1e-6 against MONAI's own directed distances with the same
    # quantile in float64, and (b) to 2e-5 against compute_hausdorff_distance itself.
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
    from monai.metrics.utils import get_edge_surface_distance

    spacing = (0.7, 1.1, 2.3)
    pred, ref = _random_blob_pair(seed)
    assert 0.3 < dice(pred, ref) < 0.95  # overlapping but different
    yp = torch.from_numpy(pred)[None, None].float()
    yr = torch.from_numpy(ref)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's own deprecation warning in get_mask_edges
        m_hd = compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=spacing).item()
        m_asd = compute_average_surface_distance(
            yp, yr, include_background=True, symmetric=True, spacing=spacing
        ).item()
        _, m_dists, _ = get_edge_surface_distance(
            torch.from_numpy(pred), torch.from_numpy(ref), spacing=spacing, symmetric=True
        )
    m_dice = compute_dice(yp, yr, include_background=True).item()

    # Tolerances: MONAI returns each distance rounded to float32 (relative error <= 2**-24 = 6e-8, so rtol 1e-6
    # is ~16 float32 ulps); its ASD is a float32 mean of ~10^4 values, whose summation order depends on the
    # CPU's vector width (error up to ~log2(n) ulps), hence rel 1e-5 there. DSC: integer counts < 2**24 are
    # exact in float32, one division rounds (abs 1e-6).
    ours = surface_distances(pred, ref, spacing)
    for d_ours, d_monai in zip(ours, m_dists):  # same surfaces, same distances (float32 rounding only)
        np.testing.assert_allclose(np.sort(d_ours), np.sort(d_monai.double().numpy()), rtol=1e-6, atol=1e-6)
    m_hd_64 = max(torch.quantile(d.double(), 0.95).item() for d in m_dists)
    assert hd95(pred, ref, spacing) == pytest.approx(m_hd_64, rel=1e-6, abs=1e-6)
    assert hd95(pred, ref, spacing) == pytest.approx(m_hd, abs=2e-5)
    assert assd(pred, ref, spacing) == pytest.approx(m_asd, rel=1e-5)
    assert dice(pred, ref) == pytest.approx(m_dice, abs=1e-6)
    for method in ("edt", "kdtree"):  # both distance back-ends agree (float64 sums of the same distances)
        d1, d2 = surface_distances(pred, ref, spacing, method=method)
        assert float(np.concatenate([d1, d2]).mean()) == pytest.approx(assd(pred, ref, spacing), rel=1e-12)
        assert float(np.concatenate([d1, d2]).mean()) == pytest.approx(m_asd, rel=1e-5)


def test_one_empty_mask_is_a_counted_inf():
    # exactly one empty mask: HD95 and ASSD have no surface to measure to, so ours are a stated inf (not NaN, which
    # summaries would drop silently), DSC is 0, and the emptiness is flagged in the row (MONAI 1.6.1 gives NaN here,
    # Project-MONAI/MONAI#9095: not checked, it is MONAI's behaviour, not ours)
    one = _vox((8, 8, 8), (3, 3, 3))
    empty = np.zeros_like(one)
    for pred, ref in ((one, empty), (empty, one)):
        assert hd95(pred, ref, (1.0, 1.0, 1.0)) == math.inf
        assert hd95(pred, ref, (1.0, 1.0, 1.0), convention="pooled") == math.inf
        assert assd(pred, ref, (1.0, 1.0, 1.0)) == math.inf
        row = case_metrics(pred, ref, (1.0, 1.0, 1.0))
        assert row["dice"] == 0.0 and row["hd95"] == math.inf and row["assd"] == math.inf
        assert (row["empty_pred"], row["empty_ref"]) == (not pred.any(), not ref.any())
    s = summarize([case_metrics(one, empty, (1.0, 1.0, 1.0)), case_metrics(one, one, (1.0, 1.0, 1.0))])
    assert s["hd95"]["n_inf"] == 1 and s["hd95"]["mean"] == math.inf and s["hd95"]["mean_finite"] == 0.0
