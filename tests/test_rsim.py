# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Known answers and cross-checks of common.rsim (RSIM / PWCCA, CCA, SVCCA, linear CKA). CPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import ortho_group

from common import rsim


def correlated(n: int, cx: int, cy: int, seed: int = 0, noise: float = 1.0, offset: float = 1.0):
    """x with unequal channel scales and non-zero means; y a noisy linear map of x."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cx)) * rng.uniform(0.5, 3.0, cx) + offset * rng.uniform(-2.0, 2.0, cx)
    y = 0.4 * x @ rng.standard_normal((cx, cy)) + noise * rng.standard_normal((n, cy)) + offset
    return x, y


# ---------------------------------------------------------------- tolerances
#: float64 unit roundoff
EPS = np.finfo(np.float64).eps


def kappa(*data) -> float:
    """The largest condition number of the covariance matrices of ``data`` (2-D arrays, rows = datapoints;
    constant channels, which the measures drop, left out)."""
    out = 1.0
    for a in data:
        a = np.asarray(a.detach() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
        a = a[:, a.std(axis=0) > 0]
        out = max(out, float(np.linalg.cond(np.atleast_2d(np.cov(a.T)))))
    return out


def tol64(*data) -> float:
    """What float64 guarantees for a measure computed from ``data`` through covariance / cross-covariance
    matrices: each entry is a sum of n products, rounded with relative error <= n * eps (Higham's gamma_n,
    whatever order the BLAS of the machine sums in), and the whitening / eigen- / singular-value steps are
    backward stable, so the result moves by at most kappa times that: n * eps * kappa(covariance). The
    measures are O(1), so this serves as an absolute tolerance."""
    n = max(np.shape(a)[0] for a in data)
    return n * EPS * kappa(*data)


# ---------------------------------------------------------------- independent reference recipes


def qr_pwcca(x: np.ndarray, y: np.ndarray) -> float:
    """Plain data-space PWCCA: QR of centred x and y, SVD of Qx^T Qy, variates h = Qx U,
    alpha_i = sum_j |<h_i, x_j>| over the centred channels of x, RSIM = sum alpha_i rho_i / sum alpha."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    qx, _ = np.linalg.qr(xc)
    qy, _ = np.linalg.qr(yc)
    u, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    alpha = np.abs((qx @ u).T @ xc).sum(axis=1)
    return float(alpha @ rho / alpha.sum())


def google_recipe(x: np.ndarray, y: np.ndarray) -> float:
    """What google/svcca's ``compute_pwcca(x.T, y.T)`` computes, restated step by step on the data:

    1. covariance blocks Sxx, Sxy, Syy (ddof=1);
    2. symmetric inverse square roots Sxx^-1/2, Syy^-1/2 (eigendecomposition);
    3. full SVD  Sxx^-1/2 Sxy Syy^-1/2 = u diag(s) vh  (numpy's sign convention);
    4. weighting side = the side with fewer channels (x on a tie); its rotation b = u (x) or vh^T (y);
    5. "directions" D = (A - mu) b + mu, i.e. the rotation applied to the *unwhitened* centred
       channels A of that side, with each channel mean mu_i added back to direction i;
    6. P = orthonormal basis of D's columns in order (QR);
    7. weights_i = sum_j |<P_i, A_j>| over the *raw* channels A_j, normalised to sum 1;
    8. value = sum_i weights_i s_i.
    (Step 4 for y is what the code intends; the published code indexes the wrong layer there.)
    """
    cx = x.shape[1]
    cov = np.cov(x.T, y.T)
    sxx, sxy, syy = cov[:cx, :cx], cov[:cx, cx:], cov[cx:, cx:]

    def inv_sqrt(s):
        lam, vec = np.linalg.eigh(s)
        return vec @ np.diag(lam**-0.5) @ vec.T

    u, s, vh = np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy))
    a, b = (x, u) if x.shape[1] <= y.shape[1] else (y, vh.T)
    mu = a.mean(axis=0)
    d = (a - mu) @ b + mu
    p, _ = np.linalg.qr(d)
    w = np.abs(p.T @ a).sum(axis=1)
    return float((w / w.sum()) @ s)


# ---------------------------------------------------------------- RSIM known answers


@pytest.mark.parametrize("mode", ["paper", "google"])
def test_self_similarity_is_one(mode):
    x, _ = correlated(4000, 12, 12, seed=1)
    assert rsim.pwcca(x, x, mode=mode) == pytest.approx(1.0, abs=tol64(x))
    np.testing.assert_allclose(rsim.cca(x, x), 1.0, rtol=0, atol=tol64(x))


