# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Run folders: what a training run writes, and how the analyses read it back.

A training run of a bundle (``configs/train.json``) writes into ``<bundle_root>/runs/<run_name>/``::

    run_info.json            seed, command line, package versions, host, time (:func:`write_run_record`) and the
                             training status: running, completed, or failed (collapsed / diverged) with the
                             reason (:func:`update_run_record`, :class:`common.health.TrainingHealth`)
    signature.json           what the run is (mode, source model, network), checked on resume (:func:`check_run_signature`)
    .lock                    the one writer's lock while the run trains (:class:`RunFolderLock`)
    configs/                 copies of the config files of the command
    datalist.json            the split (training / validation / test cases) and its seed (common.data)
    model.pt                 the best-validation-DSC weights (a plain state dict)
    checkpoint.pt            the rolling resumable checkpoint (common.checkpoints); checkpoint_final.pt at the end
    snapshots/epoch_XXXX.pt  weights at initialisation (epoch 0) and every snapshot_interval epochs
    snapshots/history.json   the validation DSC of each snapshot (common.handlers.SnapshotSaver)
    events.out.tfevents.*    TensorBoard

:class:`Run` / :func:`load_run` read such a folder for the representation analyses; :func:`convergence_epoch`
is the paper's convergence epoch (the first epoch whose validation DSC is within 0.5 % of the best one).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .io import atomic_write, write_json

__all__ = [
    "SNAPSHOT_DIR",
    "HISTORY_FILE",
    "DATALIST_FILE",
    "MODEL_FILE",
    "RUN_INFO_FILE",
    "CONVERGENCE_TOLERANCE",
    "snapshot_name",
    "run_dir",
    "check_run_signature",
    "RunFolderBusy",
    "RunFolderLock",
    "lock_run_folder",
    "is_not_rank0",
    "write_run_record",
    "update_run_record",
    "RUNNING",
    "COMPLETED",
    "FAILED_STATUSES",
    "run_status",
    "read_history",
    "convergence_epoch",
    "Run",
    "load_run",
]

logger = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"
HISTORY_FILE = "history.json"
DATALIST_FILE = "datalist.json"
MODEL_FILE = "model.pt"
RUN_INFO_FILE = "run_info.json"
#: The paper's convergence epoch: the first epoch whose validation DSC is within 0.5 % of the best one.
CONVERGENCE_TOLERANCE = 0.005

#: The training status in ``run_info.json``: a run is ``running`` from its start, ``completed`` when it trained to
#: its last iteration, or one of :data:`FAILED_STATUSES` (:class:`common.health.TrainingHealth` stopped it).
RUNNING = "running"
COMPLETED = "completed"
FAILED_STATUSES = ("collapsed", "diverged")

_SNAP_RE = re.compile(r"^epoch_(\d+)\.pt$")


def snapshot_name(epoch: int) -> str:
    """File name of the snapshot of ``epoch`` (``epoch_0000.pt`` is the initialisation)."""
    return f"epoch_{int(epoch):04d}.pt"


# ---------------------------------------------------------------------------------------------- one writer
LOCK_FILE = ".lock"
#: A lock whose holder runs on another host is stale when its heartbeat is older than this (seconds).
LOCK_STALE_AFTER = 600.0
#: How often the holder refreshes the heartbeat (the lock file's mtime), in seconds.
LOCK_HEARTBEAT = 30.0


