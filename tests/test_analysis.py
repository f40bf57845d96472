"""Representation analyses: snapshots during training, activation capture, and the paper's analyses
(evolution, similarity + t-tests, feature reuse, filter change, pictures) on a tiny trained run."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from common import analysis, capture
from common.handlers import SnapshotSaver, convergence_epoch, read_history
from common.networks import PROBE_NAMES, KarimiFCN

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
    env.setdefault("OMP_NUM_THREADS", "2")
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of the bundle (features 4, 16^3 blocks, 2 iterations per epoch, EPOCHS epochs) on 5 phantoms."""
    from common.synthetic import make_scenario

    root = tmp_path_factory.mktemp("bundle")
    data = make_scenario("liver_ct", str(root / "data"), 5, shape=(24, 24, 16), spacing=(2.0, 2.0, 3.0))
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", f"['{TRAIN}']",
        "--bundle_root", str(root),
        "--dataset_dir", data,
        "--network_def#features", "4",
        "--block_size", "[16,16,16]",
        "--iterations_per_epoch", "2",
        "--train#trainer#max_epochs", str(EPOCHS),
    ]
    res = subprocess.run(cmd, cwd=str(root), capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root, os.path.join(str(root), "runs", "train")


@pytest.fixture(scope="module")
def setup():
    return analysis.make_setup(TRAIN, TINY, block_size=16, n_blocks=2, points_per_channel=4, progress=False, device="cpu")


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
    run = analysis.load_run(run_dir)
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
    assert torch.allclose(w4 - w0, torch.full_like(w0, 0.08))  # 4 epochs x 2 iterations x 0.01
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
    for name in again:  # deterministic: same blocks, same voxels
        assert again[name].pwcca() == pytest.approx(accs[1][name].pwcca(), abs=1e-12)
        assert capture.swap(again[name]).pwcca() == pytest.approx(
            capture.layer_moments(a, b, s1, n_blocks=2, points_per_channel=10)[0][name].pwcca(), abs=1e-9
        )
    assert list(capture.probe_layers(a, "encoder-2,decoder.0.fuse")) == ["encoder-2", "decoder.0.fuse"]
    with pytest.raises(ValueError, match="Unknown layer"):
        capture.probe_layers(a, ["nope"])


def test_vnet_probe_filters_filter_change_and_picture(tmp_path):
    from monai.networks.nets import VNet

    torch.manual_seed(0)
    v = VNet(spatial_dims=3, in_channels=1, out_channels=2)
    filt = capture.probe_filters(v)
    assert list(filt) == list(capture.VNET_PROBES)
    assert all(isinstance(m, torch.nn.Conv3d) for m in filt.values())
    w = copy.deepcopy(v)
    with torch.no_grad():
        w.get_submodule("up_tr32.up_conv").weight.mul_(1.5)  # a transposed conv
    rows = {r["conv"]: r for r in analysis.filter_change(v, w)}
    assert rows["up_tr32.up_conv"]["filter_rel_change"] == pytest.approx(0.5, abs=1e-6)
    assert rows["up_tr32.up_conv"]["n_filters"] == 16
    assert rows["in_tr.conv_block.conv"]["probe"] == "encoder-1" and rows["in_tr.conv_block.conv"]["rel_change"] == 0
    path = analysis.filters_figure(v, w, str(tmp_path / "vnet_filters.png"))
    assert _is_png(path)


# ---------------------------------------------------------------------------------------------- analyses
def test_evolution_is_one_at_the_convergence_epoch(trained, setup, tmp_path):
    _, run_dir = trained
    rows = analysis.evolution(setup, [run_dir, f"second={run_dir}"], str(tmp_path))
    assert {r["run"] for r in rows} == {"train", "second"}
    conv = analysis.load_run(run_dir).convergence
    at = [r for r in rows if r["epoch"] == conv]
    assert len(at) == 2 * 6
    for r in at:
        assert r["rsim"] == pytest.approx(1.0, abs=1e-6), r
    assert {r["epoch"] for r in rows} == set(range(EPOCHS + 1))
    assert all(0.0 <= r["rsim"] <= 1.0 + 1e-9 for r in rows)
    with open(tmp_path / "evolution.csv") as f:
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
    assert "RSIM(R.I., T.L.)" in (tmp_path / "similarity.md").read_text()


def test_similarity_which_and_both_directions(trained, setup, tmp_path):
    _, run_dir = trained
    run = analysis.load_run(run_dir)
    res = analysis.similarity(setup, [run], [run], str(tmp_path), which=0)
    assert all(p["rsim"] == pytest.approx(1.0, abs=1e-6) for p in res["pairs"])
    init, conv = setup.network(run.weights("init")), setup.network(run.weights("convergence"))
    acc = setup.moments([conv], init, [run])[0]
    for layer, a in acc.items():
        v = analysis.rsim_values(a)
        assert v["mean"] == pytest.approx(0.5 * (a.pwcca() + capture.swap(a).pwcca()))


def test_welch_ttest_matches_scipy():
    rng = np.random.default_rng(1)
    groups = {"RI-RI": rng.normal(0.40, 0.03, 10), "TL-TL": rng.normal(0.43, 0.01, 12), "RI-TL": rng.normal(0.46, 0.02, 15)}
    pairs = [{"layer": "encoder-3", "group": g, "rsim": float(v)} for g, vals in groups.items() for v in vals]
    summary, tests = analysis.summarize_similarity(pairs)
    s = {r["group"]: r for r in summary}
    assert s["RI-RI"]["mean"] == pytest.approx(groups["RI-RI"].mean())
    assert s["TL-TL"]["std"] == pytest.approx(groups["TL-TL"].std(ddof=1))
    assert s["RI-TL"]["n"] == 15
    for t in tests:
        ref = stats.ttest_ind(groups[t["group_a"]], groups[t["group_b"]], equal_var=False)
        assert t["p"] == pytest.approx(ref.pvalue, rel=1e-12)
        assert t["t"] == pytest.approx(ref.statistic, rel=1e-12)
        assert t["significant"] == (ref.pvalue < 0.05)
    assert math.isnan(analysis.welch_ttest([0.1], [0.2, 0.3])[1])
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
    assert _is_png(analysis.plot_filters(setup, run_dir, out_dir=str(tmp_path)))
    assert _is_png(analysis.plot_feature_maps(setup, run_dir, out_dir=str(tmp_path), layers=["encoder-1", "decoder-3"]))


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
        "--train_config", f"['{TRAIN}']",
        "--train_overrides", json.dumps(TINY),
        "--evolution_runs", "['train']",
        "--ri_runs", "['train']",
        "--tl_runs", "['train']",
        "--block_size", "[16,16,16]",
        "--n_blocks", "2",
        "--points_per_channel", "4",
        "--progress", "False",
        "--output_dir", str(out),
    ]
    res = subprocess.run(cmd, cwd=str(root), capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("evolution.csv", "similarity_pairs.csv", "similarity.md", "feature_reuse.csv", "feature_reuse.md",
                 "filter_change.csv"):
        assert (out / name).is_file(), name
    for name in ("evolution.png", "filter_change.png", "filters_train.png", "feature_maps_train.png"):
        assert _is_png(out / name), name
    with open(out / "evolution.csv") as f:
        rows = list(csv.DictReader(f))
    conv = rows[0]["convergence_epoch"]
    assert all(abs(float(r["rsim"]) - 1) < 1e-6 for r in rows if r["epoch"] == conv)