def test_invariance_of_the_other_side():
    x, y = correlated(5000, 10, 14, seed=2)
    rng = np.random.default_rng(3)
    ref = rsim.pwcca(x, y)
    a = rng.standard_normal((14, 14))  # invertible (almost surely)
    perm = rng.permutation(14)
    for y2 in (y @ a, 7.5 * y, y + rng.standard_normal(14) * 100.0, y[:, perm], (y @ a)[:, perm] * 0.1 - 3.0):
        assert rsim.pwcca(x, y2) == pytest.approx(ref, abs=tol64(x, y, y2))


def test_invariance_of_the_weighting_side_where_it_holds():
    x, y = correlated(5000, 10, 14, seed=4)
    rng = np.random.default_rng(5)
    ref = rsim.pwcca(x, y)
    for x2 in (3.0 * x, x - 50.0, x[:, rng.permutation(10)]):
        assert rsim.pwcca(x2, y) == pytest.approx(ref, abs=tol64(x, x2, y))
    # the canonical correlations are invariant to any invertible map of either side ...
    a = rng.standard_normal((10, 10))
    np.testing.assert_allclose(rsim.cca(x @ a, y), rsim.cca(x, y), rtol=0, atol=tol64(x, x @ a, y))
    # ... but the projection weights measure x's own channels, so a general linear map of x changes RSIM
    assert abs(rsim.pwcca(x @ a, y) - ref) > 1e-3


def test_asymmetry_and_alias():
    x, y = correlated(5000, 6, 20, seed=6)
    assert rsim.rsim is rsim.pwcca
    value, d = rsim.pwcca(x, y, return_details=True)
    assert d["weight_side"] == "x" and d["rho"].shape == d["alpha"].shape == (6,)
    # the weights are normalised (a sum of 6 numbers: a few ulps), the correlations sorted (exactly, by the SVD)
    assert d["alpha"].sum() == pytest.approx(1.0, abs=10 * EPS) and np.all(np.diff(d["rho"]) <= 0)
    assert value == pytest.approx(float(d["alpha"] @ d["rho"]), abs=10 * EPS)
    np.testing.assert_allclose(rsim.cca(y, x), rsim.cca(x, y), rtol=0, atol=tol64(x, y))
    assert abs(rsim.pwcca(y, x) - value) > 1e-3


def wachter_mean_cca(p: int, q: int, n: int) -> float:
    """Large-dimension expectation of the mean canonical correlation of independent Gaussians.

    The squared canonical correlations of independent p- and q-dimensional Gaussians (p <= q) follow,
    as p, q, n grow with c1 = p/n, c2 = q/n fixed, Wachter's law with density
    sqrt((l - l_lo)(l_hi - l)) / (2 pi c1 l (1 - l)) on [l_lo, l_hi],
    l_lo/hi = (sqrt(c1 (1 - c2)) -/+ sqrt(c2 (1 - c1)))^2. The mean correlation is E[sqrt(l)].
    """
    c1, c2 = p / n, q / n
    lo = (np.sqrt(c1 * (1 - c2)) - np.sqrt(c2 * (1 - c1))) ** 2
    hi = (np.sqrt(c1 * (1 - c2)) + np.sqrt(c2 * (1 - c1))) ** 2

    def dens(lam):
        return np.sqrt(max((lam - lo) * (hi - lam), 0.0)) / (2 * np.pi * c1 * lam * (1 - lam))

    mass = quad(dens, lo, hi, limit=200)[0]
    assert mass == pytest.approx(1.0, abs=1e-6)
    return quad(lambda lam: np.sqrt(lam) * dens(lam), lo, hi, limit=200)[0]


def test_independent_gaussians_mean_cca():
    rng = np.random.default_rng(7)
    n, c = 10_000, 500
    x = torch.from_numpy(rng.standard_normal((n, c)))
    y = torch.from_numpy(rng.standard_normal((n, c)))
    acc = rsim.MomentAccumulator().update_all(x, y)
    mean_cca = float(acc.cca().mean())
    expected = wachter_mean_cca(c, c, n - 1)  # centring removes one degree of freedom
    assert 0.17 < mean_cca < 0.21
    assert mean_cca == pytest.approx(expected, abs=0.003)
    # PWCCA of unrelated data sits at the random floor too, and SVCCA (99 %) near the mean CCA
    assert 0.17 < acc.pwcca() < 0.21
    assert 0.17 < acc.svcca() < 0.21