class RunFolderBusy(RuntimeError):
    """Another live process holds the folder (the message names it: host, PID, since when, command)."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (``/proc/<pid>/stat`` field 22, clock ticks since boot), to tell a live
    holder from another process that got the same PID; None where ``/proc`` is absent."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunFolderLock:
    """One writer per folder: an exclusive lock file ``<folder>/.lock`` naming its holder.

    :meth:`acquire` creates the file atomically (``O_CREAT | O_EXCL``) with the holder's host, PID, process start
    time, start time and command line. When the file exists, the holder is checked: on the same host, a dead
    process (or another process that reused the PID) makes the lock stale; on another host (a cluster node), a
    heartbeat (the file's mtime, refreshed every :data:`LOCK_HEARTBEAT` seconds by a daemon thread) older than
    ``stale_after`` does. A stale lock is taken over (renamed away, so only one contender wins) and the log says
    so; a live one raises :class:`RunFolderBusy` at once. :meth:`release` removes the file if it is still ours; it
    also runs at interpreter exit. A kill -9 leaves the file, which the next run finds stale.
    """

    def __init__(self, folder: str, stale_after: float = LOCK_STALE_AFTER, heartbeat: float = LOCK_HEARTBEAT,
                 what: str = "Run folder") -> None:  # fmt: skip
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.stale_after = float(stale_after)
        self.heartbeat = float(heartbeat)
        self.what = what
        self.token: str | None = None
        self._stop = None

    def _holder(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # being written, or unreadable: judged by its age only

    def _stale(self, holder: Mapping[str, Any]) -> bool:
        if holder.get("host") == platform.node() and holder.get("pid"):
            if int(holder["pid"]) == os.getpid():
                return True  # this very process (an earlier run of it that ended without releasing): re-entrant
            return not _alive(int(holder["pid"]), holder.get("pid_start"))
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return True
        return age > self.stale_after

    def acquire(self) -> "RunFolderLock":
        import uuid

        os.makedirs(self.folder, exist_ok=True)
        self.token = uuid.uuid4().hex
        me = {"host": platform.node(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "since": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv, "token": self.token}  # fmt: skip
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if not self._stale(holder):
                    raise RunFolderBusy(
                        f"{self.what} {self.folder} is in use by host {holder.get('host', '?')}, PID {holder.get('pid', '?')} "
                        f"since {holder.get('since', '?')} (command: {' '.join(holder.get('argv') or [])[:300]}). "
                        f"Two processes must not write one run folder: wait for it to finish, stop it, or give this run "
                        f"another --run_name / --output_dir. (A lock left by a killed process is taken over automatically; "
                        f"remove {self.path} by hand only if you are sure its holder is gone.)"
                    ) from None
                aside = f"{self.path}.stale.{os.getpid()}.{self.token[:8]}"
                try:
                    os.rename(self.path, aside)  # only one contender can move it away
                except FileNotFoundError:
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(aside)
                logger.warning(
                    "%s %s: took over the stale lock of host %s, PID %s since %s (that process is gone).",
                    self.what, self.folder, holder.get("host", "?"), holder.get("pid", "?"), holder.get("since", "?"),
                )  # fmt: skip
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._start_heartbeat()
            atexit.register(self.release)
            return self
        raise RunFolderBusy(f"{self.what} {self.folder}: could not take the lock {self.path} (contended).")

    def _start_heartbeat(self) -> None:
        import threading

        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        threading.Thread(target=beat, name=f"lock-heartbeat {self.folder}", daemon=True).start()
        self._stop = stop

    def release(self) -> None:
        """Remove the lock file if this object still holds it."""
        if self._stop is not None:
            self._stop.set()
        holder = self._holder() if self.token else None
        if holder and holder.get("token") == self.token:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.token = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_run_folder(folder: str, enabled: bool = True) -> RunFolderLock | None:
    """Take the one-writer lock of a run folder for the rest of the process (see :class:`RunFolderLock`); the
    bundles' training ``run`` does this first. ``enabled=False`` (the ranks > 0 of a multi-GPU run): nothing."""
    return RunFolderLock(folder).acquire() if enabled else None


SIGNATURE_FILE = "signature.json"


def check_run_signature(output_dir: str, signature: Mapping[str, Any], enabled: bool = True) -> dict[str, Any]:
    """Refuse to resume a run folder whose checkpoint was trained as another run: another transfer mode, source
    model or network (e.g. the run of the same name of another bundle started from the same folder). The bundles'
    training writes ``signature.json`` (``signature``: the mode, the source checkpoint, the network class and size)
    and checks it when a checkpoint is already there. ``enabled=False`` (ranks > 0): check only.

    Raises:
        RuntimeError: naming the folder and what differs.
    """
    sig = json.loads(json.dumps(dict(signature), default=str))
    if sig.get("source_checkpoint"):
        sig["source_checkpoint"] = os.path.abspath(str(sig["source_checkpoint"]))
    path = os.path.join(output_dir, SIGNATURE_FILE)
    trained = any(os.path.isfile(os.path.join(output_dir, f)) for f in ("checkpoint.pt", "checkpoint_final.pt"))
    if trained and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = {k: (old.get(k), sig.get(k)) for k in sorted(set(old) | set(sig)) if old.get(k) != sig.get(k)}
        if diff:
            said = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise RuntimeError(
                f"Run folder {output_dir} holds a run trained otherwise ({said}); resuming it would mix two runs. Give "
                f"this run another --run_name (or --bundle_root), or delete the folder to start it again."
            )
    if enabled:
        write_json(path, sig)
    return sig


def run_dir(bundle_root: str, run_name: str, groups: Sequence[str] | str | None = None) -> str:
    """The folder of a run: ``<bundle_root>/runs/<run_name>``, with ``_<group>`` appended for each group the run
    is restricted to (``groups``: a list, or one group or a comma-separated string), e.g. ``runs/train_center5``,
    so that the runs of one mode on different centres or age groups never share a folder."""
    if isinstance(groups, str):
        groups = [g.strip() for g in groups.split(",") if g.strip()]
    return os.path.join(bundle_root, "runs", str(run_name) + "".join(f"_{g}" for g in (groups or [])))


def is_not_rank0() -> bool:
    """True on the processes of a ``torch.distributed`` run other than rank 0 (they write no files)."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


# ---------------------------------------------------------------------------------------------- run record
def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "monai", "numpy", "nibabel", "ignite", "scipy", "common"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "unknown"))
        except Exception:
            out[name] = "not installed"
    return out


def _config_files_from_argv(argv: list[str]) -> list[str]:
    """The config files named after ``--config_file`` on a ``monai.bundle run`` command line."""
    if "--config_file" not in argv:
        return []
    raw = argv[argv.index("--config_file") + 1]
    raw = raw.strip().strip("[]")
    files = [p.strip().strip("'\"") for p in raw.split(",") if p.strip()]
    return [f for f in files if os.path.isfile(f)]


def write_run_record(output_dir: str, seed: int, extra: Mapping[str, Any] | None = None) -> str | None:
    """Write ``run_info.json`` (seed, command line, versions, host, time, the ``common`` that ran) and copy
    the command's config files into ``output_dir/configs/``. Returns the path of ``run_info.json`` (None on the
    ranks > 0 of a distributed run, which write nothing)."""
    if is_not_rank0():
        return None
    import common

    os.makedirs(output_dir, exist_ok=True)
    cfg_dir = os.path.join(output_dir, "configs")
    files = _config_files_from_argv(sys.argv)
    copied = []
    for f in files:
        dst = os.path.join(cfg_dir, os.path.basename(f))
        with open(f, "rb") as src:
            content = src.read()
        atomic_write(dst, lambda fh, c=content: fh.write(c))
        copied.append(dst)
    info = {
        "seed": seed,
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "config_files": files,
        "config_copies": copied,
        "versions": _versions(),
        "common_path": os.path.dirname(os.path.abspath(common.__file__)),
        "host": platform.node(),
        "platform": platform.platform(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "status": RUNNING,
        **(dict(extra) if extra else {}),
    }
    return write_json(os.path.join(output_dir, RUN_INFO_FILE), info)


def update_run_record(output_dir: str, **fields: Any) -> str | None:
    """Merge ``fields`` into ``<output_dir>/run_info.json`` (written atomically; created when missing); a field
    given as None is removed. Returns its path (None on the ranks > 0 of a distributed run, which write nothing)."""
    if is_not_rank0():
        return None
    path = os.path.join(output_dir, RUN_INFO_FILE)
    info: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    for k, v in fields.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = v
    os.makedirs(output_dir, exist_ok=True)
    return write_json(path, info)


def run_status(run_folder: str | None) -> dict[str, Any]:
    """The training status of the run folder ``run_folder`` (or of the folder of a checkpoint file in it):
    ``{"status": ..., "failure": {...}}`` from its ``run_info.json``; ``{"status": "unknown"}`` when there is no
    record (weights from elsewhere, or a run written before statuses were recorded)."""
    if not run_folder:
        return {"status": "unknown"}
    folder = run_folder if os.path.isdir(run_folder) else os.path.dirname(os.path.abspath(run_folder))
    path = os.path.join(folder, RUN_INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {"status": "unknown"}
    out = {"status": info.get("status", "unknown")}
    if info.get("failure"):
        out["failure"] = info["failure"]
    return out


# ---------------------------------------------------------------------------------------------- history
def read_history(source: Any) -> dict[str, Any]:
    """A snapshot history as ``{"metric_name", "interval", "entries": [...]}`` (entries sorted by epoch).

    ``source``: a run folder, its ``snapshots`` folder, a ``history.json`` path, the loaded dict, or a
    list of entries (dicts with ``epoch`` and ``val_dice``).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            cand = os.path.join(path, SNAPSHOT_DIR, HISTORY_FILE)
            path = cand if os.path.isfile(cand) else os.path.join(path, HISTORY_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No snapshot history at {path}: train with the SnapshotSaver handler (save_snapshots true)."
            )
        with open(path, encoding="utf-8") as f:
            source = json.load(f)
    if isinstance(source, dict):
        entries = source.get("entries", [])
        out = dict(source)
    else:
        entries = list(source)
        out = {"metric_name": None, "interval": None}
    out["entries"] = sorted((dict(e) for e in entries), key=lambda e: e["epoch"])
    return out


