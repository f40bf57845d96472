# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Converters from the paper's public datasets (Table I) to the Decathlon layout the bundles read.

One converter per dataset as distributed (``tools/prepare_data.py <dataset> --help``; see
``docs/prepare_data.md``):

* ``msd``: ``TaskXX_*/dataset.json, imagesTr/, labelsTr/`` (BraTS, Prostate: 4-D multi-channel images,
  ``--channel`` picks one by name); default label map ``nonzero:1``; name: the task's.
* ``kits19``: ``case_XXXXX/imaging.nii.gz, segmentation.nii.gz``; ``1:1,2:1`` (kidney + tumour); ``KiTS``.
* ``lits``: ``volume-N.nii, segmentation-N.nii``; ``1:1,2:1`` (liver + tumour); ``LiTS``.
* ``sliver07``: ``liver-origXXX.mhd/.raw, liver-segXXX.mhd/.raw`` (read with ITK); ``nonzero:1``; ``Liver-CT``.
* ``chaos``: ``<patient>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm``, ``<patient>/T2SPIR/DICOM_anon/*.dcm``,
  one PNG mask per slice in ``<patient>/{T1DUAL,T2SPIR}/Ground/``; ``55-70:1`` (MR liver = grey 63);
  ``Liver-MRI-DUAL-in``, ``Liver-MRI-DUAL-out``, ``Liver-MRI-SPIR``.
* ``dhcp``: ``sub-X/ses-Y/anat/sub-X_ses-Y_T2w.nii.gz`` + ``sub-X_ses-Y_desc-drawem9_dseg.nii.gz``; ``2:1``
  (drawem9 cortical grey matter -> cortical plate); ``CP-newborn``.

Every converter writes ``<output>/imagesTr/<case>.nii.gz`` (float32), ``<output>/labelsTr/<case>.nii.gz``
(uint8 class ids) and ``<output>/dataset.json`` (``name``, ``modality`` ``{"0": "CT"|"MR"}``, ``labels``,
``numTraining``, ``training`` entries with a ``provenance`` record each, ``skipped``, ``prepared_by``).

Conventions:

* Arrays are ``(X, Y, Z)`` (NIfTI voxel order); affines are 4x4, voxel index -> world position in mm in
  the NIfTI/RAS+ convention (x grows to the patient's Left->Right, y Posterior->Anterior, z
  Inferior->Superior). ITK images (``.mhd``, DICOM) carry LPS+ geometry; MONAI's ``ITKReader`` with
  ``affine_lps_to_ras=True`` converts them (x and y change sign).
* The source affine is read, never assumed (KiTS19's has its axes permuted: the first array axis is the
  slice axis); image and label must share one voxel grid. Outputs are reoriented to RAS with MONAI's
  ``Orientation`` (a flip/permutation of the voxel array, no interpolation, world positions unchanged) and,
  with ``spacing``, resampled to isotropic voxels with MONAI's ``Spacing`` (image trilinear, label nearest).
* Labels go through a :class:`LabelMap` (``"1:1,2:1"``; ranges ``"55-70:1"``; ``"nonzero:1"``); source
  values no rule matches become background (0).

Resumable and atomic: cases are written into ``<output>.partial/`` (each file through a temporary file +
fsync + ``os.replace``, each case recorded in ``.prepare/cases/<case>.json`` once both files are
complete). A rerun of the same command keeps the recorded cases and converts the rest; only when all
cases are done is ``dataset.json`` written and the staging folder renamed to ``<output>`` (a previous
complete output is renamed to ``<output>.previous`` first and deleted afterwards; a rerun after a kill
between the two renames puts it back first). A kill at any moment leaves at ``<output>`` either nothing
or the previous complete dataset. A rerun whose output is already complete with the same settings does
nothing. ``TLSEG_PREPARE_TEST_DELAY`` (seconds, a test hook) sleeps after each case written.

Bad sources (unreadable, missing mask, grid mismatch, NaN voxels, non-integer labels) raise
:class:`common.data.DataError` naming the file and the problem; with ``skip_bad`` the case is skipped
and listed at the end and under ``skipped`` in ``dataset.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from glob import glob
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .data import DataError
from .data import check_same_grid as _check_same_grid
from .io import atomic_path, remove_stale_temporaries, write_json

__all__ = [
    "TEST_DELAY_ENV",
    "TOOL",
    "LabelMap",
    "Volume",
    "SourceCase",
    "Discovery",
    "Converter",
    "CONVERTERS",
    "CHAOS_SEQUENCES",
    "natural_key",
    "read_nifti",
    "read_itk",
    "itk_to_volume",
    "read_dicom_series",
    "read_png_masks",
    "check_same_grid",
    "to_output_grid",
    "write_nifti",
    "StagedDataset",
    "convert",
]

#: Test hook: seconds to sleep after each case written (lets a test kill the tool between cases).
TEST_DELAY_ENV = "TLSEG_PREPARE_TEST_DELAY"
#: ``prepared_by.tool`` in every dataset.json this module writes; an existing ``<output>`` is only
#: replaced when its dataset.json carries it.
TOOL = "tlseg tools/prepare_data.py"

_AFFINE_ATOL = 1e-3  # mm; two voxel grids closer than this are the same grid (as in common.data)
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _log(message: str) -> None:
    """Progress goes to stdout, flushed (a log file or pipe shows each case as it ends)."""
    print(message, flush=True)


def natural_key(text: str) -> list[Any]:
    """Sort key comparing digit runs as numbers (``slice_9.png`` < ``slice_10.png``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


# ----------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelMap:
    """Source label value -> output class id.

    ``spec`` is a comma-separated list of rules ``SOURCE:TARGET``; ``SOURCE`` is an integer (``2``), an
    inclusive range (``55-70``) or ``nonzero``; ``TARGET`` an integer class id 0..255. The first rule that
    matches a value decides; values that no rule matches become 0 (background). Examples: ``"1:1,2:1"``
    (pancreas + tumour -> pancreas), ``"1:1,2:1,3:1"`` (BraTS whole tumour), ``"2:1"`` (drawem9 cortical
    grey matter -> cortical plate), ``"55-70:1"`` (CHAOS MR liver), ``"nonzero:1"``.
    """

    spec: str
    rules: tuple[tuple[Any, int], ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, spec: str) -> "LabelMap":
        """Parse ``spec``; raises ``ValueError`` naming the bad rule."""
        rules: list[tuple[Any, int]] = []
        for raw in str(spec).split(","):
            rule = raw.strip()
            if not rule:
                continue
            m = re.fullmatch(r"(nonzero|\d+|\d+\s*-\s*\d+)\s*:\s*(\d+)", rule)
            if not m:
                raise ValueError(
                    f"label map rule {rule!r} in {spec!r}: expected SOURCE:TARGET with SOURCE an integer, a range "
                    f"LO-HI or 'nonzero' and TARGET an integer class id (e.g. '1:1,2:1' or '55-70:1')."
                )
            src, dst = m.group(1), int(m.group(2))
            if dst > 255:
                raise ValueError(f"label map rule {rule!r}: target class {dst} is above 255 (labels are uint8).")
            if src == "nonzero":
                key: Any = "nonzero"
            elif "-" in src:
                lo, hi = (int(v) for v in src.split("-"))
                if lo > hi:
                    raise ValueError(f"label map rule {rule!r}: empty range {lo}-{hi}.")
                key = (lo, hi)
            else:
                key = int(src)
            rules.append((key, dst))
        if not rules:
            raise ValueError(f"label map {spec!r} has no rule.")
        canonical = ",".join(
            ("nonzero" if k == "nonzero" else f"{k[0]}-{k[1]}" if isinstance(k, tuple) else str(k)) + f":{d}"
            for k, d in rules
        )
        return cls(canonical, tuple(rules))

    @property
    def num_classes(self) -> int:
        """Output classes including background: ``1 + the largest target``."""
        return 1 + max(d for _, d in self.rules)

    def target(self, value: int) -> int:
        """The output class of source value ``value``."""
        for key, dst in self.rules:
            if (
                (key == "nonzero" and value != 0)
                or (isinstance(key, tuple) and key[0] <= value <= key[1])
                or (isinstance(key, int) and value == key)
            ):
                return dst
        return 0

    def sources_of(self, target: int, values: Sequence[int]) -> list[int]:
        """The values among ``values`` that map to ``target``."""
        return [v for v in values if self.target(v) == target]

    def apply(self, labels: np.ndarray, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        """Map a label array of any shape; returns ``(uint8 array, {"source_values", "mapped"})``.

        Raises:
            DataError: NaN/inf or non-integer values (a label holds class ids), naming ``path``.
        """
        values = np.unique(labels)
        if values.dtype.kind == "f":
            if not np.isfinite(values).all():
                raise DataError(f"{path}: the label holds NaN or inf values; a label image holds integer class ids.")
            frac = values[values != np.round(values)]
            if frac.size:
                raise DataError(
                    f"{path}: label values {frac[:5].tolist()} are not integers; a label image holds class ids "
                    f"(was it resampled with linear interpolation?)."
                )
        ints = [int(v) for v in values]
        out = np.zeros(labels.shape, dtype=np.uint8)
        mapped: dict[str, int] = {}
        for v in ints:
            t = self.target(v)
            mapped[str(v)] = t
            if t:
                out[labels == v] = t
        return out, {"source_values": ints, "mapped": mapped}


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class Volume:
    """A voxel array ``(X, Y, Z)`` and its affine (4x4, voxel index -> RAS world position in mm)."""

    array: np.ndarray
    affine: np.ndarray
    path: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each array axis in mm (the affine's column norms)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> str:
        """Orientation of the array axes, e.g. ``"RAS"``, ``"IPL"`` (nibabel's ``aff2axcodes``)."""
        import nibabel as nib

        return "".join(str(c) for c in nib.aff2axcodes(self.affine))


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found.")


def _check_affine(path: str, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(f"{path}: degenerate voxel-to-world affine (zero spacing or collinear axes):\n{affine}")
    return affine


def read_nifti(path: str, channel: int | None = None, n_channels: int = 1, what: str = "image") -> Volume:
    """Read a NIfTI file with nibabel (its ``affine``: sform, else qform, already RAS).

    Args:
        path: ``.nii`` / ``.nii.gz``.
        channel: for a 4-D ``(X, Y, Z, C)`` file, the channel to keep (0-based); None: the file must be 3-D
            (or 4-D with one channel).
        n_channels: the number of channels a 4-D file must have when ``channel`` is given.
        what: ``"image"`` or ``"label"`` (messages).

    Raises:
        DataError: missing, unreadable or truncated file, wrong dimensionality, degenerate affine.
    """
    import nibabel as nib

    _require_file(path, what)
    try:
        img = nib.load(path)
    except Exception as err:
        raise DataError(f"{path}: cannot be read as NIfTI (corrupt or not a NIfTI file): {err}") from err
    shape = tuple(int(s) for s in img.shape)
    try:
        if len(shape) == 3:
            data = np.asarray(img.dataobj)
            if channel is not None and n_channels > 1:
                raise DataError(
                    f"{path}: a 3-D {what} {shape}, but the dataset lists {n_channels} channels (expected (X, Y, Z, C))."
                )
        elif len(shape) == 4 and channel is not None:
            if shape[3] != n_channels:
                raise DataError(
                    f"{path}: {shape[3]} channels in the {what} {shape}, but the dataset lists {n_channels}."
                )
            data = np.asarray(img.dataobj[..., channel])
        elif len(shape) >= 4 and int(np.prod(shape[3:])) == 1:
            data = np.asarray(img.dataobj).reshape(shape[:3])
        else:
            raise DataError(f"{path}: expected a 3-D {what} (X, Y, Z), got shape {shape}.")
    except DataError:
        raise
    except Exception as err:  # truncated gzip stream, short file
        raise DataError(f"{path}: cannot read the voxel data (truncated or corrupt file?): {err}") from err
    return Volume(data, _check_affine(path, img.affine), path)


def _check_mhd_data_file(path: str) -> None:
    """A MetaImage header names its voxel file (``ElementDataFile``); a missing ``.raw`` gets a clear message
    (ITK's own says only "Cannot open data file")."""
    if not path.lower().endswith(".mhd"):
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "ElementDataFile":
                    name = value.strip()
                    if name and name.upper() not in ("LOCAL", "LIST") and "%" not in name:
                        raw = os.path.join(os.path.dirname(path), name)
                        if not os.path.isfile(raw):
                            raise DataError(f"{raw}: the voxel data file named by {path} not found.")
                    return
    except OSError as err:
        raise DataError(f"{path}: cannot be read: {err}") from err


def read_itk(path: str, what: str = "image") -> Any:
    """Read any ITK-readable file (``.mhd``/``.raw``, ``.nrrd``, ``.png``, ...) with ``itk.imread``; returns
    the ITK image (LPS geometry).

    Raises:
        DataError: missing or unreadable file (ITK's message, first lines).
    """
    import itk

    _require_file(path, what)
    _check_mhd_data_file(path)
    try:
        return itk.imread(path)
    except Exception as err:
        msg = " ".join(str(err).split())[:300]
        raise DataError(f"{path}: ITK cannot read the {what}: {msg}") from err


def itk_to_volume(image: Any, path: str) -> Volume:
    """An ITK image (LPS) as a :class:`Volume` (RAS), through MONAI's ``ITKReader(affine_lps_to_ras=True)``:
    the array is reversed to ``(X, Y, Z)`` and x, y of the affine change sign."""
    from monai.data import ITKReader

    arr, meta = ITKReader(affine_lps_to_ras=True).get_data(image)
    arr = np.array(arr)  # own the memory (the ITK image may be freed)
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3-D scalar image, got an array of shape {arr.shape}.")
    return Volume(arr, _check_affine(path, np.asarray(meta["affine"])), path)


def _dicom_header(path: str) -> tuple[Any, dict[str, str]]:
    import itk

    io = itk.GDCMImageIO.New()
    io.SetFileName(path)
    try:
        io.ReadImageInformation()
    except Exception as err:
        raise DataError(f"{path}: cannot be read as DICOM: {' '.join(str(err).split())[:300]}") from err
    d = io.GetMetaDataDictionary()
    tags = {k: str(d[k]).strip() for k in ("0020|0013", "0020|0032", "0020|0037") if d.HasKey(k)}
    return io, tags


def read_dicom_series(folder: str) -> tuple[Any, list[str], list[int]]:
    """Read the one DICOM series of ``folder`` with ITK.

    ``itk.GDCMSeriesFileNames`` lists the files sorted by position along the slice normal (GDCM's
    ImagePositionPatient sort); ``itk.imread`` (an ``ImageSeriesReader``) stacks them in that order. When
    each file carries its own SeriesInstanceUID (some anonymised exports do), GDCM sees one series per file;
    the files are then sorted here the same way (by ImagePositionPatient projected on the normal of
    ImageOrientationPatient), the only own code, because GDCM's sorter is not reachable through ITK.

    Returns:
        ``(image, files, instance_numbers)``: the 3-D ITK image (LPS, float32), its files in slice order
        (slice ``z`` of the image is ``files[z]``) and each file's InstanceNumber (0020|0013).

    Raises:
        DataError: no folder, no or several series, unreadable files, missing/duplicate InstanceNumber.
    """
    import itk

    if not os.path.isdir(folder):
        raise DataError(f"{folder}: DICOM folder not found.")
    gen = itk.GDCMSeriesFileNames.New()
    gen.SetUseSeriesDetails(True)
    gen.SetDirectory(folder)
    uids = list(gen.GetSeriesUIDs())
    if not uids:
        raise DataError(f"{folder}: holds no readable DICOM series.")
    groups = [list(gen.GetFileNames(u)) for u in uids]
    if len(groups) == 1:
        files = groups[0]
    elif all(len(g) == 1 for g in groups):
        files = [g[0] for g in groups]
        keys = []
        for f in files:
            io, tags = _dicom_header(f)
            try:
                ipp = np.array([float(v) for v in tags["0020|0032"].split("\\")])
                iop = np.array([float(v) for v in tags["0020|0037"].split("\\")])
            except (KeyError, ValueError) as err:
                raise DataError(f"{f}: no usable ImagePositionPatient/ImageOrientationPatient to order the slices.") from err
            keys.append(float(ipp @ np.cross(iop[:3], iop[3:6])))
        files = [f for _, f in sorted(zip(keys, files))]
    else:
        raise DataError(
            f"{folder}: holds {len(groups)} DICOM series ({', '.join(str(len(g)) for g in groups)} files); "
            f"expected one series per folder."
        )
    instances = []
    for f in files:
        _, tags = _dicom_header(f)
        try:
            instances.append(int(float(tags["0020|0013"])))
        except (KeyError, ValueError) as err:
            raise DataError(f"{f}: no InstanceNumber (0020|0013); needed to match the slice with its mask.") from err
    if len(set(instances)) != len(instances):
        raise DataError(f"{folder}: InstanceNumbers repeat ({sorted(instances)}); cannot match slices to masks.")
    try:
        image = itk.imread(files, itk.F)
    except Exception as err:
        raise DataError(f"{folder}: ITK cannot read the DICOM series: {' '.join(str(err).split())[:300]}") from err
    if image.GetImageDimension() != 3 or int(image.GetLargestPossibleRegion().GetSize()[2]) != len(files):
        raise DataError(f"{folder}: the series of {len(files)} files did not read as a {len(files)}-slice volume.")
    return image, files, instances


def read_png_masks(ground: str, image: Any, files: Sequence[str], instances: Sequence[int]) -> Any:
    """Stack one PNG mask per slice on the geometry of the DICOM series ``image``.

    The PNGs (natural sort of their names) are in the order of the DICOM files' InstanceNumbers, while the
    series is in geometric order: slice ``z`` (file ``files[z]``) gets the PNG whose rank equals the rank of
    ``instances[z]``. PNG pixel ``(row, column)`` is DICOM pixel ``(row, column)`` (ITK index ``(x=column,
    y=row)``). Returns an ITK image (uint8 grey values as in the PNGs) sharing ``image``'s geometry.

    Raises:
        DataError: no folder, PNG count differs from the slice count, unreadable / colour / wrong-size PNG.
    """
    import itk

    if not os.path.isdir(ground):
        raise DataError(f"{ground}: mask folder (one PNG per slice) not found.")
    pngs = sorted((p for p in glob(os.path.join(ground, "*.png")) if not os.path.basename(p).startswith(".")),
                  key=lambda p: natural_key(os.path.basename(p)))
    n = len(files)
    if len(pngs) != n:
        raise DataError(f"{ground}: {len(pngs)} PNG masks for a DICOM series of {n} slices; need one per slice.")
    rank = {z: r for r, z in enumerate(sorted(range(n), key=lambda z: instances[z]))}
    shape = tuple(int(v) for v in reversed(image.GetLargestPossibleRegion().GetSize()))  # (Z, rows, columns)
    stack = np.zeros(shape, dtype=np.uint8)
    for z in range(n):
        png = pngs[rank[z]]
        arr = itk.array_from_image(read_itk(png, "mask"))  # a copy: a view would outlive its image
        if arr.ndim != 2:
            raise DataError(f"{png}: expected a grey-level mask, got an array of shape {arr.shape} (colour PNG?).")
        if arr.shape != shape[1:]:
            raise DataError(
                f"{png}: mask of {arr.shape[0]}x{arr.shape[1]} pixels for the slice {files[z]} of "
                f"{shape[1]}x{shape[2]} pixels (rows x columns)."
            )
        stack[z] = arr
    label = itk.image_from_array(stack)
    label.CopyInformation(image)
    return label


# ----------------------------------------------------------------------------------------------- geometry


def check_same_grid(image: Volume, label: Volume) -> None:
    """Raise :class:`DataError` (naming the label) unless ``label`` is on ``image``'s voxel grid
    (same shape, affines equal within 1e-3 mm; :func:`common.data.check_same_grid`)."""
    _check_same_grid(image.path, label.path, image.array.shape, label.array.shape, image.affine, label.affine)


def to_output_grid(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, spacing: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient to RAS (MONAI ``Orientation``) and optionally resample to ``spacing`` mm isotropic (MONAI
    ``Spacing``: image trilinear with border padding, label nearest).

    Args:
        image: ``(X, Y, Z)`` array; label: ``(X, Y, Z)`` class ids on the same grid; affine: their RAS affine.

    Returns:
        ``(image float32 (X', Y', Z'), label uint8 (X', Y', Z'), affine 4x4)``.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    aff = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    orient = Orientation(axcodes="RAS", labels=_RAS_LABELS)
    img = orient(MetaTensor(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], affine=aff))
    lab = orient(MetaTensor(torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None], affine=aff.clone()))
    if spacing:
        pix = (float(spacing),) * 3
        img = Spacing(pixdim=pix, mode="bilinear", padding_mode="border", dtype=np.float32)(img)
        lab = Spacing(pixdim=pix, mode="nearest", padding_mode="zeros", dtype=np.float32)(lab)
    out_aff = np.asarray(img.affine, dtype=np.float64)
    if img.shape != lab.shape or not np.allclose(out_aff, np.asarray(lab.affine), atol=_AFFINE_ATOL):
        raise RuntimeError("image and label ended on different grids after reorientation/resampling")
    lab_np = np.rint(lab[0].numpy()).astype(np.uint8)
    return img[0].numpy().astype(np.float32, copy=False), lab_np, out_aff


def write_nifti(path: str, array: np.ndarray, affine: np.ndarray, dtype: Any) -> None:
    """Write ``array`` ``(X, Y, Z)`` as ``dtype`` with ``affine`` (RAS, mm; sform and qform code 1) to ``path``
    atomically (temporary file + fsync + ``os.replace``: :func:`common.io.atomic_path`)."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    nii = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    nii.header.set_xyzt_units("mm")
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    suffix = ".tmp.nii.gz" if path.endswith(".nii.gz") else ".tmp.nii"  # nibabel picks the format by extension
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(nii, tmp)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------- staging


def _is_ours(folder: str) -> bool:
    """``folder`` holds a dataset written by this module (its dataset.json names :data:`TOOL`)."""
    try:
        with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as f:
            meta = json.load(f)
        return isinstance(meta, dict) and (meta.get("prepared_by") or {}).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


class StagedDataset:
    """The output folder of one conversion, built in ``<output>.partial/`` and moved into place at the end.

    ``job`` (the command's settings, JSON-serialisable) decides whether a staging folder left by a killed run
    belongs to this command: same job -> its recorded cases are kept; another job -> it is emptied.

    Raises (from :meth:`open`):
        FileExistsError: ``<output>`` (or the staging folder) exists and is not a dataset written by this tool.
    """

    def __init__(self, output: str, job: Mapping[str, Any], log: Callable[[str], None] = _log) -> None:
        self.output = os.path.abspath(output.rstrip("/\\") or output)
        self.staging = self.output + ".partial"
        self.previous = self.output + ".previous"
        self.meta_dir = os.path.join(self.staging, ".prepare")
        self.job = json.loads(json.dumps(dict(job)))
        self.log = log

    # -- state on disk
    def _staged_job(self) -> Any:
        try:
            with open(os.path.join(self.meta_dir, "job.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def open(self) -> bool:
        """Recover from a kill, check the output is ours, set up the staging folder.

        Returns True when ``<output>`` already holds the complete result of this job (nothing to do).
        """
        if os.path.exists(self.previous):
            if not _is_ours(self.previous):
                raise FileExistsError(f"{self.previous} exists and is not a dataset written by {TOOL}; move it away.")
            if not os.path.exists(self.output):  # killed between the two renames: put the old one back
                os.rename(self.previous, self.output)
                self.log(f"Restored the previous dataset {self.output} (an earlier run stopped while replacing it).")
            else:
                shutil.rmtree(self.previous)
        if os.path.exists(self.output):
            if not os.path.isdir(self.output):
                raise FileExistsError(f"{self.output} exists and is not a folder.")
            if os.listdir(self.output) and not _is_ours(self.output):
                raise FileExistsError(
                    f"{self.output} exists and is not a dataset written by {TOOL} (no dataset.json naming it); "
                    f"choose another --output or remove it."
                )
            if not os.path.isdir(self.staging) and self._output_up_to_date():
                with contextlib.suppress(OSError):
                    shutil.rmtree(os.path.join(self.output, ".prepare"))
                return True
        if os.path.isdir(self.staging):
            entries = set(os.listdir(self.staging))
            if entries and ".prepare" not in entries:
                raise FileExistsError(
                    f"{self.staging} exists and is not a staging folder of {TOOL}; move it away and run again."
                )
            if entries and self._staged_job() != self.job:
                self.log(f"{self.staging}: left by a run with other settings; starting afresh.")
                shutil.rmtree(self.staging)
        elif os.path.exists(self.staging):
            raise FileExistsError(f"{self.staging} exists and is not a folder; move it away.")
        for sub in ("imagesTr", "labelsTr", os.path.join(".prepare", "cases")):
            os.makedirs(os.path.join(self.staging, sub), exist_ok=True)
        if self._staged_job() != self.job:
            write_json(os.path.join(self.meta_dir, "job.json"), self.job)
        remove_stale_temporaries(self.staging)  # temporary files of writes a kill interrupted
        return False

    def _output_up_to_date(self) -> bool:
        try:
            with open(os.path.join(self.output, "dataset.json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return False
        return (meta.get("prepared_by") or {}).get("job") == self.job and not meta.get("skipped")

    def path(self, rel: str) -> str:
        """Absolute path in the staging folder of ``rel`` (e.g. ``imagesTr/x.nii.gz``)."""
        return os.path.join(self.staging, rel)

    def _record_path(self, case: str) -> str:
        return os.path.join(self.meta_dir, "cases", case + ".json")

    def done(self, case: str) -> dict[str, Any] | None:
        """The recorded training entry of ``case`` when an earlier run completed it (files present), else None."""
        try:
            with open(self._record_path(case), encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            return None
        for key in ("image", "label"):
            p = entry.get(key, "")
            if not os.path.isabs(p) and not os.path.isfile(self.path(p)):
                return None
        return entry

    def record(self, case: str, entry: Mapping[str, Any]) -> None:
        """Mark ``case`` complete (after its files are written)."""
        write_json(self._record_path(case), dict(entry))

    def finish(self, meta: dict[str, Any]) -> None:
        """Write ``dataset.json`` (with ``prepared_by``) and move the staging folder to ``<output>``."""
        keep = {os.path.normpath(e[k]) for e in meta["training"] for k in ("image", "label") if not os.path.isabs(e[k])}
        for sub in ("imagesTr", "labelsTr"):  # files of cases no longer in the source
            folder = self.path(sub)
            for name in os.listdir(folder):
                if os.path.normpath(os.path.join(".", sub, name)) not in keep:
                    os.unlink(os.path.join(folder, name))
            if not os.listdir(folder):
                os.rmdir(folder)
        meta = dict(meta)
        meta["prepared_by"] = {"tool": TOOL, "job": self.job, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(self.path("dataset.json"), meta)
        _fsync_dir(self.staging)
        if os.path.isdir(self.output) and not os.listdir(self.output):
            os.rmdir(self.output)  # an empty folder made beforehand: nothing to keep
        if os.path.exists(self.output):
            os.rename(self.output, self.previous)
        os.rename(self.staging, self.output)
        _fsync_dir(os.path.dirname(self.output))
        if os.path.exists(self.previous):
            shutil.rmtree(self.previous)
        shutil.rmtree(os.path.join(self.output, ".prepare"), ignore_errors=True)


# ----------------------------------------------------------------------------------------------- converters


@dataclass
class SourceCase:
    """One case as found in the source: ``name`` (output file stem), ``files`` (role -> path), ``info``."""

    name: str
    files: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Discovery:
    """What a converter found in ``--source``: the cases and the dataset-level facts."""

    cases: list[SourceCase]
    name: str
    modality: str
    organ: str
    extra: dict[str, Any] = field(default_factory=dict)  # added to dataset.json (e.g. the MSD channel)
    context: dict[str, Any] = field(default_factory=dict)  # for the case loader


@dataclass
class Converter:
    """A dataset's converter: ``discover(source, label_map, options) -> Discovery`` and
    ``load(case, discovery) -> (image Volume, label Volume, provenance extras)``."""

    name: str
    help: str
    label_map: str
    discover: Callable[[str, LabelMap, dict[str, Any]], Discovery]
    load: Callable[[SourceCase, Discovery], tuple[Volume, Volume, dict[str, Any]]]


def _rglob(root: str, pattern: str) -> list[str]:
    return sorted(
        (p for p in glob(os.path.join(root, "**", pattern), recursive=True) if not os.path.basename(p).startswith(".")),
        key=natural_key,
    )


def _require_dir(source: str) -> str:
    if not os.path.isdir(source):
        raise DataError(f"{source}: source folder not found.")
    return os.path.abspath(source)


def _load_nifti_case(case: SourceCase, disc: Discovery) -> tuple[Volume, Volume, dict[str, Any]]:
    return read_nifti(case.files["image"]), read_nifti(case.files["label"], what="label"), {}


# msd ---------------------------------------------------------------------------------------------------


def _discover_msd(source: str, label_map: LabelMap, opts: dict[str, Any]) -> Discovery:
    root = _require_dir(source)
    meta_path = os.path.join(root, "dataset.json")
    _require_file(meta_path, "the task's dataset.json (a Medical Segmentation Decathlon TaskXX_* folder)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            task = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{meta_path}: cannot be read as JSON: {err}") from err
    if not isinstance(task, dict) or not isinstance(task.get("training"), list) or not task["training"]:
        raise DataError(f"{meta_path}: no 'training' list of labelled cases.")
    modalities = {int(k): str(v) for k, v in (task.get("modality") or {"0": "CT"}).items()}
    names = [modalities[k] for k in sorted(modalities)]
    channel_name = opts.get("channel")
    if channel_name:
        hits = [k for k in sorted(modalities) if modalities[k].lower() == str(channel_name).lower()]
        if not hits:
            raise DataError(
                f"{meta_path}: no channel named {channel_name!r}; the task's channels are: "
                + ", ".join(f"{k}={modalities[k]}" for k in sorted(modalities))
                + "."
            )
        channel = hits[0]
    elif len(modalities) > 1:
        raise DataError(
            f"{meta_path}: the images have {len(modalities)} channels ({', '.join(names)}); pick one with --channel NAME."
        )
    else:
        channel = sorted(modalities)[0]
    picked = modalities[channel]
    modality = "CT" if picked.upper() == "CT" else "MR"
    task_name = str(task.get("name") or os.path.basename(root))
    task_labels = {int(k): str(v) for k, v in (task.get("labels") or {}).items()}
    fg = [task_labels[v] for v in label_map.sources_of(1, sorted(task_labels))]
    organ = fg[0] if len(fg) == 1 else task_name.lower()
    cases = []
    for i, entry in enumerate(task["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{meta_path}: training entry {i} needs 'image' and 'label', got {entry!r}.")
        img = os.path.normpath(os.path.join(root, entry["image"]))
        stem = os.path.basename(img)
        for ext in (".nii.gz", ".nii"):
            if stem.endswith(ext):
                stem = stem[: -len(ext)]
        cases.append(SourceCase(stem, {"image": img, "label": os.path.normpath(os.path.join(root, entry["label"]))}))
    extra = {"channel": picked} if len(modalities) > 1 or channel_name else {}
    name = task_name + (f"-{picked}" if len(modalities) > 1 else "")
    return Discovery(cases, name, modality, organ, extra,
                     {"channel": channel, "n_channels": len(modalities), "channel_name": picked})


def _load_msd(case: SourceCase, disc: Discovery) -> tuple[Volume, Volume, dict[str, Any]]:
    ctx = disc.context
    image = read_nifti(case.files["image"], channel=ctx["channel"], n_channels=ctx["n_channels"])
    label = read_nifti(case.files["label"], what="label")
    return image, label, {"channel": ctx["channel_name"], "channel_index": ctx["channel"]}


# kits19 ------------------------------------------------------------------------------------------------


def _discover_kits(source: str, label_map: LabelMap, opts: dict[str, Any]) -> Discovery:
    root = _require_dir(source)
    dirs = sorted((d for d in glob(os.path.join(root, "**", "case_*"), recursive=True) if os.path.isdir(d)),
                  key=natural_key)
    cases = [
        SourceCase(os.path.basename(d), {"image": os.path.join(d, "imaging.nii.gz"),
                                         "label": os.path.join(d, "segmentation.nii.gz")})
        for d in dirs
    ]
    return Discovery(cases, "KiTS", "CT", "kidney")


# lits --------------------------------------------------------------------------------------------------


def _discover_lits(source: str, label_map: LabelMap, opts: dict[str, Any]) -> Discovery:
    root = _require_dir(source)

    def index(prefix: str) -> dict[int, str]:
        found: dict[int, str] = {}
        for p in _rglob(root, prefix + "-*.nii*"):
            m = re.fullmatch(prefix + r"-(\d+)\.nii(\.gz)?", os.path.basename(p))
            if m:
                found.setdefault(int(m.group(1)), p)
        return found

    vols, segs = index("volume"), index("segmentation")
    cases = []
    for n in sorted(vols):
        seg = segs.get(n) or os.path.join(os.path.dirname(vols[n]), f"segmentation-{n}.nii")
        cases.append(SourceCase(f"lits_{n:03d}", {"image": vols[n], "label": seg}))
    return Discovery(cases, "LiTS", "CT", "liver")


# sliver07 ----------------------------------------------------------------------------------------------


def _discover_sliver(source: str, label_map: LabelMap, opts: dict[str, Any]) -> Discovery:
    root = _require_dir(source)
    cases = []
    for p in _rglob(root, "liver-orig*.mhd"):
        num = os.path.basename(p)[len("liver-orig"): -len(".mhd")]
        cases.append(SourceCase(f"sliver07_{num}", {"image": p, "label": os.path.join(os.path.dirname(p), f"liver-seg{num}.mhd")}))
    return Discovery(cases, "Liver-CT", "CT", "liver")


def _load_itk_case(case: SourceCase, disc: Discovery) -> tuple[Volume, Volume, dict[str, Any]]:
    image = itk_to_volume(read_itk(case.files["image"]), case.files["image"])
    label = itk_to_volume(read_itk(case.files["label"], "label"), case.files["label"])
    return image, label, {}


# chaos -------------------------------------------------------------------------------------------------

#: ``--sequence`` -> (DICOM folder, mask folder) inside a CHAOS MR patient folder, and the paper's name.
CHAOS_SEQUENCES: dict[str, tuple[str, str, str]] = {
    "t1_in": (os.path.join("T1DUAL", "DICOM_anon", "InPhase"), os.path.join("T1DUAL", "Ground"), "Liver-MRI-DUAL-in"),
    "t1_out": (os.path.join("T1DUAL", "DICOM_anon", "OutPhase"), os.path.join("T1DUAL", "Ground"), "Liver-MRI-DUAL-out"),
    "t2spir": (os.path.join("T2SPIR", "DICOM_anon"), os.path.join("T2SPIR", "Ground"), "Liver-MRI-SPIR"),
}


def _discover_chaos(source: str, label_map: LabelMap, opts: dict[str, Any]) -> Discovery:
    root = _require_dir(source)
    seq = opts.get("sequence")
    if seq not in CHAOS_SEQUENCES:
        raise ValueError(f"--sequence must be one of {', '.join(CHAOS_SEQUENCES)}, got {seq!r}.")
    dicom_rel, ground_rel, name = CHAOS_SEQUENCES[seq]
    patients = sorted(
        (d for d in os.listdir(root)
         if os.path.isdir(os.path.join(root, d, "T1DUAL")) or os.path.isdir(os.path.join(root, d, "T2SPIR"))),
        key=natural_key,
    )
    cases = [
        SourceCase(f"chaos_{p}", {"image": os.path.join(root, p, dicom_rel), "label": os.path.join(root, p, ground_rel)})
        for p in patients
    ]
    return Discovery(cases, name, "MR", "liver", {"sequence": seq})


def _load_chaos(case: SourceCase, disc: Discovery) -> tuple[Volume, Volume, dict[str, Any]]:
    image, files, instances = read_dicom_series(case.files["image"])
    label = read_png_masks(case.files["label"], image, files, instances)
    return (
        itk_to_volume(image, case.files["image"]),
        itk_to_volume(label, case.files["label"]),
        {"n_slices": len(files)},
    )


# dhcp --------------------------------------------------------------------------------------------------


def _discover_dhcp(source: str, label_map: LabelMap, opts: dict[str, Any]) -> Discovery:
    root = _require_dir(source)
    cases = []
    for anat in sorted(glob(os.path.join(root, "**", "sub-*", "ses-*", "anat"), recursive=True), key=natural_key):
        ses = os.path.basename(os.path.dirname(anat))
        sub = os.path.basename(os.path.dirname(os.path.dirname(anat)))
        prefix = f"{sub}_{ses}"
        image = os.path.join(anat, f"{prefix}_T2w.nii.gz")
        restored = os.path.join(anat, f"{prefix}_desc-restore_T2w.nii.gz")
        if not os.path.isfile(image) and os.path.isfile(restored):
            image = restored
        cases.append(SourceCase(prefix, {"image": image, "label": os.path.join(anat, f"{prefix}_desc-drawem9_dseg.nii.gz")}))
    return Discovery(cases, "CP-newborn", "MR", "cortical plate")


CONVERTERS: dict[str, Converter] = {
    "msd": Converter("msd", "Medical Segmentation Decathlon task folder (TaskXX_*)", "nonzero:1", _discover_msd, _load_msd),
    "kits19": Converter("kits19", "KiTS19 (case_XXXXX/imaging.nii.gz + segmentation.nii.gz)", "1:1,2:1",
                        _discover_kits, _load_nifti_case),
    "lits": Converter("lits", "LiTS (volume-N.nii + segmentation-N.nii)", "1:1,2:1", _discover_lits, _load_nifti_case),
    "sliver07": Converter("sliver07", "SLIVER07 (liver-origXXX.mhd/.raw + liver-segXXX.mhd/.raw, ITK)", "nonzero:1",
                          _discover_sliver, _load_itk_case),
    "chaos": Converter("chaos", "CHAOS MR (DICOM series + one PNG mask per slice)", "55-70:1", _discover_chaos, _load_chaos),
    "dhcp": Converter("dhcp", "dHCP neonatal (sub-X/ses-Y/anat T2w + drawem9 dseg)", "2:1", _discover_dhcp, _load_nifti_case),
}


def _fmt(values: Sequence[float]) -> list[float]:
    return [round(float(v), 6) for v in values]


def _convert_case(
    conv: Converter, case: SourceCase, disc: Discovery, label_map: LabelMap, spacing: float | None, staged: StagedDataset
) -> dict[str, Any]:
    image, label, extra = conv.load(case, disc)
    check_same_grid(image, label)
    finite = np.isfinite(image.array)
    if not finite.all():
        raise DataError(f"{image.path}: {int((~finite).sum())} image voxels are NaN or inf.")
    del finite
    mapped, lab_info = label_map.apply(label.array, label.path)
    img_out, lab_out, affine = to_output_grid(image.array, mapped, image.affine, spacing)
    rel_img, rel_lab = f"./imagesTr/{case.name}.nii.gz", f"./labelsTr/{case.name}.nii.gz"
    write_nifti(staged.path(rel_img), img_out, affine, np.float32)
    write_nifti(staged.path(rel_lab), lab_out, affine, np.uint8)
    n_fg = int((lab_out > 0).sum())
    provenance = {
        "sources": dict(case.files),
        "label_map": label_map.spec,
        **lab_info,
        "original_shape": list(image.array.shape),
        "original_spacing": _fmt(image.spacing),
        "original_axcodes": image.axcodes,
        "output_shape": list(img_out.shape),
        "output_spacing": _fmt(np.linalg.norm(affine[:3, :3], axis=0)),
        "foreground_voxels": n_fg,
        **extra,
    }
    return {"image": rel_img, "label": rel_lab, "case": case.name, "provenance": provenance}


def convert(
    dataset: str,
    source: str,
    output: str,
    spacing: float | None = None,
    label_map: str | None = None,
    organ: str | None = None,
    name: str | None = None,
    skip_bad: bool = False,
    log: Callable[[str], None] = _log,
    **options: Any,
) -> dict[str, Any]:
    """Convert one dataset (``dataset`` a key of :data:`CONVERTERS`) to the Decathlon layout at ``output``.

    Args:
        source: the dataset folder as distributed.
        output: the dataset folder to write (see the module docstring for the staging and the kill/rerun rules).
        spacing: isotropic voxel size in mm to resample to (None: keep the source grid).
        label_map: a :class:`LabelMap` spec (None: the converter's default).
        organ: name of class 1 in ``labels`` (comma-separated names for classes 1..K); None: the default.
        name: the dataset's ``name`` (None: the paper's name of the dataset).
        skip_bad: skip (and list) bad cases instead of stopping at the first.
        options: converter options: ``channel`` (msd), ``sequence`` (chaos).

    Returns:
        the ``dataset.json`` written (paths relative to ``output``).

    Raises:
        DataError: a bad case (without ``skip_bad``), no case found, every case bad.
        ValueError: bad arguments. FileExistsError: ``output`` is a folder this tool did not write.
    """
    if dataset not in CONVERTERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(CONVERTERS)}.")
    conv = CONVERTERS[dataset]
    if spacing is not None and not (np.isfinite(spacing) and spacing > 0):
        raise ValueError(f"--spacing must be a positive voxel size in mm, got {spacing}.")
    lmap = LabelMap.parse(label_map or conv.label_map)
    src, out = os.path.abspath(source), os.path.abspath(output)
    if src == out or src.startswith(out + os.sep):  # replacing the output would delete the source
        raise ValueError(f"--source {src} lies inside --output {out}; choose an output folder outside the source.")
    disc = conv.discover(src, lmap, options)
    if not disc.cases:
        raise DataError(f"{src}: no {dataset} cases found (expected {conv.help}).")
    ids = [c.name for c in disc.cases]
    if len(set(ids)) != len(ids):
        raise DataError(f"{src}: case names repeat: {sorted({i for i in ids if ids.count(i) > 1})[:5]}.")
    organs = [o.strip() for o in (organ or disc.organ).split(",")]
    if len(organs) != lmap.num_classes - 1:
        raise ValueError(
            f"the label map {lmap.spec!r} makes {lmap.num_classes - 1} foreground class(es); --organ names "
            f"{len(organs)} ({organ or disc.organ!r}); give one name per class, comma-separated."
        )
    job = {"dataset": dataset, "source": src, "spacing": spacing, "label_map": lmap.spec, "organ": organs,
           "name": name or disc.name, **{k: v for k, v in sorted(options.items()) if v is not None}}
    staged = StagedDataset(out, job, log)
    if staged.open():
        log(f"{out} is already complete for these settings; nothing to do (remove it to convert again).")
        with open(os.path.join(out, "dataset.json"), encoding="utf-8") as f:
            return json.load(f)
    n = len(disc.cases)
    entries: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
    log(f"Converting {n} {dataset} case(s) from {src} into {staged.staging} ...")
    for k, case in enumerate(disc.cases, 1):
        prior = staged.done(case.name)
        if prior is not None:
            entries.append(prior)
            log(f"[{k}/{n}] {case.name}: already converted by an earlier run, kept")
            continue
        t0 = time.perf_counter()
        try:
            entry = _convert_case(conv, case, disc, lmap, spacing, staged)
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append({"case": case.name, "problem": str(err)})
            log(f"[{k}/{n}] {case.name}: SKIPPED: {err}")
            continue
        staged.record(case.name, entry)
        entries.append(entry)
        if entry["provenance"]["foreground_voxels"] == 0:
            log(f"WARNING: {case.name}: the label is all background after the label map {lmap.spec!r} "
                f"(source values {entry['provenance']['source_values']}).")
        log(f"[{k}/{n}] {case.name}: {time.perf_counter() - t0:.1f} s")
        if delay:
            time.sleep(delay)
    if not entries:
        raise DataError(f"{src}: all {n} case(s) are bad:\n" + "\n".join(f"  {s['case']}: {s['problem']}" for s in skipped))
    meta = {
        "name": job["name"],
        "description": f"{conv.help}, converted by {TOOL} {dataset}.",
        "tensorImageSize": "3D",
        "modality": {"0": disc.modality},
        **disc.extra,
        "labels": {"0": "background", **{str(i + 1): o for i, o in enumerate(organs)}},
        "spacing": spacing,
        "numTraining": len(entries),
        "numTest": 0,
        "training": entries,
        "test": [],
        "skipped": skipped,
    }
    staged.finish(meta)
    log(f"Wrote {len(entries)} case(s) to {out}.")
    if skipped:
        log(f"Skipped {len(skipped)} bad case(s):\n" + "\n".join(f"  {s['case']}: {s['problem']}" for s in skipped))
    return meta
