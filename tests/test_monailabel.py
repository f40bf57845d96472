# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Bundles in MONAI Label's `monaibundle` app: a real server on 127.0.0.1, one inference and one short training, for
the liver bundle (also through the multi-GPU path) and for the TSC lesion bundle (its own synthetic data).

MONAI Label 0.8.5 lives in its own environment (it needs torchvision, pins numpy < 2 and pydicom < 3), made by
``bash tools/setup_monailabel.sh`` (default ``~/.cache/tlseg/monailabel-venv``). The test uses the interpreter
named by ``TLSEG_MONAILABEL_PY`` or that default, and is skipped when it is missing or cannot import
``monailabel`` and ``common``.

Flow: ``monailabel apps --download --name monaibundle`` (the sample app ships in the wheel, no internet),
a copy of the bundle in ``<app>/model/<name>`` (its configs set to the small test network: ``features=4``,
16^3 blocks, 2 iterations per epoch) with a checkpoint whose head makes every voxel foreground, a datastore
of 4 synthetic NIfTI images with labels in ``labels/final``, and ``monailabel start_server ... --conf
zoo_source ngc --conf sam2 false`` (trainers enabled; nothing is downloaded at start-up). Then
``POST /infer/<name>?image=case_000&output=image`` must return a label NIfTI of the image's shape and
affine, all foreground (the weights really loaded: MONAI Label loads with ``strict=False``, so a key
mismatch would silently give random weights), and ``POST /train/<name>?run_sync=true`` must train one
epoch on the CPU starting from ``models/model.pt``, once in the server process and once through MONAI Label's
multi-GPU path (``force_multi_gpu``: torchrun with ``multi_gpu_train.json``, two gloo ranks on the CPU), and each
training must replace ``models/model.pt`` with its best model (so the infer endpoint serves what was trained).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest
import torch

from common.checkpoints import checkpoint_state_dict

from _ecosystem import FIRST_BUNDLE, ROOT, copy_bundle, free_port, small_network, tiny_dataset

DEFAULT_PY = os.path.join(os.path.expanduser("~"), ".cache", "tlseg", "monailabel-venv", "bin", "python")
ML_PY = os.environ.get("TLSEG_MONAILABEL_PY") or DEFAULT_PY
START_TIMEOUT = 300


def _monailabel_python() -> str:
    if not os.path.isfile(ML_PY):
        pytest.skip(f"no MONAI Label environment at {ML_PY}: run `bash tools/setup_monailabel.sh` (or set TLSEG_MONAILABEL_PY)")
    proc = subprocess.run([ML_PY, "-c", "import monailabel, common"], capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env=_env(ML_PY))  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"{ML_PY} cannot import monailabel and common (run tools/setup_monailabel.sh): {proc.stderr.strip()[-300:]}")
    return ML_PY


def _assert_this_checkout(py: str, cwd: str) -> None:
    """The MONAI Label environment imports whichever ``common`` was installed into it last (an editable install of
    another checkout, a wheel): it must be this checkout's, or the test would check other code. Asked from a
    folder without a ``common/`` (as the server runs), with the server's environment."""
    proc = subprocess.run([py, "-c", "import common, os; print(os.path.realpath(os.path.dirname(common.__file__)))"],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300, env=_env(py), cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported, ours = proc.stdout.strip().splitlines()[-1], os.path.realpath(os.path.join(ROOT, "common"))
    assert imported == ours, (
        f"{py} imports common from {imported}, not from this checkout ({ours}): run `bash tools/setup_monailabel.sh` "
        "from this checkout (or set TLSEG_MONAILABEL_PY to an environment that has it installed)."
    )


def _env(py: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # this checkout's common first, whichever checkout (or wheel) the environment had installed last
    env["PYTHONPATH"] = ROOT
    env["PYTHONUTF8"] = "1"
    env["PATH"] = os.path.dirname(py) + os.pathsep + env.get("PATH", "")  # monailabel's own subprocesses (torchrun, python)
    return env


def _set_small(config_path: str, **values) -> None:
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["network_def"]["features"] = 4
    cfg.update(values)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=4)


def _request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 600) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _assert_published(served: str, best: str, before_inode: int) -> None:
    """The served ``models/model.pt`` was replaced (a new file renamed over it) and holds the run's best model.

    (The MONAI Label test's weights make every voxel foreground with a +100 logit: the softmax is saturated,
    the gradients vanish and training leaves the weights as they were, so the file, not its values, shows
    the replacement there.)"""
    now, best_state = checkpoint_state_dict(served), checkpoint_state_dict(best)
    assert all(torch.equal(now[k], v) for k, v in best_state.items()), "models/model.pt is not the run's best model"
    assert os.stat(served).st_ino != before_inode, "models/model.pt was not replaced"