def convergence_epoch(history: Any, tolerance: float = CONVERGENCE_TOLERANCE) -> int:
    """The paper's convergence epoch: the first epoch whose validation DSC is ``>= (1 - tolerance) * best``.

    ``history``: a list of numbers (validation DSC per epoch; the result is the list index), or anything
    :func:`read_history` takes (entries with ``epoch`` and ``val_dice``; the result is that ``epoch``).
    Epochs without a value (``None``/NaN, e.g. the initialisation) are skipped.

    Example: ``[0.5, 0.8, 0.9, 0.899, 0.95, 0.951]`` -> 4 (``0.95 >= 0.995 * 0.951``).
    """
    if isinstance(history, (list, tuple)) and all(v is None or isinstance(v, (int, float)) for v in history):
        pairs = list(enumerate(history))
    else:
        pairs = [(e["epoch"], e.get("val_dice")) for e in read_history(history)["entries"]]
    pairs = [(ep, float(v)) for ep, v in pairs if v is not None and math.isfinite(float(v))]
    if not pairs:
        raise ValueError("The history holds no validation value: cannot find the convergence epoch.")
    best = max(v for _, v in pairs)
    threshold = (1.0 - tolerance) * best
    return int(next(ep for ep, v in pairs if v >= threshold))


# ---------------------------------------------------------------------------------------------- run folders
@dataclass
class Run:
    """A run folder: its snapshots (epoch -> file), history, convergence epoch and datalist."""

    path: str
    name: str
    snapshots: dict[int, str] = field(default_factory=dict)
    history: dict[str, Any] | None = None
    convergence: int | None = None
    datalist: dict[str, Any] | None = None

    def val_dice(self, epoch: int) -> float | None:
        """The validation DSC recorded with the snapshot of ``epoch`` (None when there is none)."""
        for e in (self.history or {}).get("entries", []):
            if e["epoch"] == epoch:
                return e.get("val_dice")
        return None

    def weights(self, which: str | int = "convergence") -> str:
        """Path of the weights: ``"init"`` (epoch 0), ``"convergence"``, ``"best"`` (``model.pt``),
        ``"last"`` (latest snapshot) or an epoch number."""
        if which == "best":
            path = os.path.join(self.path, MODEL_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Run {self.name}: no {MODEL_FILE} in {self.path}.")
            return path
        if which == "convergence" and self.convergence is None:
            if not self.snapshots:
                logger.info("Run %s has no snapshots: using model.pt (best validation) as the converged model.", self.name)
                return self.weights("best")
            raise ValueError(f"Run {self.name}: the snapshot history holds no validation DSC, no convergence epoch.")
        if not self.snapshots:
            raise FileNotFoundError(
                f"Run {self.name} ({self.path}) has no weight snapshots: train it with save_snapshots true."
            )
        if which == "init":
            epoch = 0
        elif which == "last":
            epoch = max(self.snapshots)
        elif which == "convergence":
            epoch = int(self.convergence)  # type: ignore[arg-type]
        else:
            epoch = int(which)
        if epoch not in self.snapshots:
            later = [e for e in sorted(self.snapshots) if e >= epoch]
            if which == "convergence" and later:
                logger.warning("Run %s: no snapshot of convergence epoch %d, using epoch %d.", self.name, epoch, later[0])
                epoch = later[0]
            else:
                raise FileNotFoundError(f"Run {self.name}: no snapshot of epoch {epoch} (have {sorted(self.snapshots)}).")
        return self.snapshots[epoch]

    def epoch_of(self, which: str | int) -> int | None:
        """The epoch behind ``which`` (None for ``model.pt``)."""
        path = self.weights(which)
        m = _SNAP_RE.match(os.path.basename(path))
        return int(m.group(1)) if m else None


def _split_label(spec: str) -> tuple[str | None, str]:
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        if label and os.sep not in label:
            return label, path
    return None, spec


def load_run(spec: str | Run, runs_dir: str | None = None, label: str | None = None) -> Run:
    """Read a run folder. ``spec``: a path, a run name under ``runs_dir``, or ``label=path``."""
    if isinstance(spec, Run):
        return spec
    lab, path = _split_label(os.fspath(spec))
    label = label or lab
    if not os.path.isdir(path) and runs_dir and os.path.isdir(os.path.join(runs_dir, path)):
        path = os.path.join(runs_dir, path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Run folder {path!r} not found" + (f" (also looked in {runs_dir})" if runs_dir else "") + ".")
    path = os.path.abspath(path)
    run = Run(path=path, name=label or os.path.basename(os.path.normpath(path)))
    snap_dir = os.path.join(path, SNAPSHOT_DIR)
    if os.path.isdir(snap_dir):
        for f in os.listdir(snap_dir):
            m = _SNAP_RE.match(f)
            if m:
                run.snapshots[int(m.group(1))] = os.path.join(snap_dir, f)
        try:
            run.history = read_history(path)
            run.convergence = convergence_epoch(run.history)
        except (FileNotFoundError, ValueError) as err:
            logger.warning("Run %s: %s", run.name, err)
    dl = os.path.join(path, DATALIST_FILE)
    if os.path.isfile(dl):
        from .data import load_datalist

        run.datalist = load_datalist(dl)
    return run
