# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Representation analyses: snapshots during training, activation capture, and the paper's analyses
(evolution, similarity + t-tests, feature reuse, filter change, pictures).

Two kinds of runs: a tiny trained run of the bundle (the files as a training run writes them), and run folders
made here from a toy network whose probe activations have known relations (a shared convolution followed by an
invertible 1x1x1 mixing, i.e. an invertible linear map of the same features: RSIM 1; or independent Gaussian
noise: RSIM at the random floor of canonical correlations), so the analyses' answers are known in advance."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.integrate import quad

from common import analysis, capture, figures
from common.handlers import SnapshotSaver
from common.networks import PROBE_NAMES, KarimiFCN, VNet
from common.runs import convergence_epoch, load_run, read_history

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "liver_ct_from_liver_mri")
TRAIN = os.path.join(BUNDLE, "configs", "train.json")
TINY = {"network_def#features": 4}
EPOCHS = 2
PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # tiny networks: one thread each (more only spin on a shared machine)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of the bundle (features 4, 16^3 blocks, 2 iterations per epoch, EPOCHS epochs) on 5 phantoms,
    run in-process (``ConfigWorkflow``); the rsim.json test below runs the bundle as a user does."""
    from monai.bundle import ConfigWorkflow

    from common.synthetic import make_scenario

    root = tmp_path_factory.mktemp("bundle")
    data = make_scenario("liver_ct", str(root / "data"), 5, shape=(24, 24, 16), spacing=(2.0, 2.0, 3.0))
    wf = ConfigWorkflow(
        config_file=TRAIN, workflow_type=None, logging_file=False, bundle_root=str(root), dataset_dir=data,
        block_size=[16, 16, 16], iterations_per_epoch=2, max_epochs=EPOCHS, device="$torch.device('cpu')",
        **{"network_def#features": 4},
    )  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    return root, os.path.join(str(root), "runs", "train")


@pytest.fixture(scope="module")
def setup():
    return capture.make_setup(TRAIN, TINY, block_size=16, n_blocks=2, points_per_channel=4, progress=False, device="cpu")


# ---------------------------------------------------------------------------------------------- snapshots
def test_snapshots_saved_at_init_and_every_epoch(trained):
    _, run_dir = trained
    snap = os.path.join(run_dir, "snapshots")
    for e in range(EPOCHS + 1):
        assert os.path.isfile(os.path.join(snap, f"epoch_{e:04d}.pt")), e
    assert not [f for f in os.listdir(snap) if f.endswith(".tmp")]
    hist = read_history(run_dir)
    assert [e["epoch"] for e in hist["entries"]] == list(range(EPOCHS + 1))
    assert hist["entries"][0]["val_dice"] is None  # no validation at initialisation
    assert all(isinstance(e["val_dice"], float) for e in hist["entries"][1:])
    s0 = torch.load(os.path.join(snap, "epoch_0000.pt"), weights_only=True)
    s2 = torch.load(os.path.join(snap, f"epoch_{EPOCHS:04d}.pt"), weights_only=True)
    assert set(s0) == set(KarimiFCN(features=4).state_dict())
    assert any(not torch.equal(s0[k], s2[k]) for k in s0), "training changed no weight"
    run = load_run(run_dir)
    assert run.convergence == convergence_epoch(hist) and 1 <= run.convergence <= EPOCHS


def test_convergence_epoch():
    assert convergence_epoch([0.5, 0.8, 0.9, 0.899, 0.95, 0.951]) == 4  # 0.95 >= 0.995 * 0.951
    assert convergence_epoch([0.2, 0.9, 0.7]) == 1
    entries = [{"epoch": 0, "val_dice": None}, {"epoch": 2, "val_dice": 0.5}, {"epoch": 4, "val_dice": 0.8},
               {"epoch": 6, "val_dice": 0.799}, {"epoch": 8, "val_dice": 0.8}]
    assert convergence_epoch({"entries": entries}) == 4
    assert convergence_epoch(entries, tolerance=0.5) == 2
    with pytest.raises(ValueError):
        convergence_epoch([{"epoch": 0, "val_dice": None}])


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3)


@pytest.mark.parametrize("saver_first", [True, False])
def test_snapshot_saver_records_the_fresh_metric_in_either_order(tmp_path, saver_first):
    from ignite.engine import Engine, Events

    net = _Net()
    evaluator = Engine(lambda e, b: None)
    dice = {1: 0.3, 2: 0.6, 3: 0.5, 4: 0.7, 5: 0.9}

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(ev):
        ev.state.metrics["val_mean_dice"] = dice[ev.state.epoch]

    def validate(engine):  # like MONAI's ValidationHandler: afterwards evaluator.state.epoch == trainer epoch
        evaluator.run([0], max_epochs=engine.state.epoch)

    def step(engine, batch):
        with torch.no_grad():
            net.conv.weight.add_(0.01)

    trainer = Engine(step)
    saver = SnapshotSaver(net, str(tmp_path), interval=2, evaluator=evaluator)
    if saver_first:
        saver.attach(trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    else:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
        saver.attach(trainer)
    trainer.run([0, 1], max_epochs=5)
    hist = read_history(str(tmp_path))
    assert [(e["epoch"], e["val_dice"]) for e in hist["entries"]] == [(0, None), (2, 0.6), (4, 0.7), (5, 0.9)]
    w0 = torch.load(tmp_path / "snapshots" / "epoch_0000.pt", weights_only=True)["conv.weight"]
    w4 = torch.load(tmp_path / "snapshots" / "epoch_0004.pt", weights_only=True)["conv.weight"]
    # 4 epochs x 2 iterations x 0.01, added in float32 (8 roundings of a value < 1: well within rtol 1e-5)
    assert torch.allclose(w4 - w0, torch.full_like(w0, 0.08), rtol=1e-5, atol=0)
    assert convergence_epoch(hist) == 5


def test_snapshot_saver_disabled(tmp_path):
    from ignite.engine import Engine

    trainer = Engine(lambda e, b: None)
    SnapshotSaver(_Net(), str(tmp_path), enabled=False).attach(trainer)
    trainer.run([0], max_epochs=1)
    assert not (tmp_path / "snapshots").exists()


# ---------------------------------------------------------------------------------------------- capture
def test_capture_same_blocks_points_per_channel_and_eval_mode():
    rng = np.random.default_rng(0)
    images = [rng.random((1, 20, 18, 22), dtype=np.float32) for _ in range(2)]
    s1 = capture.BlockSampler(images, block_size=16, seed=3)
    s2 = capture.BlockSampler(images, block_size=16, seed=3)
    assert torch.equal(s1[5], s2[5]) and s1[0].shape == (1, 1, 16, 16, 16)
    assert not torch.equal(s1[0], capture.BlockSampler(images, block_size=16, seed=4)[0])
    with pytest.raises(ValueError, match="divisible"):
        capture.BlockSampler(images, block_size=20)
    torch.manual_seed(0)
    a, b = KarimiFCN(features=2, dropout=0.5), KarimiFCN(features=2, dropout=0.5)
    a.train()
    b.eval()
    accs = capture.layer_moments([a, b], a, s1, n_blocks=2, points_per_channel=10)
    assert a.training and not b.training  # flags restored
    assert list(accs[0]) == ["encoder-1", "encoder-2", "encoder-3", "decoder-1", "decoder-2", "decoder-3"]
    for name, acc in accs[0].items():
        c = acc.mean_x.shape[0]
        assert acc.n >= 10 * c, (name, acc.n, c)  # small layers draw more blocks
        assert acc.pwcca() == pytest.approx(1.0, abs=1e-6)  # dropout off: a network equals itself
    again = capture.layer_moments(b, a, s1, n_blocks=2, points_per_channel=10)[0]
    other_way = capture.layer_moments(a, b, s1, n_blocks=2, points_per_channel=10)[0]
    for name in again:  # deterministic: same blocks, same voxels, the same arithmetic
        assert again[name].pwcca() == accs[1][name].pwcca()
        # x and y exchanged: the cross moments are summed as x^T y instead of y^T x (another order)
        assert capture.swap(again[name]).pwcca() == pytest.approx(other_way[name].pwcca(), abs=acc_tol(again[name]))
    assert list(capture.probe_layers(a, "encoder-2,decoder.0.fuse")) == ["encoder-2", "decoder.0.fuse"]
    with pytest.raises(ValueError, match="Unknown layer"):
        capture.probe_layers(a, ["nope"])


def test_vnet_probe_filters_filter_change_and_picture(tmp_path):
    torch.manual_seed(0)
    v = VNet()
    filt = capture.probe_filters(v)
    assert list(filt) == list(v.probe_modules()) == list(PROBE_NAMES)
    assert [dict(v.named_modules())[m] is v.probe_modules("residual")[p] for p, m in VNet.PROBES] == [True] * 6
    assert all(isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) for m in filt.values())
    w = copy.deepcopy(v)
    with torch.no_grad():
        w.get_submodule("up_tr32.up_conv").weight.mul_(1.5)  # a transposed conv
    rows = {r["conv"]: r for r in analysis.filter_change(v, w)}
    # float32 weights times 1.5 (one rounding, 2**-24 relative), the change measured in float64
    assert rows["up_tr32.up_conv"]["filter_rel_change"] == pytest.approx(0.5, abs=1e-6)
    assert rows["up_tr32.up_conv"]["n_filters"] == 16
    assert rows["in_tr.conv_block.conv"]["probe"] == "encoder-1" and rows["in_tr.conv_block.conv"]["rel_change"] == 0
    path = figures.filters_figure(v, w, str(tmp_path / "vnet_filters.png"))
    assert _is_png(path)


def acc_tol(acc) -> float:
    """What float64 guarantees for a measure computed from an accumulator's moments (see tests/test_rsim.py):
    n * eps * the condition number of the live (non-constant) channels' covariance of either side."""
    conds = []
    for m in (acc.mxx, acc.myy):
        live = np.diag(m) > 0
        conds.append(np.linalg.cond(m[np.ix_(live, live)]))
    return acc.n * np.finfo(np.float64).eps * max(conds)


