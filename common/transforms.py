"""Preprocessing transforms of the paper (Section II-A), as MONAI transforms.

* CT: Hounsfield units in ``[-1000, 1000]`` mapped linearly to ``[0, 1]`` (values outside are clipped).
* MR: each image divided by the standard deviation of its voxel intensities.

The rest of the pipeline (load, channel first, orientation, isotropic resampling, random 96^3
blocks with padding, flips, rotations by multiples of 90 degrees, Gaussian noise) uses MONAI's own
transforms and is listed in each bundle's config, so MONAI Label and readers see every step.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["CT_WINDOW", "NormalizeModality", "NormalizeModalityd", "CheckFinited"]

#: The paper's CT window in Hounsfield units, mapped to [0, 1].
CT_WINDOW = (-1000.0, 1000.0)


class NormalizeModality(Transform):
    """Intensity normalisation by modality.

    Args:
        modality: ``"CT"`` (window ``CT_WINDOW`` -> ``[0, 1]``, clipped) or ``"MR"``/``"MRI"`` (divide by the
            image's standard deviation). Case-insensitive.

    Input and output: an image array/tensor of any shape; the output is float32.
    """

    def __init__(self, modality: str) -> None:
        m = str(modality).upper()
        if m == "MRI":
            m = "MR"
        if m not in ("CT", "MR"):
            raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}.")
        self.modality = m

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        is_np = isinstance(img, np.ndarray)
        x = torch.as_tensor(img).float() if is_np else img.float()
        if self.modality == "CT":
            lo, hi = CT_WINDOW
            out = (x.clamp(lo, hi) - lo) / (hi - lo)
        else:
            std = float(x.std())
            if not np.isfinite(std) or std <= 0:
                raise ValueError(
                    f"MR normalisation divides by the image's standard deviation, which is {std}: "
                    "the image is constant or holds NaN/inf values."
                )
            out = x / std
        return out.numpy() if is_np else out


def _check_finite(x: torch.Tensor | np.ndarray, key: Hashable) -> None:
    t = torch.as_tensor(x)
    if not bool(torch.isfinite(t).all()):
        name = getattr(x, "meta", {}).get("filename_or_obj", key)
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: {n_bad} voxels are NaN or inf; fix or drop this image.")


class NormalizeModalityd(MapTransform):
    """Dictionary version of :class:`NormalizeModality` (``keys``: usually ``"image"``).

    With ``check_finite`` (default) an image holding NaN or inf voxels is refused with a ``ValueError`` naming its
    file (from the MetaTensor's ``filename_or_obj``): the CT window would keep NaN (a silently wrong
    segmentation) and the MR normalisation would fail without naming the file.
    """

    def __init__(
        self, keys: KeysCollection, modality: str, allow_missing_keys: bool = False, check_finite: bool = True
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeModality(modality)
        self.check_finite = check_finite

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.check_finite:
                _check_finite(d[key], key)
            d[key] = self.normalizer(d[key])
        return d


class CheckFinited(MapTransform):
    """Raise a clear error when an image holds NaN or inf voxels (names the file from its metadata)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            _check_finite(d[key], key)
        return d

