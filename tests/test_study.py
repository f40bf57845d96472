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


def _fake_run(folder, dice: float, status: str = "completed", failure: dict | None = None, all_empty: bool = False) -> None:
    """A run folder as a study leaves it: run_info.json (status), eval/summary.json (2 test cases), a snapshot
    history of 2 epochs and its curve.csv."""
    os.makedirs(os.path.join(folder, "eval"), exist_ok=True)
    os.makedirs(os.path.join(folder, "snapshots"), exist_ok=True)
    info = {"seed": 0, "status": status, **({"failure": failure} if failure else {})}
    with open(os.path.join(folder, "run_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f)
    summary = {"n_cases": 2, "n_empty_pred": 2 if all_empty else 0, "n_empty_ref": 0,
               "dice": {"mean": dice}, "hd95": {"mean": 5.0}, "assd": {"mean": 1.0}}  # fmt: skip
    with open(os.path.join(folder, "eval", "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f)
    entries = [{"epoch": e, "iteration": 10 * e, "train_seconds": 5.0 * e, "val_seconds": 1.0 * e,
                "val_dice": None if e == 0 else dice, "file": f"epoch_{e:04d}.pt"} for e in range(3)]  # fmt: skip
    with open(os.path.join(folder, "snapshots", "history.json"), "w", encoding="utf-8") as f:
        json.dump({"metric_name": "val_mean_dice", "interval": 1, "entries": entries}, f)
    with open(os.path.join(folder, "curve.csv"), "w", encoding="utf-8") as f:
        f.write("epoch,iteration,train_seconds,val_seconds,val_dice,test_dice\n")
        f.writelines(f"{e['epoch']},{e['iteration']},{e['train_seconds']},{e['val_seconds']},{e['val_dice']},{dice}\n" for e in entries)


def test_a_failed_run_is_listed_apart_and_never_averaged(tmp_path):
    """Four R.I. and four frozen-encoder runs; R.I. seed 1 collapsed (run_info.json), frozen seed 3's model predicts
    nothing on any test case. The report names both as failed with their reasons, and the tables, paired tests and
    findings use the other runs only: the means are the known values of the healthy runs."""
    from common.report import write_report
    from common.study import Job

    bundle = os.path.join(ROOT, "bundles", FIRST_BUNDLE)
    train = os.path.join(bundle, "configs", "train.json")
    settings = StudySettings(bundle_dir=bundle, out_dir=str(tmp_path), seeds=[0, 1, 2, 3], modes=["ri", "frozen"])
    dice = {("ri", 0): 0.90, ("ri", 1): 0.0, ("ri", 2): 0.92, ("ri", 3): 0.94,
            ("frozen", 0): 0.80, ("frozen", 1): 0.84, ("frozen", 2): 0.82, ("frozen", 3): 0.0}  # fmt: skip
    jobs = []
    for (mode, seed), d in dice.items():
        job = Job(f"{mode}_nall_s{seed}", mode, None, seed, [train], {}, str(tmp_path / "runs" / f"{mode}_nall_s{seed}"))
        collapsed = (mode, seed) == ("ri", 1)
        _fake_run(job.run_dir, d, status="collapsed" if collapsed else "completed",
                  failure={"reason": "the gradient vanished", "epoch": 2, "iteration": 120} if collapsed else None,
                  all_empty=(mode, seed) == ("frozen", 3))  # fmt: skip
        jobs.append(job)
    text = open(write_report(settings, jobs, str(tmp_path)), encoding="utf-8").read()
    failed = text.split("## Failed runs", 1)[1].split("\n## ", 1)[0]
    assert "2 of 8 runs failed" in failed
    assert "| ri_nall_s1 | R.I. | all | 1 | collapsed |" in failed and "the gradient vanished" in failed
    assert "| frozen_nall_s3 | frozen random encoder | all | 3 | completed |" in failed
    assert "no foreground in any of the 2 test cases" in failed
    table = text.split("## Test accuracy", 1)[1].split("## Convergence", 1)[0]
    assert "| R.I. | 3 (+1 failed, left out) | 0.920 ± 0.020 |" in table  # mean of 0.90, 0.92, 0.94
    assert "| frozen random encoder | 3 (+1 failed, left out) | 0.820 ± 0.020 |" in table
    assert "| frozen random encoder vs R.I. | -0.100 (n=2," in table  # seeds 0 and 2: the pairs where both trained
    findings = text.split("## The paper's findings", 1)[1]
    assert "Failed runs: 2 of 8 (ri_nall_s1, frozen_nall_s3) are left out" in findings
    assert "DSC frozen - R.I. = -0.100" in findings
    with open(tmp_path / "report" / "runs.csv", encoding="utf-8") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows["ri_nall_s1"]["failed"] == "True" and rows["ri_nall_s0"]["failed"] == "False"
