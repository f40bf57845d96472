# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Synthetic 3D phantoms in the Decathlon layout: the project's embedded default data.

Each case is a body (an ellipsoid of soft tissue in air) holding a smooth random organ, optionally
with small lesions, written as NIfTI with an anisotropic voxel spacing. The appearance follows the
modality:

* ``CT``: Hounsfield units: air -1000, soft tissue about 40, the organ ``organ_hu`` (about 110, an
  enhanced liver), lesions darker; Gaussian noise of ``noise`` HU.
* ``MR``: arbitrary scale (a random global gain), organ brighter than tissue, a smooth multiplicative
  bias field, Rician-like noise; air near 0.

Variants model the paper's domain shifts: ``modality`` (MR source / CT target), ``organ`` (the task:
``liver``, ``spleen``, ``pancreas``, ``cortex`` — a thin folded shell like the cortical plate, or
``lesions`` — the label is the lesions), ``age`` (size and folding of the organ: 0 = young/small,
1 = adult), and ``quality`` (``blur`` sigma in voxels, ``downsample`` factor of the effective
resolution, ``noise`` multiplier). Everything is seeded; a 64x64x32 case takes well under a second.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["PhantomSpec", "make_phantom", "make_dataset", "SCENARIO_PRESETS", "make_scenario"]

# organ -> (centre as a fraction of the body radii, radii as a fraction of the body radii)
_ORGANS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "liver": ((-0.25, 0.1, 0.05), (0.55, 0.6, 0.7)),
    "spleen": ((0.45, 0.25, 0.1), (0.26, 0.3, 0.4)),
    "pancreas": ((0.1, -0.15, 0.0), (0.45, 0.15, 0.22)),
    "cortex": ((0.0, 0.0, 0.0), (0.7, 0.75, 0.7)),
    "lesions": ((0.0, 0.0, 0.0), (0.6, 0.6, 0.6)),
}


