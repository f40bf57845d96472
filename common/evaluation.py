# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Evaluation of a trained checkpoint on a run's test split: per-case CSV and summary JSON.

Used by the bundles' ``configs/evaluate.json`` (layered on ``train.json``). For every test case the
prediction is made as in ``configs/inference.json`` (sliding window, softmax, the preprocessing inverted
by ``Invertd``, argmax) so it lies on the ORIGINAL image grid; the reference label is read again from its
file, untouched (same grid, checked), whatever the preprocessing did to the batch's ``label``. DSC, HD95 and ASSD (and, for lesion tasks, the lesion-count TP, FP, FN,
F1) are computed by :func:`common.metrics.per_class_metrics` with the voxel size of the original file
(the column norms of its affine), so distances are in millimetres of the original grid.

Outputs (written atomically: a temporary file in the same folder, then ``os.replace``):

* ``metrics.csv``: one row per test case and foreground class, columns ``case, class, dice, hd95, assd``
  (+ ``tp, fp, fn, f1`` when ``lesion_task``) ``, empty_pred, empty_ref``; HD95 and ASSD in mm; ``inf``
  where exactly one mask is empty (see :mod:`common.metrics`).
* ``summary.json``: :func:`common.metrics.summarize` of the rows (mean/std over all cases and over the
  finite values, the counts of cases, of empty predictions and of empty references), the conventions
  used (HD95 ``"max"`` or ``"pooled"``, units mm, the grid), and the checkpoint and cases evaluated.
  JSON has no infinity: non-finite numbers are written as the strings ``"inf"`` / ``"nan"``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .data import DataError, _case_id, check_cases, check_output_dir, load_datalist, make_datalist
from .io import write_csv, write_json
from .metrics import HD95_CONVENTIONS, per_class_metrics, summarize

__all__ = [
    "CSV_NAME",
    "SUMMARY_NAME",
    "HD95_DESCRIPTIONS",
    "load_test_cases",
    "spacing_from_affine",
    "case_rows",
    "write_results",
    "original_reference",
    "CaseMetricsWriter",
]

logger = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"
SUMMARY_NAME = "summary.json"

HD95_DESCRIPTIONS = {
    "max": "maximum of the two directed 95th percentiles of surface distances (MONAI, MetricsReloaded, DeepMind)",
    "pooled": "95th percentile of both directions' surface distances pooled (medpy's hd95, the authors' code)",
}

_GRID_ATOL = 1e-3  # mm, as common.data's same-grid check


# ------------------------------------------------------------------------------------------ test split
def _read_test_list(path: str) -> list[dict[str, str]]:
    test = load_datalist(path, require=("test",))["test"]
    base = os.path.dirname(os.path.abspath(path))
    cases = []
    for i, entry in enumerate(test):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(
                f"Datalist {path}: test entry {i} needs 'image' and 'label' (evaluation compares with the label), "
                f"got {entry!r}."
            )
        item = dict(entry)
        for k in ("image", "label"):
            # a relative path is taken from the datalist's folder, else from the working directory (a datalist
            # written by make_datalist for a relative dataset_dir)
            if not os.path.isabs(item[k]):
                beside = os.path.normpath(os.path.join(base, item[k]))
                item[k] = beside if os.path.isfile(beside) or not os.path.isfile(item[k]) else os.path.abspath(item[k])
        item.setdefault("case", _case_id(item["image"]))
        cases.append(item)
    return cases


