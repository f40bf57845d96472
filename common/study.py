# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The study runner: the paper's comparisons for one scenario bundle, in one resumable command.

A study (``tools/study.py run``) trains, for every training-set size ``n_train`` and every seed, the modes asked
for (R.I. from scratch, T.L. by fine-tuning one source model, the frozen random encoder, the partial fine-tuning
modes) with the bundle's own configs, evaluates each run on its test split, evaluates every weight snapshot on
the test split for the accuracy-against-time curves, runs the representation analyses across the runs, and
writes a report folder (:mod:`common.report`). Runs of the same (size, seed) share the split and the seed, so the
modes are paired.

Layout of a study folder::

    study.json              the plan and settings, and the state of every job (the study's own bookkeeping)
    runs/pretrain/          the source model (unless a checkpoint is given)
    runs/<mode>_n<size>_s<seed>/   one run folder per job (run_info.json, model.pt, snapshots/, eval/, curve.csv)
    logs/<job>.log          each training command's output
    analysis/               the representation analyses (common.analysis)
    report/                 report.md and the PNG figures

Each job is one training command, ``python -m monai.bundle run training --config_file [...]`` with the study's
overrides (the command a user would type, so a job behaves as a bundle run: atomic checkpoints, resume, one
writer per run folder), then the evaluation of its best model and of its snapshots (:func:`evaluate_run`,
in-process, with the bundle's ``evaluate.json``). A study killed at any moment and started again with the same
command skips the finished jobs (their outputs are there: ``checkpoint_final.pt``, ``eval/summary.json``,
``curve.csv``) and resumes the unfinished run from its checkpoint. The study folder has one writer
(:class:`common.runs.RunFolderLock`), as each run folder has.

Executors: ``local`` (one job after the other on this machine, or ``workers`` at once) or submitit's (``slurm``: each job a
SLURM job with the GPUs, partition and time limit given; ``submitit-local``: the same through submitit's local
executor); results are collected as jobs finish, and a partly finished study resumes the same way.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .io import write_csv, write_json
from .runs import FAILED_STATUSES, MODEL_FILE, RunFolderLock, convergence_epoch, read_history, run_status

__all__ = [
    "MODES",
    "SOURCE_MODES",
    "Job",
    "StudySettings",
    "plan_jobs",
    "run_job",
    "evaluate_run",
    "run_study",
    "training_failure",
]

logger = logging.getLogger(__name__)

#: Study mode -> (label, the layered config files after train.json, needs the source model).
MODES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "ri": ("R.I.", (), False),
    "tl": ("T.L.", ("finetune.json",), True),
    "frozen": ("frozen random encoder", ("frozen_encoder.json",), False),
    "last_k": ("T.L., last 2 layers", ("finetune_last_k.json",), True),
    "encoder": ("T.L., encoder only", ("finetune_encoder.json",), True),
    "decoder": ("T.L., decoder only", ("finetune_decoder.json",), True),
}
SOURCE_MODES = tuple(m for m, (_, _, src) in MODES.items() if src)
STATE_FILE = "study.json"
CURVE_FILE = "curve.csv"


@dataclass
class Job:
    """One training run of the study and what it needs."""

    name: str
    mode: str  # "pretrain" or a key of MODES
    n_train: int | None
    seed: int
    config_files: list[str]
    overrides: dict[str, Any]
    run_dir: str
    evaluate: bool = True

    def done(self) -> bool:
        """All its outputs exist (a finished training, and, for target runs, the evaluation and the curve)."""
        trained = os.path.isfile(os.path.join(self.run_dir, "checkpoint_final.pt")) and os.path.isfile(
            os.path.join(self.run_dir, MODEL_FILE)
        )
        if not self.evaluate:
            return trained
        return trained and all(
            os.path.isfile(os.path.join(self.run_dir, f)) for f in (os.path.join("eval", "summary.json"), CURVE_FILE)
        )


