# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Training health: a run whose network can no longer learn stops, and says so in its log and its record.

The paper's network has no normalisation layer, and its loss is the soft Dice of a softmax. When the logits grow
large enough that the softmax rounds to exactly 0 and 1 in float32 (a logit margin above about 100; seen in
float32 and bf16 runs, docs/benchmarks.md, "Training collapse"), every voxel is predicted as one class with
probability 1, the soft Dice's gradient ``dDice/dlogit = p (1 - p) (...)`` is exactly zero, and nothing can
move the network again: the run has *collapsed* (to all background or to all foreground), however long it trains
on. A non-finite loss (the run has *diverged*) poisons Adam's moments the same way.

:class:`TrainingHealth` (an ignite handler in every bundle's ``train#handlers``) watches each training iteration:

* ``diverged``: the training loss is NaN or infinite;
* ``collapsed``: of the last ``patience`` training batches whose label holds foreground, at least
  ``stalled_fraction`` passed a gradient norm (of the optimised parameters) at most ``grad_floor``. Batches
  without foreground are not looked at (an all-background block may be predicted with certainty). A healthy
  run's gradient norm is of order 0.1-10 on every batch (the soft Dice is in [0, 1]); a saturated one's is 0 on
  nearly every batch, with a rare batch whose few unsaturated voxels pass a gradient (seen: 5e-6, 3e-4, 5.6), so
  a fraction, not a run of consecutive batches, makes the rule.

On either it logs a warning naming the run folder, the epoch, the iteration and what it saw, records
``status`` and ``failure`` in the run's ``run_info.json`` (:func:`common.runs.update_run_record`), and ends the
training (``engine.terminate()``: the final checkpoint is written, ``model.pt`` stays the best validated network
before the failure). The status is part of the training checkpoint (``checkpoint_key``), so the same command
started again says that the run failed instead of training a dead network on. A run that trains to its last
iteration is recorded as ``completed``. The evaluation summary (``configs/evaluate.json``) and the study report
read the status back (:func:`common.runs.run_status`): a failed run is listed apart and never averaged into a
table.

It also watches the validations: when every validation case is predicted as a single class (all background
or all foreground) for ``val_patience`` validations in a row, it logs a warning and records it under
``warnings`` in ``run_info.json``, without stopping the run (a lesion network may predict no lesion for a while
and recover: only a vanishing gradient proves that a run cannot).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from .runs import COMPLETED, RUNNING, update_run_record

__all__ = ["DIVERGED", "COLLAPSED", "STALLED_FRACTION", "TrainingHealth", "gradient_norm", "constant_prediction"]

logger = logging.getLogger(__name__)

DIVERGED = "diverged"
COLLAPSED = "collapsed"
#: The default fraction of the last ``patience`` training batches with foreground that must pass no gradient.
STALLED_FRACTION = 0.8


def gradient_norm(optimizer: torch.optim.Optimizer) -> float | None:
    """The Euclidean norm of the gradients of ``optimizer``'s parameters (None when none has a gradient)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    return float(torch.linalg.vector_norm(norms))


def constant_prediction(pred: Any) -> str | None:
    """``"background"`` / ``"foreground"`` when the discrete prediction ``pred`` labels every voxel as background /
    as foreground, else None. ``pred``: one-hot ``(C, ...)`` (the bundles' post-processing, C >= 2) or a label map
    ``(1, ...)``."""
    if not isinstance(pred, torch.Tensor) or pred.numel() == 0:
        return None
    if pred.shape[0] >= 2:
        fg = pred[1:].sum(0) > 0
    else:
        fg = pred[0] > 0
    if not bool(fg.any()):
        return "background"
    if bool(fg.all()):
        return "foreground"
    return None


def _items(output: Any) -> list[Any]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


def _loss_of(output: Any) -> float | None:
    for item in _items(output):
        if isinstance(item, dict) and item.get("loss") is not None:
            loss = item["loss"]
            return float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
    return None


def _has_foreground(batch: Any, label_key: str) -> bool | None:
    """Whether the training batch's label (a collated dict, or the list of dicts MONAI's engines decollate it into)
    holds foreground; None when it has no label tensor."""
    labels = [item.get(label_key) for item in _items(batch) if isinstance(item, dict)]
    labels = [lab for lab in labels if isinstance(lab, torch.Tensor)]
    if not labels:
        return None
    return any(bool((lab > 0).any()) for lab in labels)


def _predicted(output: Any) -> str | None:
    kinds = {constant_prediction(item.get("pred")) for item in _items(output) if isinstance(item, dict)}
    return kinds.pop() if len(kinds) == 1 else None


class TrainingHealth:
    """Ignite handler: stop a run that has diverged or collapsed, and record why (see the module docstring).

    Args:
        output_dir: the run folder (its ``run_info.json`` receives the status).
        optimizer: the training optimizer; the gradients of its parameters are watched.
        patience: the number of last training batches with foreground that the collapse rule looks at.
        grad_floor: the gradient norm at or below which a batch counts as passing no gradient.
        stalled_fraction: the fraction of those batches passing no gradient that makes a collapse.
        evaluator: the validation engine (None: the validations are not watched).
        val_patience: consecutive validations with every case predicted as one class that give a warning.
        label_key: the label's key in the training batch.
        enabled: False makes :meth:`attach` a no-op.

    In a multi-GPU run the ranks see the same (all-reduced) gradients and agree on the foreground through an
    all-reduce, so they stop together; only rank 0 writes.
    """

    #: The key of this handler's state in the training checkpoint.
    checkpoint_key = "health"

    def __init__(
        self,
        output_dir: str,
        optimizer: torch.optim.Optimizer,
        patience: int = 50,
        grad_floor: float = 1e-6,
        stalled_fraction: float = STALLED_FRACTION,
        evaluator: Any = None,
        val_patience: int = 3,
        label_key: str = "label",
        enabled: bool = True,
    ) -> None:
        if int(patience) < 1 or int(val_patience) < 1:
            raise ValueError(f"patience and val_patience must be >= 1, got {patience} and {val_patience}.")
        if not grad_floor >= 0:
            raise ValueError(f"grad_floor must be >= 0, got {grad_floor}.")
        if not 0 < stalled_fraction <= 1:
            raise ValueError(f"stalled_fraction must be in (0, 1], got {stalled_fraction}.")
        self.output_dir = output_dir
        self.optimizer = optimizer
        self.patience = int(patience)
        self.grad_floor = float(grad_floor)
        self.stalled_fraction = float(stalled_fraction)
        self.evaluator = evaluator
        self.val_patience = int(val_patience)
        self.label_key = label_key
        self.enabled = bool(enabled)
        self.status = RUNNING
        self.failure: dict[str, Any] | None = None
        self.stalled: list[bool] = []  # the last `patience` batches with foreground: passed no gradient?
        self.constant_validations = 0
        self.warnings: list[str] = []
        self._val_kinds: set[str | None] = set()
        self._engine: Any = None

    # ------------------------------------------------------------------ ignite
    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not self.enabled:
            return
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.STARTED, self._validation_started)
            self.evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._validation_iteration)
            self.evaluator.add_event_handler(Events.COMPLETED, self._validation_completed)

    def state_dict(self) -> dict[str, Any]:
        return {"status": self.status, "failure": self.failure or {}, "stalled": self.stalled,
                "constant_validations": self.constant_validations}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.status = str(state.get("status", RUNNING))
        self.failure = dict(state.get("failure") or {}) or None
        self.stalled = [bool(x) for x in state.get("stalled", [])][-self.patience:]
        self.constant_validations = int(state.get("constant_validations", 0))

    @property
    def failed(self) -> bool:
        return self.status not in (RUNNING, COMPLETED)

    # ------------------------------------------------------------------ training
    def started(self, engine: Any) -> None:
        if self.failed:  # a resumed run that had failed: say so again, and do not train it on
            logger.warning("Run %s %s earlier (epoch %s, iteration %s): %s Not training it on; start a new run folder.",
                           self.output_dir, self.status, self.failure.get("epoch"), self.failure.get("iteration"),
                           self.failure.get("reason"))  # fmt: skip
            update_run_record(self.output_dir, status=self.status, failure=self.failure)
            engine.terminate()
        elif self.status == COMPLETED:
            self.status = RUNNING  # a finished run extended with a larger max_epochs

    def iteration_completed(self, engine: Any) -> None:
        if self.failed:
            return
        loss = _loss_of(engine.state.output)
        if loss is not None and not math.isfinite(loss):
            self._fail(engine, DIVERGED, f"the training loss is {loss}: the weights and Adam's moments are no longer finite.")
            return
        has_fg = _has_foreground(engine.state.batch, self.label_key)
        if has_fg is None:
            return
        has_fg = _any_over_ranks(has_fg)
        if not has_fg:
            return
        norm = gradient_norm(self.optimizer)
        if norm is None:
            return
        self.stalled = (self.stalled + [norm <= self.grad_floor])[-self.patience:]
        n_stalled = sum(self.stalled)
        if len(self.stalled) == self.patience and n_stalled >= self.stalled_fraction * self.patience:
            kind = _predicted(engine.state.output)
            what = f"the last batch predicted {kind} in every voxel" if kind else "the softmax saturated"
            self._fail(engine, COLLAPSED,
                       f"the gradient norm of the trained parameters was <= {self.grad_floor:g} on {n_stalled} of the "
                       f"last {self.patience} training batches holding foreground (last: {norm:.3g}; {what}): the "
                       f"soft Dice passes no gradient, and the network cannot learn again.")  # fmt: skip

    def completed(self, engine: Any) -> None:
        if self.failed:
            return
        self.status = COMPLETED
        update_run_record(self.output_dir, status=COMPLETED, failure=None)

    def _fail(self, engine: Any, status: str, reason: str) -> None:
        self.status = status
        self.failure = {"reason": reason, "epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration)}
        logger.warning("Run %s %s at epoch %d, iteration %d: %s The training stops here; model.pt is the best network "
                       "validated before.", self.output_dir, status.upper(), engine.state.epoch, engine.state.iteration,
                       reason)  # fmt: skip
        update_run_record(self.output_dir, status=status, failure=self.failure)
        engine.terminate()

    # ------------------------------------------------------------------ validation
    def _validation_started(self, evaluator: Any = None) -> None:
        self._val_kinds = set()

    def _validation_iteration(self, evaluator: Any) -> None:
        for item in _items(evaluator.state.output):
            if isinstance(item, dict):
                self._val_kinds.add(constant_prediction(item.get("pred")))

    def _validation_completed(self, evaluator: Any) -> None:
        kinds = self._val_kinds
        if kinds and None not in kinds:
            self.constant_validations += 1
        else:
            self.constant_validations = 0
        if self.constant_validations == self.val_patience:
            epoch = getattr(getattr(self._engine, "state", None), "epoch", None)
            text = (f"epoch {epoch}: every validation case predicted as {' or '.join(sorted(kinds))} only, "
                    f"{self.constant_validations} validations in a row")  # fmt: skip
            logger.warning("Run %s: %s.", self.output_dir, text)
            self.warnings.append(text)
            update_run_record(self.output_dir, warnings=list(self.warnings))


def _any_over_ranks(flag: bool) -> bool:
    """``flag`` or-ed over the processes of an initialised ``torch.distributed`` run (every rank calls this), else
    ``flag``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    import ignite.distributed as idist

    return float(idist.all_reduce(float(flag))) > 0