# ---------------------------------------------------------------------------------------------- toy runs, known answers
C = 4  # channels of the toy probe layers
PPC = 400  # data points per channel: 1600 per layer


def random_floor(c: int = C, n: int = C * PPC) -> float:
    """The largest canonical correlation of c channels against c independent Gaussian ones over n data points
    stays below the upper edge of Wachter's law, sqrt((sqrt(c1 (1 - c2)) + sqrt(c2 (1 - c1)))^2) with
    c1 = c2 = c / n (0.0999 here); PWCCA, a weighted mean of the correlations, too. 1.5x the edge leaves room for
    the finite-size fluctuation of the top correlation (O(n^-2/3) relative)."""
    c1 = c2 = c / n
    return 1.5 * (math.sqrt(c1 * (1 - c2)) + math.sqrt(c2 * (1 - c1)))


#: RSIM of activations related by an invertible linear map: 1, up to the float32 rounding of the activations
#: (relative ~1e-7, which lowers a canonical correlation of 1 by O(1e-14)) and the float64 measure (n eps kappa)
ONE = 1e-6


class ToyNet(nn.Module):
    """``conv`` (1 -> C, 3^3) -> probe ``early`` -> ``mix`` (C -> C, 1^3) -> probe ``late``. With the buffer
    ``noise`` set, ``late`` outputs independent Gaussian noise (seeded by ``noise_seed`` and the call count)
    instead. Two networks with the same ``conv`` have identical ``early`` activations, and ``late`` activations
    related by ``mix_2 mix_1^-1`` (invertible): RSIM 1; a noise ``late`` is unrelated to anything: the random floor."""

    divisor = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, C, 3, padding=1)
        self.early = nn.Identity()
        self.mix = nn.Conv3d(C, C, 1)
        self.late = nn.Identity()
        self.register_buffer("noise", torch.zeros(()))
        self.register_buffer("noise_seed", torch.zeros((), dtype=torch.int64))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.early(self.conv(x)))
        if float(self.noise) > 0:
            self.calls += 1
            g = torch.Generator().manual_seed(int(self.noise_seed) * 100_003 + self.calls)
            h = torch.randn(h.shape, generator=g)
        return self.late(h)

    def probe_modules(self):
        return OrderedDict(early=self.early, late=self.late)


