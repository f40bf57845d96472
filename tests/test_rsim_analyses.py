# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The representation analyses as the paper made them (issue 13): conv-output probes, enough data points with the
random floor printed beside every RSIM table, and each network captured once per analysis session.

Known answers used here, independent of the code under test:

* probes: a forward hook of our own on the documented module (``<level>.residual.block2[1].conv``) gives the
  recorded values; the residual sums are another thing;
* RSIM of a representation with itself, and with an invertible linear map of it, is 1 (every canonical
  correlation is 1, whatever the weights);
* independent Gaussians: the squared canonical correlations of ``n`` points of ``cx`` vs ``cy`` independent
  Gaussian channels have the exact mean ``max(cx, cy) / (n - 1)`` (the null distribution of Pillai's trace:
  ``E[sum rho_i^2] = cx cy / (n - 1)`` over ``min(cx, cy)`` correlations), and as ``n`` grows their distribution
  tends to Wachter's law, whose mean canonical correlation for 500 vs 500 channels at 10,000 points is the
  0.19 of DESIGN.md §5; DESIGN.md also gives the PWCCA floor of 64 channels (0.64, 0.27, 0.083 at 2, 10, 100
  points per channel).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.integrate import quad

from common import analysis, capture, rsim
from common.networks import KarimiFCN, MultiTaskFCN, VNet
from common.runs import load_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "bundles", "liver_ct_from_liver_mri", "configs", "train.json")
EPS = np.finfo(np.float64).eps


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks and small matrices: one thread (more only spin on a shared 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
    else:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    torch.set_num_threads(old)


def images(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Preprocessed-like images ``(1, D, H, W)`` with some spatial structure (smoothed noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = torch.as_tensor(rng.standard_normal((1, 1, 28, 24, 24)), dtype=torch.float32)
        out.append(torch.nn.functional.avg_pool3d(a, 3, stride=1, padding=1)[0].numpy())
    return out


def tiny(seed: int) -> KarimiFCN:
    torch.manual_seed(seed)
    return KarimiFCN(features=4)


# ---------------------------------------------------------------------------------------------- probes
CONV = {
    "encoder-1": "encoder.0.residual.block2.1.conv",
    "encoder-2": "encoder.1.residual.block2.1.conv",
    "encoder-3": "encoder.2.residual.block2.1.conv",
    "decoder-1": "decoder.0.residual.block2.1.conv",
    "decoder-2": "decoder.1.residual.block2.1.conv",
    "decoder-3": "decoder.2.residual.block2.1.conv",
}


def hooked(net: nn.Module, names: dict[str, str], block: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of the named modules, copied by our own hooks (before the in-place ReLU)."""
    mods = dict(net.named_modules())
    got: dict[str, torch.Tensor] = {}
    hooks = [mods[m].register_forward_hook(lambda mod, i, o, k=k: got.__setitem__(k, o.detach().clone()))
             for k, m in names.items()]  # fmt: skip
    with torch.no_grad():
        net.eval()(block)
    for h in hooks:
        h.remove()
    return got


def test_default_probes_are_the_last_conv_outputs_before_the_relu():
    net = tiny(0)
    block = torch.as_tensor(images(1)[0][None, :, :16, :16, :16])
    own = hooked(net, CONV, block)
    with capture.ActivationRecorder(net) as rec:  # the default probes
        got = rec.run(block)
    assert list(got) == list(CONV)
    residual = hooked(net, {k: v.rsplit(".block2", 1)[0] for k, v in CONV.items()}, block)
    relu = hooked(net, {k: v[: -len(".conv")] for k, v in CONV.items()}, block)  # the ConvUnit: after ReLU (+ eval dropout)
    for name in CONV:
        # the same module's output in the same forward pass: the very numbers
        assert torch.equal(got[name], own[name]), name
        assert (got[name] < 0).any(), name  # before the ReLU: negative values are kept
        assert torch.equal(relu[name], got[name].clamp_min(0)), name  # the ReLU of the recorded values
        scale = float(residual[name].abs().max())
        assert float((residual[name] - got[name]).abs().max()) > 0.1 * scale, name  # not the residual sums
    # the filter pictures / filter change use the same modules
    assert all(a is b for a, b in zip(capture.probe_filters(net).values(), capture.probe_layers(net).values()))
    # the multi-task body and the V-Net follow the same rule
    mt = MultiTaskFCN({"a": 2, "b": 3}, features=4)
    assert {k: n for n, m in mt.named_modules() for k, p in mt.probe_modules().items() if m is p} == CONV
    with torch.device("meta"):  # the module structure only (He-initialising 45 M parameters takes seconds)
        v = VNet()
    names = {k: n for n, m in v.named_modules() for k, p in v.probe_modules().items() if m is p}
    assert names == {"encoder-1": "in_tr.conv_block.conv", "encoder-2": "down_tr32.ops.0.conv_block.conv",
                     "encoder-3": "down_tr64.ops.1.conv_block.conv", "decoder-1": "up_tr128.ops.1.conv_block.conv",
                     "decoder-2": "up_tr64.ops.0.conv_block.conv", "decoder-3": "up_tr32.ops.0.conv_block.conv"}  # fmt: skip
    assert all(isinstance(m, nn.Conv3d) for m in v.probe_modules().values())
    assert all(a is b for a, b in zip(v.probe_filters().values(), v.probe_modules().values()))
    assert [type(m).__name__ for m in v.probe_modules("residual").values()] == ["InputTransition"] + ["DownTransition"] * 2 + ["UpTransition"] * 3


def test_sampled_points_are_the_hooked_values_and_the_residual_option():
    net = tiny(1)
    setup = capture.AnalysisSetup(net, images=images(), block_size=16, n_blocks=2, points_per_channel=20,
                                  progress=False, device="cpu")  # fmt: skip
    plan = setup.plan()
    acts = setup.activations(net.state_dict())
    # the first batch of blocks as the capture forwards it (the same input: the same arithmetic, the same numbers)
    first = setup.sampler().batch(*capture._batches(plan, setup.sampler(), setup.batch_voxels)[0])
    own = hooked(net, CONV, first)
    for name, lp in plan.layers.items():
        assert acts[name].shape == (lp.points, lp.channels) and lp.points >= 20 * lp.channels
        assert lp.blocks >= 2
        idx = plan.indices(name)[0]
        expected = own[name][0].reshape(lp.channels, -1)[:, idx].T.numpy()
        assert np.array_equal(acts[name][: lp.quota], expected), name  # block 0's rows: the voxels drawn
    # layers computed before the deepest needed one draw from as many blocks (decoder-1 at 1/4 resolution)
    assert plan.layers["encoder-1"].blocks == plan.layers["decoder-1"].blocks > plan.layers["decoder-3"].blocks
    res = capture.AnalysisSetup(net, images=images(), block_size=16, n_blocks=2, points_per_channel=20,
                                progress=False, device="cpu", probe="residual")  # fmt: skip
    ra = res.activations(net.state_dict())
    first = res.sampler().batch(*capture._batches(res.plan(), res.sampler(), res.batch_voxels)[0])
    own_res = hooked(net, {k: v.rsplit(".block2", 1)[0] for k, v in CONV.items()}, first)
    for name, lp in res.plan().layers.items():
        idx = res.plan().indices(name)[0]
        assert np.array_equal(ra[name][: lp.quota], own_res[name][0].reshape(lp.channels, -1)[:, idx].T.numpy())
    assert "residual" in res.probe_text() and "encoder.0.residual" in res.probe_text()
    assert "before its activation" in setup.probe_text() and CONV["decoder-3"] in setup.probe_text()
    with pytest.raises(ValueError, match="probe kind"):
        capture.AnalysisSetup(net, probe="relu")
    # threaded through make_setup, the CLI and the bundles' rsim.json
    assert capture.make_setup(TRAIN, {"network_def#features": 4}, probe="residual", progress=False).probe == "residual"
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import analyze
    finally:
        sys.path.pop(0)
    args = analyze.build_parser().parse_args(["evolution", "r"])
    assert args.probe == "conv" and args.block_size is None and args.points_per_channel >= 1000
    with open(os.path.join(os.path.dirname(TRAIN), "rsim.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["probe"] == "conv" and cfg["setup"]["probe"] == "@probe" and cfg["points_per_channel"] >= 1000


# ---------------------------------------------------------------------------------------------- known answers
def test_rsim_of_itself_and_of_an_invertible_linear_map_is_one():
    rng = np.random.default_rng(2)
    n, c = 4000, 8

    def mixing(lo: float, hi: float) -> np.ndarray:  # U diag(s) V^T: invertible, condition number hi / lo
        u, _ = np.linalg.qr(rng.standard_normal((c, c)))
        v, _ = np.linalg.qr(rng.standard_normal((c, c)))
        return u @ np.diag(np.linspace(lo, hi, c)) @ v.T

    x = rng.standard_normal((n, c)) @ mixing(1.0, 4.0) + rng.standard_normal(c)  # correlated channels
    y = x @ mixing(0.5, 3.0) + 5.0  # an invertible linear map (not orthogonal) and a translation
    acc = rsim.MomentAccumulator().update_all(x, y)
    # float64 moments (entries with relative error <= n eps) and backward-stable c x c algebra: the result moves by
    # at most n eps kappa (tests/test_rsim.py); kappa of these covariances is ~1e2, so tol ~ 1e-10
    tol = 10 * n * EPS * max(np.linalg.cond(acc.mxx), np.linalg.cond(acc.myy))
    assert tol < 1e-8
    for value in (rsim.pwcca(x, x), rsim.pwcca(x, y), rsim.pwcca(y, x), acc.pwcca()):
        assert value == pytest.approx(1.0, abs=tol)


def test_floor_mean_squared_canonical_correlation_is_exact():
    """E[mean rho^2] = max(cx, cy) / (n - 1) for independent Gaussians (exact, any n > cx + cy): the Wishart draws
    of ``null_accumulator`` and explicit Gaussian data through ``rsim.cca`` both match it within 4 standard errors
    of their Monte Carlo mean."""
    rng = np.random.default_rng(3)
    for n, cx, cy, draws in ((60, 4, 4, 400), (200, 6, 12, 300), (120, 10, 5, 300)):
        expected = max(cx, cy) / (n - 1)
        w = np.array([np.mean(rsim.null_accumulator(n, cx, cy, rng).cca() ** 2) for _ in range(draws)])
        assert abs(w.mean() - expected) < 4 * w.std(ddof=1) / math.sqrt(draws), (n, cx, cy, w.mean(), expected)
        g = []
        for _ in range(draws):
            z = rng.standard_normal((n, cx + cy))
            g.append(np.mean(rsim.cca(z[:, :cx], z[:, cx:]) ** 2))
        g = np.array(g)
        assert abs(g.mean() - expected) < 4 * g.std(ddof=1) / math.sqrt(draws), (n, cx, cy, g.mean(), expected)


def wachter_mean_cca(p: int, q: int, n: int) -> float:
    """The mean canonical correlation under Wachter's limit law of the squared canonical correlations of independent
    Gaussians (p <= q channels, n points): density sqrt((x - a)(b - x)) / (2 pi g1 x (1 - x)) on [a, b] with
    g1 = p/n, g2 = q/n, a, b = (sqrt(g2 (1 - g1)) -+ sqrt(g1 (1 - g2)))^2. Its normalisation (1) and mean (g2, the
    exact mean of rho^2 above) are checked here too."""
    g1, g2 = min(p, q) / n, max(p, q) / n
    a = (math.sqrt(g2 * (1 - g1)) - math.sqrt(g1 * (1 - g2))) ** 2
    b = (math.sqrt(g2 * (1 - g1)) + math.sqrt(g1 * (1 - g2))) ** 2

    def f(x: float) -> float:
        return math.sqrt(max(0.0, (x - a) * (b - x))) / (2 * math.pi * g1 * x * (1 - x))

    assert quad(f, a, b, limit=200)[0] == pytest.approx(1.0, abs=1e-9)  # adaptive quadrature of a smooth density
    assert quad(lambda x: x * f(x), a, b, limit=200)[0] == pytest.approx(g2, abs=1e-9)
    return quad(lambda x: math.sqrt(x) * f(x), a, b, limit=200)[0]


def test_floor_matches_design_values_and_explicit_gaussians():
    # DESIGN.md §5: 500 vs 500 independent Gaussians, 10k points: mean CCA about 0.19 (Wachter: 0.1908)
    limit = wachter_mean_cca(500, 500, 10_000)
    assert limit == pytest.approx(0.19, abs=0.005)  # "about 0.19": the rounding of the second digit
    f = rsim.random_floor(10_000, 500, 500, draws=2, seed=1)
    # a linear spectral statistic of 500 eigenvalues: fluctuation and finite-size bias O(1/p) = 0.002
    assert f["mean_cca"] == pytest.approx(limit, abs=2 / 500)
    # DESIGN.md §5: PWCCA floor of 64 vs 64 channels: 0.64 at 2x, 0.27 at 10x, 0.083 at 100x points per channel
    for ppc, design, last_digit in ((2, 0.64, 0.01), (10, 0.27, 0.01), (100, 0.083, 0.001)):
        fl = rsim.random_floor(64 * ppc, 64, 64, draws=8, seed=0)
        assert abs(fl["mean"] - design) < last_digit / 2 + 4 * fl["se"], (ppc, fl)
    # the Wishart shortcut against PWCCA of explicit Gaussian data through the same code (both Monte Carlo)
    rng = np.random.default_rng(4)
    n, c, draws = 400, 8, 60
    explicit = []
    for _ in range(draws):
        z = rng.standard_normal((n, 2 * c))
        explicit.append(rsim.pwcca(z[:, :c], z[:, c:]))
    fl = rsim.random_floor(n, c, c, draws=draws, seed=5)
    se = math.sqrt(fl["se"] ** 2 + (np.std(explicit, ddof=1) / math.sqrt(draws)) ** 2)
    assert abs(fl["x"] - np.mean(explicit)) < 4 * se, (fl, np.mean(explicit))
    # the default 1,000 points per channel puts the floor of 64 channels near 0.026
    assert rsim.random_floor(64_000, 64, 64, draws=3)["mean"] < 0.03


# ---------------------------------------------------------------------------------------------- cache
def make_run(folder, states: dict[int, dict], val: dict[int, float], block: int | None = None) -> str:
    """A run folder as training writes it (snapshots + history), optionally with the training command line."""
    snap = os.path.join(str(folder), "snapshots")
    os.makedirs(snap)
    for e, st in states.items():
        torch.save(st, os.path.join(snap, f"epoch_{e:04d}.pt"))
    entries = [{"epoch": e, "val_dice": val.get(e), "train_seconds": float(e)} for e in sorted(states)]
    with open(os.path.join(snap, "history.json"), "w", encoding="utf-8") as f:
        json.dump({"metric_name": "val_mean_dice", "interval": 1, "entries": entries}, f)
    if block:
        with open(os.path.join(str(folder), "run_info.json"), "w", encoding="utf-8") as f:
            json.dump({"argv": ["monai.bundle", "run", "training", "--block_size", f"[{block},{block},{block}]"]}, f)
    return str(folder)


def fingerprint(net: nn.Module) -> float:
    return float(next(net.parameters()).detach().double().sum())


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two R.I. runs (own init, 3 snapshots) and two T.L. runs (the same source weights as init: identical files),
    trained at 16^3 (their run_info.json says so)."""
    root = tmp_path_factory.mktemp("study")
    nets = {s: tiny(s).state_dict() for s in range(10, 20)}
    val = {1: 0.5, 2: 0.9}
    runs = {
        "ri1": make_run(root / "ri1", {0: nets[10], 1: nets[11], 2: nets[12]}, val, block=16),
        "ri2": make_run(root / "ri2", {0: nets[13], 1: nets[14], 2: nets[15]}, val, block=16),
        "tl1": make_run(root / "tl1", {0: nets[16], 1: nets[17], 2: nets[18]}, val, block=16),
        "tl2": make_run(root / "tl2", {0: nets[16], 2: nets[19]}, val, block=16),
    }
    return runs


def counting_setup(counter: Counter, **kw) -> capture.AnalysisSetup:
    def factory() -> nn.Module:
        net = KarimiFCN(features=4)
        net.register_forward_pre_hook(lambda m, inp: counter.update([fingerprint(m)]))
        return net

    return capture.AnalysisSetup(factory, images=images(), n_blocks=2, points_per_channel=30, progress=False,
                                 device="cpu", config_block_size=24, **kw)  # fmt: skip


def test_each_weights_file_is_forwarded_once_and_the_numbers_do_not_change(study, tmp_path):
    counter: Counter = Counter()
    st = counting_setup(counter)
    out = str(tmp_path / "cached")
    ri, tl = [study["ri1"], study["ri2"]], [study["tl1"], study["tl2"]]
    res = analysis.run_analyses(st, ["evolution", "similarity", "feature_reuse"], out, evolution_runs=ri + tl,
                                ri_runs=ri, tl_runs=tl)  # fmt: skip
    assert st.block_size == (16, 16, 16) and st.block_size_source == "runs"  # the training block size, not 24^3
    files = {load_run(r).snapshots[e] for r in ri + tl for e in load_run(r).snapshots}
    distinct = {capture.ActivationCache().file_hash(f) for f in files}
    assert len(distinct) == 10  # tl1 and tl2 start from the same source weights
    assert st.cache.captures == len(distinct)
    batches = len(capture._batches(st.plan(), st.sampler(), st.batch_voxels))
    weights = {round(fingerprint(st.network(f)), 9) for f in files}
    counts = {round(k, 9): v for k, v in counter.items()}
    assert {counts[w] for w in weights} == {batches}  # every weights file: one pass over the blocks, in 3 analyses
    assert sum(counts.values()) == len(weights) * batches + 1  # + the plan's one block through a fresh network

    # the same analyses without the cache (every pair forwards both networks and streams the moments), on a
    # subset of the runs to keep the test short: the cached numbers above must not change
    counter2: Counter = Counter()
    ref = counting_setup(counter2, cache=False)
    res2 = analysis.run_analyses(ref, ["evolution", "similarity", "feature_reuse"], str(tmp_path / "nocache"),
                                 evolution_runs=ri[:1], ri_runs=ri, tl_runs=tl[:1])  # fmt: skip
    assert ref.cache.captures == 2 * (3 + 3 + 3)  # 3 snapshots, 3 pairs, 3 runs: two networks each
    res["evolution"] = [r for r in res["evolution"] if r["run"] == "ri1"]
    res["similarity"]["pairs"] = [p for p in res["similarity"]["pairs"] if "tl2" not in (p["run_a"], p["run_b"])]
    assert len(res["evolution"]) == len(res2["evolution"]) and len(res["similarity"]["pairs"]) == len(res2["similarity"]["pairs"])

    def tol(layer: str, a, b) -> float:
        """Both paths compute float64 moments of the same float32 activations in another summation order (block
        merges vs two passes): relative error ~ n eps in the moments, amplified by the covariances' condition
        number in PWCCA (see tests/test_rsim.py)."""
        acc = st.pair_moments(a, b)[layer]
        kappa = max(np.linalg.cond(acc.mxx), np.linalg.cond(acc.myy))
        return 10 * acc.n * EPS * kappa

    snaps = {load_run(r).name: load_run(r) for r in ri + tl}
    for r1, r2 in zip(res["evolution"], res2["evolution"]):
        assert (r1["run"], r1["epoch"], r1["layer"]) == (r2["run"], r2["epoch"], r2["layer"])
        run = snaps[r1["run"]]
        t = tol(r1["layer"], run.snapshots[r1["epoch"]], run.weights("convergence"))
        assert r1["rsim"] == pytest.approx(r2["rsim"], abs=t) and r1["cka"] == pytest.approx(r2["cka"], abs=t)
    paths = {n: r.weights("convergence") for n, r in snaps.items()}
    for p1, p2 in zip(res["similarity"]["pairs"], res2["similarity"]["pairs"]):
        t = tol(p1["layer"], paths[p1["run_b"]], paths[p1["run_a"]])
        assert p1["rsim"] == pytest.approx(p2["rsim"], abs=t), (p1, p2)
    reuse_runs = {(r["run"], r["layer"]): r for r in res["feature_reuse"]["runs"]}
    for r2 in res2["feature_reuse"]["runs"]:
        r1 = reuse_runs[(r2["run"], r2["layer"])]
        t = tol(r2["layer"], snaps[r2["run"]].weights("init"), paths[r2["run"]])
        assert r1["rsim"] == pytest.approx(r2["rsim"], abs=t), (r1, r2)

    # an epoch at its own convergence epoch: RSIM 1; the floors printed beside every table
    for row in res["evolution"]:
        if row["epoch"] == snaps[row["run"]].convergence:
            assert row["rsim"] == pytest.approx(1.0, abs=1e-6)
        assert 0 < row["floor"] < 0.5 and row["n_points"] >= 30 * 4 and row["probe_kind"] == "conv"
    with open(os.path.join(out, "evolution.csv"), encoding="utf-8") as f:
        head = next(csv.reader(f))
    assert head[:4] == ["run", "epoch", "layer", "rsim"] and "floor" in head and "probe_kind" in head
    sim = open(os.path.join(out, "similarity.md"), encoding="utf-8").read()
    reuse = open(os.path.join(out, "feature_reuse.md"), encoding="utf-8").read()
    for md in (sim, reuse):
        assert "random floor (independent Gaussians)" in md and "Probes: conv" in md and "Welch's t-test" in md
        assert "data points per layer" in md.lower()
    assert "| p-value (Welch) |" in sim
    floors = {r["layer"]: r for r in csv.DictReader(open(os.path.join(out, "rsim_floor.csv"), encoding="utf-8"))}
    lp = st.plan().layers["decoder-1"]
    assert int(floors["decoder-1"]["n_points"]) == lp.points and int(floors["decoder-1"]["channels"]) == lp.channels
    info = json.load(open(os.path.join(out, "analysis_info.json"), encoding="utf-8"))
    assert info["networks_captured"] == len(distinct) and info["probe_kind"] == "conv"


def test_cache_spills_to_disk_and_gives_the_same_numbers(study):
    a = load_run(study["ri1"]).snapshots
    big = counting_setup(Counter())
    small = counting_setup(Counter(), cache_bytes=0)  # nothing stays in RAM: every array read back memory-mapped
    for st in (big, small):
        for e in (0, 1, 2):
            st.activations(a[e], [load_run(study["ri1"])])
    assert small.cache.ram_bytes_used() == 0 and big.cache.ram_bytes_used() > 0 and small.cache.captures == 3
    for e in (0, 1):
        m1, m2 = big.pair_moments(a[e], a[2]), small.pair_moments(a[e], a[2])
        for layer in m1:  # the same float64 operations on the same float32 numbers, read from RAM or from disk
            assert m1[layer].pwcca() == m2[layer].pwcca() and np.array_equal(m1[layer].mxy, m2[layer].mxy)
    assert small.cache.captures == 3


def test_block_size_defaults_to_the_training_block_size(study, tmp_path):
    assert capture.training_block_size(study["ri1"]) == (16, 16, 16)
    bare = make_run(tmp_path / "bare", {0: tiny(0).state_dict()}, {})
    assert capture.training_block_size(bare) is None
    st = counting_setup(Counter())
    assert st.resolve_block_size([load_run(bare)]) == (24, 24, 24) and st.block_size_source == "config"
    assert counting_setup(Counter(), block_size=32).resolve_block_size([load_run(study["ri1"])]) == (32, 32, 32)
    assert capture.make_setup(TRAIN, {"block_size": [48, 48, 48]}, progress=False).config_block_size == (48, 48, 48)