@dataclass
class StudySettings:
    """What a study runs (recorded in ``study.json``; the same command resumes it)."""

    bundle_dir: str
    out_dir: str
    n_train: list[int | None] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    modes: list[str] = field(default_factory=lambda: ["ri", "tl", "frozen"])
    overrides: dict[str, Any] = field(default_factory=dict)  # every run (e.g. block_size, max_epochs)
    target: dict[str, Any] = field(default_factory=dict)  # target runs (e.g. dataset_dir)
    source: dict[str, Any] = field(default_factory=dict)  # the pretrain run (e.g. dataset_dir)
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)  # the pretrain run only (e.g. more epochs)
    source_checkpoint: str | None = None  # a given source model instead of pretraining
    analyses: list[str] | str = "all"
    analysis_overrides: dict[str, Any] = field(default_factory=dict)  # AnalysisSetup arguments
    description: str = ""

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"Unknown modes {unknown}; choose from {list(MODES)}.")
        if not self.seeds:
            raise ValueError("A study needs at least one seed.")


def _config(settings: StudySettings, *files: str) -> list[str]:
    return [os.path.join(settings.bundle_dir, "configs", f) for f in ("train.json", *files)]


def run_name(mode: str, n_train: int | None, seed: int) -> str:
    """The run folder name of a job: ``<mode>_n<size or all>_s<seed>``."""
    return f"{mode}_n{'all' if n_train is None else int(n_train)}_s{int(seed)}"


def job_run_dir(config_files: Sequence[str], overrides: Mapping[str, Any]) -> str:
    """The run folder the bundle's layered configs give for ``overrides``: their ``output_dir`` (which appends the
    groups the configs select, e.g. ``runs/pretrain_center1_center2_center3_center4``), evaluated without building
    anything else."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(dict(overrides))
    return os.path.abspath(parser.get_parsed_content("output_dir"))


def plan_jobs(settings: StudySettings) -> list[Job]:
    """Every job of the study, the source model first."""
    root = os.path.abspath(settings.out_dir)
    jobs: list[Job] = []
    needs_source = any(MODES[m][2] for m in settings.modes)
    source_ckpt = settings.source_checkpoint
    if needs_source and not source_ckpt:
        ov = {**settings.overrides, **settings.source, **settings.pretrain_overrides, "bundle_root": root,
              "run_name": "pretrain", "seed": 0, "split_seed": 0}  # fmt: skip
        files = _config(settings, "pretrain.json")
        pre = Job("pretrain", "pretrain", None, 0, files, ov, job_run_dir(files, ov), evaluate=False)
        jobs.append(pre)
        source_ckpt = os.path.join(pre.run_dir, MODEL_FILE)
    for n in settings.n_train:
        for seed in settings.seeds:
            for mode in settings.modes:
                name = run_name(mode, n, seed)
                ov = {**settings.overrides, **settings.target, "bundle_root": root, "run_name": name, "seed": int(seed),
                      "split_seed": int(seed), "n_train": n}  # fmt: skip
                if MODES[mode][2]:
                    ov["source_checkpoint"] = source_ckpt
                files = _config(settings, *MODES[mode][1])
                jobs.append(Job(name, mode, n, int(seed), files, ov, job_run_dir(files, ov)))
    return jobs


# ---------------------------------------------------------------------------------------------- one job
def _cli_value(value: Any) -> str:
    """A config value as ``python -m monai.bundle`` (fire) parses it back: Python literals, strings as they are."""
    return value if isinstance(value, str) else repr(value)


def train_command(job: Job) -> list[str]:
    """``python -m monai.bundle run training --config_file "[...]" --<id> <value> ...`` for ``job``."""
    files = "[" + ",".join(f"'{f}'" for f in job.config_files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", files]
    for k, v in job.overrides.items():
        cmd += [f"--{k}", _cli_value(v)]
    return cmd


def _die_with_parent() -> None:
    """In the training command's process (Linux, before exec): ask the kernel to kill it when the process that
    started it dies. A study killed with ``kill -9`` (or a lost worker) then leaves no training running on, which
    would hold its run folder's lock against the resumed study (or write into it)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_job(job: Job | Mapping[str, Any], log_dir: str) -> dict[str, Any]:
    """Train (a ``monai.bundle`` command, resumed if a checkpoint is there), then evaluate; returns the job's
    record: its seconds of training and evaluation, and the evaluation summary. Runs in the study's process or as
    a submitit job."""
    job = job if isinstance(job, Job) else Job(**job)
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{job.name}.log")
    record: dict[str, Any] = {"name": job.name}
    t0 = time.perf_counter()
    trained = os.path.isfile(os.path.join(job.run_dir, "checkpoint_final.pt")) and os.path.isfile(
        os.path.join(job.run_dir, MODEL_FILE)
    )
    if not trained:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(train_command(job))}\n")
            log.flush()
            proc = subprocess.run(train_command(job), stdout=log, stderr=subprocess.STDOUT, cwd=job.overrides["bundle_root"],
                                  preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)  # fmt: skip
        if proc.returncode != 0:
            with open(log_path, encoding="utf-8") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"Study job {job.name} failed (exit {proc.returncode}); the end of {log_path}:\n{tail}")
    record["command_seconds"] = time.perf_counter() - t0
    if job.evaluate:
        t1 = time.perf_counter()
        record["evaluation"] = evaluate_run(job)
        record["evaluation_seconds"] = time.perf_counter() - t1
    return record


