# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Tracking and feedback of a training run: TensorBoard events, MLflow tracking, the progress bar, and the
learning rate with its decay events.

One short run (1 epoch of 3 iterations) of ``train.json`` + ``progress_bar.json`` with
``--tracking mlflow --tracking_uri sqlite:///...`` (when mlflow is installed: ``pip install -e .[tracking]``).
MONAI 1.6's MLFlowHandler refuses ``file://`` URIs (MLflow >= 3.13 dropped the file store), so the local
store is a SQLite database. A test-only overlay makes the decay rule see a constant loss, so with
``lr_decay_interval=1`` (and no warm-up) the learning rate decays at iterations 2 and 3, deterministically.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re

import pytest
import torch

from _ecosystem import FIRST_BUNDLE, BUNDLES_DIR, SMALL, bundle_cmd, run, tiny_dataset

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
BASE_LR, FACTOR = 1e-4, 0.5
CONSTANT_LOSS_OVERLAY = {  # MONAI's ConfigWorkflow runs an "initialize" id, when there is one, before "run"
    "initialize": ["$setattr(@checkpointer.save_dict['lr_decay'], 'output_transform', lambda output: 1.0)"]
}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    cfg = os.path.join(BUNDLES_DIR, FIRST_BUNDLE, "configs")
    data = tiny_dataset(str(tmp / "ds"), 4)
    overlay = tmp / "constant_loss.json"
    overlay.write_text(json.dumps(CONSTANT_LOSS_OVERLAY), encoding="utf-8")
    out = tmp / "out"
    args = [
        "run", "--config_file", f"['{cfg}/train.json','{cfg}/progress_bar.json','{overlay}']",
        "--meta_file", f"{cfg}/metadata.json", "--logging_file", f"{cfg}/logging.conf",
        "--bundle_root", str(out), "--dataset_dir", data, "--n_val", "1",
        "--train#trainer#max_epochs", "1", "--iterations_per_epoch", "3",
        "--base_lr", str(BASE_LR), "--lr_warmup_iterations", "0", "--lr_decay_interval", "1",
        "--lr_decay_factor", str(FACTOR), *SMALL,
    ]  # fmt: skip
    db = tmp / "mlflow" / "mlruns.db"
    if HAS_MLFLOW:
        db.parent.mkdir()
        args += ["--tracking", "mlflow", "--tracking_uri", f"sqlite:///{db}", "--experiment_name", "tlseg_tracking_test"]
    work = tmp / "cwd"
    work.mkdir()
    proc = run(bundle_cmd(*args), cwd=str(work), timeout=600)
    return {"proc": proc, "run_dir": out / "runs" / "train", "db": db}


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(str(run_dir / "events.out.tfevents.*"))):
        ea = EventAccumulator(path)
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
    return found


@pytest.mark.slow
def test_tensorboard_events(tracked_run):
    scalars = _scalars(tracked_run["run_dir"])
    assert [s for s, _ in scalars["train_loss"]] == [1, 2, 3]  # every iteration
    assert [s for s, _ in scalars["val_mean_dice"]] == [1]  # every epoch
    assert [s for s, _ in scalars["train_mean_dice"]] == [1]


@pytest.mark.slow
def test_learning_rate_and_decays_are_logged(tracked_run):
    log = tracked_run["proc"].stdout + tracked_run["proc"].stderr
    decays = re.findall(r"Iteration (\d+): monitored loss did not improve .*; learning rate ([\d.e-]+\d) -> ([\d.e-]+\d)", log)
    assert [int(d[0]) for d in decays] == [2, 3], decays
    assert float(decays[-1][2]) == pytest.approx(BASE_LR * FACTOR**2, rel=5e-3)  # logged with %.3g
    lr = _scalars(tracked_run["run_dir"])["lr"]  # PlateauDecay's engine.state.metrics["lr"], per epoch
    assert [s for s, _ in lr] == [1]
    assert lr[0][1] == pytest.approx(BASE_LR * FACTOR**2, rel=1e-6)  # TensorBoard keeps float32 (6e-8)
    assert re.search(r"Epoch\[1\] Metrics -- .*lr: ", log)  # StatsHandler's epoch summary
    # the decay state is checkpointed (train.json's checkpointer finds the PlateauDecay among train#handlers)
    ckpt = torch.load(tracked_run["run_dir"] / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert ckpt["lr_decay"]["decays"] == 2
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == BASE_LR * FACTOR**2  # two exact halvings


@pytest.mark.slow
def test_progress_bar(tracked_run):
    err = tracked_run["proc"].stderr
    assert re.search(r"\[3/3\] 100%\|", err), err[-2000:]  # ignite's ProgressBar (tqdm) on stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install -e .[tracking])")
def test_mlflow_run_recorded(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run['db']}")
    exp = client.get_experiment_by_name("tlseg_tracking_test")
    assert exp is not None
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "train"
    assert {"train_loss", "lr", "train_mean_dice", "val_mean_dice"} <= set(r.data.metrics)
    assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 3
    assert r.data.metrics["lr"] == pytest.approx(BASE_LR * FACTOR**2, rel=1e-6)
    assert r.data.params.get("max_epochs") == "1"
    artifacts = [a.path for a in client.list_artifacts(r.info.run_id)]
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts), artifacts
