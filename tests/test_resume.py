# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Reliability of training runs: kill-and-resume (to the same weights as an uninterrupted run), finished runs,
extension, the best model kept across a resume, reproducibility, atomic writes."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.checkpoints import AtomicCheckpointSaver, RNGState, TrainingCheckpointer, checkpoint_state_dict
from common.io import atomic_torch_save, atomic_write
from common.synthetic import make_scenario

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume") / "ct"
    make_scenario("liver_ct", str(d), 5, seed=0, shape=(16, 16, 8), spacing=(2.0, 2.0, 4.0))
    return str(d)


def _cmd(data: str, root: str, epochs: int, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"['{CFG}/train.json']",
            "--dataset_dir", data, "--bundle_root", root, "--block_size", "[16,16,16]",
            "--network_def#features", "4", "--iterations_per_epoch", "4", "--train#trainer#max_epochs", str(epochs),
            "--checkpoint_interval", "2", "--seed", "7", *(extra or [])]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")  # tiny networks: one thread (more only spin on a shared machine)


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _run_in_process(data: str, root: str, epochs: int, caplog) -> str:
    """``_cmd``'s run in this process (``ConfigWorkflow``); returns the log of the propagating loggers."""
    from monai.bundle import ConfigWorkflow

    caplog.clear()
    with caplog.at_level(logging.INFO):
        wf = ConfigWorkflow(
            config_file=os.path.join(CFG, "train.json"), workflow_type=None, logging_file=False, dataset_dir=data,
            bundle_root=root, block_size=[16, 16, 16], iterations_per_epoch=4, max_epochs=epochs,
            checkpoint_interval=2, seed=7, **{"network_def#features": 4},
        )  # fmt: skip
        wf.initialize()
        wf.run()
        wf.finalize()
    return caplog.text


def _iteration(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["trainer"]["iteration"])


