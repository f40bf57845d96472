# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The study runner (common.study, tools/study.py): a tiny study on the first bundle's synthetic stand-ins, killed
part-way and started again with the same command (finished runs are not redone), through submitit's local executor,
and its bookkeeping under the one-writer rule."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _ecosystem import FIRST_BUNDLE, ROOT, run
from common.runs import LOCK_FILE, RunFolderBusy
from common.study import StudySettings, plan_jobs, run_study

TINY = ["--set", "network_def#features=4", "--set", "block_size=[16,16,16]", "--set", "max_epochs=2",
        "--set", "iterations_per_epoch=2", "--set", "pixdim=[3.0,3.0,3.0]", "--set", "n_val=1"]  # fmt: skip
STUDY = [sys.executable, os.path.join(ROOT, "tools", "study.py"), "run", "--bundle", FIRST_BUNDLE, "--synthetic"]


def _mtimes(root: str) -> dict[str, float]:
    out = {}
    runs = os.path.join(root, "runs")
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        path = os.path.join(runs, name, "checkpoint_final.pt")
        if os.path.isfile(path):
            out[name] = os.path.getmtime(path)
    return out


def _done(root: str) -> list[str]:
    """The jobs the study's own bookkeeping (``study.json``) marks done."""
    try:
        with open(os.path.join(root, "study.json"), encoding="utf-8") as f:
            jobs = json.load(f)["jobs"]
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return []
    return [name for name, job in jobs.items() if job.get("status") == "done"]


