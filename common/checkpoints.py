# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: the one reader of network weights, the one "do these weights fit this network" check, and
resumable training.

* :func:`checkpoint_state_dict` reads the network weights of any checkpoint file the bundles meet (a plain
  state dict such as ``models/model.pt``, or a dict holding one under ``"model"``), as MONAI's
  ``CheckpointLoader`` reads them; inference, evaluation, fine-tuning and the analyses all use it.
* :func:`check_state_fits` says, with the file named, why weights do not fit a network (missing or
  unexpected keys, shapes), before MONAI's ``CheckpointLoader`` (MONAI Label loads with ``strict=False``,
  where a mismatch only warns and then runs random weights) or ``load_state_dict`` meets them.
* :class:`TrainingCheckpointer` (an ignite handler, ``checkpointer`` in the bundles' ``train.json``): every
  ``interval`` iterations, at the end of every epoch and at the end of the run it writes one rolling
  ``checkpoint.pt`` (and ``checkpoint_final.pt`` at the end) holding the state dicts of its ``save_dict``
  (model, optimizer, learning-rate decay, trainer counters, best-model tracker) and the random number
  generator states (:class:`RNGState`: torch, numpy, python and every random transform's own). Every write
  is atomic (:mod:`common.io`). On ``attach`` with ``resume=True`` it loads the newest readable checkpoint, so
  the same command started again continues where a killed run stopped; ``max_epochs`` of the new command
  wins, so a finished run can be extended; :meth:`TrainingCheckpointer.run` runs the trainer or says that
  the run has already finished.
* :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` writing atomically, whose best-model tracking
  is part of the training checkpoint (``state_dict``), so a resumed run keeps ``model.pt`` as the best of the
  whole run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from .io import atomic_torch_save, remove_stale_temporaries
from .networks import unwrap

__all__ = [
    "checkpoint_state_dict",
    "check_state_fits",
    "RNGState",
    "TrainingCheckpointer",
    "AtomicCheckpointSaver",
]

logger = logging.getLogger(__name__)


def checkpoint_state_dict(path: str, missing_hint: str = "", what: str = "Checkpoint") -> dict[str, torch.Tensor]:
    """The network weights in a checkpoint file, read as MONAI's ``CheckpointLoader`` reads them.

    Accepted: a plain state dict (``models/model.pt``, a run's ``model.pt``) or a dict holding it under
    ``"model"``, ``"network"`` or ``"state_dict"`` (a run's ``checkpoint_final.pt``). ``missing_hint`` ends the
    message when the file does not exist (what to do instead); ``what`` names the file in messages.
    The one reader of network weights used by inference, evaluation, fine-tuning (``common.transfer``)
    and the analyses.

    Raises:
        FileNotFoundError: no file at ``path`` (the message names it).
        ValueError: the file cannot be read, or holds no network weights.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} {path!r} not found: "
            + (missing_hint or "train the model first (a run writes runs/<run_name>/model.pt; the bundle's default "
               "is models/model.pt) or pass --ckpt_path <path to model.pt>.")
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or not a torch file
        import zipfile

        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; torch's own message here suggests
            # weights_only=False, which is beside the point for a truncated or corrupt file
            reason = (
                "it is not a complete PyTorch checkpoint (no readable zip archive: truncated, corrupt, or not "
                "written by torch.save)"
            )
        else:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"Cannot read {what.lower()} {path}: {reason}.") from err
    for key in ("model", "network", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"{what} {path} holds no network weights: expected a state dict or a dict with a 'model' "
            f"state dict, found {found}."
        )
    return obj


def check_state_fits(
    state: Mapping[str, torch.Tensor], network: torch.nn.Module, source: str, may_differ: Collection[str] = ()
) -> list[str]:
    """Check that the weights ``state`` (read from ``source``, named in messages) fit ``network``: the same
    keys, and the same shapes except for the keys in ``may_differ`` (e.g. the output head when fine-tuning
    to another class count). Returns the keys of ``may_differ`` whose shapes differ.

    Raises:
        ValueError: keys missing or unexpected (another architecture), or shapes that differ (other
            ``network_def`` settings: features, levels, in/out channels); the message names ``source``.
    """
    network = unwrap(network)
    target = network.state_dict()
    arch = type(network).__name__
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit the network {arch}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). It was saved from another architecture; "
            f"check network_def in the config."
        )
    differ = [k for k in target if tuple(state[k].shape) != tuple(target[k].shape)]
    bad = [k for k in differ if k not in may_differ]
    if bad:
        k = bad[0]
        raise ValueError(
            f"{source} does not fit the network {arch}: {len(bad)} tensors differ in shape, e.g. {k} is "
            f"{tuple(state[k].shape)} in the file and {tuple(target[k].shape)} in the network. It was saved with "
            f"other network_def settings (features, levels, in/out channels)."
        )
    return differ


def _np_state_to_tensor(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_tensor(d: Mapping[str, Any]) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


class RNGState:
    """The random number generator states a training run depends on, as a checkpointable object.

    Covers torch (CPU and, when present, CUDA), numpy's global generator, python's ``random``, and the
    private generators (``.R``) of every random transform found in ``transforms`` (a MONAI ``Compose``,
    a list, or None), inner ones included. Stored as tensors and plain numbers, so it loads with ``weights_only=True``.
    """

    def __init__(self, transforms: Any = None) -> None:
        self.transforms = transforms

    def _generators(self) -> list[np.random.RandomState]:
        """Every ``np.random.RandomState`` of the pipeline, in a fixed order: each transform's ``.R`` and
        those of the random transforms it holds (e.g. ``RandGaussianNoised`` draws from an inner
        ``RandGaussianNoise``), found by walking ``transforms`` lists and attributes."""
        found: list[np.random.RandomState] = []
        seen: set[int] = set()

        def walk(obj: Any, depth: int = 0) -> None:
            if obj is None or id(obj) in seen or depth > 6:
                return
            seen.add(id(obj))
            if isinstance(obj, (list, tuple)):
                for o in obj:
                    walk(o, depth + 1)
                return
            if not hasattr(obj, "__dict__") or isinstance(obj, (torch.Tensor, np.ndarray)):
                return
            r = getattr(obj, "R", None)
            if isinstance(r, np.random.RandomState) and id(r) not in seen:
                seen.add(id(r))
                found.append(r)
            for key, value in sorted(vars(obj).items()):
                if key != "R" and (hasattr(value, "transforms") or hasattr(value, "R") or isinstance(value, (list, tuple))):
                    walk(value, depth + 1)

        walk(self.transforms)
        return found

    def state_dict(self) -> dict[str, Any]:
        py = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _np_state_to_tensor(np.random.get_state()),
            "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
            "transforms": [_np_state_to_tensor(r.get_state()) for r in self._generators()],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(_np_state_from_tensor(state["numpy"]))
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        ts = self._generators()
        if len(ts) == len(state.get("transforms", [])):
            for r, s in zip(ts, state["transforms"]):
                r.set_state(_np_state_from_tensor(s))
        else:
            logger.warning("The checkpoint has %d random transform states, the pipeline %d: transform RNGs not restored.",
                           len(state.get("transforms", [])), len(ts))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class TrainingCheckpointer:
    """Atomic, resumable checkpoints of a training run (see the module docstring).

    Args:
        save_dir: the run's output folder.
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (the trainer engine included,
            under ``"trainer"``).
        interval: iterations between checkpoints (also written at every epoch end and at the end).
        resume: load the newest checkpoint of ``save_dir`` on attach.
        transforms: the training pipeline, whose random transforms' states are saved (see :class:`RNGState`).
        filename / final_filename: the rolling and the final checkpoint names.
        save_enabled: write checkpoints (False on the non-zero ranks of a multi-GPU run, which only load).
        optional: names of ``save_dict`` that a checkpoint may lack (written before they were added); they are
            left as they are, with a warning.
        handlers: the trainer's handlers (``train#handlers``); every one with a ``checkpoint_key`` attribute (the
            learning-rate decay, the snapshot clocks) is saved and restored under that key, so the configs need no
            reference into the handler list (MONAI Label inserts handlers there).

    A wrapped network (``DistributedDataParallel``/``DataParallel``) is saved and loaded as its ``module``,
    so the checkpoint keys are the same with one GPU or several.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        interval: int = 100,
        resume: bool = True,
        transforms: Any = None,
        filename: str = "checkpoint.pt",
        final_filename: str = "checkpoint_final.pt",
        save_enabled: bool = True,
        optional: Sequence[str] = ("snapshots", "health", "lr_warmup"),
        handlers: Sequence[Any] = (),
    ) -> None:
        if interval < 1:
            raise ValueError(f"checkpoint interval must be >= 1 iteration, got {interval}.")
        if "trainer" not in save_dict:
            raise ValueError("save_dict needs the trainer engine under 'trainer' to resume its counters.")
        self.save_dir = save_dir
        self.save_dict = dict(save_dict)
        for h in handlers or ():
            key = getattr(h, "checkpoint_key", None)
            if key:
                if key in self.save_dict and self.save_dict[key] is not h:
                    raise ValueError(f"Two objects to checkpoint under '{key}': rename one handler's checkpoint_key.")
                self.save_dict[key] = h
        self.save_dict.setdefault("rng", RNGState(transforms))
        self.interval = int(interval)
        self.resume = bool(resume)
        self.path = os.path.join(save_dir, filename)
        self.final_path = os.path.join(save_dir, final_filename)
        self.save_enabled = bool(save_enabled)
        self.optional = tuple(optional)
        self.finished = False
        self.resumed_from: str | None = None

    # ------------------------------------------------------------------ saving
    def _state(self) -> dict[str, Any]:
        return {k: unwrap(obj).state_dict() for k, obj in self.save_dict.items()}

    def save(self, engine: Any = None) -> None:
        if self.save_enabled:
            atomic_torch_save(self._state(), self.path)

    def save_final(self, engine: Any = None) -> None:
        if not self.save_enabled:
            return
        state = self._state()
        atomic_torch_save(state, self.path)
        atomic_torch_save(state, self.final_path)
        logger.info("Training finished at iteration %d: wrote %s.", engine.state.iteration if engine else -1, self.final_path)

    # ------------------------------------------------------------------ loading
    def _candidates(self) -> list[str]:
        paths = [p for p in (self.path, self.final_path) if os.path.isfile(p)]
        return sorted(paths, key=os.path.getmtime, reverse=True)

    def load_latest(self, engine: Any) -> str | None:
        """Load the newest readable checkpoint into ``save_dict``; returns its path (None: none found)."""
        for path in self._candidates():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # an unreadable file is reported and skipped, never loaded half-way
                logger.warning("Cannot read checkpoint %s (%s); trying an older one.", path, err)
                continue
            missing = [k for k in self.save_dict if k not in state and k not in self.optional]
            if missing:
                raise ValueError(f"Checkpoint {path} lacks {missing}: it was not written by this training config.")
            for k in [k for k in self.optional if k in self.save_dict and k not in state]:
                logger.warning("Checkpoint %s has no '%s' (written by an older version): it starts afresh.", path, k)
            prior_max_epochs = engine.state.max_epochs
            for k, obj in self.save_dict.items():
                if k not in state:
                    continue
                try:
                    unwrap(obj).load_state_dict(state[k])
                except Exception as err:
                    raise ValueError(f"Checkpoint {path}: cannot restore '{k}': {err}") from err
            done_epochs = engine.state.iteration / max(engine.state.epoch_length or 1, 1)
            if prior_max_epochs is not None:
                if done_epochs > prior_max_epochs:
                    raise ValueError(
                        f"Checkpoint {path} is at epoch {done_epochs:g}, beyond max_epochs={prior_max_epochs}: "
                        "pass a larger --train#trainer#max_epochs to extend the run."
                    )
                engine.state.max_epochs = prior_max_epochs
            total = (engine.state.max_epochs or 0) * (engine.state.epoch_length or 0)
            self.finished = total > 0 and engine.state.iteration >= total
            self.resumed_from = path
            logger.info("Resumed from %s at iteration %d (epoch %d of %s).", path, engine.state.iteration,
                        engine.state.epoch, engine.state.max_epochs)
            return path
        return None

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporaries that a run killed in the middle of a write left in its folder (see
        :func:`common.io.remove_stale_temporaries`); they are never loaded, this only tidies up."""
        return remove_stale_temporaries(self.save_dir) if self.save_enabled else []

    # ------------------------------------------------------------------ engine
    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        self.remove_stale_temporaries()
        if self.resume:
            self.load_latest(engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save_final)

    def run(self, engine: Any) -> None:
        """Run ``engine`` unless the loaded checkpoint shows the run has already finished."""
        if self.finished:
            logger.info(
                "This run has already finished (%d iterations, max_epochs=%s, checkpoint %s): nothing to do. "
                "Pass a larger --train#trainer#max_epochs to extend it.",
                engine.state.iteration, engine.state.max_epochs, self.resumed_from,
            )
            return
        engine.run()


class _AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler that writes each checkpoint with :func:`common.io.atomic_torch_save`, into each of
    ``dirnames``.

    With a fixed ``filename`` (``model.pt``), ``remove`` does nothing: ignite removes the old best file before
    it writes the new one, and the rename over the old file is what replaces it, so the path always holds a
    whole checkpoint (an inference process reading it meanwhile gets the old or the new weights).
    """

    def __init__(self, dirnames: Sequence[str], filename: str | None = None) -> None:
        self.dirnames = [str(d) for d in dirnames]
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        for dirname in self.dirnames:
            atomic_torch_save(checkpoint, os.path.join(dirname, self.filename or filename))

    def remove(self, filename: str) -> None:
        if self.filename is None:
            for dirname in self.dirnames:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(dirname, filename))


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments and files) whose files are written atomically.

    Why not MONAI's own: it writes ``model.pt`` in place (``DiskSaver(atomic=False)``) and deletes the previous
    best file before writing the new one, so a kill or a concurrent reader (MONAI Label's infer endpoint, a
    fine-tuning run loading ``runs/pretrain/model.pt``) can meet a missing or truncated file.

    Args:
        save_dir, save_dict, *args, **kwargs: as for ``monai.handlers.CheckpointSaver``.
        publish_dir: a second folder that receives each new best-metric file too (with ``save_key_metric``),
            e.g. the bundle's ``models/`` folder whose ``model.pt`` inference and MONAI Label load. ``None``:
            only ``save_dir``.
        enabled: False makes :meth:`attach` a no-op (the ranks > 0 of a multi-GPU run write nothing), while
            the object still serves :meth:`state_dict` / :meth:`load_state_dict` to the training checkpoint.

    :meth:`state_dict` / :meth:`load_state_dict` hold the best-model tracking (the key-metric list), so a
    resumed run keeps ``model.pt`` as the best of the whole run, not of the part after the restart.
    """

    def __init__(
        self, save_dir: str, save_dict: dict, *args: Any, publish_dir: str | None = None, enabled: bool = True,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(save_dir, save_dict, *args, **kwargs)
        self.enabled = bool(enabled)
        for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            ckpt = getattr(self, name, None)
            if ckpt is not None:
                dirs = [self.save_dir] + ([publish_dir] if publish_dir and name == "_key_metric_checkpoint" else [])
                ckpt.save_handler = _AtomicDiskSaver(dirs, getattr(ckpt.save_handler, "filename", None))

    def attach(self, engine: Any) -> None:
        if self.enabled:
            super().attach(engine)

    def state_dict(self) -> dict[str, Any]:
        ckpt = getattr(self, "_key_metric_checkpoint", None)
        return ckpt.state_dict() if ckpt is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict and getattr(self, "_key_metric_checkpoint", None) is not None:
            super().load_state_dict(dict(state_dict))
