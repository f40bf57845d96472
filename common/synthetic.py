# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Synthetic 3D phantoms in the Decathlon layout: the project's embedded default data.

Each case is a body (an ellipsoid of soft tissue in air: an abdomen, a pelvis or a brain) holding a smooth
random organ, optionally with small lesions, written as NIfTI with an anisotropic voxel spacing. The
appearance follows the modality:

* ``CT``: Hounsfield units: air -1000, soft tissue about 40, the organ ``organ_hu`` (about 110, an
  enhanced liver; 200 for an enhanced kidney cortex), lesions/tumours ``organ_hu - 70``; Gaussian noise of
  ``20 * noise`` HU.
* ``MR``: arbitrary scale (a random global gain per channel), every tissue class a ratio of the soft
  tissue's intensity (organ ``organ_ratio``, lesions ``lesion_ratio``, or per channel name, e.g. ``FLAIR``,
  ``T1w``, ``t1gd``, ``T2w``, ``T2``, ``ADC``), a smooth multiplicative bias field shared by the channels,
  Rician noise (the magnitude of a complex Gaussian signal, so always >= 0); air near 0.

Variants model the paper's domain shifts: ``modality`` (MR source / CT target), ``organ`` (the task:
``liver``, ``spleen``, ``pancreas``, ``kidney`` (two bean-shaped organs), ``prostate`` (low in the body),
``hippocampus`` (a paired, curved, elongated structure in a small brain crop), ``cortex`` — a thin folded
shell like the cortical plate, ``lesions`` — the label is the lesions, or ``brain_tumour`` — BraTS-like
nested tumour regions in 4 MR channels), ``age`` (size and folding of the organ: 0 = young/small,
1 = adult), and ``quality`` (``blur`` sigma in voxels, ``downsample`` factor of the effective resolution,
``noise`` multiplier, ``contrast`` multiplier of every tissue difference).

Conventions: arrays are indexed ``(x, y, z)`` on a grid of ``spacing`` mm per voxel (the affine is
diagonal, centred on the volume; read as RAS: +x right, +y anterior, +z superior). Images are float32 of
shape ``shape`` (one channel) or ``shape + (channels,)`` (several channels, stored as a 4-D NIfTI like the
Decathlon's BraTS and prostate), labels uint8 of shape ``shape``. Everything is seeded (a
``numpy.random.Generator``; the same seed gives byte-identical arrays); a 64x64x32 case takes well under a
second. Fields added after the first release default to values that reproduce the first release's arrays
exactly for the same seed.

Datasets: :func:`make_dataset` (one spec), :func:`make_scenario` (a preset of :data:`SCENARIO_PRESETS` or
:data:`GROUPED_PRESETS`), :func:`make_grouped_dataset` (several presets in one dataset, each case tagged
with its ``group`` and optionally fixed to the test ``split``, like the in-house TSC centres and CP ages).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import numpy as np
from scipy import ndimage

__all__ = [
    "PhantomSpec",
    "ORGANS",
    "make_phantom",
    "make_dataset",
    "make_grouped_dataset",
    "SCENARIO_PRESETS",
    "GROUPED_PRESETS",
    "PRESET_DESCRIPTIONS",
    "preset_spec",
    "group_specs",
    "make_scenario",
]

# organ -> (centre as a fraction of the body radii, radii as a fraction of the body radii)
_ORGANS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "liver": ((-0.25, 0.1, 0.05), (0.55, 0.6, 0.7)),
    "spleen": ((0.45, 0.25, 0.1), (0.26, 0.3, 0.4)),
    "pancreas": ((0.1, -0.15, 0.0), (0.45, 0.15, 0.22)),
    "cortex": ((0.0, 0.0, 0.0), (0.7, 0.75, 0.7)),
    "lesions": ((0.0, 0.0, 0.0), (0.6, 0.6, 0.6)),
}
#: Every organ (task) a :class:`PhantomSpec` can hold.
ORGANS: tuple[str, ...] = tuple(_ORGANS) + ("kidney", "hippocampus", "prostate", "brain_tumour")
#: Organs that can be painted, unlabelled, around the task's organ (``PhantomSpec.context``).
_CONTEXT_ORGANS = ("liver", "spleen", "pancreas", "kidney", "cortex")
#: Organs whose sub-regions can be labelled as in the Decathlon (``PhantomSpec.subregions``).
_SUBREGION_NAMES: dict[str, dict[str, str]] = {
    "prostate": {"1": "PZ", "2": "TZ"},  # MSD Task05: peripheral and transition zone
    "hippocampus": {"1": "Anterior", "2": "Posterior"},  # MSD Task04
}
#: MSD Task01 (BraTS) label names, spelling included.
_BRATS_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}

# CT: tissue class -> (HU, texture amplitude in HU). "organ" and "lesion" come from the spec.
_CT_HU: dict[str, tuple[float, float]] = {
    "liver": (110.0, 10.0), "spleen": (120.0, 10.0), "pancreas": (90.0, 10.0), "kidney": (160.0, 10.0),
    "cortex": (38.0, 6.0), "gm": (38.0, 6.0), "csf": (8.0, 4.0), "fat": (-100.0, 15.0), "fluid": (5.0, 4.0),
    "rectum": (20.0, 15.0), "tz": (35.0, 8.0), "edema": (22.0, 6.0), "net": (30.0, 6.0), "et": (80.0, 10.0),
}  # fmt: skip
# MR: tissue class -> intensity relative to the soft tissue (1.0), for a channel without its own table.
_MR_RATIO: dict[str, float] = {
    "liver": 1.7, "spleen": 1.4, "pancreas": 1.5, "kidney": 1.3, "cortex": 1.25, "gm": 0.88, "csf": 0.3,
    "fat": 2.0, "fluid": 2.5, "rectum": 0.5, "tz": 1.2, "net": 1.35,
}  # fmt: skip
# MR: channel name (lower case) -> its own ratios (BraTS: FLAIR, T1w, t1gd, T2w; prostate: T2, ADC). Classes:
# csf, cortex, edema (the whole tumour), net (non-enhancing core), et (enhancing), organ, tz, fluid, rectum.
_CHANNEL_RATIO: dict[str, dict[str, float]] = {
    "flair": {"csf": 0.3, "cortex": 1.15, "edema": 1.9, "net": 1.6, "et": 1.35, "organ": 1.9},
    "t1w": {"csf": 0.35, "cortex": 0.85, "edema": 0.8, "net": 0.6, "et": 0.72},
    "t1gd": {"csf": 0.35, "cortex": 0.85, "edema": 0.8, "net": 0.5, "et": 2.1},
    "t2w": {"csf": 2.3, "cortex": 1.2, "edema": 1.9, "net": 1.55, "et": 1.3},
    "t2": {"organ": 1.6, "tz": 1.1, "fluid": 2.6, "rectum": 0.5, "lesion": 0.7},
    "adc": {"organ": 1.3, "tz": 0.8, "fluid": 3.0, "rectum": 0.8, "lesion": 0.5},
}


