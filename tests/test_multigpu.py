# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""`configs/multi_gpu_train.json` under `torchrun --nproc_per_node 2` on the CPU (gloo backend).

A test-only overlay makes each rank save its iteration count and its final weights after the run. Checks:
both ranks ran the 2 iterations; their weights are identical although each rank trained on another case
(DistributedDataParallel averaged the gradients); the learning-rate decay rule of both
ranks saw the same, rank-averaged, loss; rank 0 alone logged, wrote TensorBoard
scalars and saved the one checkpoint set (model.pt, the epoch checkpoint, checkpoint_final.pt), which
holds the same weights.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import pytest
import torch

from _ecosystem import BUNDLE_NAMES, BUNDLES_DIR, FIRST_BUNDLE, SMALL, run, tiny_dataset

OVERLAY = {
    "+run": [
        "$torch.save({'iteration': @train#trainer.state.iteration, 'rank': dist.get_rank(), 'world': dist.get_world_size(), "
        "'state': @network.state_dict(), "
        "'decay_window_loss': @checkpointer.save_dict['lr_decay'].rule.window_value()}, "
        "os.path.join(@output_dir, f'rank{dist.get_rank()}.pt'))",
    ]
}


def _scalar_tags(path: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(path)
    ea.Reload()
    return set(ea.Tags()["scalars"])


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path):
    """The first bundle's multi_gpu_train.json (every bundle renders it from the same template)."""
    name = FIRST_BUNDLE
    assert name in BUNDLE_NAMES
    cfg = os.path.join(BUNDLES_DIR, name, "configs")
    if not os.path.isfile(os.path.join(cfg, "multi_gpu_train.json")):
        pytest.fail(f"{name} has no configs/multi_gpu_train.json")
    data = tiny_dataset(str(tmp_path / "ds"), 6)  # split: 2 train, 2 validation, 2 test -> one case of each per rank
    overlay = tmp_path / "rank_markers.json"
    overlay.write_text(json.dumps(OVERLAY), encoding="utf-8")
    logs = tmp_path / "torchrun_logs"
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "--log_dir", str(logs), "--tee", "3",
        "-m", "monai.bundle", "run",
        "--config_file", f"['{cfg}/train.json','{cfg}/multi_gpu_train.json','{overlay}']",
        "--meta_file", f"{cfg}/metadata.json", "--logging_file", f"{cfg}/logging.conf",
        "--bundle_root", str(out), "--dataset_dir", data, "--n_val", "2",
        "--train#trainer#max_epochs", "1", "--iterations_per_epoch", "2", *SMALL,
    ]  # fmt: skip
    work = tmp_path / "cwd"
    work.mkdir()
    run(cmd, cwd=str(work), timeout=600)

    run_dir = out / "runs" / "train"
    ranks = [torch.load(run_dir / f"rank{r}.pt", map_location="cpu") for r in (0, 1)]
    assert [(m["rank"], m["world"], m["iteration"]) for m in ranks] == [(0, 2, 2), (1, 2, 2)]
    # the learning-rate decay sees the loss averaged over the ranks, so both decide alike
    assert ranks[0]["decay_window_loss"] is not None
    assert ranks[0]["decay_window_loss"] == pytest.approx(ranks[1]["decay_window_loss"], abs=1e-7)
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), f"ranks diverged at {k}"
    final = torch.load(run_dir / "checkpoint_final.pt", map_location="cpu")["model"]
    assert all(torch.equal(final[k], v) for k, v in ranks[0]["state"].items())

    # one checkpoint set (the best model, the rolling and the final checkpoint), written by rank 0 alone
    written = sorted(os.path.basename(p) for p in glob.glob(str(run_dir / "*.pt")))
    assert {"model.pt", "checkpoint_final.pt", "rank0.pt", "rank1.pt"} <= set(written), written
    assert all(w.startswith(("checkpoint", "model", "rank")) for w in written), written
    # the event files with scalars all come from one process (rank 1 holds at most empty writers)
    events = glob.glob(str(run_dir / "events.out.tfevents.*"))
    writers = {re.search(r"\.(\d+)\.\d+$", p).group(1) for p in events if _scalar_tags(p)}
    assert len(writers) == 1, events
    assert {"train_loss", "lr", "val_mean_dice"} <= set().union(*(_scalar_tags(p) for p in events))

    rank_logs = {
        int(os.path.basename(os.path.dirname(p))): open(p, encoding="utf-8").read()
        for p in glob.glob(str(logs / "*" / "attempt_0" / "*" / "stdout.log"))
    }
    assert sorted(rank_logs) == [0, 1]
    final_path = str(run_dir / "checkpoint_final.pt")
    assert "Epoch: 1/1, Iter: 2/2" in rank_logs[0] and final_path in rank_logs[0]
    assert "Iter:" not in rank_logs[1] and final_path not in rank_logs[1]
    assert json.loads((run_dir / "datalist.json").read_text(encoding="utf-8"))["n_train"] == 2
    assert not os.listdir(work), "the run wrote into the working directory"