@pytest.mark.slow
def test_a_killed_study_resumes_without_redoing_finished_runs_and_reports(tmp_path):
    out = str(tmp_path / "study")
    # two local workers: the parallel path, and a kill -9 that must take the workers and their trainings with it
    cmd = [*STUDY, "--out", out, "--seeds", "0", "1", "--modes", "ri", "tl", "frozen", "--workers", "2", *TINY]
    first = subprocess.Popen(cmd, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace")
    try:
        deadline = time.time() + 900
        while len(_done(out)) < 3:  # the source model and two target runs trained and evaluated
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.5)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    before, done = _mtimes(out), _done(out)  # a run killed while its snapshots were evaluated: trained, not done
    assert set(done) <= set(before)
    proc = run(cmd, cwd=str(tmp_path), timeout=1800)
    assert f"{len(done)} already done (skipped)" in proc.stdout, proc.stdout[-2000:]
    after = _mtimes(out)
    assert all(after[name] == t for name, t in before.items()), "a finished run was trained again"
    state = json.loads(open(os.path.join(out, "study.json"), encoding="utf-8").read())
    jobs = plan_jobs(StudySettings(**state["settings"]))
    assert len(jobs) == 7 and all(state["jobs"][j.name]["status"] == "done" for j in jobs)
    report = open(os.path.join(out, "report", "report.md"), encoding="utf-8").read()
    for label in ("| R.I. | 2 |", "| T.L. | 2 |", "| frozen random encoder | 2 |", "scipy.stats.ttest_rel", "T.L. converges faster"):
        assert label in report, label
    assert os.path.getsize(os.path.join(out, "report", "curves_nall.png")) > 1000
    with open(os.path.join(out, "report", "runs.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["mode"] for r in rows} == {"ri", "tl", "frozen"}
    for job in jobs[1:]:  # every snapshot evaluated on the test split, stamped with iterations and training seconds
        with open(os.path.join(job.run_dir, "curve.csv"), encoding="utf-8") as f:
            curve = list(csv.DictReader(f))
        assert [int(r["epoch"]) for r in curve] == [0, 1, 2]
        assert [int(r["iteration"]) for r in curve] == [0, 2, 4]
        seconds = [float(r["train_seconds"]) for r in curve]
        assert seconds[0] == 0.0 and seconds[1] > 0 and seconds[2] > seconds[1]
        assert all(0.0 <= float(r["test_dice"]) <= 1.0 for r in curve)
    # the same command once more: nothing to do
    again = run(cmd, cwd=str(tmp_path), timeout=900)
    assert "7 already done (skipped)" in again.stdout
    assert _mtimes(out) == after


@pytest.mark.slow
def test_submitit_local_executor_runs_the_study(tmp_path):
    pytest.importorskip("submitit")
    out = str(tmp_path / "study")
    run([*STUDY, "--out", out, "--seeds", "0", "--modes", "ri", "tl", "--analyses", "none", "--executor", "submitit-local",
         *TINY], cwd=str(tmp_path), timeout=1800)  # fmt: skip
    state = json.loads(open(os.path.join(out, "study.json"), encoding="utf-8").read())
    assert {k: v["status"] for k, v in state["jobs"].items()} == {"pretrain": "done", "ri_nall_s0": "done", "tl_nall_s0": "done"}
    assert os.path.isdir(os.path.join(out, "submitit")) and os.path.isfile(os.path.join(out, "report", "report.md"))


def test_the_study_folder_has_one_writer_and_one_set_of_settings(tmp_path):
    bundle = os.path.join(ROOT, "bundles", FIRST_BUNDLE)
    settings = StudySettings(bundle_dir=bundle, out_dir=str(tmp_path), seeds=[0])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import platform

        with open(os.path.join(tmp_path, LOCK_FILE), "w", encoding="utf-8") as f:
            json.dump({"host": platform.node(), "pid": sleeper.pid, "since": "2026-12-02T08:00:00", "token": "x"}, f)
        with pytest.raises(RunFolderBusy, match=f"Study folder {tmp_path} is in use by host .*PID {sleeper.pid}"):
            run_study(settings)
    finally:
        sleeper.kill()
        sleeper.wait()
    os.unlink(os.path.join(tmp_path, LOCK_FILE))
    with open(os.path.join(tmp_path, "study.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": {"seeds": [5]}, "jobs": {}}, f)
    with pytest.raises(ValueError, match="records a study with other settings"):
        run_study(settings)


def test_the_analyses_see_the_images_the_runs_were_trained_on(tmp_path, monkeypatch):
    """The report's analyses build their preprocessing from the study's overrides: a quick study's CT window and
    voxel size must reach it (a network trained on one CT window and probed on another reads other images)."""
    import torch
    from monai.bundle import ConfigParser

    import common.analysis
    import common.capture
    from common import report
    from common.study import Job
    from common.synthetic import PhantomSpec, make_dataset

    data = make_dataset(str(tmp_path / "ct"), 1, PhantomSpec(modality="CT", shape=(24, 24, 12)), seed=0)
    with open(os.path.join(data, "dataset.json"), encoding="utf-8") as f:
        case = {k: os.path.join(data, v) for k, v in json.load(f)["training"][0].items()}
    bundle = os.path.join(ROOT, "bundles", FIRST_BUNDLE)
    train = os.path.join(bundle, "configs", "train.json")
    settings = StudySettings(bundle_dir=bundle, out_dir=str(tmp_path), seeds=[0],
                             overrides={"ct_window": [-160.0, 240.0], "base_lr": 3e-4, "block_size": [16, 16, 16]},
                             target={"pixdim": [3.0, 3.0, 3.0], "dataset_dir": data})  # fmt: skip
    jobs = [Job(f"{m}_s0", m, None, 0, [train], {}, str(tmp_path / m)) for m in ("ri", "tl")]
    seen = {}
    monkeypatch.setattr(common.capture, "make_setup", lambda files, overrides, **kw: seen.update(files=files, overrides=overrides))
    monkeypatch.setattr(common.analysis, "run_analyses", lambda *a, **kw: {})
    report._analysis_results(settings, jobs, str(tmp_path))

    def preprocessed(overrides):
        parser = ConfigParser()
        parser.read_config(seen["files"])
        parser.update(overrides)
        return torch.as_tensor(parser.get_parsed_content("preprocessing")(dict(case))["image"])

    trained_on = preprocessed({**settings.overrides, **settings.target})
    assert torch.equal(preprocessed(seen["overrides"]), trained_on)
    assert not torch.equal(preprocessed({}), trained_on)  # the bundle's defaults would show other images
    assert "base_lr" not in seen["overrides"]  # training-only settings stay out