@dataclass
class PhantomSpec:
    """Parameters of one synthetic dataset (see the module docstring).

    Attributes:
        modality: ``"CT"`` (HU) or ``"MR"`` (arbitrary units, >= 0).
        organ: the labelled structure, one of :data:`ORGANS`.
        shape: voxels along ``(x, y, z)``.
        spacing: voxel size in mm along ``(x, y, z)``.
        age: organ size (``0.7 + 0.3 * age`` times the adult size) and, for ``cortex``, folding; 0 .. 1.5.
        lesions: lesions (tumours) per case; the minimum count when ``lesions_max`` is set. ``organ="lesions"``
            draws at least 3.
        blur: Gaussian blur sigma in voxels (image quality).
        downsample: loss of effective resolution (the image is resampled down by this factor and back).
        noise: noise multiplier (CT: ``20 * noise`` HU; MR: ``0.05 * noise`` of the median body intensity).
        organ_hu: CT organ intensity in HU (lesions are ``organ_hu - 70``).
        extra: free-form metadata, recorded in ``dataset.json``.
        channels: image channels (MR only); > 1 gives images of shape ``shape + (channels,)``.
        channel_names: one name per channel (e.g. ``("FLAIR", "T1w", "t1gd", "T2w")``): ``dataset.json``'s
            ``modality`` and the channel's contrast table; empty: one channel named after ``modality``.
        lesion_label: label value of the lesions inside the organ (e.g. 2: KiTS/LiTS tumours); 0: lesions are
            only in the image (the first release's behaviour), except ``organ="lesions"`` (the label is 1).
            With a value > 0 the lesions are drawn inside the organ and clipped to it.
        lesion_size: lesion radius range in units of the smallest voxel spacing.
        lesions_max: when set, each case draws its lesion count uniformly in ``lesions .. lesions_max``.
        separate_lesions: place lesions so that no two touch (26-connectivity): one component per lesion
            (a lesion that does not fit after 50 tries is dropped).
        organ_ratio: MR organ intensity relative to the soft tissue.
        lesion_ratio: MR lesion intensity relative to the soft tissue.
        contrast: multiplier of every tissue's difference from the soft tissue (< 1: flatter contrast).
        boundary_rim: MR signal loss (fraction, 0 .. 1) on a thin shell along the organ's boundary, like the
            out-of-phase ("India ink") chemical-shift artefact.
        context: other organs painted (unlabelled) around the task's organ, e.g. ``("liver", "spleen")``.
        subregions: label the organ's Decathlon sub-regions (prostate PZ 1 / TZ 2, hippocampus anterior 1 /
            posterior 2) instead of one foreground class.
    """

    modality: str = "CT"
    organ: str = "liver"
    shape: tuple[int, int, int] = (64, 64, 32)
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)
    age: float = 1.0
    lesions: int = 0
    blur: float = 0.0
    downsample: float = 1.0
    noise: float = 1.0
    organ_hu: float = 110.0
    extra: dict[str, Any] = field(default_factory=dict)
    # -- added for the other datasets of the paper; the defaults reproduce the first release --
    channels: int = 1
    channel_names: tuple[str, ...] = ()
    lesion_label: int = 0
    lesion_size: tuple[float, float] = (1.5, 3.5)
    lesions_max: int | None = None
    separate_lesions: bool = False
    organ_ratio: float = 1.7
    lesion_ratio: float = 2.6
    contrast: float = 1.0
    boundary_rim: float = 0.0
    context: tuple[str, ...] = ()
    subregions: bool = False

    def __post_init__(self) -> None:
        self.modality = self.modality.upper().replace("MRI", "MR")
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be 'CT' or 'MR', got {self.modality!r}.")
        if self.organ not in ORGANS:
            raise ValueError(f"organ must be one of {sorted(ORGANS)}, got {self.organ!r}.")
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be 3 sizes >= 8, got {self.shape}.")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers in mm, got {self.spacing}.")
        self.channel_names = tuple(str(n) for n in self.channel_names)
        self.context = tuple(str(c) for c in self.context)
        self.lesion_size = tuple(float(s) for s in self.lesion_size)  # type: ignore[assignment]
        if int(self.channels) < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}.")
        if self.modality == "CT" and self.channels != 1:
            raise ValueError(f"CT phantoms have one channel, got channels={self.channels}.")
        if self.channel_names and len(self.channel_names) != self.channels:
            raise ValueError(
                f"channel_names {self.channel_names} name {len(self.channel_names)} channel(s), "
                f"channels={self.channels}."
            )
        if not 0 <= int(self.lesion_label) <= 255:
            raise ValueError(f"lesion_label must be 0 .. 255, got {self.lesion_label}.")
        if self.lesion_label and self.organ in ("lesions", "brain_tumour"):
            raise ValueError(f"lesion_label applies to lesions inside an organ, not to organ={self.organ!r}.")
        if self.lesion_label == 1 or (self.lesion_label == 2 and self.subregions):
            raise ValueError(f"lesion_label={self.lesion_label} collides with the organ's own label value(s).")
        if len(self.lesion_size) != 2 or not 0 < self.lesion_size[0] <= self.lesion_size[1]:
            raise ValueError(f"lesion_size must be (min, max) with 0 < min <= max, got {self.lesion_size}.")
        if self.lesions_max is not None and self.lesions_max < self.lesions:
            raise ValueError(f"lesions_max={self.lesions_max} is below lesions={self.lesions}.")
        if self.contrast <= 0:
            raise ValueError(f"contrast must be > 0, got {self.contrast}.")
        if not 0.0 <= self.boundary_rim < 1.0:
            raise ValueError(f"boundary_rim must be in [0, 1), got {self.boundary_rim}.")
        bad = [c for c in self.context if c not in _CONTEXT_ORGANS]
        if bad:
            raise ValueError(f"context organs must be among {list(_CONTEXT_ORGANS)}, got {bad}.")
        if self.subregions and self.organ not in _SUBREGION_NAMES:
            raise ValueError(f"subregions exist for {sorted(_SUBREGION_NAMES)}, not for organ={self.organ!r}.")


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (Gaussian-filtered white noise)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def _size(spec: PhantomSpec) -> float:
    """Organ size factor of the subject's age (1 = adult)."""
    return 0.7 + 0.3 * float(np.clip(spec.age, 0.0, 1.5))