def toy_state(conv_seed: int, mix_seed: int, noise_seed: int | None = None) -> dict:
    """The weights of a ToyNet: ``conv`` from ``conv_seed``; ``mix`` from ``mix_seed``, ``U diag(s) V^T`` with random
    rotations U, V and singular values s in [0.5, 2] (invertible, condition number <= 4, not orthogonal); noise on
    with ``noise_seed``."""
    net = ToyNet()
    with torch.no_grad():
        g = torch.Generator().manual_seed(conv_seed)
        net.conv.weight.copy_(torch.randn(net.conv.weight.shape, generator=g))
        net.conv.bias.copy_(torch.randn(C, generator=g))
        g = torch.Generator().manual_seed(1000 + mix_seed)
        u, _ = torch.linalg.qr(torch.randn(C, C, generator=g))
        v, _ = torch.linalg.qr(torch.randn(C, C, generator=g))
        sv = 0.5 + 1.5 * torch.rand(C, generator=g)
        net.mix.weight.copy_((u @ torch.diag(sv) @ v.T).view(C, C, 1, 1, 1))
        net.mix.bias.copy_(torch.randn(C, generator=g))
        if noise_seed is not None:
            net.noise.fill_(1.0)
            net.noise_seed.fill_(noise_seed)
    return net.state_dict()