def evaluate_run(job: Job) -> dict[str, Any]:
    """The run's best model on its test split (``eval/summary.json``, as ``evaluate.json`` writes it) and every
    snapshot on the test split (``curve.csv``: epoch, iteration, training seconds, validation DSC, test DSC / HD95 /
    ASSD (/ F1) means), with the bundle's ``evaluate.json`` built once. Returns the best model's summary."""
    from monai.bundle import ConfigWorkflow

    files = job.config_files + [os.path.join(os.path.dirname(job.config_files[0]), "evaluate.json")]
    ov = {k: v for k, v in job.overrides.items() if k not in ("source_checkpoint",)}
    wf = ConfigWorkflow(config_file=files, workflow_type=None, **ov)
    wf.initialize()
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    loader, writer = (wf.parser.get_parsed_content(f"validate#handlers#{i}") for i in (0, 1))
    eval_dir = writer.output_dir

    def evaluate(path: str, out_dir: str) -> dict[str, Any]:
        loader.load_path = path
        writer.output_dir = out_dir
        evaluator.run()
        return dict(writer.summary)

    best = evaluate(os.path.join(job.run_dir, MODEL_FILE), eval_dir)
    history = read_history(job.run_dir)["entries"]
    rows = []
    for entry in history:
        snap = os.path.join(job.run_dir, "snapshots", entry["file"])
        s = evaluate(snap, os.path.join(eval_dir, "snapshots", os.path.splitext(entry["file"])[0]))
        row = {k: entry.get(k) for k in ("epoch", "iteration", "train_seconds", "val_seconds", "val_dice")}
        for metric in ("dice", "hd95", "assd", "f1"):
            if metric in s:
                row[f"test_{metric}"] = s[metric]["mean"]
        rows.append(row)
    write_csv(os.path.join(job.run_dir, CURVE_FILE), rows)
    return best


# ---------------------------------------------------------------------------------------------- the study
def _progress(done: int, total: int, name: str, seconds: float, durations: list[float], parallel: int = 1) -> None:
    left = total - done
    eta = (sum(durations) / len(durations)) * left / max(1, min(parallel, left)) if durations else float("nan")
    eta_txt = "" if not durations or left == 0 else f", about {eta / 60:.1f} min left"
    print(f"[{done}/{total}] {name}: {seconds:.0f} s{eta_txt}", flush=True)


def _executor(kind: str, folder: str, slurm: Mapping[str, Any] | None):
    import submitit

    if kind == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=int((slurm or {}).get("timeout_min", 600)))
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = dict(slurm or {})
    ex.update_parameters(
        slurm_partition=params.get("partition"),
        gpus_per_node=int(params.get("gpus", 1)),
        timeout_min=int(params.get("timeout_min", 24 * 60)),
        cpus_per_task=int(params.get("cpus", 8)),
        mem_gb=int(params.get("mem_gb", 64)),
        name=params.get("name", "tlseg-study"),
        **{k: v for k, v in params.items() if k.startswith("slurm_")},
    )
    return ex


