# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Training handlers (ignite) used by the bundles: the paper's learning-rate decay rule and weight snapshots.

The paper: "an initial learning rate of 1e-4, which was reduced by 0.90 after every 2000 training
iterations if the loss did not decrease". The authors' code instead decays when the validation Dice
falls below 0.995 times its previous value. Both are offered by :class:`PlateauDecay`:

* ``monitor="loss"`` (the paper, default): at the end of every window of ``interval`` iterations the
  mean training loss of the window is compared with the mean of the previous window; when it did not
  decrease the learning rate is multiplied by ``factor``.
* ``monitor="val_dice"`` (the authors' code): after the end of every window, the validation Dice of the first
  validation run that follows (``evaluator.state.metrics[metric_name]`` when the evaluator completes, i.e. the
  validation of the weights the window trained) is compared with the value at the previous decision; when it is
  below ``tolerance`` (0.995) times that value the learning rate is multiplied by ``factor``.

The decay state is part of the checkpoint (``state_dict`` / ``load_state_dict``), so a resumed run
decays exactly as an uninterrupted one would. In a multi-GPU run the loss is averaged over the ranks, so
every rank takes the same decision.

:class:`SnapshotSaver` keeps the network weights at initialisation and every ``interval`` epochs, with
the validation Dice of each saved epoch, for the representation analyses of :mod:`common.analysis`
(Figs. 6-9, Table VIII); :func:`common.runs.convergence_epoch` finds the paper's convergence epoch in that
history. :class:`LogLevel` quiets the engines of the ranks > 0 of a multi-GPU run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from .io import atomic_write, write_json
from .networks import unwrap
from .runs import HISTORY_FILE, SNAPSHOT_DIR, is_not_rank0, read_history, snapshot_name

__all__ = ["DecayRule", "PlateauDecay", "SnapshotSaver", "LogLevel"]

logger = logging.getLogger(__name__)


class DecayRule:
    """The decision part of the decay, free of any engine (so it can be tested on its own).

    Call :meth:`update` once per iteration with the iteration's training loss (``monitor="loss"``),
    and :meth:`window_end` at the end of each window with the monitored value; it returns True when
    the learning rate must decay.

    Args:
        monitor: ``"loss"`` (lower is better, decay when the window mean did not decrease) or
            ``"val_dice"`` (higher is better, decay when below ``tolerance`` x previous value).
        tolerance: factor of the ``val_dice`` rule (the authors' 0.995).
    """

    def __init__(self, monitor: str = "loss", tolerance: float = 0.995) -> None:
        if monitor not in ("loss", "val_dice"):
            raise ValueError(f"monitor must be 'loss' or 'val_dice', got {monitor!r}.")
        self.monitor = monitor
        self.tolerance = float(tolerance)
        self.previous: float | None = None
        self._sum = 0.0
        self._count = 0

    def update(self, loss: float) -> None:
        """Add one iteration's training loss to the current window."""
        if math.isfinite(loss):
            self._sum += float(loss)
            self._count += 1

    def window_value(self) -> float | None:
        """Mean training loss of the current window (None when the window is empty)."""
        return self._sum / self._count if self._count else None

    def window_end(self, value: float | None = None) -> bool:
        """Close the window; returns True when the learning rate must decay.

        For ``monitor="loss"`` the value is the window's mean loss (``value`` is ignored unless given);
        for ``monitor="val_dice"`` ``value`` is the latest validation Dice (None: no decision).
        The first window only records its value.
        """
        if self.monitor == "loss" and value is None:
            value = self.window_value()
        self._sum, self._count = 0.0, 0
        if value is None or not math.isfinite(value):
            return False
        prev, self.previous = self.previous, float(value)
        if prev is None:
            return False
        if self.monitor == "loss":
            return value >= prev
        return value < self.tolerance * prev

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.previous, "sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state.get("previous")
        self._sum = float(state.get("sum", 0.0))
        self._count = int(state.get("count", 0))


class PlateauDecay:
    """Ignite handler: multiply every learning rate of ``optimizer`` by ``factor`` at the end of each
    window of ``interval`` iterations when the monitored value did not improve (see module docstring).

    Args:
        optimizer: the trainer's optimizer.
        interval: window length in iterations (the paper: 2000).
        factor: decay factor (the paper: 0.9).
        monitor: ``"loss"`` (the paper) or ``"val_dice"`` (the authors' code).
        evaluator: the validation engine, needed for ``monitor="val_dice"``.
        metric_name: the evaluator metric read for ``monitor="val_dice"``.
        tolerance: the ``val_dice`` rule's factor (0.995).
        min_lr: the learning rate never goes below this.
        output_transform: maps ``engine.state.output`` to the loss (MONAI trainers: ``output[0]["loss"]``
            for a list output, ``output["loss"]`` for a dict).

    Attach with ``handler.attach(trainer)``; the bundles list it in ``train#handlers``. Its state is saved in the
    training checkpoint under :attr:`checkpoint_key` (``common.checkpoints.TrainingCheckpointer`` collects it).
    The learning rate is written to ``engine.state.metrics["lr"]`` every iteration so the stats and
    TensorBoard handlers log it, and each decay is logged.
    """

    #: The key of this handler's state in the training checkpoint.
    checkpoint_key = "lr_decay"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        interval: int = 2000,
        factor: float = 0.9,
        monitor: str = "loss",
        evaluator: Any = None,
        metric_name: str = "val_mean_dice",
        tolerance: float = 0.995,
        min_lr: float = 0.0,
        output_transform: Any = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1 iteration, got {interval}.")
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"factor must be in (0, 1], got {factor}.")
        if monitor == "val_dice" and evaluator is None:
            raise ValueError("monitor='val_dice' needs the validation evaluator (evaluator=@validate#evaluator).")
        self.optimizer = optimizer
        self.interval = int(interval)
        self.factor = float(factor)
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.min_lr = float(min_lr)
        self.rule = DecayRule(monitor, tolerance)
        self.output_transform = output_transform or _loss_from_output
        self.decays = 0
        #: ``val_dice``: a window ended and waits for the validation that follows it
        self.window_ended = False
        self._trainer: Any = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if self.rule.monitor == "val_dice":
            # the validation of a window's end runs after the window's last ITERATION_COMPLETED (MONAI's
            # ValidationHandler at EPOCH_COMPLETED): decide when it has completed, with its metric
            self._trainer = engine
            self.evaluator.add_event_handler(Events.COMPLETED, self.validation_completed)

    def __call__(self, engine: Any) -> None:
        if self.rule.monitor == "loss":
            loss = self.output_transform(engine.state.output)
            if loss is not None:
                self.rule.update(_mean_over_ranks(float(loss)))
        if engine.state.iteration % self.interval == 0:
            if self.rule.monitor == "val_dice":
                self.window_ended = True
            elif self.rule.window_end(None):
                self._decay(engine)
        engine.state.metrics["lr"] = self.optimizer.param_groups[0]["lr"]

    def validation_completed(self, evaluator: Any) -> None:
        """``val_dice``: the decision of the window(s) that ended before this validation, on its metric."""
        if not self.window_ended:
            return
        self.window_ended = False
        if self.rule.window_end(evaluator.state.metrics.get(self.metric_name)):
            self._decay(self._trainer)
        if self._trainer is not None:
            self._trainer.state.metrics["lr"] = self.optimizer.param_groups[0]["lr"]

    def _decay(self, engine: Any) -> None:
        self.decays += 1
        for group in self.optimizer.param_groups:
            old = group["lr"]
            group["lr"] = max(old * self.factor, self.min_lr)
        logger.info(
            "Iteration %d: monitored %s did not improve over the last %d iterations; learning rate %.3g -> %.3g.",
            engine.state.iteration,
            self.rule.monitor,
            self.interval,
            old,
            self.optimizer.param_groups[0]["lr"],
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict(), "decays": self.decays, "window_ended": self.window_ended}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state.get("rule", {}))
        self.decays = int(state.get("decays", 0))
        self.window_ended = bool(state.get("window_ended", False))