def _served_labels(bundle_dir: str) -> dict:
    """The labels MONAI Label shows for a bundle: ``metadata.json``'s output ``channel_def`` without the background."""
    with open(os.path.join(bundle_dir, "configs", "metadata.json"), encoding="utf-8") as f:
        meta = json.load(f)
    out = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {name: int(k) for k, name in out.items() if int(k) != 0}


def _datastore(tmp_path, name: str) -> tuple[str, str]:
    """4 synthetic cases of the bundle's own target data (its stand-ins) as a MONAI Label datastore
    (images + ``labels/final``); returns ``(studies folder, the first image's id)``."""
    from common.standins import read_recipe, stand_in_overrides

    if name == FIRST_BUNDLE:
        ds = tiny_dataset(str(tmp_path / "ds"), 4)
    else:
        ds = stand_in_overrides(read_recipe(os.path.join(ROOT, "bundles", name)), "train.json", str(tmp_path / "ds"),
                                shape=(24, 24, 16), spacing=(2.0, 2.0, 3.0))["dataset_dir"]  # fmt: skip
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    images = sorted(os.listdir(os.path.join(ds, "imagesTr")))[:4]
    for f in images:
        shutil.copy(os.path.join(ds, "imagesTr", f), studies)
        shutil.copy(os.path.join(ds, "labelsTr", f), studies / "labels" / "final")
    return str(studies), images[0].split(".")[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", [FIRST_BUNDLE, "tsc_from_brats"])
def test_monailabel_serves_and_trains_the_bundle(tmp_path, name):
    """The organ bundle: infer, train, and train through the multi-GPU path; the lesion bundle (TSC lesions, a
    grouped dataset, lesion metrics): infer and train."""
    py = _monailabel_python()
    _assert_this_checkout(py, str(tmp_path))
    env = _env(py)
    apps = tmp_path / "apps"
    subprocess.run([py, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output", str(apps)],
                   check=True, capture_output=True, encoding="utf-8", errors="replace", timeout=300, env=env, cwd=str(tmp_path))  # fmt: skip
    app = apps / "monaibundle"
    bdir = copy_bundle(str(app / "model" / name), name)
    _set_small(os.path.join(bdir, "configs", "inference.json"), block_size=[16, 16, 16])
    _set_small(os.path.join(bdir, "configs", "train.json"), block_size=[16, 16, 16], iterations_per_epoch=2)
    ckpt = os.path.join(bdir, "models", "model.pt")
    torch.save(small_network(all_foreground=True).state_dict(), ckpt)
    served_before = os.stat(ckpt).st_ino
    studies, first = _datastore(tmp_path, name)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    cmd = [
        py, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", studies,
        "--conf", "models", name, "--conf", "zoo_source", "ngc", "--conf", "sam2", "false",
        "--conf", "preload", "false", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with open(log_path, "w", encoding="utf-8") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
    try:
        deadline = time.time() + START_TIMEOUT
        info = None
        while time.time() < deadline and server.poll() is None:
            try:
                status, body = _request(f"{base}/info/", timeout=10)
                if status == 200:
                    info = json.loads(body)
                    break
            except OSError:
                pass
            time.sleep(2)
        server_log = lambda: log_path.read_text(encoding="utf-8", errors="replace")[-6000:]  # noqa: E731
        assert info is not None, f"server did not start (exit {server.poll()}):\n{server_log()}"
        assert name in info["models"], info["models"]
        assert info["models"][name]["labels"] == _served_labels(bdir)  # metadata.json channel_def, background dropped
        assert name in info["trainers"], "trainer not loaded"

        status, body = _request(f"{base}/infer/{name}?image={first}&output=image", method="POST")
        assert status == 200, f"infer: HTTP {status} {body[:300]!r}\n{server_log()}"
        pred_path = tmp_path / "pred.nii.gz"
        pred_path.write_bytes(body)
        pred, image = nib.load(str(pred_path)), nib.load(os.path.join(studies, f"{first}.nii.gz"))
        assert pred.shape == image.shape[:3]
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
        seg = np.asarray(pred.dataobj)
        assert (seg == 1).mean() > 0.99, f"not the checkpoint's output: {np.unique(seg, return_counts=True)}"

        request = {"max_epochs": 1, "val_split": 0.25, "device": "cpu", "multi_gpu": False, "pretrained": True}
        status, body = _request(f"{base}/train/{name}?run_sync=true", method="POST", body=request, timeout=900)
        assert status == 200, f"train: HTTP {status} {body[:300]!r}\n{server_log()}"
        log_text = log_path.read_text(encoding="utf-8", errors="replace")
        assert f"Restored all variables from {ckpt}" in log_text, server_log()
        assert "Training Finished" in log_text, server_log()
        (run_dir,) = [os.path.join(bdir, "runs", d) for d in os.listdir(os.path.join(bdir, "runs"))]
        final = torch.load(os.path.join(run_dir, "checkpoint_final.pt"), map_location="cpu")
        assert final["trainer"]["iteration"] == 2 and final["trainer"]["max_epochs"] == 1
        assert os.path.isfile(os.path.join(run_dir, "model.pt"))
        _assert_published(ckpt, os.path.join(run_dir, "model.pt"), served_before)
        served_before = os.stat(ckpt).st_ino
        if name != FIRST_BUNDLE:
            return

        # MONAI Label's multi-GPU path, forced on the CPU: torchrun with ['monailabel_train.json',
        # 'multi_gpu_train.json'] (gloo backend on two CPU ranks). Under MONAI Label there is no resume: the
        # run starts again from the served models/model.pt (the one the first training published) and runs
        # both epochs, 4 iterations, in the same run folder.
        request.update(max_epochs=2, multi_gpu=True, force_multi_gpu=True, gpus="0,1")
        status, body = _request(f"{base}/train/{name}?run_sync=true", method="POST", body=request, timeout=900)
        assert status == 200, f"multi-GPU train: HTTP {status} {body[:300]!r}\n{server_log()}"
        log_text = log_path.read_text(encoding="utf-8", errors="replace")
        assert "multi_gpu_train.json" in log_text and "--nproc_per_node=2" in log_text, server_log()
        assert "Return code: 0" in log_text, server_log()
        assert log_text.count("Training Finished") == 2, server_log()
        assert "Epoch: 2/2, Iter: 2/2" in log_text, server_log()
        final = torch.load(os.path.join(run_dir, "checkpoint_final.pt"), map_location="cpu")
        assert final["trainer"]["iteration"] == 4 and final["trainer"]["max_epochs"] == 2
        _assert_published(ckpt, os.path.join(run_dir, "model.pt"), served_before)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)


def test_training_started_by_monailabel_publishes_its_best_model(tmp_path):
    """Without the MONAI Label server: ``MONAI_LABEL_APP_DIR`` in the environment (the server exports its
    settings to the training process) turns resume off and makes the run replace ``models/model.pt`` with its
    best model. Without it, the run leaves ``models/`` alone and a second start resumes (here: finds the run
    finished)."""
    from _ecosystem import SMALL, bundle_cmd, run

    data = tiny_dataset(str(tmp_path / "ds"), 4)
    bdir = copy_bundle(str(tmp_path / FIRST_BUNDLE))
    cfg = os.path.join(bdir, "configs")
    served = os.path.join(bdir, "models", "model.pt")
    torch.save(small_network(seed=3).state_dict(), served)
    before, before_inode = checkpoint_state_dict(served), os.stat(served).st_ino
    cmd = bundle_cmd("run", "--config_file", f"['{cfg}/train.json']", "--bundle_root", bdir, "--dataset_dir", data,
                     "--n_val", "1", "--train#trainer#max_epochs", "1", "--iterations_per_epoch", "2", *SMALL)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}

    run(cmd, cwd=str(tmp_path), env=env)
    best = os.path.join(bdir, "runs", "train", "model.pt")
    assert os.path.isfile(best)
    assert all(torch.equal(checkpoint_state_dict(served)[k], v) for k, v in before.items()), "a plain run changed models/model.pt"
    again = run(cmd, cwd=str(tmp_path), env=env)
    assert "already finished" in again.stdout + again.stderr

    hosted = dict(env, MONAI_LABEL_APP_DIR=str(tmp_path / "app"))
    proc = run(cmd, cwd=str(tmp_path), env=hosted)
    log = proc.stdout + proc.stderr
    assert "already finished" not in log and "Epoch: 1/1, Iter: 2/2" in log
    _assert_published(served, best, before_inode)
    assert any(not torch.equal(checkpoint_state_dict(served)[k], v) for k, v in before.items())  # this run's own weights
    assert not [f for f in os.listdir(os.path.dirname(served)) if f.startswith(".")], "temporary file left in models/"