def run_study(settings: StudySettings, executor: str = "local", slurm: Mapping[str, Any] | None = None,
              report: bool = True, workers: int = 1) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) the study; returns its state (``study.json``). See the module docstring.

    ``workers`` (local executor): jobs run at once, each in its own process with ``cpu_count // workers`` torch and
    OpenMP threads. On a CPU the paper's network (14 channels per layer) does not keep more than one core busy
    per job (small 3-D convolutions): two one-thread jobs on two cores train 1.4-1.7x the steps per second of one
    two-thread job (docs/benchmarks.md, "Quick study"). A job that needs the source model waits for it;
    the others start at once."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = os.path.abspath(settings.out_dir)
    os.makedirs(root, exist_ok=True)
    lock = RunFolderLock(root, what="Study folder").acquire()
    try:
        return _run_study(settings, root, executor, slurm, report, workers)
    finally:
        lock.release()


def _worker_init(threads: int) -> None:
    """A local worker process: ``threads`` torch/OpenMP threads, for its in-process evaluation and (through the
    environment) its training command."""
    if sys.platform.startswith("linux"):
        _die_with_parent()  # a killed study leaves no worker (nor, through run_job, any training) behind
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _run_local_parallel(todo: Sequence[Job], log_dir: str, workers: int, finished: Any) -> None:
    """Run ``todo`` on ``workers`` local processes; a job that fine-tunes the source model starts once the
    ``pretrain`` job (if it is among ``todo``) has finished. ``finished(job, record, seconds)`` as each ends."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // workers)
    waiting_for_source = any(j.mode == "pretrain" for j in todo)
    ready = [j for j in todo if not (waiting_for_source and j.mode != "pretrain" and "source_checkpoint" in j.overrides)]
    held = [j for j in todo if j not in ready]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:  # fmt: skip
        running = {pool.submit(run_job, asdict(j), log_dir): j for j in ready}
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                record = fut.result()  # its own clock: the time it waited in the queue is not the job's
                finished(job, record, record.get("command_seconds", 0.0) + record.get("evaluation_seconds", 0.0))
                if job.mode == "pretrain":
                    running.update({pool.submit(run_job, asdict(j), log_dir): j for j in held})
                    held = []


def _write_state(root: str, state: Mapping[str, Any]) -> None:
    write_json(os.path.join(root, STATE_FILE), state)


def _run_study(settings: StudySettings, root: str, executor: str, slurm: Any, report: bool, workers: int) -> dict[str, Any]:
    state_path = os.path.join(root, STATE_FILE)
    previous = json.load(open(state_path, encoding="utf-8")) if os.path.isfile(state_path) else {}
    if previous and previous.get("settings") != json.loads(json.dumps(asdict(settings))):
        raise ValueError(
            f"{state_path} records a study with other settings: give this study another folder, or delete the old one "
            f"(recorded: {previous.get('settings')})."
        )
    jobs = plan_jobs(settings)
    state: dict[str, Any] = {"settings": asdict(settings), "jobs": previous.get("jobs", {}), "started": previous.get(
        "started", time.strftime("%Y-%m-%dT%H:%M:%S"))}  # fmt: skip
    log_dir = os.path.join(root, "logs")
    total, durations = len(jobs), []
    done = [j for j in jobs if j.done()]
    for j in done:
        state["jobs"].setdefault(j.name, {})["status"] = "done"
    print(f"Study {root}: {len(jobs)} runs, {len(done)} already done" + (" (skipped)" if done else "") + ".", flush=True)
    todo = [j for j in jobs if not j.done()]
    pre = [j for j in todo if j.mode == "pretrain"]
    rest = [j for j in todo if j.mode != "pretrain"]
    n_done = len(done)

    def finished(job: Job, record: dict[str, Any], seconds: float) -> None:
        nonlocal n_done
        n_done += 1
        durations.append(seconds)
        state["jobs"][job.name] = {"status": "done", "seconds": seconds, **{k: v for k, v in record.items() if k != "evaluation"}}
        _write_state(root, state)
        _progress(n_done, total, job.name, seconds, durations, workers if executor == "local" else 1)

    _write_state(root, state)
    if executor == "local" and workers > 1:
        _run_local_parallel(pre + rest, log_dir, workers, finished)
    elif executor == "local":
        for job in pre + rest:
            t0 = time.perf_counter()
            finished(job, run_job(job, log_dir), time.perf_counter() - t0)
    else:
        ex = _executor(executor, os.path.join(root, "submitit"), slurm)
        for batch in (pre, rest):  # the source model first, then every target run at once
            submitted = [(job, ex.submit(run_job, asdict(job), log_dir), time.perf_counter()) for job in batch]
            for job, sub, _ in submitted:
                state["jobs"][job.name] = {"status": "submitted", "job_id": str(sub.job_id)}
            _write_state(root, state)
            pending = list(submitted)
            while pending:
                for item in list(pending):
                    job, sub, t0 = item
                    if sub.done():
                        pending.remove(item)
                        finished(job, sub.result(), time.perf_counter() - t0)
                time.sleep(1.0)
    state["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_state(root, state)
    if report:
        from .report import write_report

        state["report"] = write_report(settings, jobs, root)
        _write_state(root, state)
    return state


def job_table(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Per target job: mode, size, seed, test metrics (best model), convergence epoch / iteration / training seconds."""
    rows = []
    for job in jobs:
        if job.mode == "pretrain":
            continue
        summary_path = os.path.join(job.run_dir, "eval", "summary.json")
        if not os.path.isfile(summary_path):
            continue
        with open(summary_path, encoding="utf-8") as f:
            s = json.load(f)
        row: dict[str, Any] = {"run": job.name, "mode": job.mode, "n_train": job.n_train, "seed": job.seed}
        row.update(training_failure(job.run_dir, s))
        parts = list(s["per_task"].values()) if "per_task" in s else [s]  # a multi-task run: the mean over its tasks
        for metric in ("dice", "hd95", "assd", "f1"):
            values = [_num(p[metric]["mean"]) for p in parts if metric in p]
            if values:
                row[metric] = sum(values) / len(values)
        history = read_history(job.run_dir)
        entries = history["entries"]
        try:
            conv = convergence_epoch(history)
            at = next(e for e in entries if e["epoch"] == conv)
            row.update(convergence_epoch=conv, convergence_iteration=at["iteration"], convergence_seconds=at.get("train_seconds"))
        except (ValueError, StopIteration):
            row.update(convergence_epoch=None, convergence_iteration=None, convergence_seconds=None)
        last = entries[-1] if entries else {}
        row.update(iterations=last.get("iteration"), train_seconds=last.get("train_seconds"), val_seconds=last.get("val_seconds"))
        rows.append(row)
    return rows