def test_dead_channels_change_nothing():
    x, y = correlated(3000, 8, 9, seed=8)
    n = x.shape[0]
    x_dead = np.concatenate([x[:, :3], np.zeros((n, 1)), x[:, 3:], np.full((n, 1), 123.456)], axis=1)
    y_dead = np.concatenate([np.full((n, 1), -2.0), y], axis=1)
    t = tol64(x, y)
    for mode in ("paper", "google"):
        assert rsim.pwcca(x_dead, y_dead, mode=mode) == pytest.approx(rsim.pwcca(x, y, mode=mode), abs=t)
    np.testing.assert_allclose(rsim.cca(x_dead, y_dead), rsim.cca(x, y), rtol=0, atol=t)
    assert rsim.svcca(x_dead, y_dead) == pytest.approx(rsim.svcca(x, y), abs=t)
    assert rsim.linear_cka(x_dead, y_dead) == pytest.approx(rsim.linear_cka(x, y), abs=t)
    _, d = rsim.pwcca(x_dead, y_dead, return_details=True)
    assert d["x_channels"].tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert d["y_channels"].tolist() == list(range(1, 10))


def test_input_errors():
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match="datapoints"):
        rsim.pwcca(rng.standard_normal((20, 30)), rng.standard_normal((20, 5)))
    with pytest.raises(ValueError, match="datapoints"):
        rsim.cca(rng.standard_normal((100, 5)), rng.standard_normal((100, 100)))
    with pytest.raises(ValueError, match="same number of datapoints"):
        rsim.pwcca(rng.standard_normal((100, 5)), rng.standard_normal((99, 5)))
    with pytest.raises(ValueError, match="dead"):
        rsim.pwcca(np.ones((100, 3)), rng.standard_normal((100, 5)))
    with pytest.raises(ValueError, match="2-D"):
        rsim.pwcca(rng.standard_normal(100), rng.standard_normal((100, 5)))
    with pytest.raises(ValueError, match="mode"):
        rsim.pwcca(rng.standard_normal((100, 3)), rng.standard_normal((100, 3)), mode="qr")
    with pytest.raises(ValueError, match="non-finite"):
        x = rng.standard_normal((100, 3))
        x[5, 1] = np.nan
        rsim.pwcca(x, rng.standard_normal((100, 3)))
    acc = rsim.MomentAccumulator().update(rng.standard_normal((10, 3)), rng.standard_normal((10, 2)))
    with pytest.raises(ValueError, match="channel counts"):
        acc.update(rng.standard_normal((10, 4)), rng.standard_normal((10, 2)))


# ---------------------------------------------------------------- streaming and cross-checks


def test_streaming_equals_one_shot():
    x, y = correlated(20_000, 16, 12, seed=10, offset=50.0)  # large means: the merge must stay accurate
    acc = rsim.MomentAccumulator()
    bounds = [0, 1, 7, 1000, 1001, 5000, 12_345, 20_000]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.update(torch.from_numpy(x[a:b]), y[a:b])
    one = rsim.MomentAccumulator().update_all(x, y, chunk_rows=10**9)
    assert acc.n == one.n == 20_000
    t = tol64(x, y)
    for mode in ("paper", "google"):
        assert acc.pwcca(mode=mode) == pytest.approx(rsim.pwcca(x, y, mode=mode), abs=t)
        assert acc.pwcca(mode=mode) == pytest.approx(one.pwcca(mode=mode), abs=t)
    np.testing.assert_allclose(acc.cca(), rsim.cca(x, y), rtol=0, atol=t)
    assert acc.svcca() == pytest.approx(rsim.svcca(x, y), abs=t)
    assert acc.linear_cka() == pytest.approx(rsim.linear_cka(x, y), abs=t)
    # a mean of n numbers: relative error <= n * eps; a merged covariance entry: n * eps relative to the
    # scale of the centred products (|x - mean| |y - mean|), which the sample standard deviations bound
    n = x.shape[0]
    np.testing.assert_allclose(acc.mean_x, x.mean(0), rtol=n * EPS)
    scale = np.outer(x.std(0), y.std(0))
    np.testing.assert_array_less(np.abs(acc.mxy / (acc.n - 1) - np.cov(x.T, y.T)[:16, 16:]), n * EPS * scale)


@pytest.mark.parametrize("cx,cy", [(10, 10), (6, 15), (15, 6)])
def test_agrees_with_qr_pwcca(cx, cy):
    x, y = correlated(6000, cx, cy, seed=11 + cx)
    assert rsim.pwcca(x, y) == pytest.approx(qr_pwcca(x, y), abs=tol64(x, y))


