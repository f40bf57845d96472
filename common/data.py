# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Datasets, checks, splits and datalists.

A dataset is a folder in the Medical Segmentation Decathlon layout::

    <dataset_dir>/dataset.json       {"name", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
                                      "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...],
                                      "test": ["./imagesTs/y.nii.gz", ...]}
    <dataset_dir>/imagesTr/*.nii.gz
    <dataset_dir>/labelsTr/*.nii.gz

Only the labelled ``training`` cases are used. They are split deterministically (seeded) into 70 %
for training + validation and 30 % for test, as in the paper; a run then takes ``n_train`` training
cases and ``n_val`` validation cases from the 70 %. The split is written as a datalist JSON beside the
run's outputs (``datalist.json``) so every run can be reproduced.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import math
import os
import random
import zlib
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from .io import write_json

__all__ = [
    "DataError",
    "read_decathlon",
    "check_case",
    "check_same_grid",
    "check_image_file",
    "check_output_dir",
    "check_cases",
    "split_cases",
    "read_sources",
    "make_datalist",
    "load_datalist",
    "list_images",
]

logger = logging.getLogger(__name__)

_AFFINE_ATOL = 1e-3  # mm; voxel grids closer than this are the same grid
#: Optional fields of a ``dataset.json`` training entry that the datalists keep.
ENTRY_FIELDS = ("group", "split")


class DataError(ValueError):
    """A dataset problem, named with the file it concerns."""


def _case_id(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def read_decathlon(dataset_dir: str) -> dict[str, Any]:
    """Read ``dataset.json``; returns it with ``training`` entries made absolute, each with a ``case`` id (the
    entry's ``case``, else the image's file name), and the entry's ``group`` (a centre or age group) and
    ``split`` (``"train"`` or ``"test"``: a case fixed to one side of the split) when it has them.

    Raises:
        DataError: no such folder, no or unreadable ``dataset.json``, no labelled cases, missing files.
    """
    if not dataset_dir or not os.path.isdir(dataset_dir):
        raise DataError(f"Dataset folder {dataset_dir!r} does not exist.")
    meta_path = os.path.join(dataset_dir, "dataset.json")
    if not os.path.isfile(meta_path):
        raise DataError(
            f"{meta_path} not found: a dataset folder needs a dataset.json in the Medical Segmentation Decathlon "
            f"layout (see tools/prepare_data.py or make it with tools/make_synthetic.py)."
        )
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{meta_path} cannot be read as JSON: {err}") from err
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise DataError(f"{meta_path} has no labelled cases: its 'training' list is missing or empty.")
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{meta_path}: training entry {i} needs 'image' and 'label', got {entry!r}.")
    from monai.data import load_decathlon_datalist  # here, not at import: the data tools start without MONAI

    resolved = load_decathlon_datalist(meta_path, is_segmentation=True, data_list_key="training",
                                       base_dir=os.path.abspath(dataset_dir))  # fmt: skip
    cases = []
    missing = []
    for raw, entry in zip(training, resolved):
        item = {k: os.path.normpath(entry[k]) for k in ("image", "label")}
        for k in ("image", "label"):
            if not os.path.isfile(item[k]):
                missing.append(item[k])
        item["case"] = str(raw.get("case") or _case_id(item["image"]))
        for k in ENTRY_FIELDS:
            if raw.get(k) not in (None, ""):
                item[k] = str(raw[k])
        if item.get("split") not in (None, "train", "test"):
            raise DataError(f"{meta_path}: case {item['case']} has split {item['split']!r}; use 'train' or 'test'.")
        cases.append(item)
    if missing:
        raise DataError(
            f"{meta_path} lists {len(missing)} file(s) that do not exist, e.g. {missing[0]}"
            + (f" and {missing[1]}" if len(missing) > 1 else "")
            + "."
        )
    ids = [c["case"] for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"{meta_path}: case names repeat: {dup[:5]}.")
    meta = dict(meta)
    meta["training"] = cases
    meta["dataset_dir"] = os.path.abspath(dataset_dir)
    return meta


def _load_header(path: str):
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as err:
        raise DataError(f"{path} cannot be read as an image (not a NIfTI file, or corrupt): {err}") from err


def _check_shape(path: str, shape: Sequence[int], channels: int = 1, what: str = "image") -> tuple[int, ...]:
    """The spatial shape of a 3-D ``what`` stored as ``(X, Y, Z)`` or ``(X, Y, Z, C...)`` with ``channels`` channels."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise DataError(
            f"{path}: expected a 3-D {what} (X, Y, Z), got a {len(shape)}-D one of shape {shape}; "
            f"the bundles segment volumes."
        )
    n = math.prod(shape[3:])
    if n != channels:
        raise DataError(
            f"{path}: expected a 3-D {what} with {channels} channel{'s' if channels != 1 else ''}, got shape {shape}: "
            f"{n} channels (or time points) after the 3 spatial axes; the network takes in_channels={channels}."
        )
    return shape[:3]


def _check_complete(path: str, img: Any) -> None:
    """Raise :class:`DataError` when the voxel data of a single-file NIfTI are cut short (an interrupted copy or
    download). ``.nii``: the file size; ``.nii.gz``: the gzip trailer's uncompressed size, and when that does not
    match (e.g. a multi-member gzip) a streaming decompression that holds one 16 MiB chunk at a time."""
    if not path.endswith((".nii", ".nii.gz")):
        return
    proxy = img.dataobj  # nibabel's ArrayProxy: where the voxels start in the (uncompressed) file, their type
    try:
        expected = int(proxy.offset) + math.prod(int(s) for s in proxy.shape) * np.dtype(proxy.dtype).itemsize
    except Exception:  # not a file-backed NIfTI: nothing to compare with
        return
    cut = f"{path}: the file is truncated or corrupt"
    if path.endswith(".nii"):
        size = os.path.getsize(path)
        if size < expected:
            raise DataError(f"{cut}: {size} bytes, its header needs {expected}; copy or download it again.")
        return
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            raise DataError(f"{cut}: {f.tell()} bytes is no gzip stream.")
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    if isize == expected % 2**32:
        return
    total = 0
    try:
        with gzip.open(path, "rb") as g:
            while True:
                chunk = g.read(1 << 24)
                if not chunk:
                    break
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{cut} ({err}); copy or download it again.") from err
    if total < expected:
        raise DataError(f"{cut}: it holds {total} bytes of NIfTI data, its header needs {expected}.")


def check_image_file(path: str, channels: int = 1) -> tuple[int, ...]:
    """Checks of one image file that need no voxel decoding: the header reads, the image is 3-D with
    ``channels`` channel(s), and the data are complete (not a truncated file). Returns the spatial shape.

    Raises:
        DataError: naming the file and the problem.
    """
    img = _load_header(path)
    spatial = _check_shape(path, img.shape, channels)
    _check_complete(path, img)
    return spatial


def _read_voxels(path: str, img: Any) -> np.ndarray:
    try:
        return np.asarray(img.dataobj)
    except Exception as err:  # truncated or corrupt data
        raise DataError(f"{path}: cannot read the voxel data (truncated or corrupt file?): {err}") from err


def check_output_dir(path: str, what: str = "Output folder") -> str:
    """Check, creating nothing, that ``path`` is a folder that exists and is writable, or can be created.

    Walks up to the nearest existing ancestor: it must be a folder (not a file) with write permission on a
    writable file system (``os.access``, which also reports a read-only mount; root passes permission bits
    but not a file in the way or a read-only mount). Returns ``path``.

    Raises:
        NotADirectoryError: a file stands where a folder of the path should be.
        PermissionError: the nearest existing folder is not writable.
    """
    if not path:
        raise ValueError(f"{what}: no path given.")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise NotADirectoryError(
            errno.ENOTDIR, f"{what} {path} cannot be created: {probe} is a file, not a folder (Not a directory)"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES,
            f"{what} {path} is not writable: no write access to {probe} (permissions or a read-only mount)",
        )
    return path


def check_same_grid(
    image: str, label: str, image_shape: Sequence[int], label_shape: Sequence[int], image_affine: Any, label_affine: Any
) -> None:
    """Raise :class:`DataError` naming ``label`` (a path) unless it lies on ``image``'s voxel grid: the same spatial
    shape and affines equal within 1e-3 mm."""
    if tuple(label_shape) != tuple(image_shape):
        raise DataError(
            f"{label}: label shape {tuple(label_shape)} differs from image shape {tuple(image_shape)} ({image}); "
            f"image and label must share one voxel grid."
        )
    if not np.allclose(image_affine, label_affine, atol=_AFFINE_ATOL):
        raise DataError(
            f"{label}: label affine differs from the image's ({image}); image and label must share one voxel grid."
            f"\nimage affine:\n{np.round(np.asarray(image_affine), 4)}\nlabel affine:\n{np.round(np.asarray(label_affine), 4)}"
        )


def check_case(case: Mapping[str, Any], num_classes: int, check_values: bool = True) -> dict[str, Any]:
    """Check one labelled case; returns ``{"shape", "spacing", "labels"}``.

    Checks: both files readable, the image 3-D with one channel (or with several when the case names its
    ``channel``, which must exist), the label on the same voxel grid (shape and affine), label values integers
    within ``0 .. num_classes-1`` (after the case's ``label_map``, whose keys must cover every value of the
    file: an unexpected value is an error, never a silent remap), no NaN/inf image voxels.

    Raises:
        DataError: naming the file and the problem.
    """
    img = _load_header(case["image"])
    lab = _load_header(case["label"])
    channel = case.get("channel")
    if channel is None:
        ishape = _check_shape(case["image"], img.shape, 1, "image")
    else:
        ishape = _check_shape(case["image"], img.shape, math.prod(int(s) for s in img.shape[3:]), "image")
        n_channels = math.prod(int(s) for s in img.shape[3:])
        if not 0 <= int(channel) < n_channels:
            raise DataError(f"{case['image']}: channel {channel} was asked for, the image has {n_channels} channel(s).")
    lshape = _check_shape(case["label"], lab.shape, 1, "label")
    check_same_grid(case["image"], case["label"], ishape, lshape, img.affine, lab.affine)
    info: dict[str, Any] = {"shape": ishape, "spacing": tuple(float(s) for s in img.header.get_zooms()[:3])}
    if check_values:
        _check_complete(case["label"], lab)
        _check_complete(case["image"], img)
        labels = _read_voxels(case["label"], lab)
        image = _read_voxels(case["image"], img)
        if not np.isfinite(labels).all():
            raise DataError(f"{case['label']}: {int((~np.isfinite(labels)).sum())} label voxels are NaN or inf.")
        values = np.unique(labels)
        noninteger = [v for v in values.tolist() if v != int(v)]
        if noninteger:
            raise DataError(f"{case['label']}: label values {noninteger[:5]} are not integers.")
        label_map = case.get("label_map")
        if label_map is not None:
            unknown = [int(v) for v in values.tolist() if str(int(v)) not in label_map]
            if unknown:
                raise DataError(
                    f"{case['label']}: label values {unknown[:5]} are not in the label map {dict(label_map)} of "
                    f"source {case.get('source', '?')}; add them to the map (e.g. to 0) if they are expected."
                )
            values = np.unique([int(label_map[str(int(v))]) for v in values.tolist()])
        bad = [v for v in values.tolist() if not 0 <= v < num_classes]
        if bad:
            mapped = " after the label map" if label_map is not None else ""
            raise DataError(
                f"{case['label']}: label values {bad[:5]}{mapped} are outside the declared classes 0..{num_classes - 1}."
            )
        if not np.isfinite(image).all():
            raise DataError(f"{case['image']}: {int((~np.isfinite(image)).sum())} voxels are NaN or inf.")
        info["labels"] = [int(v) for v in values]
        if values.max(initial=0) == 0:
            logger.warning("%s: the label is all background.", case["label"])
    return info


def check_cases(cases: Sequence[dict[str, str]], num_classes: int, check_values: bool = True) -> dict[str, Any]:
    """Check every case (see :func:`check_case`); returns a summary with the count of all-background labels."""
    n_empty = 0
    for case in cases:
        info = check_case(case, int(case.get("num_classes", num_classes)), check_values)
        if check_values and max(info["labels"]) == 0:
            n_empty += 1
    if n_empty:
        logger.warning("%d of %d labels are all background.", n_empty, len(cases))
    return {"n_cases": len(cases), "n_all_background": n_empty}


def split_cases(
    cases: Sequence[Mapping[str, Any]], seed: int = 0, test_fraction: float = 0.3, n_test: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic split into (train+validation pool, test).

    Cases are sorted by id, shuffled with ``random.Random(seed)`` and the last ``n_test`` (default
    ``round(test_fraction * n)``, at least 1 when there are 2+ cases) form the test set; the result does not
    depend on the order of ``dataset.json``. Cases marked ``"split": "test"`` (or ``"train"``) in their entry
    are fixed to that side; the others are split as above (``n_test`` then counts the unmarked ones too).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    fixed_test = [dict(c) for c in cases if c.get("split") == "test"]
    fixed_pool = [dict(c) for c in cases if c.get("split") == "train"]
    free = [dict(c) for c in cases if c.get("split") not in ("test", "train")]
    if fixed_test or fixed_pool:
        if n_test is None:
            n_test = 0 if fixed_test else None
        else:
            n_test = max(0, int(n_test) - len(fixed_test))
    ordered = sorted(free, key=lambda c: c["case"])
    random.Random(seed).shuffle(ordered)
    if n_test is None:
        n_test = int(round(test_fraction * len(ordered)))
        if test_fraction > 0 and len(ordered) >= 2:
            n_test = max(1, n_test)
    if not 0 <= int(n_test) < max(1, len(ordered)) and not (n_test == 0 and not ordered):
        raise ValueError(f"n_test={n_test} leaves no case for training among {len(ordered)} cases.")
    n_pool = len(ordered) - int(n_test)
    pool = sorted(fixed_pool, key=lambda c: c["case"]) + ordered[:n_pool]
    return pool, ordered[n_pool:] + sorted(fixed_test, key=lambda c: c["case"])


def read_sources(
    dataset_dir: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]],
    options: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
) -> list[dict[str, Any]]:
    """The datasets a run reads, each as ``{"name", "dir", "label_map", "channel", "meta"}``.

    ``options`` (the bundles' ``dataset_options`` id) gives the settings of each dataset apart from its folder: a
    dict for one dataset, or a list aligned with a list of folders, so that ``--dataset_dir`` can point at other
    folders while the label maps and channels stay. ``dataset_dir`` is one Decathlon folder, or a pool: a list of
    folders and/or source specs
    ``{"dir": folder, "name": optional, "label_map": {"source value": class, ...}, "channel": index or name,
    "task": head name, "modality": "CT" or "MR", "num_classes": classes}``. ``label_map`` maps every label value
    of that dataset to a class of the run (values it does not list are an error when the cases are checked);
    ``channel`` picks one channel of multi-channel images, by index or by its name in the dataset's ``modality``
    map (e.g. ``"FLAIR"``). ``task``, ``modality`` and ``num_classes`` are for multi-task runs, whose datasets keep
    their own labels and normalisation: each case goes to its task's head, is normalised for its modality, and
    is checked against its task's classes.
    """
    specs = [dataset_dir] if isinstance(dataset_dir, (str, os.PathLike, Mapping)) else list(dataset_dir or [])
    if not specs:
        raise DataError("No dataset given: pass --dataset_dir <Decathlon folder> (or a list of them).")
    if options is None:
        opts: list[Mapping[str, Any] | None] = [None] * len(specs)
    else:
        opts = [options] if isinstance(options, Mapping) else list(options)
        if len(opts) != len(specs):
            raise DataError(
                f"dataset_options has {len(opts)} entries for {len(specs)} dataset folder(s) {specs}: give one per folder "
                f"(null for none), or --dataset_options null."
            )
    sources = []
    for spec, opt in zip(specs, opts):
        spec = {"dir": os.fspath(spec)} if isinstance(spec, (str, os.PathLike)) else dict(spec)
        spec = {**dict(opt or {}), **spec}
        if "dir" not in spec:
            raise DataError(f"Source {spec!r} has no 'dir' (the Decathlon folder).")
        meta = read_decathlon(spec["dir"])
        name = str(spec.get("name") or os.path.basename(os.path.normpath(spec["dir"])))
        label_map = spec.get("label_map")
        if label_map is not None:
            label_map = {str(int(float(k))): int(v) for k, v in dict(label_map).items()}
        channel = spec.get("channel")
        picked = meta.get("channel")  # a converter (tools/prepare_data.py msd --channel) already kept this one
        if channel is not None and isinstance(picked, str) and str(channel).lower() == picked.lower():
            logger.info("%s holds the %s channel only (picked when it was converted).", spec["dir"], picked)
            channel = None
        if channel is not None and not isinstance(channel, int) and not str(channel).isdigit():
            names = {str(v).lower(): int(k) for k, v in (meta.get("modality") or {}).items()}
            if str(channel).lower() not in names:
                raise DataError(
                    f"{spec['dir']}: no channel named {channel!r} in its dataset.json modality {meta.get('modality')}."
                )
            channel = names[str(channel).lower()]
        extra = {k: spec[k] for k in ("task", "modality", "num_classes") if spec.get(k) is not None}
        sources.append({"name": name, "dir": meta["dataset_dir"], "label_map": label_map,
                        "channel": None if channel is None else int(channel), "meta": meta, **extra})  # fmt: skip
    names = [s["name"] for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"Sources repeat a name: {names}; give each a distinct 'name'.")
    return sources


def _interleave(lists: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Round-robin merge (first of each, then second of each, ...): a subset drawn from the front is balanced."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def make_datalist(
    dataset_dir: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]],
    output_dir: str | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.3,
    num_classes: int = 2,
    check: bool = True,
    filename: str = "datalist.json",
    n_test: int | None = None,
    groups: Sequence[str] | str | None = None,
    dataset_options: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Read, check and split the run's data; write the datalist JSON to ``output_dir``.

    The split is made per stratum (each dataset of a pool, and each ``group`` of a dataset: a centre or an age
    group of in-house data): ``test_fraction`` (or ``n_test`` cases) of each stratum form its test set, with the
    seed (:func:`split_cases`). ``groups`` keeps only the strata of those groups (e.g. ``["center5"]`` or the
    four other centres). Validation and training cases are then drawn from the strata's train+validation pools
    in turn (a small ``n_train`` takes from every dataset and group).

    Args:
        dataset_dir: one Decathlon folder, or a pool (see :func:`read_sources`).
        output_dir: where ``datalist.json`` is written (None: not written).
        n_train: training cases (None: all that remain after validation).
        n_val: validation cases (None: ``max(1, round(0.2 * pool))``, 0 when the pool has 1 case).
        seed: the split's seed (recorded in the datalist).
        test_fraction: the test share of each stratum (the paper: 0.3).
        num_classes: classes including background, for the label check.
        check: check every case before training (shape/affine/label values/NaN).
        n_test: test cases per stratum instead of ``test_fraction``.
        groups: the groups to keep (None: all; a string is one group, or comma-separated).
        dataset_options: each dataset's settings apart from its folder (see :func:`read_sources`).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...], "seed", "sources", "strata", ...}``; each case
        is ``{"image", "label", "case"}`` with absolute paths, plus ``source`` in a pool, ``group`` where the
        dataset has groups, and the source's ``label_map`` / ``channel`` when it sets them.

    Raises:
        DataError: bad dataset (see :func:`read_decathlon`, :func:`check_case`), an unknown group, or ``n_train``
            larger than available.
    """
    if output_dir:
        check_output_dir(output_dir, "Run output folder")  # fail before the checks, not after them
    sources = read_sources(dataset_dir, dataset_options)
    where = ", ".join(s["dir"] for s in sources)
    if isinstance(groups, str):
        groups = [g.strip() for g in groups.split(",") if g.strip()]
    pooled = len(sources) > 1
    strata = []
    for src in sources:
        cases = []
        for c in src["meta"]["training"]:
            item = dict(c)
            if pooled:
                item["source"] = src["name"]
                item["case"] = f"{src['name']}/{c['case']}"
            if src["label_map"] is not None:
                item["label_map"] = dict(src["label_map"])
            if src["channel"] is not None:
                item["channel"] = src["channel"]
            for k in ("task", "modality", "num_classes"):
                if k in src:
                    item[k] = src[k]
            cases.append(item)
        for group in sorted({c.get("group") for c in cases}, key=str):
            members = [c for c in cases if c.get("group") == group]
            pool, test = split_cases(members, seed=seed, test_fraction=test_fraction, n_test=n_test)
            strata.append({"source": src["name"], "group": group, "pool": pool, "test": test})
    if groups:
        known = sorted({str(s["group"]) for s in strata if s["group"] is not None})
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise DataError(f"{where}: groups {unknown} are not in the data (its groups: {known or 'none'}).")
        strata = [s for s in strata if s["group"] in groups]
    pool = _interleave([s["pool"] for s in strata])
    test = [c for s in strata for c in s["test"]]
    if n_val is None:
        n_val = max(1, int(round(0.2 * len(pool)))) if len(pool) > 1 else 0
    if n_val < 0 or (n_val > 0 and n_val >= len(pool)):
        raise DataError(f"{where}: n_val={n_val} leaves no training case in the train+validation pool of {len(pool)} cases.")
    val, rest = pool[:n_val], pool[n_val:]
    if n_train is None:
        n_train = len(rest)
    if n_train < 1:
        raise DataError(f"{where}: n_train must be >= 1, got {n_train}.")
    if n_train > len(rest):
        total = sum(len(s["pool"]) + len(s["test"]) for s in strata)
        raise DataError(
            f"{where}: n_train={n_train} but only {len(rest)} training cases are available ({total} labelled cases: "
            f"{len(pool)} in the train+validation pool, {n_val} of them for validation, {len(test)} for test); "
            f"lower --n_val, --test_fraction or --n_test to free more."
        )
    train = rest[:n_train]
    summary = {}
    if check:
        summary = check_cases(train + val + test, num_classes)
    first = sources[0]["meta"]
    datalist = {
        "dataset_dir": sources[0]["dir"] if not pooled else [s["dir"] for s in sources],
        "name": first.get("name", sources[0]["name"]) if not pooled else "+".join(s["name"] for s in sources),
        "modality": first.get("modality", {}),
        "labels": first.get("labels", {}),
        "seed": seed,
        "test_fraction": test_fraction,
        "n_test": n_test,
        "groups": list(groups) if groups else None,
        "n_train": n_train,
        "n_val": n_val,
        "sources": [{k: s[k] for k in ("name", "dir", "label_map", "channel", "task", "modality", "num_classes") if k in s}
                    for s in sources],  # fmt: skip
        "strata": [{"source": s["source"], "group": s["group"], "n_pool": len(s["pool"]), "n_test": len(s["test"])}
                   for s in strata],  # fmt: skip
        "checks": summary,
        "training": train,
        "validation": val,
        "test": test,
    }
    if output_dir:
        _check_same_run(output_dir, filename, datalist)
        path = write_json(os.path.join(output_dir, filename), datalist)
        logger.info(
            "Datalist %s: %d training, %d validation, %d test cases (seed %d).", path, len(train), len(val), len(test), seed
        )
    return datalist


def _check_same_run(output_dir: str, filename: str, datalist: Mapping[str, Any]) -> None:
    """Refuse to resume a run folder whose checkpoints were trained on other cases (another bundle's run of the same
    name, another ``n_train``, seed or dataset): resuming would silently mix two runs."""
    old_path = os.path.join(output_dir, filename)
    trained = any(os.path.isfile(os.path.join(output_dir, f)) for f in ("checkpoint.pt", "checkpoint_final.pt"))
    if not (trained and os.path.isfile(old_path)):
        return
    try:
        old = load_datalist(old_path)
    except DataError:
        return  # an unreadable record: the checkpointer's own checks decide
    for key in ("training", "validation", "test"):
        before = [c.get("case") for c in old[key]]
        now = [c.get("case") for c in datalist[key]]
        if before != now:
            raise DataError(
                f"Run folder {output_dir} holds a run trained on other {key} cases ({len(before)} from "
                f"{old.get('dataset_dir')}, n_train {old.get('n_train')}, seed {old.get('seed')}) than this command asks "
                f"for ({len(now)} from {datalist.get('dataset_dir')}, n_train {datalist.get('n_train')}, seed "
                f"{datalist.get('seed')}); resuming would mix two runs. Give this run another --run_name (or "
                f"--bundle_root), or delete the folder to start it again."
            )


def load_datalist(path: str, require: Sequence[str] = ("training", "validation", "test")) -> dict[str, Any]:
    """Read a datalist JSON (written by :func:`make_datalist`, or a user's own with at least the ``require``
    lists); clear error when it is missing, not JSON, or lacks a required list."""
    if not os.path.isfile(path):
        raise DataError(f"Datalist {path} not found.")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"Datalist {path} cannot be read as JSON: {err}") from err
    for key in require:
        if not isinstance(d, dict) or not isinstance(d.get(key), list):
            raise DataError(f"Datalist {path} has no '{key}' list.")
    return d


def list_images(source: str | Sequence[str]) -> list[dict[str, str]]:
    """Images to segment: a folder (every ``.nii``/``.nii.gz`` in it), a datalist/dataset JSON (its test
    cases, else its training cases) or a list of paths. Returns ``[{"image": path}, ...]``.
    """
    if isinstance(source, (list, tuple)):
        paths = list(source)
    elif os.path.isdir(source):
        # hidden files are skipped: an interrupted atomic write's temporary file, macOS "._x.nii.gz" metadata
        paths = sorted(
            os.path.join(source, f)
            for f in os.listdir(source)
            if f.endswith((".nii.gz", ".nii")) and not f.startswith(".")
        )
    elif os.path.isfile(source) and source.endswith(".json"):
        try:
            with open(source, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{source} cannot be read as JSON: {err}") from err
        if not isinstance(d, dict):
            raise DataError(f"{source}: expected a datalist or dataset.json object, got a {type(d).__name__}.")
        base = os.path.dirname(os.path.abspath(source))
        entries = d.get("test") or d.get("training") or []
        paths = [e["image"] if isinstance(e, dict) else e for e in entries]
        paths = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in paths]
    else:
        raise DataError(f"Input {source!r} is neither a folder of NIfTI images, a JSON datalist nor a list of paths.")
    if not paths:
        raise DataError(f"Input {source!r} holds no images.")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"Image {missing[0]} does not exist ({len(missing)} missing in {source!r}).")
    return [{"image": p} for p in paths]