@dataclass
class PhantomSpec:
    """Parameters of one synthetic dataset (see the module docstring)."""

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

    def __post_init__(self) -> None:
        self.modality = self.modality.upper().replace("MRI", "MR")
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be 'CT' or 'MR', got {self.modality!r}.")
        if self.organ not in _ORGANS:
            raise ValueError(f"organ must be one of {sorted(_ORGANS)}, got {self.organ!r}.")
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be 3 sizes >= 8, got {self.shape}.")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers in mm, got {self.spacing}.")


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (Gaussian-filtered white noise)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def make_phantom(spec: PhantomSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One case: ``(image float32, label uint8)``, both of shape ``spec.shape`` (voxel grid of ``spec.spacing``)."""
    shape = np.asarray(spec.shape)
    spacing = np.asarray(spec.spacing, dtype=np.float32)
    extent = shape * spacing  # mm
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(shape, spacing, extent)], indexing="ij")
    body_r = extent / 2 * np.array([0.88, 0.78, 0.95]) * rng.uniform(0.92, 1.0, 3)
    centre_jitter = rng.uniform(-0.04, 0.04, 3) * extent
    rel = [(g - c) / r for g, c, r in zip(grids, centre_jitter, body_r)]
    body = (rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) <= 1.0

    o_centre, o_radii = _ORGANS[spec.organ]
    size = 0.7 + 0.3 * float(np.clip(spec.age, 0.0, 1.5))
    radii = np.asarray(o_radii) * size * rng.uniform(0.85, 1.15, 3)
    centre = np.asarray(o_centre) + rng.uniform(-0.05, 0.05, 3)
    warp = _smooth_field(spec.shape, rng, sigma=max(2.0, min(spec.shape) / 8))
    d = np.sqrt(sum(((r - c) / rr) ** 2 for r, c, rr in zip(rel, centre, radii)))
    if spec.organ == "cortex":
        folding = 0.08 + 0.12 * float(np.clip(spec.age, 0.0, 1.5))
        fold = _smooth_field(spec.shape, rng, sigma=max(1.5, min(spec.shape) / 14))
        radius = 1.0 + folding * fold
        thickness = 0.16 - 0.04 * float(np.clip(spec.age, 0.0, 1.0))
        organ = (np.abs(d - radius + thickness / 2) <= thickness / 2) & body
    else:
        organ = (d + 0.12 * warp) <= 1.0
        organ &= body

    lesion_mask = np.zeros(spec.shape, dtype=bool)
    n_lesions = spec.lesions if spec.organ != "lesions" else max(spec.lesions, 3)
    inside = np.argwhere(body & (organ if spec.organ != "lesions" else body))
    for _ in range(n_lesions if len(inside) else 0):
        c = inside[rng.integers(len(inside))] * spacing
        r_mm = rng.uniform(1.5, 3.5) * float(spacing.min())
        pts = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
        g = np.meshgrid(*pts, indexing="ij")
        lesion_mask |= ((g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - c[2]) ** 2) <= r_mm**2
    lesion_mask &= body

    texture = _smooth_field(spec.shape, rng, sigma=1.0)
    if spec.modality == "CT":
        img = np.full(spec.shape, -1000.0, dtype=np.float32)
        img[body] = 40.0 + 12.0 * texture[body]
        img[organ] = spec.organ_hu + 10.0 * texture[organ]
        img[lesion_mask] = spec.organ_hu - 70.0 + 8.0 * texture[lesion_mask]
        noise_sd = 20.0 * spec.noise
    else:
        img = np.zeros(spec.shape, dtype=np.float32)
        img[body] = 1.0 + 0.08 * texture[body]
        img[organ] = 1.7 + 0.1 * texture[organ]
        img[lesion_mask] = 2.6 + 0.1 * texture[lesion_mask]
        bias = np.exp(0.25 * _smooth_field(spec.shape, rng, sigma=max(4.0, min(spec.shape) / 4)))
        img *= bias * rng.uniform(200.0, 900.0)
        noise_sd = 0.05 * float(np.median(img[body])) * spec.noise
    if spec.downsample > 1.0:
        zoom = 1.0 / spec.downsample
        low = ndimage.zoom(img, zoom, order=1)
        img = ndimage.zoom(low, np.asarray(spec.shape) / np.asarray(low.shape), order=1)[
            : spec.shape[0], : spec.shape[1], : spec.shape[2]
        ]
    if spec.blur > 0:
        img = ndimage.gaussian_filter(img, spec.blur)
    if spec.modality == "CT":
        img = img + rng.normal(0.0, noise_sd, spec.shape).astype(np.float32)
    else:  # Rician-like: magnitude of a complex signal with Gaussian noise
        re = img + rng.normal(0.0, noise_sd, spec.shape)
        im = rng.normal(0.0, noise_sd, spec.shape)
        img = np.sqrt(re**2 + im**2).astype(np.float32)
    label = lesion_mask if spec.organ == "lesions" else organ
    return img.astype(np.float32), label.astype(np.uint8)


def _affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    aff = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    aff[:3, 3] = -np.asarray(shape) * np.asarray(spacing) / 2
    return aff


def make_dataset(
    out_dir: str,
    n_cases: int,
    spec: PhantomSpec | None = None,
    seed: int = 0,
    name: str | None = None,
    prefix: str = "case",
) -> str:
    """Write ``n_cases`` phantoms in the Decathlon layout under ``out_dir``; returns ``out_dir``.

    ``dataset.json`` records the generator's parameters and seed under ``"synthetic"``.
    """
    import nibabel as nib

    spec = spec or PhantomSpec()
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}.")
    os.makedirs(os.path.join(out_dir, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "labelsTr"), exist_ok=True)
    rng = np.random.default_rng(seed)
    training = []
    affine = _affine(spec.spacing, spec.shape)
    for i in range(n_cases):
        img, lab = make_phantom(spec, rng)
        fname = f"{prefix}_{i:03d}.nii.gz"
        im = nib.Nifti1Image(img, affine)
        lb = nib.Nifti1Image(lab, affine)
        for x in (im, lb):
            x.header.set_xyzt_units("mm")
            x.set_qform(affine, code=1)
            x.set_sform(affine, code=1)
        nib.save(im, os.path.join(out_dir, "imagesTr", fname))
        nib.save(lb, os.path.join(out_dir, "labelsTr", fname))
        training.append({"image": f"./imagesTr/{fname}", "label": f"./labelsTr/{fname}"})
    label_name = "lesion" if spec.organ == "lesions" else spec.organ
    meta = {
        "name": name or f"synthetic_{spec.modality.lower()}_{spec.organ}",
        "description": "Synthetic phantoms made by common.synthetic (no real patient data).",
        "licence": "CC0 (generated data)",
        "tensorImageSize": "3D",
        "modality": {"0": spec.modality},
        "labels": {"0": "background", "1": label_name},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "synthetic": {"seed": seed, **{k: v for k, v in asdict(spec).items()}},
    }
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir


#: Presets for the paper's scenarios: name -> PhantomSpec keyword arguments.
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
    "lesions_mr_lowq": {"modality": "MR", "organ": "lesions", "lesions": 5, "blur": 1.0, "downsample": 1.6, "noise": 2.0},
}


def make_scenario(preset: str, out_dir: str, n_cases: int, seed: int = 0, **overrides: Any) -> str:
    """Write a dataset from :data:`SCENARIO_PRESETS` (``overrides`` change any :class:`PhantomSpec` field)."""
    if preset not in SCENARIO_PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(SCENARIO_PRESETS)}.")
    spec = PhantomSpec(**{**SCENARIO_PRESETS[preset], **overrides})
    return make_dataset(out_dir, n_cases, spec, seed=seed, name=f"synthetic_{preset}")