def test_torch_inputs_and_float32():
    x, y = correlated(4000, 8, 8, seed=12)
    ref = rsim.pwcca(x, y)
    assert rsim.pwcca(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ref, abs=tol64(x, y))
    # float32 data: every value rounded by <= 2**-24 relative, which moves the covariances by about twice
    # that and the result by kappa times more (the moments are still accumulated in float64)
    u32 = 2.0**-24
    xt = torch.from_numpy(x).float().requires_grad_(True)
    assert rsim.pwcca(xt, torch.from_numpy(y).float()) == pytest.approx(ref, abs=4 * u32 * kappa(x, y))
    # float32 moments: n products summed in float32 (the BLAS blocks the sum, so the rounding errors add up
    # like a random walk, ~sqrt(n) * 2**-24), amplified by kappa; a factor 10 covers the walk's spread
    n = x.shape[0]
    assert rsim.pwcca(x.T.copy().T, y, gram_dtype=torch.float32) == pytest.approx(
        ref, abs=10 * np.sqrt(n) * u32 * kappa(x, y)
    )


@pytest.mark.parametrize("cx,cy", [(8, 8), (5, 11), (11, 5)])
def test_google_mode_matches_recipe(cx, cy):
    x, y = correlated(5000, cx, cy, seed=13 + cx)
    value, d = rsim.pwcca(x, y, mode="google", return_details=True)
    assert value == pytest.approx(google_recipe(x, y), abs=tol64(x, y))
    assert d["weight_side"] == ("x" if cx <= cy else "y")
    # google's version skips the whitening and adds the means back: a different number from the paper's
    assert abs(value - rsim.pwcca(x, y)) > 1e-3


def test_google_mode_hand_checked():
    """One direction each: CCA is the plain correlation, D has one column, so P = D/|D| and
    weight = 1 after normalisation; the value is the correlation coefficient itself."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((500, 1)) + 3.0
    y = 2.0 * x + rng.standard_normal((500, 1))
    r = np.corrcoef(x[:, 0], y[:, 0])[0, 1]
    assert rsim.pwcca(x, y, mode="google") == pytest.approx(r, abs=tol64(x, y))
    assert rsim.pwcca(x, y) == pytest.approx(r, abs=tol64(x, y))


# ---------------------------------------------------------------- SVCCA and linear CKA


def test_svcca_keep_drops_low_variance_directions():
    rng = np.random.default_rng(15)
    n = 5000
    shared = rng.standard_normal((n, 3))
    x = np.concatenate([shared, 1e-3 * rng.standard_normal((n, 3))], axis=1) @ ortho_group.rvs(6, random_state=1)
    y = np.concatenate([shared @ rng.standard_normal((3, 3)), 1e-3 * rng.standard_normal((n, 3))], axis=1)
    value, d = rsim.svcca(x, y, keep=0.99, return_details=True)
    assert (d["kx"], d["ky"]) == (3, 3)
    # the 3 kept directions of each side are exactly linearly related: CCA 1, to what float64 guarantees for
    # the kept (well-conditioned) subspaces
    assert value == pytest.approx(1.0, abs=tol64(shared, shared @ np.eye(3)))
    full = rsim.svcca(x, y, keep=1.0)  # the weak, unrelated directions now count: 3 ones + 3 ~zeros
    # two routes to the same CCA; x's covariance has variances 1 and 1e-6, kappa ~1e6, and the two routes
    # round differently (0.5123113565035436 vs ...49994 was seen on an AMD CPU, ...50xx on Intel)
    assert full == pytest.approx(float(rsim.cca(x, y).mean()), abs=tol64(x, y))
    assert 0.45 < full < 0.6
    with pytest.raises(ValueError):
        rsim.svcca(x, y, keep=0.0)


def test_linear_cka_known_answers():
    x, y = correlated(3000, 7, 11, seed=16)
    rng = np.random.default_rng(17)
    # linear CKA needs no inverse: Frobenius norms of (cross-)covariances, so n * eps (kappa does not enter)
    t = x.shape[0] * EPS
    assert rsim.linear_cka(x, x) == pytest.approx(1.0, abs=t)
    ref = rsim.linear_cka(x, y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert ref == pytest.approx(direct, abs=t)
    assert rsim.linear_cka(y, x) == pytest.approx(ref, abs=t)
    qx, qy = ortho_group.rvs(7, random_state=2), ortho_group.rvs(11, random_state=3)
    assert rsim.linear_cka(x @ qx, y @ qy) == pytest.approx(ref, abs=t)
    assert rsim.linear_cka(5.0 * x - 1.0, 0.01 * y + rng.standard_normal(11)) == pytest.approx(ref, abs=t)
    assert 0.0 < ref < 1.0
    # CKA does not need more datapoints than channels
    assert 0.0 < rsim.linear_cka(rng.standard_normal((20, 50)), rng.standard_normal((20, 40))) <= 1.0
