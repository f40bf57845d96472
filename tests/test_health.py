# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Training health (common.health): a run whose network is in the saturated state stops, names itself failed in its
log, its run_info.json, its evaluation summary and the study report; a healthy run does not trip the detector.

The collapsed state is made by hand, a known answer: the paper's FCN (``features=4``) with its head weights zero and
its head bias (+1e4, -1e4) gives the logit margin 2e4 on every voxel, so the softmax is exactly (1, 0) in float32,
the soft Dice's gradient is exactly zero, and Adam cannot move any weight (its update is m / (sqrt(v) + eps) with
m = v = 0). The collapsed test trains with ``logit_range_limit=0`` (the paper's loss alone): the bundles' default
logit bound (``common.losses.LogitRangeBound``) gives such a network a gradient back, and it is not stalled."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from _ecosystem import ROOT, tiny_dataset
from common.health import TrainingHealth, constant_prediction, gradient_norm
from common.networks import KarimiFCN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs")
F = 4


def _saturated_network() -> KarimiFCN:
    torch.manual_seed(0)
    net = KarimiFCN(features=F)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([1e4, -1e4]))
    return net


def _train(tmp_path, network, data, max_epochs=10, iterations=4, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=os.path.join(CONFIGS, "train.json"), workflow_type="train", logging_file=False,
        bundle_root=str(tmp_path), dataset_dir=data, n_val=1, iterations_per_epoch=iterations, max_epochs=max_epochs,
        block_size=[16, 16, 16], health_patience=5, checkpoint_interval=2, save_snapshots=False,
        **{"network_def": network, "device": "$torch.device('cpu')", **overrides},
    )  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    run = tmp_path / "runs" / "train"
    info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
    final = torch.load(run / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    return run, info, final


def test_gradient_norm_and_constant_prediction_known_values():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([a, b])
    assert gradient_norm(opt) is None  # no gradient yet
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([4.0])
    assert gradient_norm(opt) == pytest.approx(5.0, rel=1e-6)
    onehot = torch.zeros(2, 4, 4, 4)
    onehot[0] = 1
    assert constant_prediction(onehot) == "background"
    onehot[0, 1, 1, 1], onehot[1, 1, 1, 1] = 0, 1
    assert constant_prediction(onehot) is None
    onehot[1] = 1
    onehot[0] = 0
    assert constant_prediction(onehot) == "foreground"
    assert constant_prediction(torch.zeros(1, 3, 3, 3)) == "background"  # a label map


def test_health_arguments_are_checked():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    for kwargs, msg in (({"patience": 0}, "patience"), ({"grad_floor": -1.0}, "grad_floor"),
                        ({"stalled_fraction": 0.0}, "stalled_fraction")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            TrainingHealth("x", opt, **kwargs)


def test_a_saturated_network_is_stopped_named_collapsed_and_stays_so(tmp_path, caplog):
    net = _saturated_network()
    x = torch.rand(1, 1, 16, 16, 16)
    p = torch.softmax(net.eval()(x), dim=1)
    assert float(p[:, 1].max()) == 0.0  # the premise: the foreground probability underflows to exactly 0
    data = tiny_dataset(tmp_path / "ds", 4)
    with caplog.at_level(logging.WARNING, logger="common.health"):
        run, info, final = _train(tmp_path, net, data, logit_range_limit=0)  # the paper's loss alone
    assert info["status"] == "collapsed", info
    failure = info["failure"]
    # the fifth batch holding foreground is the first that can fill the window of 5; 40 iterations were asked for
    assert 5 <= failure["iteration"] < 40, failure
    assert final["trainer"]["iteration"] == failure["iteration"]  # it stopped right there
    assert "every voxel" in failure["reason"] and "background" in failure["reason"], failure["reason"]
    assert f"Run {run} COLLAPSED at epoch {failure['epoch']}, iteration {failure['iteration']}" in caplog.text
    assert final["health"]["status"] == "collapsed"
    # the same command again: it says that the run failed, and does not train it on
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.health"):
        _, info2, final2 = _train(tmp_path, _saturated_network(), data, logit_range_limit=0)
    assert info2["status"] == "collapsed" and info2["failure"] == failure
    assert final2["trainer"]["iteration"] == failure["iteration"]
    assert "collapsed earlier" in caplog.text and "Not training it on" in caplog.text
    # the evaluation summary records the training status of the checkpoint's run
    from monai.bundle import ConfigWorkflow

    ev = ConfigWorkflow(config_file=[os.path.join(CONFIGS, "train.json"), os.path.join(CONFIGS, "evaluate.json")],
                        workflow_type=None, logging_file=False, bundle_root=str(tmp_path), dataset_dir=data, n_val=1,
                        block_size=[16, 16, 16], **{"network_def#features": F, "device": "$torch.device('cpu')"})  # fmt: skip
    ev.initialize()
    ev.run()
    summary = json.loads((run / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert summary["training"] == {"status": "collapsed", "failure": failure}


def test_a_healthy_run_is_completed_and_a_nan_loss_is_diverged(tmp_path):
    data = tiny_dataset(tmp_path / "ds", 4)
    torch.manual_seed(0)
    _, info, final = _train(tmp_path / "ok", KarimiFCN(features=F), data, max_epochs=3)
    assert info["status"] == "completed" and "failure" not in info, info
    assert final["trainer"]["iteration"] == 12 and final["health"]["status"] == "completed"
    broken = KarimiFCN(features=F)
    with torch.no_grad():
        broken.head.bias[0] = float("nan")
    _, info, final = _train(tmp_path / "nan", broken, data)
    assert info["status"] == "diverged" and info["failure"]["iteration"] == 1, info
    assert "nan" in info["failure"]["reason"]