def load_test_cases(
    datalist: str = "",
    run_datalist: str = "",
    dataset_dir: str = "",
    seed: int = 0,
    test_fraction: float = 0.3,
    num_classes: int = 2,
    check: bool = True,
    n_test: int | None = None,
    groups: Sequence[str] | str | None = None,
    dataset_options: Any = None,
) -> list[dict[str, str]]:
    """The labelled test cases to evaluate, ``[{"image", "label", "case"}, ...]``.

    Taken from, in this order: ``datalist`` (an explicit datalist JSON, e.g. ``--datalist``; must exist),
    ``run_datalist`` (the ``datalist.json`` the training run wrote, when it exists), else the split rebuilt
    from ``dataset_dir`` with ``seed``, ``test_fraction``, ``n_test`` and ``groups`` (the same function and settings
    as training, so the same test cases; nothing is written).

    With ``check`` (default) every test case is checked before any is evaluated, as training checks its cases
    (:func:`common.data.check_cases`: readable and complete files, 3-D, image and label on one grid, label values
    within ``0 .. num_classes-1``, no NaN/inf voxels; all-background references are counted and logged).

    Raises:
        DataError: the datalist or dataset cannot be read, a listed file is missing, there is no test case, or a
            test case fails the checks (naming the file).
    """
    if datalist:
        cases, source = _read_test_list(datalist), datalist
    elif run_datalist and os.path.isfile(run_datalist):
        cases, source = _read_test_list(run_datalist), run_datalist
    else:
        if not dataset_dir:
            raise DataError("No test cases: pass --datalist <datalist.json> or --dataset_dir <Decathlon folder>.")
        d = make_datalist(dataset_dir, None, seed=seed, test_fraction=test_fraction, num_classes=num_classes,
                          check=False, n_test=n_test, groups=groups, dataset_options=dataset_options)  # fmt: skip
        cases, source = d["test"], f"{dataset_dir} (split rebuilt with seed {seed})"
        where = f" at {run_datalist}" if run_datalist else ""
        logger.info("No run datalist%s: rebuilt the test split from %s.", where, source)
    if not cases:
        raise DataError(f"{source} has no test cases.")
    missing = [c[k] for c in cases for k in ("image", "label") if not os.path.isfile(c[k])]
    if missing:
        raise DataError(f"{source}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}.")
    if check:
        check_cases(cases, num_classes)
    logger.info("Evaluating %d test cases from %s.", len(cases), source)
    return cases