def _final_model(root: str) -> dict:
    path = os.path.join(root, "runs", "train", "checkpoint_final.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The reference: the same command as the killed run below (seed 7, 4 epochs of 4 iterations), never stopped."""
    root = str(tmp_path_factory.mktemp("uninterrupted"))
    log = _run(_cmd(data, root, epochs=4))
    return root, log


def test_kill_mid_epoch_then_resume_finish_and_extend(data, uninterrupted, tmp_path, caplog):
    root = str(tmp_path / "run")
    out = os.path.join(root, "runs", "train")
    ckpt = os.path.join(out, "checkpoint.pt")
    cmd = _cmd(data, root, epochs=4)
    log_path = tmp_path / "first.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.time() + 400
        # kill in the middle of epoch 2 (iterations 5..8), once a checkpoint past iteration 4 exists
        while time.time() < deadline and proc.poll() is None:
            text = log_path.read_text(encoding="utf-8")
            done = [int(e) * 4 - 4 + int(i) for e, i in re.findall(r"Epoch: (\d+)/\d+, Iter: (\d+)/4", text)]
            if os.path.isfile(ckpt) and done and max(done) >= 6:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    text = log_path.read_text(encoding="utf-8")
    done = [int(e) * 4 - 4 + int(i) for e, i in re.findall(r"Epoch: (\d+)/\d+, Iter: (\d+)/4", text)]
    assert done and max(done) < 16, "the run finished before it could be killed"
    killed_at = max(done)
    saved_at = _iteration(ckpt)  # never truncated: the write is atomic
    assert 0 < saved_at <= killed_at
    # a kill during a write may leave a hidden temporary file (never loaded); the next start removes it

    log2 = _run(cmd)
    m = re.search(r"Resumed from .*checkpoint\.pt at iteration (\d+)", log2)
    assert m, log2[-3000:]
    resumed = int(m.group(1))
    assert resumed == saved_at
    assert killed_at - resumed <= 2 + 1  # at most the checkpoint interval (+ the iteration being run when killed)
    assert _iteration(os.path.join(out, "checkpoint_final.pt")) == 16
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # killed and resumed, the run ends with the weights of the uninterrupted run of the same seed: the checkpoint
    # restores model, optimizer, decay, counters and every random generator. (Here the checkpoints, every 2
    # iterations, fall where the data loader starts a new pass over the 2 training cases; a checkpoint in the
    # middle of a pass would resume with a fresh shuffle, not the one the killed run was drawing from.)
    reference = _final_model(uninterrupted[0])
    resumed_model = _final_model(root)
    assert reference.keys() == resumed_model.keys()
    for k in reference:
        assert torch.equal(resumed_model[k], reference[k]), k
    first_new = min(int(e) * 4 - 4 + int(i) for e, i in re.findall(r"Epoch: (\d+)/\d+, Iter: (\d+)/4", log2))
    assert first_new == resumed + 1

    # started again (in-process from here on): says so and does nothing
    final = os.path.join(out, "checkpoint_final.pt")
    before = open(final, "rb").read()
    log3 = _run_in_process(data, root, 4, caplog)
    assert "already finished" in log3 and "Engine run" not in log3  # ignite's "Engine run starting/resuming"
    assert open(final, "rb").read() == before

    # more epochs asked: extends the run from iteration 16 to 20
    log4 = _run_in_process(data, root, 5, caplog)
    assert "at iteration 16" in log4 and "Engine run resuming from iteration 16" in log4
    assert _iteration(final) == 20


def test_same_seed_gives_bit_identical_weights_and_a_run_record(data, uninterrupted, tmp_path):
    roots = [uninterrupted[0], str(tmp_path / "again")]
    _run(_cmd(data, roots[1], epochs=4))
    states = []
    for root in roots:
        out = os.path.join(root, "runs", "train")
        states.append(_final_model(root))
        info = json.loads(open(os.path.join(out, "run_info.json"), encoding="utf-8").read())
        assert info["seed"] == 7 and info["versions"]["torch"] == torch.__version__
        assert os.path.isfile(os.path.join(out, "configs", "train.json"))
        assert os.path.isfile(os.path.join(out, "datalist.json"))
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    first = torch.load(os.path.join(roots[0], "runs", "train", "snapshots", "epoch_0000.pt"), weights_only=True)
    assert any(not torch.equal(first[k], states[0][k]) for k in first), "training changed no weight"


class ConstantInferer:
    """Stands in for the validation's sliding window: every voxel foreground (validation DSC 2|R| / (|R| + N) > 0)
    or every voxel background (DSC 0), whatever the network."""

    def __init__(self, foreground: bool) -> None:
        self.foreground = foreground

    def __call__(self, inputs, network, *args, **kwargs):
        logit = torch.full_like(inputs, 10.0 if self.foreground else -10.0)
        return torch.cat([torch.zeros_like(inputs), logit], dim=1)


def test_resumed_run_keeps_its_best_model(data, tmp_path):
    """A run validated at DSC d > 0 (epochs 1-2) is resumed for a third epoch whose validation is 0 by
    construction: ``model.pt`` must stay the epoch-1 file (the best-model tracker is restored with the checkpoint;
    a fresh tracker takes its first validation as the best and overwrites it, as the last run, started over
    with ``resume`` off and another seed, shows)."""
    from monai.bundle import ConfigWorkflow

    root = tmp_path / "run"
    model = root / "runs" / "train" / "model.pt"

    def train(epochs: int, foreground: bool, seed: int = 7, **extra) -> None:
        wf = ConfigWorkflow(
            config_file=os.path.join(CFG, "train.json"), workflow_type=None, logging_file=False,
            bundle_root=str(root), dataset_dir=data, block_size=[16, 16, 16], iterations_per_epoch=2,
            max_epochs=epochs, seed=seed, device="$torch.device('cpu')",
            **{"network_def#features": 4, "validate#inferer": ConstantInferer(foreground)}, **extra,
        )  # fmt: skip
        wf.initialize()
        wf.run()
        wf.finalize()

    train(2, foreground=True)
    history = json.loads((root / "runs" / "train" / "snapshots" / "history.json").read_text(encoding="utf-8"))["entries"]
    dsc = [e["val_dice"] for e in history if e["epoch"] > 0]
    assert dsc[0] > 0 and dsc[1] == dsc[0], dsc  # epoch 1 is the best (a tie does not replace it)
    best = model.read_bytes()
    epoch1 = torch.load(root / "runs" / "train" / "snapshots" / "epoch_0001.pt", weights_only=True)
    saved = checkpoint_state_dict(str(model))
    assert all(torch.equal(saved[k], v) for k, v in epoch1.items())  # model.pt = the weights validated at epoch 1
    train(3, foreground=False)  # resumed at iteration 4: epoch 3 trains the weights further, validates at DSC 0
    final = torch.load(root / "runs" / "train" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 6
    history = json.loads((root / "runs" / "train" / "snapshots" / "history.json").read_text(encoding="utf-8"))["entries"]
    assert [e["val_dice"] for e in history if e["epoch"] == 3] == [0.0]
    assert model.read_bytes() == best, "a worse model after the resume replaced model.pt"
    # control: started over (another seed: other weights), a fresh tracker saves its first validation, DSC 0
    train(1, foreground=False, seed=8, resume=False)
    assert model.read_bytes() != best


def test_atomic_write_leaves_old_file_when_the_disk_fills(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"a": torch.ones(3)}, str(path))
    old = path.read_bytes()

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"Cannot write .*checkpoint\.pt: No space left on device"):
        atomic_write(str(path), full_disk)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_best_model_file_is_never_missing_or_partial(tmp_path, monkeypatch):
    """``AtomicCheckpointSaver`` (the bundles' best-model saver): each new best replaces ``model.pt`` by a
    rename, the old file is never deleted first (MONAI's saver deletes it, then writes in place), and a
    write that fails half-way leaves the previous best untouched and no temporary file."""
    from ignite.engine import Engine, Events

    net = torch.nn.Linear(2, 1)
    scores = iter([0.2, 0.5, 0.9, 0.3])
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _score(engine):  # registered before the saver, like MONAI's metrics
        engine.state.metrics = {"val_mean_dice": next(scores)}
        engine.state.key_metric_name = "val_mean_dice"

    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_filename="model.pt").attach(evaluator)
    path = tmp_path / "model.pt"
    removed = []
    real_remove = os.remove
    monkeypatch.setattr(os, "remove", lambda p, *a, **k: (removed.append(str(p)), real_remove(p, *a, **k)))

    for weight in (1.0, 2.0):  # scores 0.2 then 0.5: two new bests
        with torch.no_grad():
            net.weight.fill_(weight)
        evaluator.run([0], max_epochs=1)
        assert torch.load(path, weights_only=True)["weight"].eq(weight).all()
    assert removed == []
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600

    # score 0.9, a new best, but the disk fills during the write: model.pt keeps weight 2
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with torch.no_grad():
        net.weight.fill_(3.0)
    with pytest.raises(OSError, match=r"Cannot write .*model\.pt"):
        evaluator.run([0], max_epochs=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["weight"].eq(2.0).all()
    assert os.listdir(tmp_path) == ["model.pt"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_rng_state_round_trip_restores_every_generator():
    import random

    import numpy as np
    from monai.transforms import Compose, RandGaussianNoised

    # RandGaussianNoised draws its noise from an inner RandGaussianNoise generator: it must be restored too
    t = Compose([RandGaussianNoised(keys="image", prob=1.0)])
    t.set_random_state(3)
    rng = RNGState(t)
    state = rng.state_dict()
    x = {"image": torch.zeros(1, 4, 4, 4)}
    draws = (torch.rand(2), np.random.rand(2), random.random(), t(dict(x))["image"])
    rng.load_state_dict(state)
    again = (torch.rand(2), np.random.rand(2), random.random(), t(dict(x))["image"])
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2] and torch.equal(draws[3], again[3]) and draws[3].abs().sum() > 0


def test_checkpointer_skips_an_unreadable_checkpoint(tmp_path, caplog):
    from ignite.engine import Engine

    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs, engine.state.epoch_length = 2, 3
    good = TrainingCheckpointer(str(tmp_path), {"model": net, "trainer": engine})
    atomic_torch_save({"model": net.state_dict(), "trainer": {"iteration": 3, "epoch_length": 3, "max_epochs": 2},
                       "rng": RNGState().state_dict()}, good.final_path)
    time.sleep(0.01)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")  # newer but unreadable
    assert good.load_latest(engine) == good.final_path
    assert engine.state.iteration == 3 and not good.finished
    assert "Cannot read checkpoint" in caplog.text