def _ellipsoid_distance(rel: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoid distance (1 on the surface) in the body's relative coordinates."""
    return np.sqrt(sum(((r - c) / rr) ** 2 for r, c, rr in zip(rel, centre, radii)))


_Layers = list[tuple[str, np.ndarray]]
#: A builder's result: (organ mask, label or None (the organ is label 1), tissue layers painted in order).
_Built = tuple[np.ndarray, Union[np.ndarray, None], _Layers]


def _legacy_organ(name: str, spec: PhantomSpec, rel: Sequence[np.ndarray], body: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """The first release's organs (a warped ellipsoid, or the folded cortical shell); its random draws, in order."""
    o_centre, o_radii = _ORGANS[name]
    size = 0.7 + 0.3 * float(np.clip(spec.age, 0.0, 1.5))
    radii = np.asarray(o_radii) * size * rng.uniform(0.85, 1.15, 3)
    centre = np.asarray(o_centre) + rng.uniform(-0.05, 0.05, 3)
    warp = _smooth_field(spec.shape, rng, sigma=max(2.0, min(spec.shape) / 8))
    d = np.sqrt(sum(((r - c) / rr) ** 2 for r, c, rr in zip(rel, centre, radii)))
    if name == "cortex":
        folding = 0.08 + 0.12 * float(np.clip(spec.age, 0.0, 1.5))
        fold = _smooth_field(spec.shape, rng, sigma=max(1.5, min(spec.shape) / 14))
        radius = 1.0 + folding * fold
        thickness = 0.16 - 0.04 * float(np.clip(spec.age, 0.0, 1.0))
        organ = (np.abs(d - radius + thickness / 2) <= thickness / 2) & body
    else:
        organ = (d + 0.12 * warp) <= 1.0
        organ &= body
    return organ


def _kidney(spec: PhantomSpec, rel: Sequence[np.ndarray], body: np.ndarray, rng: np.random.Generator) -> _Built:
    """Two bean-shaped kidneys, posterior, left and right; the concave hilum holds renal sinus fat."""
    size = _size(spec)
    warp = _smooth_field(spec.shape, rng, sigma=max(2.0, min(spec.shape) / 8))
    organ = np.zeros(spec.shape, dtype=bool)
    fat = np.zeros(spec.shape, dtype=bool)
    for side in (-1.0, 1.0):
        radii = np.array([0.26, 0.25, 0.45]) * size * rng.uniform(0.85, 1.15, 3)
        centre = np.array([0.45 * side, -0.35, 0.0]) + rng.uniform(-0.05, 0.05, 3)
        d = _ellipsoid_distance(rel, centre, radii)
        hilum_c = centre + np.array([-side * radii[0], 0.0, 0.0])  # the medial side
        dh = _ellipsoid_distance(rel, hilum_c, radii * np.array([0.5, 0.45, 0.4]))
        kidney = ((d + 0.1 * warp) <= 1.0) & (dh > 1.0) & body
        organ |= kidney
        fat |= (dh <= 1.0) & (d <= 1.1) & body & ~kidney
    return organ, None, [("organ", organ), ("fat", fat & ~organ)]


def _hippocampus(spec: PhantomSpec, rel: Sequence[np.ndarray], body: np.ndarray, rng: np.random.Generator) -> _Built:
    """Two curved, elongated hippocampi (long axis along y, head anterior and thicker), each with an amygdala-like
    grey-matter blob in front (unlabelled, slightly brighter) and a thin CSF temporal horn above-laterally."""
    size = _size(spec)
    warp = _smooth_field(spec.shape, rng, sigma=max(1.5, min(spec.shape) / 10))
    organ = np.zeros(spec.shape, dtype=bool)
    anterior = np.zeros(spec.shape, dtype=bool)
    gm = np.zeros(spec.shape, dtype=bool)
    csf = np.zeros(spec.shape, dtype=bool)
    for side in (-1.0, 1.0):
        radii = np.array([0.2, 0.6, 0.26]) * size * rng.uniform(0.85, 1.15, 3)
        centre = np.array([0.5 * side, -0.05, -0.15]) + rng.uniform(-0.04, 0.04, 3)
        bend = rng.uniform(0.1, 0.25)
        t = np.clip((rel[1] - centre[1]) / radii[1], -1.5, 1.5)  # -1 (tail, posterior) .. 1 (head, anterior)
        cx = centre[0] + side * 0.06 * t  # the long axis runs obliquely
        cz = centre[2] + bend * t**2  # and curves upwards at both ends
        rx = radii[0] * (1.0 + 0.3 * t)  # the head is thicker than the tail
        rz = radii[2] * (1.0 + 0.2 * t)
        d = np.sqrt(((rel[0] - cx) / rx) ** 2 + ((rel[1] - centre[1]) / radii[1]) ** 2 + ((rel[2] - cz) / rz) ** 2)
        hip = ((d + 0.1 * warp) <= 1.0) & body
        organ |= hip
        anterior |= hip & (rel[1] >= centre[1])
        amyg_c = centre + np.array([0.02 * side, radii[1] * 1.2, 0.05])
        gm |= (_ellipsoid_distance(rel, amyg_c, radii[[0, 0, 2]] * 1.2) <= 1.0) & body
        horn_c = centre + np.array([side * (radii[0] + 0.05), 0.0, radii[2] + 0.04])
        csf |= (_ellipsoid_distance(rel, horn_c, np.array([0.04, radii[1] * 0.8, 0.05])) <= 1.0) & body
    gap = ndimage.binary_dilation(organ)  # a one-voxel margin (the alveus) keeps the blobs apart
    label = None
    if spec.subregions:
        label = np.where(anterior, 1, 2 * organ).astype(np.uint8)
    return organ, label, [("gm", gm & ~gap), ("csf", csf & ~organ), ("organ", organ)]


def _prostate(spec: PhantomSpec, rel: Sequence[np.ndarray], body: np.ndarray, rng: np.random.Generator) -> _Built:
    """A small prostate low in the body (pelvis) with its transition zone (anterior-central), the bladder above
    it and the rectum behind it."""
    size = _size(spec)
    warp = _smooth_field(spec.shape, rng, sigma=max(2.0, min(spec.shape) / 8))
    radii = np.array([0.34, 0.28, 0.34]) * size * rng.uniform(0.85, 1.15, 3)
    centre = np.array([0.0, -0.15, -0.4]) + rng.uniform(-0.05, 0.05, 3)
    organ = ((_ellipsoid_distance(rel, centre, radii) + 0.1 * warp) <= 1.0) & body
    tz_c = centre + radii * np.array([0.0, 0.25, 0.1])
    tz = ((_ellipsoid_distance(rel, tz_c, radii * rng.uniform(0.5, 0.65)) + 0.1 * warp) <= 1.0)
    tz &= ndimage.binary_erosion(organ)  # the peripheral zone wraps it
    bladder_c = np.array([0.0, centre[1] + 0.1, centre[2] + radii[2] + 0.3]) + rng.uniform(-0.04, 0.04, 3)
    bladder = (_ellipsoid_distance(rel, bladder_c, np.array([0.35, 0.3, 0.26]) * rng.uniform(0.8, 1.2, 3)) <= 1.0)
    rectum_c = np.array([0.0, centre[1] - radii[1] - 0.17, centre[2]])
    rectum = _ellipsoid_distance(rel, rectum_c, np.array([0.14, 0.12, 0.45])) <= 1.0
    label = None
    if spec.subregions:
        label = np.where(tz, 2, organ.astype(np.uint8)).astype(np.uint8)
    layers = [("fluid", bladder & body & ~organ), ("rectum", rectum & body & ~organ), ("organ", organ), ("tz", tz)]
    return organ, label, layers


def _brain_tumour(spec: PhantomSpec, rel: Sequence[np.ndarray], body: np.ndarray, rng: np.random.Generator) -> _Built:
    """A BraTS-like glioma in a skull-stripped brain with two lateral ventricles: nested regions of one tumour,
    each at least one voxel (26-neighbourhood) inside the next: enhancing (3) in the non-enhancing core (2) in
    the edema (1). The organ is the whole tumour."""
    size = _size(spec)
    warp = _smooth_field(spec.shape, rng, sigma=max(2.0, min(spec.shape) / 8))
    warp2 = _smooth_field(spec.shape, rng, sigma=max(1.5, min(spec.shape) / 12))
    csf = np.zeros(spec.shape, dtype=bool)
    for side in (-1.0, 1.0):
        c = np.array([0.13 * side, 0.05, 0.1]) + rng.uniform(-0.02, 0.02, 3)
        csf |= _ellipsoid_distance(rel, c, np.array([0.07, 0.32, 0.14]) * size * rng.uniform(0.85, 1.15, 3)) <= 1.0
    direction = rng.standard_normal(3)
    centre = direction / (np.linalg.norm(direction) + 1e-8) * rng.uniform(0.15, 0.4)
    r_edema = rng.uniform(0.3, 0.45) * rng.uniform(0.85, 1.15, 3)
    edema = ((_ellipsoid_distance(rel, centre, r_edema) + 0.15 * warp) <= 1.0) & body
    cube = np.ones((3, 3, 3), dtype=bool)
    r_core = r_edema * rng.uniform(0.55, 0.75)
    c_core = centre + rng.uniform(-0.15, 0.15, 3) * r_edema
    core = ((_ellipsoid_distance(rel, c_core, r_core) + 0.15 * warp2) <= 1.0)
    core &= ndimage.binary_erosion(edema, structure=cube)
    r_et = r_core * rng.uniform(0.5, 0.7)
    c_et = c_core + rng.uniform(-0.15, 0.15, 3) * r_core
    inner = ndimage.binary_erosion(core, structure=cube)
    et = ((_ellipsoid_distance(rel, c_et, r_et) + 0.1 * warp2) <= 1.0) & inner
    if not et.any() and inner.any():  # a small core: its deepest voxels enhance
        depth = ndimage.distance_transform_edt(inner)
        et = inner & (depth >= 0.6 * depth.max())
    label = edema.astype(np.uint8)
    label[core] = 2
    label[et] = 3
    return edema, label, [("csf", csf & body), ("edema", edema), ("net", core), ("et", et)]


def _organ_anatomy(spec: PhantomSpec, rel: Sequence[np.ndarray], body: np.ndarray, rng: np.random.Generator) -> _Built:
    """The task's organ: its mask, label (None: the organ is 1) and tissue layers (painted over the body, in order)."""
    if spec.organ in _ORGANS:
        organ = _legacy_organ(spec.organ, spec, rel, body, rng)
        return organ, None, [("organ", organ)]
    builders = {"kidney": _kidney, "hippocampus": _hippocampus, "prostate": _prostate, "brain_tumour": _brain_tumour}
    return builders[spec.organ](spec, rel, body, rng)


def _context_mask(name: str, spec: PhantomSpec, rel: Sequence[np.ndarray], body: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    if name == "kidney":
        return _kidney(spec, rel, body, rng)[0]
    return _legacy_organ(name, spec, rel, body, rng)


def _ct_value(spec: PhantomSpec, cls: str) -> tuple[float, float]:
    """(HU, texture amplitude) of a tissue class in CT."""
    if cls == "organ":
        value, amp = spec.organ_hu, 10.0
    elif cls == "lesion":
        value, amp = spec.organ_hu - 70.0, 8.0
    else:
        value, amp = _CT_HU.get(cls, (spec.organ_hu, 10.0))
    if spec.contrast != 1.0:
        value = 40.0 + spec.contrast * (value - 40.0)
    return value, amp


def _mr_value(spec: PhantomSpec, channel: str | None, cls: str) -> float:
    """Intensity of a tissue class in MR relative to the soft tissue (1.0), for the named channel."""
    table = _CHANNEL_RATIO.get(str(channel).lower(), {}) if channel else {}
    default = {"organ": spec.organ_ratio, "lesion": spec.lesion_ratio,
               "edema": spec.organ_ratio, "et": spec.lesion_ratio}  # fmt: skip
    ratio = table.get(cls, default.get(cls, _MR_RATIO.get(cls, spec.organ_ratio)))
    if spec.contrast != 1.0:
        ratio = 1.0 + spec.contrast * (ratio - 1.0)
    return ratio


def _degrade(img: np.ndarray, spec: PhantomSpec) -> np.ndarray:
    """Loss of resolution (``downsample``) and blur (``blur`` voxels) of one channel."""
    if spec.downsample > 1.0:
        zoom = 1.0 / spec.downsample
        low = ndimage.zoom(img, zoom, order=1)
        img = ndimage.zoom(low, np.asarray(spec.shape) / np.asarray(low.shape), order=1)[
            : spec.shape[0], : spec.shape[1], : spec.shape[2]
        ]
    if spec.blur > 0:
        img = ndimage.gaussian_filter(img, spec.blur)
    return img


def make_phantom(spec: PhantomSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One case: ``(image float32, label uint8)`` on the voxel grid of ``spec.shape`` x ``spec.spacing`` mm.

    The image has shape ``spec.shape`` for one channel and ``spec.shape + (spec.channels,)`` for several (each
    channel a contrast of the same anatomy); the label has shape ``spec.shape``. CT images are in HU; MR images
    are >= 0 (Rician magnitude).
    """
    shape = np.asarray(spec.shape)
    spacing = np.asarray(spec.spacing, dtype=np.float32)
    extent = shape * spacing  # mm
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(shape, spacing, extent)], indexing="ij")
    body_r = extent / 2 * np.array([0.88, 0.78, 0.95]) * rng.uniform(0.92, 1.0, 3)
    centre_jitter = rng.uniform(-0.04, 0.04, 3) * extent
    rel = [(g - c) / r for g, c, r in zip(grids, centre_jitter, body_r)]
    body = (rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) <= 1.0

    organ, label, layers = _organ_anatomy(spec, rel, body, rng)
    context = [(name, _context_mask(name, spec, rel, body, rng) & ~organ) for name in spec.context]

    lesion_mask = np.zeros(spec.shape, dtype=bool)
    n_lesions = spec.lesions if spec.organ != "lesions" else max(spec.lesions, 3)
    if spec.lesions_max is not None:
        n_lesions = int(rng.integers(n_lesions, max(n_lesions, spec.lesions_max) + 1))
    if spec.lesion_label:  # tumours inside the organ: centres at least a voxel inside it
        region = ndimage.binary_erosion(organ)
        inside = np.argwhere(region if region.any() else organ)
    else:
        inside = np.argwhere(body & (organ if spec.organ != "lesions" else body))
    pts = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    g = np.meshgrid(*pts, indexing="ij")
    diagonal = float(np.sqrt(np.sum(spacing.astype(np.float64) ** 2)))  # mm between 26-neighbours, at most
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(n_lesions if len(inside) else 0):
        for _try in range(50 if spec.separate_lesions else 1):
            c = inside[rng.integers(len(inside))] * spacing
            r_mm = rng.uniform(*spec.lesion_size) * float(spacing.min())
            # voxels of two spheres are 26-neighbours only if the centres are closer than r1 + r2 + a diagonal
            apart = all(float(np.linalg.norm(c - c2)) > r_mm + r2 + diagonal for c2, r2 in placed)
            if not spec.separate_lesions or apart:
                break
        else:
            continue
        placed.append((c, r_mm))
        lesion_mask |= ((g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - c[2]) ** 2) <= r_mm**2
    lesion_mask &= body
    if spec.lesion_label:
        lesion_mask &= organ

    if spec.organ == "lesions":
        label = lesion_mask
    elif label is None:
        label = organ
    if spec.lesion_label:
        label = label.astype(np.uint8)
        label[lesion_mask] = spec.lesion_label
    layers = context + layers + [("lesion", lesion_mask)]

    texture = _smooth_field(spec.shape, rng, sigma=1.0)
    if spec.modality == "CT":
        img = np.full(spec.shape, -1000.0, dtype=np.float32)
        img[body] = 40.0 + 12.0 * texture[body]
        for cls, mask in layers:
            value, amp = _ct_value(spec, cls)
            img[mask] = value + amp * texture[mask]
        noise_sd = 20.0 * spec.noise
        img = _degrade(img, spec)
        img = img + rng.normal(0.0, noise_sd, spec.shape).astype(np.float32)
        return img.astype(np.float32), label.astype(np.uint8)

    names: Sequence[str | None] = spec.channel_names or [None] * spec.channels
    channels = []
    for name in names:
        img = np.zeros(spec.shape, dtype=np.float32)
        img[body] = 1.0 + 0.08 * texture[body]
        for cls, mask in layers:
            img[mask] = _mr_value(spec, name, cls) + 0.1 * texture[mask]
        channels.append(img)
    if spec.boundary_rim > 0:
        rim = ndimage.binary_dilation(organ) & ~ndimage.binary_erosion(organ) & body
        for img in channels:
            img[rim] *= 1.0 - spec.boundary_rim
    bias = np.exp(0.25 * _smooth_field(spec.shape, rng, sigma=max(4.0, min(spec.shape) / 4)))
    out = []
    for img in channels:
        img *= bias * rng.uniform(200.0, 900.0)
        noise_sd = 0.05 * float(np.median(img[body])) * spec.noise
        out.append((_degrade(img, spec), noise_sd))
    result = []
    for img, noise_sd in out:  # Rician: magnitude of a complex signal with Gaussian noise
        re = img + rng.normal(0.0, noise_sd, spec.shape)
        im = rng.normal(0.0, noise_sd, spec.shape)
        result.append(np.sqrt(re**2 + im**2).astype(np.float32))
    img = result[0] if len(result) == 1 else np.stack(result, axis=-1)
    return img.astype(np.float32), label.astype(np.uint8)


def _affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    aff = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    aff[:3, 3] = -np.asarray(shape) * np.asarray(spacing) / 2
    return aff


def _label_names(spec: PhantomSpec) -> dict[str, str]:
    """``dataset.json`` labels: value (str) -> name."""
    if spec.organ == "brain_tumour":
        return dict(_BRATS_LABELS)
    names = {"0": "background"}
    if spec.subregions:
        names.update(_SUBREGION_NAMES[spec.organ])
    else:
        names["1"] = "lesion" if spec.organ == "lesions" else spec.organ
    if spec.lesion_label:
        names[str(spec.lesion_label)] = "tumor"
    return names


def _modality_names(spec: PhantomSpec) -> dict[str, str]:
    """``dataset.json`` modality: channel index (str) -> name."""
    if spec.channel_names:
        return {str(i): n for i, n in enumerate(spec.channel_names)}
    return {str(i): spec.modality for i in range(spec.channels)}


#: The first release's fields; the later ones are recorded only where they differ from their defaults.
_FIRST_FIELDS = ("modality", "organ", "shape", "spacing", "age", "lesions", "blur", "downsample", "noise", "organ_hu",
                 "extra")  # fmt: skip
_NEW_FIELDS = [f for f in dataclasses.fields(PhantomSpec) if f.name not in _FIRST_FIELDS]


def _spec_record(spec: PhantomSpec) -> dict[str, Any]:
    """The spec as JSON-able fields; fields added after the first release only where they differ from their
    default (so the first release's ``dataset.json`` files are unchanged)."""
    record = asdict(spec)
    for f in _NEW_FIELDS:
        if record[f.name] == f.default:
            del record[f.name]
    return record


def _save_case(out_dir: str, fname: str, img: np.ndarray, lab: np.ndarray, spec: PhantomSpec) -> None:
    import nibabel as nib

    affine = _affine(spec.spacing, spec.shape)
    im = nib.Nifti1Image(img, affine)
    lb = nib.Nifti1Image(lab, affine)
    for x in (im, lb):
        x.header.set_xyzt_units("mm")
        x.set_qform(affine, code=1)
        x.set_sform(affine, code=1)
    nib.save(im, os.path.join(out_dir, "imagesTr", fname))
    nib.save(lb, os.path.join(out_dir, "labelsTr", fname))


def make_dataset(
    out_dir: str,
    n_cases: int,
    spec: PhantomSpec | None = None,
    seed: int = 0,
    name: str | None = None,
    prefix: str = "case",
) -> str:
    """Write ``n_cases`` phantoms in the Decathlon layout under ``out_dir``; returns ``out_dir``.

    Files are ``imagesTr/<prefix>_NNN.nii.gz`` (3-D, or 4-D ``(X, Y, Z, C)`` for several channels) and
    ``labelsTr/<prefix>_NNN.nii.gz`` (3-D uint8). ``dataset.json`` records the generator's parameters and seed
    under ``"synthetic"``; its ``modality`` names the channels and ``labels`` the label values.
    """
    spec = spec or PhantomSpec()
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}.")
    os.makedirs(os.path.join(out_dir, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "labelsTr"), exist_ok=True)
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n_cases):
        img, lab = make_phantom(spec, rng)
        fname = f"{prefix}_{i:03d}.nii.gz"
        _save_case(out_dir, fname, img, lab, spec)
        training.append({"image": f"./imagesTr/{fname}", "label": f"./labelsTr/{fname}"})
    meta = {
        "name": name or f"synthetic_{spec.modality.lower()}_{spec.organ}",
        "description": "Synthetic phantoms made by common.synthetic (no real patient data).",
        "licence": "CC0 (generated data)",
        "tensorImageSize": "4D" if spec.channels > 1 else "3D",
        "modality": _modality_names(spec),
        "labels": _label_names(spec),
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "synthetic": {"seed": seed, **_spec_record(spec)},
    }
    with open(os.path.join(out_dir, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return out_dir


#: Presets for the paper's datasets (Table I): name -> PhantomSpec keyword arguments.
SCENARIO_PRESETS: dict[str, dict[str, Any]] = {
    # transfer across modalities (Table II): liver MR pool -> liver CT
    "liver_mr": {"modality": "MR", "organ": "liver"},
    "liver_ct": {"modality": "CT", "organ": "liver"},
    # transfer across tasks (Table IV): other CT organs -> pancreas CT
    "spleen_ct": {"modality": "CT", "organ": "spleen"},
    "pancreas_ct": {"modality": "CT", "organ": "pancreas"},
    # transfer across subject age (Table III): newborn -> fetus cortical plate (MR)
    "cp_newborn": {"modality": "MR", "organ": "cortex", "age": 1.0},
    "cp_younger_fetus": {"modality": "MR", "organ": "cortex", "age": 0.2},
    # transfer across acquisition protocols (Table VI): good centres -> a blurred, noisy centre
    "lesions_mr": {"modality": "MR", "organ": "lesions", "lesions": 5},
    "lesions_mr_lowq": {"modality": "MR", "organ": "lesions", "lesions": 5, "blur": 1.0, "downsample": 1.6,
                        "noise": 2.0},
    # -- the other datasets of Table I --
    "cp_older_fetus": {"modality": "MR", "organ": "cortex", "age": 0.6},
    # CHAOS liver MR (the Liver-MRI pool): three contrasts of the same anatomy
    "liver_mr_t1_in": {"modality": "MR", "organ": "liver", "organ_ratio": 1.45},
    "liver_mr_t1_out": {"modality": "MR", "organ": "liver", "organ_ratio": 1.3, "noise": 1.2, "boundary_rim": 0.5},
    "liver_mr_t2spir": {"modality": "MR", "organ": "liver", "organ_ratio": 0.6, "noise": 1.5},
    "kits_ct": {"modality": "CT", "organ": "kidney", "organ_hu": 200.0, "lesions": 1, "lesions_max": 2,
                "lesion_label": 2, "lesion_size": (2.5, 4.0), "context": ("liver", "spleen")},
    "lits_ct": {"modality": "CT", "organ": "liver", "lesions": 1, "lesions_max": 4, "lesion_label": 2,
                "lesion_size": (2.0, 4.5), "context": ("spleen", "kidney")},
    "hippocampus_mr": {"modality": "MR", "organ": "hippocampus", "shape": (36, 50, 35), "spacing": (1.0, 1.0, 1.0),
                       "organ_ratio": 0.72, "subregions": True},
    "prostate_mr": {"modality": "MR", "organ": "prostate", "shape": (64, 64, 20), "spacing": (1.25, 1.25, 3.6),
                    "channels": 2, "channel_names": ("T2", "ADC"), "organ_ratio": 1.5, "subregions": True},
    "brats_mr": {"modality": "MR", "organ": "brain_tumour", "shape": (64, 64, 48), "spacing": (2.0, 2.0, 2.0),
                 "channels": 4, "channel_names": ("FLAIR", "T1w", "t1gd", "T2w"), "context": ("cortex",)},
}  # fmt: skip

_TSC = {"separate_lesions": True, "lesions": 3, "lesions_max": 8, "context": ("cortex",)}
#: Grouped presets (one dataset, several groups; :func:`make_grouped_dataset`): name -> {group: (preset,
#: overrides)}. The TSC centres differ a little in noise, contrast and sharpness; centre 5 is the low-quality
#: one (blurred, lower resolution, noisier, flatter grey/white contrast).
GROUPED_PRESETS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "tsc_centers": {
        "center1": ("lesions_mr", dict(_TSC)),
        "center2": ("lesions_mr", {**_TSC, "noise": 1.2, "contrast": 0.9}),
        "center3": ("lesions_mr", {**_TSC, "noise": 0.8, "contrast": 1.1}),
        "center4": ("lesions_mr", {**_TSC, "blur": 0.5}),
        "center5": ("lesions_mr_lowq", {**_TSC, "contrast": 0.6}),
    },
    "cp_fetus": {"younger": ("cp_younger_fetus", {}), "older": ("cp_older_fetus", {})},
}

#: One line per preset (``tools/make_synthetic.py --list``).
PRESET_DESCRIPTIONS: dict[str, str] = {
    "liver_mr": "MR liver (Liver-MRI source pool), 1 ch, labels 0/1",
    "liver_ct": "CT liver (Liver-CT / SLIVER07 target), HU, labels 0/1",
    "spleen_ct": "CT spleen (MSD Task09), HU, labels 0/1",
    "pancreas_ct": "CT pancreas (MSD Task07, whole pancreas), HU, labels 0/1",
    "cp_newborn": "MR T2 newborn cortical plate (dHCP; age 1.0), labels 0/1",
    "cp_younger_fetus": "MR T2 younger-fetus cortical plate (age 0.2: smaller, less folded), labels 0/1",
    "lesions_mr": "MR FLAIR TSC lesions, a good centre, labels 0/1 (lesion)",
    "lesions_mr_lowq": "MR FLAIR TSC lesions, the low-quality centre 5 (blur, resolution, noise), labels 0/1",
    "cp_older_fetus": "MR T2 older-fetus cortical plate (age 0.6), labels 0/1",
    "liver_mr_t1_in": "MR CHAOS T1 DUAL in-phase liver (organ/tissue 1.45), labels 0/1",
    "liver_mr_t1_out": "MR CHAOS T1 DUAL out-of-phase liver (1.3, India-ink rim, noise x1.2), labels 0/1",
    "liver_mr_t2spir": "MR CHAOS T2 SPIR liver (darker than tissue, 0.6; noise x1.5), labels 0/1",
    "kits_ct": "CT kidneys with tumours (KiTS19), HU, labels 0 bg / 1 kidney / 2 tumor",
    "lits_ct": "CT liver with tumours (LiTS), HU, labels 0 bg / 1 liver / 2 tumor",
    "hippocampus_mr": "MR T1 brain crop 36x50x35 at 1 mm, both hippocampi (MSD Task04), labels 0/1 ant./2 post.",
    "prostate_mr": "MR prostate (MSD Task05), 2 ch T2/ADC as 4-D NIfTI, labels 0/1 PZ/2 TZ",
    "brats_mr": "MR brain tumour (MSD Task01), 4 ch FLAIR/T1w/t1gd/T2w, labels 0/1 edema/2 non-enh./3 enh.",
    "tsc_centers": "grouped: TSC lesions from 5 centres (center1..center5; centre 5 low quality), labels 0/1",
    "cp_fetus": "grouped: fetal cortical plate, groups younger (age 0.2) and older (age 0.6), labels 0/1",
}

_GroupSource = Union[str, PhantomSpec]
_GroupValue = Union[tuple[_GroupSource, int], tuple[_GroupSource, int, Mapping[str, Any]]]


def preset_spec(preset: str, **overrides: Any) -> PhantomSpec:
    """The :class:`PhantomSpec` of a preset of :data:`SCENARIO_PRESETS` with ``overrides`` applied.

    Overriding ``channels`` of a preset with channel names keeps its first ``channels`` names (e.g. the T2
    channel of ``prostate_mr`` with ``channels=1``).
    """
    if preset not in SCENARIO_PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(SCENARIO_PRESETS)}.")
    kwargs = {**SCENARIO_PRESETS[preset], **overrides}
    names = kwargs.get("channel_names") or ()
    if "channels" in overrides and "channel_names" not in overrides and names:
        kwargs["channel_names"] = tuple(names)[: int(overrides["channels"])]
    return PhantomSpec(**kwargs)


def group_specs(preset: str, **overrides: Any) -> dict[str, PhantomSpec]:
    """The specs of a grouped preset of :data:`GROUPED_PRESETS`: group -> spec (``overrides`` apply to all)."""
    if preset not in GROUPED_PRESETS:
        raise ValueError(f"Unknown grouped preset {preset!r}; choose one of {', '.join(GROUPED_PRESETS)}.")
    return {g: preset_spec(p, **{**o, **overrides}) for g, (p, o) in GROUPED_PRESETS[preset].items()}


def make_grouped_dataset(
    out_dir: str,
    groups: Mapping[str, _GroupValue],
    seed: int = 0,
    test_per_group: int | Mapping[str, int] = 0,
    name: str | None = None,
    **overrides: Any,
) -> str:
    """Write ONE Decathlon dataset whose cases come from several presets; returns ``out_dir``.

    Args:
        out_dir: the dataset folder (gets ``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        groups: group name -> ``(preset name or PhantomSpec, n_cases)`` or ``(preset, n_cases, overrides)``,
            e.g. ``{"center1": ("lesions_mr", 30), ..., "center5": ("lesions_mr_lowq", 8)}``. Group names are
            letters, digits, ``_`` and ``-`` (they prefix the file names: ``<group>_NNN.nii.gz``, so case ids
            are unique across the dataset).
        seed: the base seed; each group draws from its own generator seeded by ``(seed, crc32(group))``, so a
            group's cases do not depend on the other groups nor on their order.
        test_per_group: the first ``k`` cases of each group (or ``{group: k}``) get ``"split": "test"`` in their
            training entry (the fixed test scans of a centre), the others ``"split": "train"``; 0: no split
            field. The first cases of a group do not depend on its ``n_cases``, so the test cases stay the same
            when more cases are made.
        name: ``dataset.json`` name.
        overrides: :class:`PhantomSpec` fields applied to every group given by preset name.

    Every training entry has ``image``, ``label``, ``case`` and ``group``. All groups must share the modality,
    channel names and label names.
    """
    if not groups:
        raise ValueError("groups is empty: give at least one group -> (preset, n_cases).")
    specs: dict[str, tuple[PhantomSpec, int, str]] = {}
    for group, value in groups.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(group)):
            raise ValueError(f"Group name {group!r}: use letters, digits, '_' and '-' (it prefixes the file names).")
        if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
            raise ValueError(f"Group {group!r}: expected (preset, n_cases[, overrides]), got {value!r}.")
        source, n = value[0], int(value[1])
        extra = dict(value[2]) if len(value) == 3 else {}
        if isinstance(source, PhantomSpec):
            spec = dataclasses.replace(source, **extra) if extra else source
            label = "spec"
        else:
            spec, label = preset_spec(str(source), **{**extra, **overrides}), str(source)
        if n < 1:
            raise ValueError(f"Group {group!r}: n_cases must be >= 1, got {n}.")
        specs[str(group)] = (spec, n, label)
    per_group = test_per_group if isinstance(test_per_group, Mapping) else {g: test_per_group for g in specs}
    n_test = {g: int(per_group.get(g, 0)) for g in specs}
    for g, k in n_test.items():
        if not 0 <= k < specs[g][1]:
            raise ValueError(
                f"Group {g!r}: test_per_group={k} must be >= 0 and leave training cases among {specs[g][1]}."
            )
    first = next(iter(specs.values()))[0]
    for g, (spec, _, _) in specs.items():
        for what, fn in (("modality", _modality_names), ("labels", _label_names)):
            if fn(spec) != fn(first):
                raise ValueError(f"Group {g!r} has {what} {fn(spec)}, the first group {fn(first)}; they must agree.")
    os.makedirs(os.path.join(out_dir, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "labelsTr"), exist_ok=True)
    training: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    for g, (spec, n, label) in specs.items():
        key = [int(seed), zlib.crc32(g.encode())]
        rng = np.random.default_rng(key)
        for i in range(n):
            img, lab = make_phantom(spec, rng)
            fname = f"{g}_{i:03d}.nii.gz"
            _save_case(out_dir, fname, img, lab, spec)
            entry: dict[str, Any] = {"image": f"./imagesTr/{fname}", "label": f"./labelsTr/{fname}",
                                     "case": fname[: -len(".nii.gz")], "group": g}  # fmt: skip
            if any(n_test.values()):
                entry["split"] = "test" if i < n_test[g] else "train"
            training.append(entry)
        record[g] = {"preset": label, "n_cases": n, "n_test": n_test[g], "seed": key, **_spec_record(spec)}
    meta = {
        "name": name or "synthetic_grouped",
        "description": "Synthetic phantoms made by common.synthetic (no real patient data), in groups.",
        "licence": "CC0 (generated data)",
        "tensorImageSize": "4D" if first.channels > 1 else "3D",
        "modality": _modality_names(first),
        "labels": _label_names(first),
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "synthetic": {"seed": seed, "groups": record},
    }
    with open(os.path.join(out_dir, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def make_scenario(
    preset: str,
    out_dir: str,
    n_cases: int | Mapping[str, int],
    seed: int = 0,
    *,
    test_per_group: int | Mapping[str, int] = 0,
    **overrides: Any,
) -> str:
    """Write a dataset from :data:`SCENARIO_PRESETS` or :data:`GROUPED_PRESETS` (``overrides`` change any
    :class:`PhantomSpec` field, of every group). For a grouped preset ``n_cases`` is per group (an int, or
    ``{group: n}``) and ``test_per_group`` fixes the first cases of each group to the test split."""
    if preset in GROUPED_PRESETS:
        counts = n_cases if isinstance(n_cases, Mapping) else {g: n_cases for g in GROUPED_PRESETS[preset]}
        groups = {g: (p, int(counts[g]), o) for g, (p, o) in GROUPED_PRESETS[preset].items() if g in counts}
        return make_grouped_dataset(out_dir, groups, seed=seed, test_per_group=test_per_group,
                                    name=f"synthetic_{preset}", **overrides)  # fmt: skip
    if preset not in SCENARIO_PRESETS:
        known = ", ".join([*SCENARIO_PRESETS, *GROUPED_PRESETS])
        raise ValueError(f"Unknown preset {preset!r}; choose one of {known}.")
    if test_per_group:
        raise ValueError(
            f"test_per_group applies to the grouped presets ({', '.join(GROUPED_PRESETS)}), not {preset!r}."
        )
    spec = preset_spec(preset, **overrides)
    return make_dataset(out_dir, n_cases, spec, seed=seed, name=f"synthetic_{preset}")