# ------------------------------------------------------------------------------------------ one case
def spacing_from_affine(affine: Any) -> tuple[float, float, float]:
    """Voxel size (mm) along the three array axes: the column norms of the affine's 3x3 part (oblique too)."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    sp = np.linalg.norm(a[:3, :3], axis=0)
    return float(sp[0]), float(sp[1]), float(sp[2])


def _squeeze_channel(x: Any, name: str, case: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"case {case}: {name} must be a 3-D label map (1, X, Y, Z), got shape {tuple(a.shape)}.")
    return a


def case_rows(
    case: str,
    pred: Any,
    label: Any,
    spacing: Sequence[float],
    classes: Sequence[int] = (1,),
    lesion_task: bool = False,
    hd95_convention: str = "max",
) -> list[dict[str, Any]]:
    """CSV rows of one case: one per class in ``classes``, ``{"case", "class", "dice", "hd95", "assd", ...}``.

    ``pred`` and ``label`` are integer label maps ``(X, Y, Z)`` or ``(1, X, Y, Z)`` on the same grid with
    voxel size ``spacing`` (mm).
    """
    p = _squeeze_channel(pred, "the prediction", case)
    r = _squeeze_channel(label, "the label", case)
    if p.shape != r.shape:
        raise ValueError(f"case {case}: the prediction {p.shape} and the label {r.shape} are not on the same grid.")
    per_class = per_class_metrics(p, r, spacing, classes, lesion=lesion_task, hd95_convention=hd95_convention)
    return [{"case": case, "class": c, **m} for c, m in per_class.items()]


# ------------------------------------------------------------------------------------------ writing
def _columns(lesion_task: bool) -> list[str]:
    cols = ["case", "class", "dice", "hd95", "assd"]
    if lesion_task:
        cols += ["tp", "fp", "fn", "f1"]
    return cols + ["empty_pred", "empty_ref"]


def _summary_of(rows: Sequence[Mapping[str, Any]], lesion_task: bool) -> dict[str, Any]:
    metrics = ("dice", "hd95", "assd") + (("f1",) if lesion_task else ())
    out = summarize(rows, metrics)
    if lesion_task:
        tp, fp, fn = (int(sum(r[k] for r in rows)) for k in ("tp", "fp", "fn"))
        denom = 2 * tp + fp + fn
        out["lesion_totals"] = {"tp": tp, "fp": fp, "fn": fn, "f1_pooled": 1.0 if denom == 0 else 2.0 * tp / denom}
    return out


def _class_summary(rows: Sequence[Mapping[str, Any]], lesion_task: bool) -> dict[str, Any]:
    """The summary of ``rows``: at the top level with one foreground class, else under ``per_class``."""
    classes = sorted({int(r["class"]) for r in rows})
    if len(classes) == 1:
        return _summary_of(rows, lesion_task)
    per_class = {c: _summary_of([r for r in rows if int(r["class"]) == c], lesion_task) for c in classes}
    conventions = {}
    for v in per_class.values():
        conventions = v.pop("conventions")
    n_cases = len(dict.fromkeys(r["case"] for r in rows))
    return {"n_cases": n_cases, "per_class": per_class, "conventions": conventions}


def write_results(
    rows: Sequence[Mapping[str, Any]],
    output_dir: str,
    lesion_task: bool = False,
    hd95_convention: str = "max",
    info: Mapping[str, Any] | None = None,
    csv_name: str = CSV_NAME,
    summary_name: str = SUMMARY_NAME,
) -> dict[str, Any]:
    """Write ``metrics.csv`` and ``summary.json`` under ``output_dir`` (atomically); returns the summary.

    With one foreground class the summary holds :func:`common.metrics.summarize`'s fields at its top level
    (``n_cases``, ``n_empty_pred``, ``n_empty_ref``, ``n_both_empty``, ``dice``/``hd95``/``assd`` (+``f1``)
    each with ``mean``, ``std``, ``mean_finite``, ``std_finite``, ``n_finite``, ``n_inf``); with several it
    holds them per class under ``per_class``; rows of a multi-task network (a ``task`` column) are summarised per
    task under ``per_task``, each as above. ``conventions`` names the HD95 convention, units and grid.
    """
    if not rows:
        raise ValueError("No evaluated cases: nothing to write.")
    tasks = list(dict.fromkeys(r["task"] for r in rows if r.get("task") is not None))
    cols = (["task"] if tasks else []) + _columns(lesion_task)

    classes = sorted({int(r["class"]) for r in rows})
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if tasks:  # a multi-task network: each task's cases on its own classes
        per_task = {t: _class_summary([r for r in rows if r.get("task") == t], lesion_task) for t in tasks}
        conventions = {}
        for v in per_task.values():
            conventions = v.pop("conventions")
        summary: dict[str, Any] = {"n_cases": len(cases), "per_task": per_task}
    else:
        summary = _class_summary(rows, lesion_task)
        conventions = summary.pop("conventions")
    conventions.update(
        {
            "hd95": f"{hd95_convention}: {HD95_DESCRIPTIONS[hd95_convention]}; numpy linear-interpolated percentiles",
            "units": {"dice": "fraction in [0, 1]", "hd95": "mm", "assd": "mm"},
            "grid": "prediction inverted to the original image grid; distances use the original file's voxel size",
            "surface": "mask voxels with a 6-neighbour outside the mask (border voxels included)",
            "non_finite_in_json": "written as the strings 'inf' / 'nan'",
        }
    )
    if lesion_task:
        conventions["lesions"] = (
            "26-connected components; TP: reference lesion touched by the prediction; F1 = 2TP/(2TP+FP+FN)"
        )
    result = {
        **summary,
        "classes": classes,
        "hd95_convention": hd95_convention,
        "lesion_task": bool(lesion_task),
        "csv": csv_name,
        "cases": cases,
        **dict(info or {}),
        "conventions": conventions,
    }
    write_csv(os.path.join(output_dir, csv_name), rows, cols)
    write_json(os.path.join(output_dir, summary_name), result)
    return result


def original_reference(label: Any) -> Any:
    """The reference label on its file's original grid, read again with MONAI's ``LoadImage`` when ``label`` is a
    ``MetaTensor`` that names its file (``filename_or_obj``), whatever the preprocessing did to it (the bundles
    resample the batch's label with the image), with the label map the preprocessing applied (a pooled source's,
    :class:`common.transforms.MapLabelsd`); else ``label`` itself."""
    meta = getattr(label, "meta", None) or {}
    src = meta.get("filename_or_obj")
    if not (isinstance(src, str) and os.path.isfile(src)):
        return label
    from monai.transforms import LoadImage

    from .transforms import LABEL_MAP_META, MapLabelsd

    ref = LoadImage(image_only=True, ensure_channel_first=True)(src)
    mapping = meta.get(LABEL_MAP_META)
    if isinstance(mapping, (list, tuple)):  # a batch of one, collated
        mapping = mapping[0]
    if mapping:
        ref = MapLabelsd("label")({"label": ref, "label_map": json.loads(mapping)})["label"]
    return ref


# ------------------------------------------------------------------------------------------ handler
class CaseMetricsWriter:
    """Ignite handler for an evaluator: metrics of every case, written as CSV and JSON when the run ends.

    Attach it to a ``SupervisedEvaluator`` whose post-processing leaves, per case, ``pred`` as an argmax label
    map ``(1, X, Y, Z)`` inverted to the original image grid and ``label`` as read from its file (the
    bundles' ``evaluate.json``). The case id is the data item's ``case`` (else the image file name).

    Args:
        output_dir: folder of ``metrics.csv`` and ``summary.json``.
        num_classes: classes including background; classes ``1 .. num_classes-1`` are evaluated (a case of a
            multi-task run names its own ``num_classes`` and ``task``: its classes, and a ``task`` column).
        lesion_task: also compute lesion-count detection (TP, FP, FN, F1).
        hd95_convention: ``"max"`` (default) or ``"pooled"``.
        info: extra entries for the summary (e.g. the checkpoint path).
        pred_key, label_key: keys of the prediction and the reference.
    """

    def __init__(
        self,
        output_dir: str,
        num_classes: int = 2,
        lesion_task: bool = False,
        hd95_convention: str = "max",
        info: Mapping[str, Any] | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
    ) -> None:
        if hd95_convention not in HD95_CONVENTIONS:
            raise ValueError(f"hd95_convention must be one of {HD95_CONVENTIONS}, got {hd95_convention!r}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}.")
        self.output_dir = output_dir
        self.classes = list(range(1, int(num_classes)))
        self.lesion_task = bool(lesion_task)
        self.hd95_convention = hd95_convention
        self.info = dict(info or {})
        self.pred_key = pred_key
        self.label_key = label_key
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        check_output_dir(self.output_dir, "Evaluation output folder")  # before any case is evaluated
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def reset(self, engine: Any = None) -> None:
        self.rows = []
        self.summary = None

    def iteration_completed(self, engine: Any) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):  # decollate=False: a batch of one
            batch, output = [batch], [output]
        for b, o in zip(batch, output):
            self.rows.extend(self.evaluate_item(b, o))

    def evaluate_item(self, batch_item: Mapping[str, Any], output_item: Mapping[str, Any]) -> list[dict[str, Any]]:
        pred = output_item[self.pred_key]
        label = output_item.get(self.label_key)
        if label is None and isinstance(batch_item, Mapping):
            label = batch_item.get(self.label_key)
        meta = getattr(label, "meta", {}) or {}
        case = batch_item.get("case") if isinstance(batch_item, Mapping) else None
        if not case:
            case = _case_id(str(meta.get("filename_or_obj", getattr(pred, "meta", {}).get("filename_or_obj", "case"))))
        if label is None:
            raise ValueError(f"case {case}: no '{self.label_key}' to compare with; evaluation needs labelled cases.")
        label = original_reference(label)
        affine = getattr(label, "affine", None)
        if affine is None:
            raise ValueError(f"case {case}: the label carries no affine; load it with LoadImaged (MetaTensor).")
        p_aff = getattr(pred, "affine", None)
        if tuple(pred.shape[-3:]) != tuple(label.shape[-3:]) or (
            p_aff is not None and not np.allclose(np.asarray(p_aff.cpu()), np.asarray(affine.cpu()), atol=_GRID_ATOL)
        ):
            raise ValueError(
                f"case {case}: the prediction (shape {tuple(pred.shape)}) is not on the label's original grid "
                f"(shape {tuple(label.shape)}): the post-processing must invert the preprocessing (Invertd)."
            )
        spacing = spacing_from_affine(affine)
        item = batch_item if isinstance(batch_item, Mapping) else {}
        classes = list(range(1, int(item["num_classes"]))) if item.get("num_classes") else self.classes
        rows = case_rows(str(case), pred, label, spacing, classes, self.lesion_task, self.hd95_convention)
        if item.get("task") is not None:  # a multi-task network: the dataset (head) of the case
            rows = [{"task": str(item["task"]), **r} for r in rows]
        return rows

    def completed(self, engine: Any = None) -> None:
        if not self.rows:
            raise ValueError("The evaluator saw no case: the test list is empty.")
        self.summary = write_results(self.rows, self.output_dir, self.lesion_task, self.hd95_convention, self.info)
        if "per_task" in self.summary:
            for task, s in self.summary["per_task"].items():
                if "dice" in s:
                    logger.info("Task %s: %d cases, DSC %.4f +- %.4f.", task, s["n_cases"], s["dice"]["mean"], s["dice"]["std"])
        elif len(self.classes) == 1:
            s = self.summary
            logger.info(
                "Evaluated %d cases: DSC %.4f +- %.4f, HD95 %s mm, ASSD %s mm (%s); %d empty predictions. Wrote %s.",
                s["n_cases"],
                s["dice"]["mean"],
                s["dice"]["std"],
                f"{s['hd95']['mean']:.3f}",
                f"{s['assd']['mean']:.3f}",
                self.hd95_convention,
                s["n_empty_pred"],
                os.path.join(self.output_dir, CSV_NAME),
            )
            if engine is not None:
                engine.state.metrics["mean_dice"] = s["dice"]["mean"]
