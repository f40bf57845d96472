# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""One writer per run folder (common.runs.RunFolderLock), unit by unit and as users meet it: a second identical
training command stops at once naming the holder; after a kill -9 of the first, the rerun takes the stale lock
over and finishes."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest

from _ecosystem import BUNDLES_DIR, FIRST_BUNDLE, SMALL, bundle_cmd, run, tiny_dataset
from common.runs import LOCK_FILE, RunFolderBusy, RunFolderLock


def write_holder(folder, **fields):
    os.makedirs(folder, exist_ok=True)
    holder = {"host": platform.node(), "pid": 1, "pid_start": None, "since": "2026-01-01T00:00:00", "argv": ["x"],
              "token": "t"}  # fmt: skip
    holder.update(fields)
    with open(os.path.join(folder, LOCK_FILE), "w", encoding="utf-8") as f:
        json.dump(holder, f)
    return os.path.join(folder, LOCK_FILE)


def test_a_live_holder_on_this_host_blocks_and_is_named(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_holder(str(tmp_path), pid=sleeper.pid, since="2026-12-01T10:00:00")
        with pytest.raises(RunFolderBusy) as err:
            RunFolderLock(str(tmp_path)).acquire()
        msg = str(err.value)
        assert str(tmp_path) in msg and f"PID {sleeper.pid}" in msg and platform.node() in msg and "2026-12-01T10:00:00" in msg
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same lock file, now that its holder is dead: taken over
    lock = RunFolderLock(str(tmp_path)).acquire()
    with open(os.path.join(tmp_path, LOCK_FILE), encoding="utf-8") as f:
        assert json.load(f)["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(os.path.join(tmp_path, LOCK_FILE))


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path):
    path = write_holder(str(tmp_path), host="node-that-is-not-here", pid=12345)
    with pytest.raises(RunFolderBusy, match="node-that-is-not-here"):
        RunFolderLock(str(tmp_path), stale_after=600).acquire()
    old = time.time() - 601
    os.utime(path, (old, old))  # no heartbeat for longer than stale_after: the node is lost
    lock = RunFolderLock(str(tmp_path), stale_after=600).acquire()
    lock.release()


def test_release_removes_only_its_own_lock_and_the_heartbeat_refreshes(tmp_path):
    lock = RunFolderLock(str(tmp_path), heartbeat=0.2).acquire()
    path = os.path.join(tmp_path, LOCK_FILE)
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.6)
    assert time.time() - os.path.getmtime(path) < 5, "the holder's heartbeat did not refresh the lock"
    write_holder(str(tmp_path), pid=os.getpid() + 1, token="someone-else")  # replaced by hand meanwhile
    lock.release()
    assert os.path.exists(path), "release removed a lock it no longer holds"


@pytest.mark.slow
def test_second_training_command_stops_then_the_rerun_after_kill_9_takes_over(tmp_path):
    data = tiny_dataset(str(tmp_path / "ds"), 4)
    train = os.path.join(BUNDLES_DIR, FIRST_BUNDLE, "configs", "train.json")
    cmd = bundle_cmd("run", "training", "--config_file", train, "--dataset_dir", data, "--bundle_root", str(tmp_path),
                     "--max_epochs", "1", "--iterations_per_epoch", "400", "--checkpoint_interval", "5", *SMALL)  # fmt: skip
    out_dir = tmp_path / "runs" / "train"
    first = subprocess.Popen(cmd, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while not (out_dir / "checkpoint.pt").exists():  # the first run holds the lock and is training
            assert first.poll() is None, "the first run ended early"
            assert time.time() < deadline, "no checkpoint after 900 s"
            time.sleep(0.5)
        t0 = time.time()
        second = run(cmd, cwd=str(tmp_path), check=False, timeout=300)
        assert second.returncode != 0
        last = [line for line in second.stderr.splitlines() if line.strip()][-1]
        assert "The run stopped:" in last and str(out_dir) in last and f"PID {first.pid}" in last, last
        assert first.poll() is None, "the second command disturbed the first"
        assert time.time() - t0 < 120, "the second command did not stop at once"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out_dir / LOCK_FILE).exists(), "kill -9 left no lock (the test would not test the takeover)"
    rerun = run(cmd, cwd=str(tmp_path), timeout=900)
    log = rerun.stdout + rerun.stderr
    assert f"took over the stale lock of host {platform.node()}, PID {first.pid}" in log
    assert "Resumed from" in log
    assert (out_dir / "checkpoint_final.pt").exists() and not (out_dir / LOCK_FILE).exists()