def make_run(folder, snapshots: dict[int, dict], val_dice: dict[int, float]) -> str:
    """A run folder as a training run writes it: ``snapshots/epoch_XXXX.pt`` and ``snapshots/history.json``."""
    snap = os.path.join(str(folder), "snapshots")
    os.makedirs(snap)
    for epoch, state in snapshots.items():
        torch.save(state, os.path.join(snap, f"epoch_{epoch:04d}.pt"))
    entries = [{"epoch": e, "iteration": 10 * e, "val_dice": val_dice.get(e), "file": f"epoch_{e:04d}.pt"}
               for e in sorted(snapshots)]  # fmt: skip
    with open(os.path.join(snap, "history.json"), "w", encoding="utf-8") as f:
        json.dump({"metric_name": "val_mean_dice", "interval": 1, "entries": entries}, f)
    return str(folder)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy runs (convergence at epoch 2, the best validation DSC) and an AnalysisSetup on random images.

    * ``tl1``, ``tl2`` (fine-tuned-like): init = conv c, mix 0; epoch 1 = noise; epoch 2 = conv c, mix 1 (tl2:
      mix 2). Init vs converged: same conv, another mixing: RSIM 1 at both layers.
    * ``ri1``, ``ri2`` (scratch-like): init = conv r, mix 0; converged = noise at ``late`` (seeds 1, 2), the
      same conv at ``early``. Init vs converged: ``early`` 1, ``late`` at the random floor.
    """
    root = tmp_path_factory.mktemp("toy")
    hist = {1: 0.5, 2: 0.9}
    runs = {
        "tl1": make_run(root / "tl1", {0: toy_state(7, 0), 1: toy_state(7, 0, noise_seed=9), 2: toy_state(7, 1)}, hist),
        "tl2": make_run(root / "tl2", {0: toy_state(7, 0), 1: toy_state(7, 3), 2: toy_state(7, 2)}, hist),
        "ri1": make_run(root / "ri1", {0: toy_state(3, 0), 2: toy_state(3, 4, noise_seed=1)}, hist),
        "ri2": make_run(root / "ri2", {0: toy_state(3, 0), 2: toy_state(3, 5, noise_seed=2)}, hist),
    }
    rng = np.random.default_rng(0)
    images = [rng.random((1, 24, 20, 20), dtype=np.float32) for _ in range(2)]
    toy_setup = capture.AnalysisSetup(ToyNet(), images=images, block_size=16, n_blocks=2, points_per_channel=PPC,
                                      progress=False, device="cpu")  # fmt: skip
    return runs, toy_setup


def test_toy_activations_relations(toy):
    """The toy's premises, checked on the accumulators: an invertible linear map gives RSIM 1 in both directions
    (and CKA < 1: CKA is not invariant to it), independent noise stays under the random floor."""
    runs, st = toy
    a, b = st.network(toy_state(7, 0)), st.network(toy_state(7, 1))
    noise = st.network(toy_state(7, 0, noise_seed=5))
    same, unrelated = st.moments([b, noise], a)
    for layer in ("early", "late"):
        assert same[layer].n >= C * PPC
        v = analysis.rsim_values(same[layer])
        assert v["x"] == pytest.approx(1.0, abs=ONE) and v["y"] == pytest.approx(1.0, abs=ONE), (layer, v)
    assert analysis.rsim_values(same["late"])["cka"] < 0.99  # the mixing is not orthogonal
    assert analysis.rsim_values(unrelated["early"])["mean"] == pytest.approx(1.0, abs=ONE)  # early is not noised
    v = analysis.rsim_values(unrelated["late"])
    assert 0 < v["x"] < random_floor() and 0 < v["y"] < random_floor(), v


def test_evolution_known_answers(toy, tmp_path):
    """Evolution of ``tl1`` against its convergence epoch 2: epoch 0 (another mixing of the same features) and 2
    (itself) give RSIM 1 at both layers; epoch 1 (noise at ``late``) the random floor there, 1 at ``early``."""
    runs, st = toy
    rows = analysis.evolution(st, [runs["tl1"]], str(tmp_path))
    got = {(r["epoch"], r["layer"]): r["rsim"] for r in rows}
    assert set(got) == {(e, l) for e in (0, 1, 2) for l in ("early", "late")}
    assert {r["convergence_epoch"] for r in rows} == {2}
    for key, value in got.items():
        if key == (1, "late"):
            assert 0 < value < random_floor(), (key, value)
        else:
            assert value == pytest.approx(1.0, abs=ONE), (key, value)
    assert _is_png(tmp_path / "evolution.png")


def test_similarity_known_answers(toy, tmp_path):
    """Converged models: ``tl1`` and ``tl2`` share the features (RSIM 1 at both layers, T.L.-T.L.); ``ri1`` and
    ``ri2`` have independent noise at ``late``, so every pair with one of them sits at the random floor there
    (R.I.-R.I. and R.I.-T.L.) and at 1 at ``early`` only when both share the conv (R.I.-R.I.)."""
    runs, st = toy
    res = analysis.similarity(st, [runs["ri1"], runs["ri2"]], [runs["tl1"], runs["tl2"]], str(tmp_path))
    pairs = {(p["group"], p["run_a"], p["run_b"], p["layer"]): p for p in res["pairs"]}
    assert len(pairs) == 6 * 2  # 4 runs: 6 pairs, 2 layers
    for (group, ra, rb, layer), p in pairs.items():
        if layer == "late" and group != "TL-TL":
            assert 0 < p["rsim_ab"] < random_floor() and 0 < p["rsim_ba"] < random_floor(), p
        elif layer == "early" and group == "RI-TL":  # another conv: related through the image, not a linear map
            assert 0.05 < p["rsim"] < 1 - 1e-3, p
        else:
            assert p["rsim"] == pytest.approx(1.0, abs=ONE), p
        assert p["rsim"] == pytest.approx(0.5 * (p["rsim_ab"] + p["rsim_ba"]), rel=1e-15)
    summary = {(r["layer"], r["group"]): r for r in res["summary"]}
    assert summary[("late", "TL-TL")]["n"] == 1 and summary[("late", "RI-TL")]["n"] == 4
    assert summary[("late", "TL-TL")]["mean"] > 1 - ONE > random_floor() > summary[("late", "RI-TL")]["mean"]


def test_feature_reuse_known_answers(toy, tmp_path):
    """Reuse = mean RSIM(init, converged) of T.L. runs minus that of R.I. runs: at ``early`` every run keeps its
    conv (1 - 1 = 0), at ``late`` the T.L. runs keep their features (1) and the R.I. runs do not (the floor), so
    reuse(late) > 1 - floor > reuse(early) = 0; exchanging the groups negates it exactly."""
    runs, st = toy
    ri, tl = [runs["ri1"], runs["ri2"]], [runs["tl1"], runs["tl2"]]
    res = analysis.feature_reuse(st, ri, tl, str(tmp_path / "a"))
    reuse = {r["layer"]: r for r in res["reuse"]}
    assert reuse["early"]["reuse"] == pytest.approx(0.0, abs=2 * ONE)
    assert reuse["late"]["mean_rsim_tl"] == pytest.approx(1.0, abs=ONE)
    assert 0 < reuse["late"]["mean_rsim_ri"] < random_floor()
    assert reuse["late"]["reuse"] > 1 - random_floor() - ONE
    swapped = {r["layer"]: r["reuse"] for r in analysis.feature_reuse(st, tl, ri, str(tmp_path / "b"))["reuse"]}
    for layer in ("early", "late"):  # the same blocks and voxels: the same numbers, subtracted the other way
        assert swapped[layer] == -reuse[layer]["reuse"]
    runs_rows = {(r["run"], r["layer"]): r for r in res["runs"]}
    assert runs_rows[("ri1", "late")]["converged_epoch"] == 2


# ---------------------------------------------------------------------------------------------- analyses
def test_evolution_is_one_at_the_convergence_epoch(trained, setup, tmp_path):
    _, run_dir = trained
    rows = analysis.evolution(setup, [run_dir, f"second={run_dir}"], str(tmp_path))
    assert {r["run"] for r in rows} == {"train", "second"}
    conv = load_run(run_dir).convergence
    at = [r for r in rows if r["epoch"] == conv]
    assert len(at) == 2 * 6
    for r in at:
        assert r["rsim"] == pytest.approx(1.0, abs=1e-6), r
    assert {r["epoch"] for r in rows} == set(range(EPOCHS + 1))
    assert all(0.0 <= r["rsim"] <= 1.0 + 1e-9 for r in rows)
    with open(tmp_path / "evolution.csv", encoding="utf-8") as f:
        head = next(csv.reader(f))
    assert head[:4] == ["run", "epoch", "layer", "rsim"]
    assert _is_png(tmp_path / "evolution.png")


def test_similarity_of_a_network_with_itself_is_one(trained, setup, tmp_path):
    _, run_dir = trained
    res = analysis.similarity(setup, [run_dir], [run_dir], str(tmp_path))
    assert len(res["pairs"]) == 6 and {p["group"] for p in res["pairs"]} == {"RI-TL"}
    for p in res["pairs"]:
        assert p["rsim"] == pytest.approx(1.0, abs=1e-6)
        assert p["rsim_ab"] == pytest.approx(1.0, abs=1e-6) and p["rsim_ba"] == pytest.approx(1.0, abs=1e-6)
    for name in ("similarity_pairs.csv", "similarity_summary.csv", "similarity_ttests.csv", "similarity.md"):
        assert (tmp_path / name).is_file(), name
    assert "RSIM(R.I., T.L.)" in (tmp_path / "similarity.md").read_text(encoding="utf-8")


def test_similarity_which_and_both_directions(trained, setup, tmp_path):
    _, run_dir = trained
    run = load_run(run_dir)
    res = analysis.similarity(setup, [run], [run], str(tmp_path), which=0)
    assert all(p["rsim"] == pytest.approx(1.0, abs=1e-6) for p in res["pairs"])
    init, conv = setup.network(run.weights("init")), setup.network(run.weights("convergence"))
    acc = setup.moments([conv], init, [run])[0]
    for layer, a in acc.items():
        v = analysis.rsim_values(a)
        assert v["mean"] == pytest.approx(0.5 * (a.pwcca() + capture.swap(a).pwcca()))


def welch_by_hand(a, b) -> tuple[float, float, float]:
    """Welch's t-test written out: t = (mean_a - mean_b) / sqrt(s_a^2 / n_a + s_b^2 / n_b) (sample variances),
    Welch-Satterthwaite degrees of freedom df = (v_a + v_b)^2 / (v_a^2 / (n_a - 1) + v_b^2 / (n_b - 1)) with
    v = s^2 / n, and the two-sided p = 2 * integral of Student's t density (Gamma functions) from |t| to inf."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    tail = quad(lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2), abs(t), math.inf, epsabs=1e-15, epsrel=1e-12)[0]
    return t, 2 * tail, df