def training_failure(run_dir: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """``{"status": ..., "failed": bool, "failure": reason}`` of a run: failed when its training stopped as
    collapsed or diverged (``run_info.json``, :class:`common.health.TrainingHealth`), or when its best model predicts
    no foreground in any test case that has some (a network collapsed to all background, however it trained)."""
    info = run_status(run_dir)
    status = info["status"]
    if status in FAILED_STATUSES:
        f = info.get("failure") or {}
        return {"status": status, "failed": True,
                "failure": f"{status} at epoch {f.get('epoch')}, iteration {f.get('iteration')}: {f.get('reason', '')}"}  # fmt: skip
    leaves = list(_count_leaves(summary))  # per task and class: {"n_cases", "n_empty_pred", "n_empty_ref"}
    if leaves and all(int(c["n_empty_pred"]) == int(c["n_cases"]) for c in leaves) and any(
        int(c["n_empty_ref"]) < int(c["n_cases"]) for c in leaves
    ):
        return {"status": status, "failed": True,
                "failure": f"its model predicts no foreground in any of the {summary.get('n_cases')} test cases "
                           "(all background)"}  # fmt: skip
    return {"status": status, "failed": False, "failure": ""}


def _count_leaves(summary: Mapping[str, Any]):
    """The evaluation summary's case counts, per task and class (the dicts holding ``n_empty_pred``)."""
    if "n_empty_pred" in summary:
        yield summary
        return
    for key in ("per_task", "per_class"):
        for part in (summary.get(key) or {}).values():
            if isinstance(part, Mapping):
                yield from _count_leaves(part)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("inf") if str(v) == "inf" else float("nan")
