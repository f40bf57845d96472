# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The in-house datasets' layout (fetal cortical plate CP-younger/CP-older, TSC lesions from 5 centres) and
its checker.

In-house data stay where they are; a case list names them. Either a CSV with the columns
``image,label,group`` and optionally ``case``, or a JSON list of ``{"image", "label", "group"[, "case"]}``
objects, optionally with a ``split`` column (``test`` fixes a case to the test set of every run, ``train`` to the
training side; empty: the seeded split decides). Paths are relative to the list's folder, or absolute. ``group``
is the case's age group for
``--task cp`` (``younger``, ``older``) or its centre for ``--task tsc`` (``center1`` .. ``center5``);
``case`` defaults to the image's file name without ``.nii.gz``. Images and labels are NIfTI files
(``.nii``/``.nii.gz``) on one voxel grid; labels hold class ids ``0 .. K-1``. Example (``cases.csv``)::

    image,label,group,case
    images/fetus01_t2.nii.gz,labels/fetus01_cp.nii.gz,younger,fetus01
    images/fetus02_t2.nii.gz,labels/fetus02_cp.nii.gz,younger,fetus02
    images/fetus03_t2.nii.gz,labels/fetus03_cp.nii.gz,older,fetus03
    images/fetus04_t2.nii.gz,labels/fetus04_cp.nii.gz,older,fetus04

The same as JSON (``cases.json``)::

    [{"image": "images/fetus01_t2.nii.gz", "label": "labels/fetus01_cp.nii.gz", "group": "younger", "case": "fetus01"},
     ...]

Check it and write the dataset (``tools/prepare_data.py inhouse --help``)::

    python tools/prepare_data.py inhouse --source cases.csv --output data/CP-fetus --task cp
    python tools/prepare_data.py inhouse --source tsc.csv --output data/TSC --task tsc --labels "0:background,1:lesion"

:func:`check_inhouse` validates every case before any training (files exist and read, image and label
on one grid, label values within the classes, no NaN/inf voxels — :func:`common.data.check_case` — plus
every case in a known group and each required group present) and reports every bad case with its
problem in one :class:`common.data.DataError`. :func:`prepare_inhouse` then writes the same
``dataset.json`` as the converters of :mod:`common.prepare` (each training entry with its ``group``),
pointing at the files in place (absolute paths), or, with ``copy``, at copies in ``imagesTr/`` and
``labelsTr/``; it is written through the same staging folder (``<output>.partial``), so a kill leaves
either nothing or the previous complete dataset at ``<output>``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

from .data import DataError, check_case

__all__ = ["TASKS", "EXAMPLE_CSV", "parse_labels", "read_case_list", "check_inhouse", "prepare_inhouse"]

#: ``--task`` -> its groups (all required by default), default labels and dataset name.
TASKS: dict[str, dict[str, Any]] = {
    "cp": {"groups": ["younger", "older"], "labels": "0:background,1:cortical plate", "name": "CP-fetus"},
    "tsc": {"groups": [f"center{i}" for i in range(1, 6)], "labels": "0:background,1:lesion", "name": "TSC"},
}

#: The documented example case list (module docstring, docs/prepare_data.md).
EXAMPLE_CSV = """image,label,group,case
images/fetus01_t2.nii.gz,labels/fetus01_cp.nii.gz,younger,fetus01
images/fetus02_t2.nii.gz,labels/fetus02_cp.nii.gz,younger,fetus02
images/fetus03_t2.nii.gz,labels/fetus03_cp.nii.gz,older,fetus03
images/fetus04_t2.nii.gz,labels/fetus04_cp.nii.gz,older,fetus04
"""


def _log(message: str) -> None:
    print(message, flush=True)