def test_welch_ttest_by_hand():
    # a = 1..4, b = 2, 4, .., 10: means 2.5 and 6, sample variances 5/3 and 10, squared standard errors 5/12 and
    # 2 (sum 29/12): t = -3.5 / sqrt(29/12) = -2.2514; df = (29/12)^2 / ((5/12)^2 / 3 + 2^2 / 4) = 2523/457
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    t_hand, p_hand, df = welch_by_hand(a, b)
    assert t_hand == pytest.approx(-3.5 / math.sqrt(29 / 12), rel=1e-14) and df == pytest.approx(2523 / 457, rel=1e-14)
    assert 0.06 < p_hand < 0.08  # between the t(5) and t(6) two-sided tails of 2.25 (0.074, 0.065)
    t, p = analysis.welch_ttest(a, b)
    assert t == pytest.approx(t_hand, rel=1e-12)  # a few float64 operations
    assert p == pytest.approx(p_hand, rel=1e-9)  # the quadrature is good to ~1e-12 relative
    t_rev, p_rev = analysis.welch_ttest(b, a)
    assert t_rev == pytest.approx(-t, rel=1e-15) and p_rev == pytest.approx(p, rel=1e-12)
    assert math.isnan(analysis.welch_ttest([0.1], [0.2, 0.3])[1])  # a group of one has no variance


