# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Representation similarity: RSIM (projection-weighted CCA), CCA, SVCCA and linear CKA.

RSIM is the similarity measure of Karimi et al. (Eq. 1), i.e. projection-weighted CCA (PWCCA,
Morcos, Raghu & Bengio 2018) between the activations of two layers.

Conventions
-----------
- ``x`` has shape ``(datapoints, channels_x)`` and ``y`` has shape ``(datapoints, channels_y)``: one
  row per data point (e.g. one voxel of a feature map), one column per neuron (channel). Both sides
  must have the same data points, in the same order. (google/svcca uses the transpose,
  ``(neurons, datapoints)``.)
- Inputs may be numpy arrays or torch tensors on any device. The big ``n x c`` Gram products run on
  the tensor's device (float64 by default); all ``c x c`` algebra runs on the CPU in float64.
- Every channel is centred. Dead channels, whose variance is ``<= dead_tol`` (default ``1e-12``)
  times the largest channel variance *of the same side*, are dropped (a constant channel carries no
  information and would make the covariance singular). After dropping, each side needs more data
  points than channels (centring removes one degree of freedom), otherwise ``ValueError``. The
  measures are only meaningful with many more data points than channels: the random-data floor of
  PWCCA for 64 channels is about 0.64 with 2x as many points, 0.27 at 10x and 0.08 at 100x.
- Everything is computed from the first and second moments (``n``, the channel means and the
  centred cross-product matrices), accumulated block by block by :class:`MomentAccumulator`; the
  one-shot functions run the same accumulator, so there is one implementation and millions of
  voxels never need to be in memory at once.

Projection weighting in covariance form
---------------------------------------
Let ``G = Xc^T Xc = (n - 1) Sxx`` for the centred ``x`` (``n x c``). With ``D = diag(std)`` and the
eigendecomposition of the correlation matrix ``C = D^-1 Sxx D^-1 = V L V^T`` (eigenvalues below
``rank_tol * max`` dropped), the whitening is ``Winv = L^-1/2 V^T D^-1`` and its "inverse"
``W = D V L^1/2`` satisfies ``Winv Sxx Winv^T = I`` and ``Winv Sxx = W^T``. CCA is the SVD of the
whitened cross-covariance ``Winv_x Sxy Winv_y^T = U diag(rho) Q^T``. The canonical variates on the
``x`` side are ``h_i = Xc a_i`` with ``a_i = Winv_x^T u_i``, of unit variance. Their inner product
with the centred channel ``x_j`` is

    <h_i, x_j> = a_i^T G e_j = (n - 1) u_i^T Winv_x Sxx e_j = (n - 1) (W_x U)_{j i},

so the PWCCA weights ``alpha_i = sum_j |<h_i, x_j>|`` need only ``W_x`` and ``U`` (``c x c``); the
factor ``n - 1`` cancels when ``alpha`` is normalised to sum 1. Equivalently
``alpha_i ~ sum_j std_j |corr(h_i, x_j)|``. The result does not depend on the choice of whitening
(any ``W' = W R`` with ``R`` orthogonal gives ``U' = R^T U``).

Asymmetry
---------
:func:`pwcca` weights the canonical correlations by the ``x`` side (the first argument):
``pwcca(x, y) != pwcca(y, x)`` in general; to weight by ``y``, swap the arguments. The canonical
correlations themselves are symmetric. RSIM is invariant to invertible linear maps, isotropic
scaling, translation and channel permutation of ``y``; of ``x`` it is invariant to translation,
isotropic scaling and channel permutation, but *not* to general linear maps (the weights measure
how much of the channels of ``x`` each canonical variate accounts for). :func:`linear_cka` is
symmetric and invariant to orthogonal maps, isotropic scaling and translation of either side.

