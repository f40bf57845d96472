"""Training handlers (ignite) used by the bundles: the paper's learning-rate decay rule.

The paper: "an initial learning rate of 1e-4, which was reduced by 0.90 after every 2000 training
iterations if the loss did not decrease". The authors' code instead decays when the validation Dice
falls below 0.995 times its previous value. Both are offered by :class:`PlateauDecay`:

* ``monitor="loss"`` (the paper, default): at the end of every window of ``interval`` iterations the
  mean training loss of the window is compared with the mean of the previous window; when it did not
  decrease the learning rate is multiplied by ``factor``.
* ``monitor="val_dice"`` (the authors' code): at the end of every window the latest validation Dice
  (``evaluator.state.metrics[metric_name]``) is compared with the value at the previous window end;
  when it is below ``tolerance`` (0.995) times that value the learning rate is multiplied by ``factor``.

The decay state is part of the checkpoint (``state_dict`` / ``load_state_dict``), so a resumed run
decays exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

__all__ = ["DecayRule", "PlateauDecay"]

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

    Attach with ``handler.attach(trainer)``; the bundles list it in ``train#handlers``.
    The learning rate is written to ``engine.state.metrics["lr"]`` every iteration so the stats and
    TensorBoard handlers log it, and each decay is logged.
    """

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

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        if self.rule.monitor == "loss":
            loss = self.output_transform(engine.state.output)
            if loss is not None:
                self.rule.update(float(loss))
        if engine.state.iteration % self.interval == 0:
            value = None
            if self.rule.monitor == "val_dice":
                value = self.evaluator.state.metrics.get(self.metric_name) if self.evaluator.state else None
            if self.rule.window_end(value):
                self._decay(engine)
        engine.state.metrics["lr"] = self.optimizer.param_groups[0]["lr"]

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
        return {"rule": self.rule.state_dict(), "decays": self.decays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state.get("rule", {}))
        self.decays = int(state.get("decays", 0))


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