def test_similarity_summary_and_ttests():
    rng = np.random.default_rng(1)
    groups = {"RI-RI": rng.normal(0.40, 0.03, 10), "TL-TL": rng.normal(0.43, 0.01, 12), "RI-TL": rng.normal(0.46, 0.02, 15)}
    pairs = [{"layer": "encoder-3", "group": g, "rsim": float(v)} for g, vals in groups.items() for v in vals]
    summary, tests = analysis.summarize_similarity(pairs)
    s = {r["group"]: r for r in summary}
    # means and sample standard deviations of <= 15 numbers: a few ulps (numpy sums pairwise, we may not)
    assert s["RI-RI"]["mean"] == pytest.approx(groups["RI-RI"].mean(), rel=1e-12)
    assert s["TL-TL"]["std"] == pytest.approx(groups["TL-TL"].std(ddof=1), rel=1e-12)
    assert s["RI-TL"]["n"] == 15
    assert [(t["group_a"], t["group_b"]) for t in tests] == [("RI-RI", "TL-TL"), ("RI-RI", "RI-TL"), ("TL-TL", "RI-TL")]
    for t in tests:
        t_hand, p_hand, _ = welch_by_hand(groups[t["group_a"]], groups[t["group_b"]])
        assert t["t"] == pytest.approx(t_hand, rel=1e-12)
        assert t["p"] == pytest.approx(p_hand, rel=1e-9)
        assert t["significant"] == (p_hand < 0.05)
    md = analysis.similarity_markdown(summary, tests)
    assert f"{groups['RI-RI'].mean():.3f} ± {groups['RI-RI'].std(ddof=1):.3f}" in md