Random floor
------------
RSIM of two *independent* representations is not 0: with ``n`` data points and ``cx``, ``cy`` channels the
canonical correlations of independent Gaussian data are those of the MANOVA null (Wachter 1980), e.g. their
squares have the exact mean ``max(cx, cy) / (n - 1)``, and PWCCA is a weighted mean of them. :func:`random_floor`
measures this floor for given shapes: the mean over a few seeded draws of the RSIM of independent Gaussians,
computed by this module's own PWCCA from moments whose distribution is exactly that of ``n`` independent
Gaussian data points (:func:`null_accumulator`: the centred cross-product matrix of ``n`` i.i.d.
``N(0, I_{cx+cy})`` rows is Wishart with ``n - 1`` degrees of freedom, drawn with ``scipy.stats.wishart``, i.e.
Bartlett's decomposition, in ``O((cx + cy)^3)`` instead of ``O(n (cx + cy)^2)``). For 64 vs 64 channels the
floor is about 0.64 at 2 points per channel, 0.27 at 10, 0.083 at 100 and 0.026 at 1,000.

``mode="google"``
-----------------
Reproduces the numbers of google/svcca's ``pwcca.compute_pwcca(acts1, acts2)`` (default
``epsilon=0``), which differs from the paper's formula: it takes the singular vectors ``u`` of the
symmetrically whitened cross-covariance ``Sxx^-1/2 Sxy Syy^-1/2`` and applies them to the *unwhitened*
centred activations, adds the channel means back (``D = Xc u + 1 mu^T``), orthonormalises ``D``
(QR: ``D = P R``) and weights by ``|P^T A|`` summed over the raw (uncentred) channels ``A``. In
covariance form ``D^T D = u^T G u + n mu mu^T`` and ``D^T A = u^T G + n mu mu^T``, so with the
Cholesky factor ``D^T D = L L^T`` (``R = L^T`` up to column signs, which ``|.|`` removes) the weights
are the absolute row sums of ``L^-1 D^T A``. Its weighting side is the side with fewer channels
(``x`` on a tie). When ``x`` has more channels, google's code indexes the wrong layer (a crash or a
silent mix-up); here the ``y`` side is used as intended. Because the means are added back after the
rotation, google's value depends on the (arbitrary) signs of the singular vectors when the channel
means are non-zero; we use the same symmetric whitening and ``numpy.linalg.svd`` so that the signs,
and hence the numbers, match. Dead channels are dropped here as in ``mode="paper"`` (google keeps
them), so the two agree on data without dead channels.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Union

import numpy as np
import torch

__all__ = [
    "MomentAccumulator",
    "cca",
    "pwcca",
    "rsim",
    "svcca",
    "linear_cka",
    "centred_moments",
    "cross_moment",
    "null_accumulator",
    "random_floor",
    "DEAD_TOL",
    "RANK_TOL",
]

ArrayLike = Union[np.ndarray, torch.Tensor]
Mode = Literal["paper", "google"]

#: A channel is dead when its variance is <= DEAD_TOL x the largest channel variance of its side.
DEAD_TOL = 1e-12
#: Eigenvalues of a side's correlation matrix <= RANK_TOL x the largest one are treated as zero
#: (exactly collinear channels); the canonical correlations then number min(rank_x, rank_y).
RANK_TOL = 1e-10
#: The one-shot functions feed the accumulator blocks of about this many values (both sides together):
#: cache-sized blocks on the CPU (measured fastest), large ones on accelerators (fewer host syncs).
_CHUNK_VALUES_CPU = 1 << 19
_CHUNK_VALUES_DEVICE = 1 << 25


