"""The first bundle's training configs: MONAI property checks and real runs through `python -m monai.bundle run`."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigWorkflow

from common.networks import KarimiFCN
from common.synthetic import make_scenario

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = sorted(glob.glob(os.path.join(ROOT, "bundles", "*", "configs", "train.json")))
LAYERS = ("pretrain.json", "finetune.json", "frozen_encoder.json")


def _train_configs():
    for train in BUNDLES:
        cdir = os.path.dirname(train)
        yield [train]
        for layer in LAYERS:
            if os.path.isfile(os.path.join(cdir, layer)):
                yield [train, os.path.join(cdir, layer)]


@pytest.mark.parametrize("files", list(_train_configs()), ids=lambda f: "+".join(os.path.basename(x) for x in f))
def test_train_configs_pass_monai_property_checks(files, tiny_dataset, tmp_path):
    assert BUNDLES, "no bundle found"
    overrides = {"dataset_dir": tiny_dataset, "bundle_root": str(tmp_path), "block_size": [16, 16, 16]}
    if files[-1].endswith(("finetune.json",)):
        src = tmp_path / "source.pt"
        torch.save(KarimiFCN().state_dict(), src)
        overrides["source_checkpoint"] = str(src)
    wf = ConfigWorkflow(config_file=files, workflow_type="train", logging_file=False, **overrides)
    wf.initialize()  # builds the trainer, so the data must exist
    missing = wf.check_properties()
    assert not missing, missing


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "ct"
    make_scenario("liver_ct", str(d), 4, seed=0, shape=(16, 16, 8), spacing=(2.0, 2.0, 4.0))
    return str(d)


def _run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_pretrain_then_finetune_end_to_end(tmp_path):
    """A 2-epoch pretrain on MR-like phantoms and a 1-epoch fine-tune on CT-like ones, 32^3 blocks, from a
    working directory outside the repository, with the outputs under an overridden bundle_root."""
    make_scenario("liver_mr", str(tmp_path / "mr"), 5, seed=1, shape=(24, 24, 12), spacing=(2.0, 2.0, 4.0))
    make_scenario("liver_ct", str(tmp_path / "ct"), 5, seed=2, shape=(24, 24, 12), spacing=(2.0, 2.0, 4.0))
    cfg = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs")
    work = tmp_path / "cwd"
    work.mkdir()
    out_root = tmp_path / "out"
    common_args = ["--bundle_root", str(out_root), "--block_size", "[32,32,32]", "--iterations_per_epoch", "2"]
    _run(
        ["--config_file", f"['{cfg}/train.json','{cfg}/pretrain.json']", "--dataset_dir", str(tmp_path / "mr"),
         "--train#trainer#max_epochs", "2", *common_args],
        cwd=str(work),
    )
    pre = out_root / "runs" / "pretrain"
    for name in ("model.pt", "checkpoint_final.pt", "datalist.json"):
        assert (pre / name).is_file(), name
    assert glob.glob(str(pre / "events.out.tfevents.*"))
    ckpt = torch.load(pre / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_decay", "trainer"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 4 and ckpt["trainer"]["epoch_length"] == 2  # 2 epochs x 2 iterations
    assert "rule" in ckpt["lr_decay"]
    datalist = json.loads((pre / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) + len(datalist["test"]) == 5

    proc = _run(
        ["--config_file", f"['{cfg}/train.json','{cfg}/finetune.json']", "--dataset_dir", str(tmp_path / "ct"),
         "--train#trainer#max_epochs", "1", *common_args],
        cwd=str(work),
    )
    fin = out_root / "runs" / "finetune"
    assert (fin / "model.pt").is_file() and (fin / "checkpoint_final.pt").is_file()
    log = proc.stdout + proc.stderr
    assert "Loaded source weights from" in log and "Transfer mode finetune" in log
    opt = torch.load(fin / "checkpoint_final.pt", map_location="cpu", weights_only=False)["optimizer"]
    assert opt["param_groups"][0]["lr"] == pytest.approx(5e-5)  # halved for transfer learning
    assert not os.listdir(work), "the run wrote into the working directory"


def test_bad_dataset_fails_before_training(tmp_path):
    cfg = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs")
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"['{cfg}/train.json']",
         "--dataset_dir", str(tmp_path), "--bundle_root", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert f"{tmp_path}/dataset.json not found" in proc.stderr
    assert "Epoch" not in proc.stdout