def test_feature_reuse_of_identical_groups_is_zero(trained, setup, tmp_path):
    _, run_dir = trained
    res = analysis.feature_reuse(setup, [run_dir], [run_dir], str(tmp_path))
    assert len(res["reuse"]) == 6
    for r in res["reuse"]:
        assert r["reuse"] == pytest.approx(0.0, abs=1e-12)
        assert 0.0 < r["mean_rsim_tl"] <= 1.0 + 1e-9
    for name in ("feature_reuse.csv", "feature_reuse_runs.csv", "feature_reuse.md"):
        assert (tmp_path / name).is_file(), name


def test_filter_change_zero_and_scaled_layer():
    torch.manual_seed(0)
    net = KarimiFCN(features=4)
    rows = analysis.filter_change(net, copy.deepcopy(net))
    assert len(rows) == len(net.conv_layers())
    assert all(r["rel_change"] == 0 and r["filter_rel_change"] == 0 and r["filter_norm_change"] == 0 for r in rows)
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.encoder[2].residual.block2[1].conv.weight.mul_(1.5)  # the conv producing encoder-3
        other.decoder[0].up.conv.weight.mul_(1.5)  # a transposed conv
    rows = {r["conv"]: r for r in analysis.filter_change(net.state_dict(), other.state_dict(), net)}
    for name in ("encoder.2.residual.block2.1.conv", "decoder.0.up.conv"):
        for key in ("rel_change", "filter_rel_change", "filter_norm_change"):
            assert rows[name][key] == pytest.approx(0.5, abs=1e-6), (name, key)
    assert rows["encoder.2.residual.block2.1.conv"]["probe"] == "encoder-3"
    assert sum(r["rel_change"] > 0 for r in rows.values()) == 2