def _as_tensor(a: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        arr = np.asarray(a)
        if arr.dtype == object:
            raise TypeError(f"{name} must be a numeric array or tensor")
        if any(s < 0 for s in arr.strides):
            arr = np.ascontiguousarray(arr)
        t = torch.from_numpy(arr)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (datapoints, channels), got shape {tuple(t.shape)}")
    return t


class MomentAccumulator:
    """Streaming first and second moments of paired activations ``x`` and ``y``.

    Call :meth:`update` with row blocks ``x_block`` (``b, cx``) and ``y_block`` (``b, cy``) holding
    the same ``b`` data points; blocks may have different ``b``. Per block, the block means and the
    centred cross-product matrices are computed on the block's device (``gram_dtype``, float64 by
    default) and merged in float64 on the CPU with the pairwise update of Chan et al., which stays
    accurate when the channel means are large compared with their spread. Then :meth:`cca`,
    :meth:`pwcca`, :meth:`svcca` and :meth:`linear_cka` compute from the moments only.

    Attributes: ``n`` (data points so far), ``mean_x`` (``cx``), ``mean_y`` (``cy``), and the
    centred cross-product matrices ``mxx`` (``cx, cx``), ``myy`` (``cy, cy``), ``mxy`` (``cx, cy``),
    i.e. ``Xc^T Xc`` etc. (covariances times ``n - 1``).
    """

    def __init__(
        self,
        gram_dtype: torch.dtype = torch.float64,
        dead_tol: float = DEAD_TOL,
        rank_tol: float = RANK_TOL,
    ) -> None:
        self.gram_dtype = gram_dtype
        self.dead_tol = float(dead_tol)
        self.rank_tol = float(rank_tol)
        self.n = 0
        self.mean_x: np.ndarray | None = None
        self.mean_y: np.ndarray | None = None
        self.mxx: np.ndarray | None = None
        self.myy: np.ndarray | None = None
        self.mxy: np.ndarray | None = None

    # ------------------------------------------------------------------ accumulation
    def update(self, x_block: ArrayLike, y_block: ArrayLike) -> "MomentAccumulator":
        """Add a block of data points: ``x_block`` (``b, cx``) and ``y_block`` (``b, cy``)."""
        xb = _as_tensor(x_block, "x")
        yb = _as_tensor(y_block, "y")
        if xb.shape[0] != yb.shape[0]:
            raise ValueError(f"x and y must have the same number of datapoints, got {xb.shape[0]} and {yb.shape[0]}")
        if self.mean_x is not None and (xb.shape[1] != self.mean_x.shape[0] or yb.shape[1] != self.mean_y.shape[0]):
            raise ValueError(
                f"channel counts changed between blocks: ({self.mean_x.shape[0]}, {self.mean_y.shape[0]}) "
                f"then ({xb.shape[1]}, {yb.shape[1]})"
            )
        b = int(xb.shape[0])
        if b == 0:
            return self
        if yb.device != xb.device:
            yb = yb.to(xb.device)
        xb = xb.to(self.gram_dtype)
        yb = yb.to(self.gram_dtype)
        mx = xb.mean(dim=0)
        my = yb.mean(dim=0)
        xc = xb - mx
        yc = yb - my
        blocks = [xc.T @ xc, yc.T @ yc, xc.T @ yc, mx, my]
        gxx, gyy, gxy, mx_np, my_np = (t.to("cpu", torch.float64).numpy() for t in blocks)
        if self.n == 0:
            self.n = b
            self.mean_x, self.mean_y = mx_np.copy(), my_np.copy()
            self.mxx, self.myy, self.mxy = gxx.copy(), gyy.copy(), gxy.copy()
            return self
        n_a, n = self.n, self.n + b
        dx = mx_np - self.mean_x
        dy = my_np - self.mean_y
        f = n_a * b / n
        self.mxx += gxx + f * np.outer(dx, dx)
        self.myy += gyy + f * np.outer(dy, dy)
        self.mxy += gxy + f * np.outer(dx, dy)
        self.mean_x += dx * (b / n)
        self.mean_y += dy * (b / n)
        self.n = n
        return self

    def update_all(self, x: ArrayLike, y: ArrayLike, chunk_rows: int | None = None) -> "MomentAccumulator":
        """Add all rows of ``x`` and ``y`` in blocks of ``chunk_rows`` (default: ~0.5 M values per block on
        the CPU, ~32 M on other devices)."""
        xt = _as_tensor(x, "x")
        yt = _as_tensor(y, "y")
        if xt.shape[0] != yt.shape[0]:
            raise ValueError(f"x and y must have the same number of datapoints, got {xt.shape[0]} and {yt.shape[0]}")
        n = int(xt.shape[0])
        if chunk_rows is None:
            values = _CHUNK_VALUES_CPU if xt.device.type == "cpu" else _CHUNK_VALUES_DEVICE
            chunk_rows = max(1024, values // max(1, xt.shape[1] + yt.shape[1]))
        for s in range(0, n, chunk_rows):
            self.update(xt[s : s + chunk_rows], yt[s : s + chunk_rows])
        return self

    @classmethod
    def from_moments(
        cls,
        n: int,
        mean_x: np.ndarray,
        mean_y: np.ndarray,
        mxx: np.ndarray,
        myy: np.ndarray,
        mxy: np.ndarray,
        **kwargs: Any,
    ) -> "MomentAccumulator":
        """An accumulator holding the given moments (``n`` data points, channel means ``(cx,)``, ``(cy,)`` and the
        centred cross-product matrices ``(cx, cx)``, ``(cy, cy)``, ``(cx, cy)``; copied as float64), e.g. from
        :func:`centred_moments` and :func:`cross_moment`. ``kwargs`` go to the constructor."""
        acc = cls(**kwargs)
        acc.n = int(n)
        acc.mean_x = np.array(mean_x, dtype=np.float64)
        acc.mean_y = np.array(mean_y, dtype=np.float64)
        acc.mxx = np.array(mxx, dtype=np.float64)
        acc.myy = np.array(myy, dtype=np.float64)
        acc.mxy = np.array(mxy, dtype=np.float64)
        if acc.mxx.shape != (acc.mean_x.size,) * 2 or acc.myy.shape != (acc.mean_y.size,) * 2 or acc.mxy.shape != (
            acc.mean_x.size, acc.mean_y.size
        ):
            raise ValueError(
                f"inconsistent moment shapes: mean_x {acc.mean_x.shape}, mean_y {acc.mean_y.shape}, mxx {acc.mxx.shape}, "
                f"myy {acc.myy.shape}, mxy {acc.mxy.shape}"
            )
        return acc

    # ------------------------------------------------------------------ helpers
    def _check(self) -> None:
        if self.n == 0 or self.mxx is None:
            raise ValueError("no data accumulated")
        if not (np.isfinite(self.mxx).all() and np.isfinite(self.myy).all() and np.isfinite(self.mxy).all()):
            raise ValueError("activations contain non-finite values (nan or inf)")
        if self.n < 2:
            raise ValueError("need at least 2 datapoints")

    def _live(self, m: np.ndarray, side: str) -> np.ndarray:
        var = np.diag(m)
        vmax = float(var.max()) if var.size else 0.0
        keep = np.flatnonzero(var > self.dead_tol * vmax) if vmax > 0 else np.array([], dtype=np.int64)
        if keep.size == 0:
            raise ValueError(f"all channels of {side} are dead (zero variance)")
        if self.n <= keep.size:
            raise ValueError(
                f"{side} has {keep.size} live channels but only {self.n} datapoints: CCA needs more datapoints "
                f"than channels (aim for >= 100 datapoints per channel)"
            )
        return keep

    def _live_moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._check()
        kx = self._live(self.mxx, "x")
        ky = self._live(self.myy, "y")
        return kx, ky, self.mxx[np.ix_(kx, kx)], self.myy[np.ix_(ky, ky)], self.mxy[np.ix_(kx, ky)]

    def _whitening(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(W, Winv)`` with ``Winv S Winv^T = I`` and ``Winv S = W^T`` on the range of ``S``."""
        std = np.sqrt(np.diag(s))
        corr = s / np.outer(std, std)
        lam, vec = np.linalg.eigh((corr + corr.T) * 0.5)
        keep = lam > self.rank_tol * lam[-1]
        lam, vec = lam[keep][::-1], vec[:, keep][:, ::-1]
        w = (std[:, None] * vec) * np.sqrt(lam)[None, :]
        winv = (vec / np.sqrt(lam)[None, :]).T / std[None, :]
        return w, winv

    def _cca_core(self, sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray):
        wx, winv_x = self._whitening(sxx)
        _, winv_y = self._whitening(syy)
        u, rho, _ = np.linalg.svd(winv_x @ sxy @ winv_y.T, full_matrices=False)
        return np.clip(rho, 0.0, 1.0), u, wx

    # ------------------------------------------------------------------ measures
    def cca(self) -> np.ndarray:
        """Canonical correlations, descending; ``min(rank_x, rank_y)`` of them (ranks after dropping dead channels)."""
        _, _, sxx, syy, sxy = self._live_moments()
        return self._cca_core(sxx, syy, sxy)[0]

    def pwcca(self, mode: Mode = "paper", return_details: bool = False) -> float | tuple[float, dict[str, Any]]:
        """RSIM: projection-weighted mean of the canonical correlations, weighted by the ``x`` side.

        ``mode="paper"``: the formula of Morcos et al. / Karimi et al. Eq. 1 (see the module docstring).
        ``mode="google"``: google/svcca's ``compute_pwcca`` numbers (weighting side = the side with fewer
        channels, ``x`` on a tie; the wrong-layer defect fixed).
        With ``return_details=True`` returns ``(value, details)`` where details holds ``rho`` and
        ``alpha`` (same length, alpha sums to 1), ``weight_side`` and the live channel indices
        ``x_channels``, ``y_channels``.
        """
        kx, ky, sxx, syy, sxy = self._live_moments()
        if mode == "paper":
            rho, u, wx = self._cca_core(sxx, syy, sxy)
            alpha = np.abs(wx @ u).sum(axis=0)
            side = "x"
        elif mode == "google":
            rho, alpha, side = self._google_weights(kx, ky, sxx, syy, sxy)
        else:
            raise ValueError(f"mode must be 'paper' or 'google', got {mode!r}")
        alpha = alpha / alpha.sum()
        value = float(np.dot(alpha, rho))
        if return_details:
            return value, {"rho": rho, "alpha": alpha, "weight_side": side, "x_channels": kx, "y_channels": ky}
        return value

    def _google_weights(self, kx, ky, sxx, syy, sxy) -> tuple[np.ndarray, np.ndarray, str]:
        # google rescales the covariances by their largest magnitude; it does not change u, s but we do
        # the same so that the SVD input, and therefore the singular vectors' signs, match closely.
        xmax = np.abs(sxx).max()
        ymax = np.abs(syy).max()

        def inv_sqrt(s: np.ndarray) -> np.ndarray:  # symmetric (pseudo-)inverse square root
            lam, vec = np.linalg.eigh(s)
            inv = np.where(lam > 1e-15 * lam.max(), 1.0 / np.sqrt(np.abs(lam)), 0.0)
            return (vec * inv[None, :]) @ vec.T

        arr = inv_sqrt(sxx / xmax) @ (sxy / np.sqrt(xmax * ymax)) @ inv_sqrt(syy / ymax)
        u, s, vh = np.linalg.svd(arr)
        if kx.size <= ky.size:
            b, g, mu, side = u, self.mxx[np.ix_(kx, kx)], self.mean_x[kx], "x"
        else:  # google indexes the wrong layer here; we use the y side as intended
            b, g, mu, side = vh.T, self.myy[np.ix_(ky, ky)], self.mean_y[ky], "y"
        nmm = self.n * np.outer(mu, mu)
        dtd = b.T @ g @ b + nmm  # D^T D with D = Ac b + 1 mu^T
        dta = b.T @ g + nmm  # D^T A with A the raw channels
        chol = np.linalg.cholesky((dtd + dtd.T) * 0.5)
        pta = np.linalg.solve(chol, dta)  # P^T A with P = D L^-T
        return np.abs(s), np.abs(pta).sum(axis=1), side

    def svcca(self, keep: float = 0.99, return_details: bool = False) -> float | tuple[float, dict[str, Any]]:
        """SVCCA: per side keep the leading principal directions holding ``keep`` of the variance, then mean CCA.

        The principal directions are those of the centred data (eigenvectors of the covariance, i.e. the
        right singular vectors of ``Xc``); the smallest number ``k`` of them whose eigenvalues (squared
        singular values) sum to at least ``keep`` of the total is kept.
        """
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        _, _, sxx, syy, sxy = self._live_moments()

        def principal(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            lam, vec = np.linalg.eigh((s + s.T) * 0.5)
            lam, vec = lam[::-1], vec[:, ::-1]
            lam = np.where(lam > self.rank_tol * lam[0], lam, 0.0)
            frac = np.cumsum(lam) / lam.sum()
            k = int(np.searchsorted(frac, keep * (1 - 1e-12))) + 1
            k = min(k, int(np.count_nonzero(lam)))
            return lam[:k], vec[:, :k]

        lx, vx = principal(sxx)
        ly, vy = principal(syy)
        rho = self._cca_core(np.diag(lx), np.diag(ly), vx.T @ sxy @ vy)[0]
        value = float(rho.mean())
        if return_details:
            return value, {"rho": rho, "kx": lx.size, "ky": ly.size}
        return value

    def linear_cka(self) -> float:
        """Linear CKA = ``||Sxy||_F^2 / (||Sxx||_F ||Syy||_F)`` on centred data; symmetric, in [0, 1].

        Needs no more datapoints than channels, only ``n >= 2`` and some variance on each side.
        """
        self._check()
        den = np.linalg.norm(self.mxx) * np.linalg.norm(self.myy)
        if den == 0:
            raise ValueError("x or y has no variance")
        return float(np.linalg.norm(self.mxy) ** 2 / den)


def _accumulate(x: ArrayLike, y: ArrayLike, **kwargs: Any) -> MomentAccumulator:
    return MomentAccumulator(**kwargs).update_all(x, y)


def cca(x: ArrayLike, y: ArrayLike, **kwargs: Any) -> np.ndarray:
    """Canonical correlations of ``x`` (``n, cx``) and ``y`` (``n, cy``), descending, float64 numpy.

    ``kwargs`` go to :class:`MomentAccumulator` (``gram_dtype``, ``dead_tol``, ``rank_tol``).
    """
    return _accumulate(x, y, **kwargs).cca()


def pwcca(
    x: ArrayLike, y: ArrayLike, mode: Mode = "paper", return_details: bool = False, **kwargs: Any
) -> float | tuple[float, dict[str, Any]]:
    """RSIM(x, y): projection-weighted CCA (Morcos et al. 2018), weights from ``x`` (asymmetric).

    ``x``: (``n, cx``), ``y``: (``n, cy``), numpy or torch (any device). See the module docstring for the
    formula, its covariance form and ``mode="google"``. Returns a float, or ``(float, details)`` with
    ``return_details=True`` (``rho``, ``alpha``, ...). ``kwargs`` go to :class:`MomentAccumulator`.
    """
    return _accumulate(x, y, **kwargs).pwcca(mode=mode, return_details=return_details)


#: RSIM is the paper's name for PWCCA.
rsim = pwcca


def svcca(
    x: ArrayLike, y: ArrayLike, keep: float = 0.99, return_details: bool = False, **kwargs: Any
) -> float | tuple[float, dict[str, Any]]:
    """SVCCA (Raghu et al. 2017): keep the principal directions of each centred side that hold ``keep``
    of its variance, then the mean canonical correlation. Symmetric."""
    return _accumulate(x, y, **kwargs).svcca(keep=keep, return_details=return_details)


def linear_cka(x: ArrayLike, y: ArrayLike, **kwargs: Any) -> float:
    """Linear CKA (Kornblith et al. 2019) of ``x`` (``n, cx``) and ``y`` (``n, cy``); symmetric."""
    return _accumulate(x, y, **kwargs).linear_cka()


# ---------------------------------------------------------------------------------------------- stored samples
def _rows(x: ArrayLike, chunk_rows: int | None, channels: int) -> int:
    if chunk_rows is None:
        chunk_rows = max(1024, _CHUNK_VALUES_CPU // max(1, channels))
    return int(chunk_rows)


def _chunk64(a: ArrayLike, s: int, e: int) -> torch.Tensor:
    """Rows ``s:e`` of ``a`` as a new float64 tensor (a copy: the source may be a read-only memory map)."""
    part = a[s:e]
    if isinstance(part, torch.Tensor):
        return part.detach().to(torch.float64, copy=True)
    return torch.from_numpy(np.array(part, dtype=np.float64))


def centred_moments(x: ArrayLike, chunk_rows: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, mean, Xc^T Xc)`` of stored samples ``x`` (``n, c``; numpy, a numpy memmap or a CPU tensor, any float
    dtype), float64, in two passes over row chunks: the exact mean first, then the Gram matrix of the centred
    chunks. Two-pass centring is at least as accurate as the pairwise merge of :meth:`MomentAccumulator.update`.
    """
    n, c = int(x.shape[0]), int(x.shape[1])
    if n == 0:
        raise ValueError("no data points")
    rows = _rows(x, chunk_rows, c)
    total = torch.zeros(c, dtype=torch.float64)
    for s in range(0, n, rows):
        total += _chunk64(x, s, s + rows).sum(dim=0)
    mean = total / n
    gram = torch.zeros((c, c), dtype=torch.float64)
    for s in range(0, n, rows):
        xc = _chunk64(x, s, s + rows) - mean
        gram += xc.T @ xc
    return n, mean.numpy(), gram.numpy()


def cross_moment(
    x: ArrayLike, y: ArrayLike, mean_x: np.ndarray, mean_y: np.ndarray, chunk_rows: int | None = None
) -> np.ndarray:
    """``Xc^T Yc`` (``cx, cy``, float64) of stored paired samples ``x`` (``n, cx``) and ``y`` (``n, cy``), centred with
    the given (exact, e.g. :func:`centred_moments`) means; row chunks are converted to float64 before the product."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of datapoints, got {x.shape[0]} and {y.shape[0]}")
    n = int(x.shape[0])
    rows = _rows(x, chunk_rows, int(x.shape[1]) + int(y.shape[1]))
    mx = torch.from_numpy(np.asarray(mean_x, dtype=np.float64))
    my = torch.from_numpy(np.asarray(mean_y, dtype=np.float64))
    out = torch.zeros((int(x.shape[1]), int(y.shape[1])), dtype=torch.float64)
    for s in range(0, n, rows):
        out += (_chunk64(x, s, s + rows) - mx).T @ (_chunk64(y, s, s + rows) - my)
    return out.numpy()


# ---------------------------------------------------------------------------------------------- random floor
def null_accumulator(n: int, cx: int, cy: int, rng: np.random.Generator | int | None = None) -> MomentAccumulator:
    """Moments of ``n`` data points of independent standard Gaussian ``x`` (``cx`` channels) and ``y`` (``cy``):
    the centred cross-product matrix of ``n`` i.i.d. ``N(0, I)`` rows of ``cx + cy`` values is
    ``Wishart(n - 1, I)``, drawn with ``scipy.stats.wishart`` (Bartlett decomposition); when ``n - 1 < cx + cy``
    (Wishart undefined) the Gaussian data are drawn and accumulated. The means are zero (the measures centre)."""
    from scipy import stats

    rng = np.random.default_rng(rng)
    d = int(cx) + int(cy)
    if n < 2 or cx < 1 or cy < 1:
        raise ValueError(f"need n >= 2 and at least one channel per side, got n={n}, cx={cx}, cy={cy}")
    if n - 1 >= d:
        w = stats.wishart(df=int(n) - 1, scale=np.eye(d)).rvs(random_state=rng)
        w = np.atleast_2d(w)
        return MomentAccumulator.from_moments(n, np.zeros(cx), np.zeros(cy), w[:cx, :cx], w[cx:, cx:], w[:cx, cx:])
    z = rng.standard_normal((int(n), d))
    return MomentAccumulator().update_all(z[:, :cx], z[:, cx:])


_FLOORS: dict[tuple, dict[str, float]] = {}


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Limit the BLAS thread pools to one thread (``threadpoolctl``, optional) for small dense algebra: the
    (channels x channels) LAPACK calls of the floor draws run fastest on one thread and many times slower when
    a busy machine's cores are oversubscribed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def random_floor(
    n: int, cx: int, cy: int | None = None, draws: int = 5, seed: int = 0, mode: Mode = "paper"
) -> dict[str, float]:
    """The RSIM of independent random representations of the given shapes: ``n`` data points, ``cx`` and ``cy``
    channels (``cy`` defaults to ``cx``).

    Returns ``{"x", "y", "mean", "sd", "se", "mean_cca", "draws"}``: the mean over ``draws`` seeded draws of
    :func:`null_accumulator` of PWCCA weighted by ``x``, by ``y``, and of their average (``mean``), the sample
    standard deviation of that average over the draws and its standard error ``sd / sqrt(draws)``, and the mean
    canonical correlation (the SVCCA-style average). Memoised per argument tuple.
    """
    cy = int(cx if cy is None else cy)
    key = (int(n), int(cx), cy, int(draws), int(seed), mode)
    if key in _FLOORS:
        return dict(_FLOORS[key])
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    rng = np.random.default_rng([int(seed), 524287, int(n), int(cx), cy])
    vx, vy, vc = [], [], []
    with _one_blas_thread():
        for _ in range(int(draws)):
            acc = null_accumulator(int(n), int(cx), cy, rng)
            vx.append(acc.pwcca(mode=mode))
            swapped = MomentAccumulator.from_moments(acc.n, acc.mean_y, acc.mean_x, acc.myy, acc.mxx, acc.mxy.T)
            vy.append(swapped.pwcca(mode=mode))
            vc.append(float(acc.cca().mean()))
    both = 0.5 * (np.asarray(vx) + np.asarray(vy))
    sd = float(both.std(ddof=1)) if draws > 1 else float("nan")
    out = {
        "x": float(np.mean(vx)),
        "y": float(np.mean(vy)),
        "mean": float(both.mean()),
        "sd": sd,
        "se": sd / float(np.sqrt(draws)) if draws > 1 else float("nan"),
        "mean_cca": float(np.mean(vc)),
        "draws": int(draws),
    }
    _FLOORS[key] = out
    return dict(out)