def _mean_over_ranks(value: float) -> float:
    """``value`` averaged over the processes of an initialised ``torch.distributed`` run (every rank calls this
    once per iteration), else ``value``: the ranks see different batches, and must take the same decisions."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    import ignite.distributed as idist

    return float(idist.all_reduce(value)) / dist.get_world_size()


def _loss_from_output(output: Any) -> float | None:
    """The loss of a MONAI trainer's output (a dict, or a list of dicts with ``decollate=True``)."""
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, dict):
        loss = output.get("loss")
        return None if loss is None else float(loss)
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return float(output)
    return None


# ---------------------------------------------------------------------------------------------- snapshots
class SnapshotSaver:
    """Ignite handler: save the network weights at initialisation and every ``interval`` epochs.

    Files (under ``<output_dir>/snapshots/``):

    * ``epoch_0000.pt``: the weights when training starts (``Events.STARTED``), i.e. He initialisation
      for R.I. runs and the loaded source weights for T.L. runs (``network`` is built, and the source
      loaded, before the trainer runs);
    * ``epoch_XXXX.pt``: the weights at the end of epoch ``XXXX`` (``Events.EPOCH_COMPLETED``, every
      ``interval`` epochs, and always the last epoch);
    * ``history.json``: ``{"metric_name", "interval", "entries": [{"epoch", "iteration", "train_seconds",
      "val_seconds", "val_dice", "file"}, ...]}``, one entry per snapshot; ``val_dice`` is
      ``evaluator.state.metrics[metric_name]`` of the validation run of that epoch (``null`` for the
      initialisation and for epochs without a validation run). ``train_seconds`` is the wall-clock time spent
      in training iterations to reach the snapshot (from each iteration's start to its end: data loading of the
      step, forward, backward, optimiser), with the validation runs, snapshots and checkpoints kept out of it;
      ``val_seconds`` is the time spent validating so far, reported separately (the paper's Figs. 2, 4, 11
      plot accuracy against training time).

    Each file is a plain CPU state dict (loadable by ``common.transfer.load_source_weights``), written
    atomically (temporary file + ``os.replace``).

    Order with validation: the bundles' ``ValidationHandler`` runs the evaluator at the trainer's
    ``EPOCH_COMPLETED``. List this handler after it in ``train#handlers`` so the entry is written with the
    fresh metric. Whatever the order, the handler also listens to the evaluator's ``COMPLETED`` event and
    fills in the metric of the entry of that epoch (``evaluator.state.epoch`` equals the trainer's epoch
    after a ``ValidationHandler`` run), so the history is right either way; a metric is only taken when
    the evaluator ran for that very epoch.

    Resuming: an existing ``history.json`` is read back and extended; the initialisation snapshot is only
    written when training starts at epoch 0 (or when it is missing). The two clocks are part of the training
    checkpoint (:meth:`state_dict`), so a resumed run continues them where the checkpoint left them.
    With ``torch.distributed`` initialised only rank 0 writes. ``enabled=False`` makes ``attach`` a no-op
    (the bundles' ``save_snapshots`` switch).

    Args:
        network: the trained network (a DDP/DataParallel wrapper is unwrapped).
        output_dir: the run folder; snapshots go to ``<output_dir>/snapshots``.
        interval: save every ``interval`` epochs (>= 1).
        evaluator: the validation engine whose metric is recorded (None: no metric).
        metric_name: the evaluator's key metric (the bundles': ``val_mean_dice``).
        enabled: False to disable the handler.
    """

    #: The key of this handler's clocks in the training checkpoint.
    checkpoint_key = "snapshots"

    def __init__(
        self,
        network: torch.nn.Module,
        output_dir: str,
        interval: int = 1,
        evaluator: Any = None,
        metric_name: str = "val_mean_dice",
        enabled: bool = True,
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1 epoch, got {interval}.")
        self.network = network
        self.output_dir = output_dir
        self.snapshot_dir = os.path.join(output_dir, SNAPSHOT_DIR)
        self.history_path = os.path.join(self.snapshot_dir, HISTORY_FILE)
        self.interval = int(interval)
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.enabled = bool(enabled)
        self.entries: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.val_seconds = 0.0
        self._t_iter: float | None = None
        self._t_val: float | None = None

    # ------------------------------------------------------------------ ignite
    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not self.enabled:
            logger.info("SnapshotSaver disabled: no weight snapshots are saved.")
            return
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.STARTED, self._validation_started)
            self.evaluator.add_event_handler(Events.COMPLETED, self.validation_completed)

    # ------------------------------------------------------------------ clocks
    def _iteration_started(self, engine: Any = None) -> None:
        self._t_iter = time.perf_counter()

    def _iteration_completed(self, engine: Any = None) -> None:
        if self._t_iter is not None:
            self.train_seconds += time.perf_counter() - self._t_iter
            self._t_iter = None

    def _validation_started(self, evaluator: Any = None) -> None:
        self._t_val = time.perf_counter()

    def state_dict(self) -> dict[str, float]:
        """The training and validation clocks (seconds), for the training checkpoint."""
        return {"train_seconds": float(self.train_seconds), "val_seconds": float(self.val_seconds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.val_seconds = float(state.get("val_seconds", 0.0))

    def _is_writer(self) -> bool:
        return not is_not_rank0()

    def _metric(self, epoch: int) -> float | None:
        ev = self.evaluator
        state = getattr(ev, "state", None) if ev is not None else None
        if state is None or getattr(state, "epoch", None) != epoch:
            return None
        value = state.metrics.get(self.metric_name)
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    def started(self, engine: Any) -> None:
        if not self._is_writer():
            return
        self.entries = read_history(self.history_path)["entries"] if os.path.isfile(self.history_path) else []
        epoch = int(engine.state.epoch)
        if epoch == 0 or not os.path.isfile(os.path.join(self.snapshot_dir, snapshot_name(0))):
            if epoch != 0:
                logger.warning("SnapshotSaver: resumed at epoch %d without an initialisation snapshot; not saving one.", epoch)
            else:
                self.entries = [e for e in self.entries if e["epoch"] != 0]
                self._save(engine, 0)

    def epoch_completed(self, engine: Any) -> None:
        epoch = int(engine.state.epoch)
        last = engine.state.max_epochs is not None and epoch >= engine.state.max_epochs
        if self._is_writer() and (epoch % self.interval == 0 or last):
            self._save(engine, epoch)

    def validation_completed(self, evaluator: Any) -> None:
        if self._t_val is not None:
            self.val_seconds += time.perf_counter() - self._t_val
            self._t_val = None
        if not self._is_writer():
            return
        epoch = int(getattr(evaluator.state, "epoch", -1))
        for e in self.entries:
            if e["epoch"] == epoch and e.get("val_dice") is None:
                e["val_dice"] = self._metric(epoch)
                if e["val_dice"] is not None:
                    self._write_history()

    # ------------------------------------------------------------------ files
    def _save(self, engine: Any, epoch: int) -> None:
        name = snapshot_name(epoch)
        state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(self.network).state_dict().items()}
        atomic_write(os.path.join(self.snapshot_dir, name), lambda f: torch.save(state, f))
        entry = {
            "epoch": epoch,
            "iteration": int(engine.state.iteration),
            "train_seconds": round(self.train_seconds, 3),
            "val_seconds": round(self.val_seconds, 3),
            "val_dice": self._metric(epoch) if epoch > 0 else None,
            "file": name,
        }
        self.entries = [e for e in self.entries if e["epoch"] != epoch] + [entry]
        self.entries.sort(key=lambda e: e["epoch"])
        self._write_history()
        logger.info("Snapshot of epoch %d saved to %s (validation %s: %s).", epoch, name, self.metric_name, entry["val_dice"])

    def _write_history(self) -> None:
        write_json(self.history_path, {"metric_name": self.metric_name, "interval": self.interval, "entries": self.entries})


class LogLevel:
    """Ignite handler: set the logging level of its engine's logger (and of ``engines``) when attached.

    The bundles list it in ``train#handlers`` with ``"_disabled_": "$not @is_not_rank0"``, so the ranks > 0
    of a multi-GPU run log warnings only, and the log shows each epoch once.

    Args:
        level: a ``logging`` level name or number (default ``"WARNING"``).
        engines: other engines to set (e.g. the validation evaluator).
    """

    def __init__(self, level: str | int = "WARNING", engines: Any = ()) -> None:
        self.level = logging.getLevelName(level) if isinstance(level, str) else int(level)
        if not isinstance(self.level, int):
            raise ValueError(f"Unknown logging level {level!r}.")
        self.engines = list(engines or [])

    def attach(self, engine: Any) -> None:
        for e in [engine, *self.engines]:
            e.logger.setLevel(self.level)