def test_filter_change_and_pictures_write_files(trained, setup, tmp_path):
    _, run_dir = trained
    rows = analysis.filter_change_runs(setup, [run_dir], str(tmp_path))
    assert {r["probe"] for r in rows} >= set(PROBE_NAMES)
    assert any(r["rel_change"] > 0 for r in rows)
    assert _is_png(tmp_path / "filter_change.png")
    assert _is_png(figures.plot_filters(setup, run_dir, out_dir=str(tmp_path)))
    assert _is_png(figures.plot_feature_maps(setup, run_dir, out_dir=str(tmp_path), layers=["encoder-1", "decoder-3"]))


def test_cli_filter_change(trained, tmp_path):
    root, run_dir = trained
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import analyze
    finally:
        sys.path.pop(0)
    out = tmp_path / "cli"
    rc = analyze.main(["filter_change", "--set", "network_def#features=4", "--runs_dir", os.path.join(str(root), "runs"),
                       "--out", str(out), "-q", "train"])
    assert rc == 0 and (out / "filter_change.csv").is_file() and _is_png(out / "filter_change.png")


def test_rsim_config_end_to_end(trained, tmp_path):
    root, _ = trained
    out = tmp_path / "rsim"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", os.path.join(BUNDLE, "configs", "rsim.json"),
        "--bundle_root", str(root),
        "--network_def#features", "4",
        "--evolution_runs", "['train']",
        "--ri_runs", "['train']",
        "--tl_runs", "['train']",
        "--block_size", "[16,16,16]",
        "--n_blocks", "2",
        "--points_per_channel", "4",
        "--progress", "False",
        "--output_dir", str(out),
    ]
    res = subprocess.run(cmd, cwd=str(root), capture_output=True, encoding="utf-8", errors="replace", env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("evolution.csv", "similarity_pairs.csv", "similarity.md", "feature_reuse.csv", "feature_reuse.md",
                 "filter_change.csv"):
        assert (out / name).is_file(), name
    for name in ("evolution.png", "filter_change.png", "filters_train.png", "feature_maps_train.png"):
        assert _is_png(out / name), name
    with open(out / "evolution.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    conv = rows[0]["convergence_epoch"]
    assert all(abs(float(r["rsim"]) - 1) < 1e-6 for r in rows if r["epoch"] == conv)