def parse_labels(spec: str) -> dict[str, str]:
    """``"0:background,1:lesion"`` -> ``{"0": "background", "1": "lesion"}``; ids must be ``0 .. K-1``.

    Raises:
        ValueError: malformed spec, ids not contiguous from 0.
    """
    labels: dict[int, str] = {}
    for part in str(spec).split(","):
        if not part.strip():
            continue
        key, sep, name = part.partition(":")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise ValueError(f"--labels entry {part!r} in {spec!r}: expected ID:NAME, e.g. '0:background,1:lesion'.")
        labels[int(key)] = name.strip()
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise ValueError(f"--labels {spec!r}: class ids must be 0..K-1 with K >= 2, got {sorted(labels)}.")
    return {str(k): labels[k] for k in sorted(labels)}


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def read_case_list(path: str) -> list[dict[str, str]]:
    """Read a CSV or JSON case list; returns ``[{"case", "image", "label", "group"[, "split"]}]`` with absolute
    paths (relative ones are taken from the list's folder). The optional ``split`` column (``train`` / ``test`` /
    empty) fixes a case to one side of every run's split (:func:`common.data.split_cases`), e.g. the scans the
    paper kept for testing.

    Raises:
        DataError: missing/unreadable list, missing columns or keys, no case.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: case list not found.")
    base = os.path.dirname(os.path.abspath(path))
    try:
        if path.lower().endswith(".json"):
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{path}: expected a JSON list of {{\"image\", \"label\", \"group\"}} objects.")
        else:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                fields = [c.strip() for c in (reader.fieldnames or [])]
                missing = [c for c in ("image", "label", "group") if c not in fields]
                if missing:
                    raise DataError(f"{path}: the CSV needs the columns image,label,group (missing: {', '.join(missing)}).")
                rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except DataError:
        raise
    except (OSError, ValueError, csv.Error) as err:
        raise DataError(f"{path}: cannot be read as a case list: {err}") from err
    cases = []
    for i, row in enumerate(rows, 1):
        where = f"{path}: entry {i}"
        for key in ("image", "label"):
            if not str(row.get(key) or "").strip():
                raise DataError(f"{where}: no '{key}' path.")
        image, label = (os.path.normpath(os.path.join(base, str(row[k]).strip())) for k in ("image", "label"))
        split = str(row.get("split") or "").strip().lower()
        if split not in ("", "train", "test"):
            raise DataError(f"{where}: split {row.get('split')!r}; use train, test or leave it empty.")
        case = {
            "case": str(row.get("case") or "").strip() or _stem(image),
            "image": image,
            "label": label,
            "group": str(row.get("group") or "").strip(),
        }
        if split:
            case["split"] = split
        cases.append(case)
    if not cases:
        raise DataError(f"{path}: lists no case.")
    return cases


def check_inhouse(
    source: str, task: str, labels: str | None = None, groups: Sequence[str] | None = None
) -> tuple[list[dict[str, str]], dict[str, str], list[str]]:
    """Check every case of the case list ``source``; returns ``(cases, labels, groups)`` when all are good.

    Args:
        task: ``"cp"`` or ``"tsc"`` (see :data:`TASKS`).
        labels: ``"0:background,1:lesion"`` (None: the task's default).
        groups: the groups a case may belong to, each of which must have a case (None: the task's).

    Raises:
        DataError: listing every bad case (``case (image): problem``) and every required group without a case.
    """
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}.")
    label_names = parse_labels(labels or TASKS[task]["labels"])
    required = [g.strip() for g in (groups or TASKS[task]["groups"]) if g.strip()]
    cases = read_case_list(source)
    problems: list[str] = []
    seen: dict[str, int] = {}
    for c in cases:
        seen[c["case"]] = seen.get(c["case"], 0) + 1
    for c in cases:
        who = f"case {c['case']} ({c['image']})"
        if seen[c["case"]] > 1:
            problems.append(f"{who}: the case name is used {seen[c['case']]} times.")
        if not c["group"]:
            problems.append(f"{who}: no group (expected one of {', '.join(required)}).")
        elif c["group"] not in required:
            problems.append(f"{who}: unknown group {c['group']!r} (expected one of {', '.join(required)}).")
        missing = [c[k] for k in ("image", "label") if not os.path.isfile(c[k])]
        if missing:
            problems.append(f"{who}: file not found: {', '.join(missing)}.")
            continue
        try:
            check_case({"image": c["image"], "label": c["label"]}, len(label_names))
        except DataError as err:
            problems.append(f"{who}: {err}")
    present = {c["group"] for c in cases}
    for g in required:
        if g not in present:
            problems.append(f"group {g}: required by --task {task} but no case belongs to it.")
    if problems:
        raise DataError(
            f"{source}: {len(problems)} problem(s) in {len(cases)} in-house case(s):\n" + "\n".join(f"  {p}" for p in problems)
        )
    return cases, label_names, required


def prepare_inhouse(
    source: str,
    output: str,
    task: str,
    labels: str | None = None,
    groups: Sequence[str] | None = None,
    copy: bool = False,
    name: str | None = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """Check the case list (:func:`check_inhouse`), then write ``<output>/dataset.json`` (and, with ``copy``,
    ``imagesTr/``, ``labelsTr/``) through :class:`common.prepare.StagedDataset`. Returns the dataset.json.

    Raises:
        DataError: see :func:`check_inhouse`. ValueError: a case file lies inside ``output`` (replacing the
        output would delete it). FileExistsError: ``output`` is a folder this tool did not write.
    """
    from .io import atomic_path
    from .prepare import StagedDataset

    cases, label_names, required = check_inhouse(source, task, labels, groups)
    out = os.path.abspath(output)
    inside = [c[k] for c in cases for k in ("image", "label") if os.path.abspath(c[k]).startswith(out + os.sep)]
    if inside:
        raise ValueError(f"{inside[0]} lies inside --output {out}; choose an output folder outside the in-house data.")
    job = {"dataset": "inhouse", "source": os.path.abspath(source), "task": task, "labels": label_names,
           "groups": required, "copy": bool(copy), "name": name or TASKS[task]["name"]}
    staged = StagedDataset(out, job, log)
    if staged.open():
        log(f"All {len(cases)} in-house case(s) are good; {out} is already complete for these settings.")
        with open(os.path.join(out, "dataset.json"), encoding="utf-8") as f:
            return json.load(f)
    entries = []
    n = len(cases)
    for k, c in enumerate(cases, 1):
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"image": c["image"], "label": c["label"], "case": c["case"], "group": c["group"]}
        if c.get("split"):  # a case fixed to the test (or training) side, e.g. the paper's TSC test scans
            entry["split"] = c["split"]
        if copy:
            prior = staged.done(c["case"])
            if prior is not None:
                entries.append(prior)
                log(f"[{k}/{n}] {c['case']}: already copied by an earlier run, kept")
                continue
            for key, sub in (("image", "imagesTr"), ("label", "labelsTr")):
                ext = ".nii.gz" if c[key].endswith(".nii.gz") else ".nii"
                rel = f"./{sub}/{c['case']}{ext}"
                with atomic_path(staged.path(rel)) as tmp:
                    shutil.copyfile(c[key], tmp)
                entry[key] = rel
        entry["provenance"] = {"sources": {"image": c["image"], "label": c["label"]}, "group": c["group"], "copied": bool(copy)}
        if copy:
            staged.record(c["case"], entry)
        entries.append(entry)
        log(f"[{k}/{n}] {c['case']} ({c['group']}): {'copied' if copy else 'checked'} in {time.perf_counter() - t0:.1f} s")
    meta = {
        "name": job["name"],
        "description": f"In-house {task.upper()} cases listed in {os.path.abspath(source)}"
        + (" (copied)." if copy else " (files in place, absolute paths)."),
        "tensorImageSize": "3D",
        "modality": {"0": "MR"},
        "labels": label_names,
        "groups": {g: sum(c["group"] == g for c in cases) for g in required},
        "numTraining": len(entries),
        "numTest": 0,
        "training": entries,
        "test": [],
        "skipped": [],
    }
    staged.finish(meta)
    log(f"All {n} in-house case(s) are good; wrote {os.path.join(out, 'dataset.json')}.")
    return meta
