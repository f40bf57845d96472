# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The bundles' training configs: MONAI property checks and real runs through `python -m monai.bundle run`
(the paper's FCN at ``features=4`` and 16^3 blocks: the same configs, a fraction of the cost)."""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigWorkflow

from common.networks import KarimiFCN, VNet
from common.synthetic import make_scenario

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST = "liver_ct_from_liver_mri"
CFG = os.path.join(ROOT, "bundles", FIRST, "configs")
#: complete workflows and overlays that are not training variants (checked by tests/test_bundles.py and others)
NOT_LAYERS = {"train.json", "inference.json", "evaluate.json", "rsim.json", "metadata.json", "multi_gpu_train.json",
              "progress_bar.json"}  # fmt: skip
LAYERS = sorted(f for f in os.listdir(CFG) if f.endswith(".json") and f not in NOT_LAYERS)


def _train_configs():
    yield ["train.json"]
    for layer in LAYERS:
        yield ["train.json", layer]


@pytest.mark.parametrize("files", list(_train_configs()), ids=lambda f: "+".join(f))
def test_train_configs_pass_monai_property_checks(files, tiny_dataset, tmp_path):
    """The first bundle's train.json and every training variant layered on it (pretrain, the transfer modes,
    V-Net) build their trainer on a tiny dataset and pass MONAI's train-workflow property checks (every bundle's
    plain train.json: tests/test_bundles.py)."""
    assert "pretrain.json" in LAYERS and "finetune.json" in LAYERS, LAYERS
    paths = [os.path.join(CFG, f) for f in files]
    layer = {}
    for path in paths[1:]:
        with open(path, encoding="utf-8") as f:
            layer.update(json.load(f))
    overrides = {"dataset_dir": tiny_dataset, "bundle_root": str(tmp_path), "block_size": [16, 16, 16]}
    vnet = "VNet" in str(layer.get("network_def", {}).get("_target_", ""))
    if not vnet:
        overrides["network_def#features"] = 4  # the FCN at 4 features (V-Net has no such argument)
    if "source_checkpoint" in layer:
        src = tmp_path / "source.pt"
        torch.save((VNet() if vnet else KarimiFCN(features=4)).state_dict(), src)
        overrides["source_checkpoint"] = str(src)
    wf = ConfigWorkflow(config_file=paths, workflow_type="train", logging_file=False, **overrides)
    wf.initialize()  # builds the trainer, so the data must exist
    missing = wf.check_properties()
    assert not missing, missing
    # MONAI's check and MONAI Label's trainer read every entry of train#handlers as a dict (a "@id" string there
    # breaks both)
    assert all(isinstance(h, dict) for h in wf.parser["train#handlers"]), wf.parser["train#handlers"]
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert type(trainer.network).__name__ == ("VNet" if vnet else "KarimiFCN")
    mode = wf.parser.get_parsed_content("transfer_mode")
    assert mode == layer.get("transfer_mode", "scratch")
    frozen = sum(not p.requires_grad for p in trainer.network.parameters())
    assert (frozen > 0) == (mode not in ("scratch", "finetune")), (mode, frozen)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "ct"
    make_scenario("liver_ct", str(d), 4, seed=0, shape=(16, 16, 8), spacing=(2.0, 2.0, 4.0))
    return str(d)


def _run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny networks: one thread (more only spin on a shared machine)
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=900,
        env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_pretrain_then_finetune_end_to_end(tmp_path):
    """A 2-epoch pretrain on MR-like phantoms and a 1-epoch fine-tune on CT-like ones (the network at 4 features,
    16^3 blocks), from a working directory outside the repository, with the outputs under an overridden
    bundle_root."""
    make_scenario("liver_mr", str(tmp_path / "mr"), 5, seed=1, shape=(24, 24, 12), spacing=(2.0, 2.0, 4.0))
    make_scenario("liver_ct", str(tmp_path / "ct"), 5, seed=2, shape=(24, 24, 12), spacing=(2.0, 2.0, 4.0))
    cfg = CFG
    work = tmp_path / "cwd"
    work.mkdir()
    out_root = tmp_path / "out"
    common_args = ["--bundle_root", str(out_root), "--block_size", "[16,16,16]", "--network_def#features", "4",
                   "--iterations_per_epoch", "2"]  # fmt: skip
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
    assert {"model", "optimizer", "lr_decay", "trainer", "best_model", "rng"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 4 and ckpt["trainer"]["epoch_length"] == 2  # 2 epochs x 2 iterations
    assert "rule" in ckpt["lr_decay"]
    datalist = json.loads((pre / "datalist.json").read_text(encoding="utf-8"))
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
    # halved for transfer learning, and 2 of the warm-up's steps done: (1/W + (1 - 1/W) 2/W) of it (no decay yet)
    w = json.loads(open(f"{cfg}/train.json", encoding="utf-8").read())["lr_warmup_iterations"]
    assert opt["param_groups"][0]["lr"] == pytest.approx(5e-5 * (1 / w + (1 - 1 / w) * 2 / w), rel=1e-9)
    source = torch.load(pre / "model.pt", map_location="cpu", weights_only=True)
    first = torch.load(fin / "snapshots" / "epoch_0000.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(first[k], v) for k, v in source.items()), "the fine-tune did not start from the source"
    assert not os.listdir(work), "the run wrote into the working directory"


def test_bad_dataset_fails_before_training(tmp_path, caplog):
    """A folder without dataset.json: train.json stops before any training iteration, naming the file (in-process;
    tests/test_bundles.py checks the reason in the last line of a failed ``python -m monai.bundle run``)."""
    wf = ConfigWorkflow(config_file=os.path.join(CFG, "train.json"), workflow_type=None, logging_file=False,
                        dataset_dir=str(tmp_path), bundle_root=str(tmp_path))  # fmt: skip
    with caplog.at_level(logging.INFO), pytest.raises(Exception) as err:
        wf.initialize()
        wf.run()
    cause = err.value
    while cause.__cause__ or cause.__context__:  # MONAI wraps it in RuntimeErrors
        cause = cause.__cause__ or cause.__context__
    assert type(cause).__name__ == "DataError" and f"{tmp_path}/dataset.json not found" in str(cause), cause
    assert "Engine run" not in caplog.text  # ignite's "Engine run starting/resuming": no training ran
    assert not (tmp_path / "runs" / "train" / "checkpoint.pt").exists()
