# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Transforms of the bundles' pipelines that MONAI lacks, each a thin layer over MONAI's own.

* :class:`NormalizeModality` / :class:`NormalizeModalityd`: the paper's intensity normalisation
  (Section II-A) chosen by modality, so that one config serves CT and MR runs (the ``modality`` id):
  CT: Hounsfield units in ``[-1000, 1000]`` (or the bundles' ``ct_window``) mapped linearly to ``[0, 1]``,
  clipped (MONAI's ``ScaleIntensityRange``); MR: each image divided by the (population) standard deviation of its
  voxels (MONAI's ``NormalizeIntensity(subtrahend=0)``). Unlike MONAI, a constant image (standard deviation 0) or
  one holding NaN/inf voxels is refused with an error naming its file, instead of passing through
  unscaled or as NaN.
* :class:`Spacingd`: MONAI's ``Spacingd`` that leaves non-dictionary ``<key>_*`` entries alone. MONAI 1.6.1's
  ``Spacingd`` calls ``.update`` on every ``image_*`` entry as if it were a meta dict; MONAI Label puts the
  image's datastore path under ``image_path``, a string, and the call fails. Outside MONAI Label it is
  MONAI's transform exactly.
* :class:`RandGaussianNoised`: MONAI's ``RandGaussianNoised`` with the noise optionally drawn on the image's
  device (``speed#noise_on_device``).
* :class:`SelectChanneld` / :class:`MapLabelsd`: the per-dataset channel choice and label map of a pooled run
  (:func:`common.data.make_datalist` puts each source's ``channel`` and ``label_map`` into its cases). MONAI's
  ``SplitDimd`` / ``MapLabelValued`` take one setting for every item; in a pool each item carries its own, so
  these read it from the item (and do nothing for an item without one, e.g. at inference).

The rest of the pipeline (load, channel first, orientation, random 96^3 blocks with padding, flips,
rotations by multiples of 90 degrees) uses MONAI's transforms directly and is listed in each bundle's
config, so MONAI Label and readers see every step.
"""

from __future__ import annotations

import json
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, NormalizeIntensity, ScaleIntensityRange, Transform
from monai.transforms import RandGaussianNoised as _MonaiRandGaussianNoised
from monai.transforms import Spacingd as _MonaiSpacingd

__all__ = [
    "CT_WINDOW",
    "ABDOMEN_CT_WINDOW",
    "NormalizeModality",
    "NormalizeModalityd",
    "CheckFinited",
    "Spacingd",
    "RandGaussianNoised",
    "SelectChanneld",
    "MapLabelsd",
]

#: Where :class:`MapLabelsd` records the map it applied in a ``MetaTensor``'s metadata (a JSON string).
LABEL_MAP_META = "tlseg_label_map"

#: The paper's CT window in Hounsfield units, mapped to [0, 1].
CT_WINDOW = (-1000.0, 1000.0)
#: The radiologists' abdominal soft-tissue window (width 400 HU, level 40 HU): the quick studies' CT window
#: (``tools/study.py --quick``). With the paper's window a 70 HU organ contrast is 0.035 of the input range, on top
#: of an offset of about 0.5; the paper's network, without normalisation layers, then needs thousands of Adam
#: steps before it segments by intensity (measured in docs/benchmarks.md, "Quick study").
ABDOMEN_CT_WINDOW = (-160.0, 240.0)


def _check_window(window: Sequence[float]) -> tuple[float, float]:
    if isinstance(window, (str, bytes)):
        raise ValueError(f"ct_window must be two numbers (low, high) in HU, got {window!r}.")
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"ct_window must be two numbers (low, high) in HU, got {window!r}.") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"ct_window must be (low, high) in HU with low < high, got {window!r}.")
    return lo, hi


class NormalizeModality(Transform):
    """Intensity normalisation by modality.

    Args:
        modality: ``"CT"`` (window ``ct_window`` -> ``[0, 1]``, clipped) or ``"MR"``/``"MRI"`` (divide by the
            image's standard deviation). Case-insensitive.
        ct_window: ``(low, high)`` in Hounsfield units mapped to ``[0, 1]`` for CT (default: the paper's
            :data:`CT_WINDOW`); a model must be run with the window it was trained with.

    Input and output: an image array/tensor of any shape; the output is float32.
    """

    def __init__(self, modality: str, ct_window: Sequence[float] = CT_WINDOW) -> None:
        m = str(modality).upper()
        if m == "MRI":
            m = "MR"
        if m not in ("CT", "MR"):
            raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}.")
        self.modality = m
        lo, hi = self.ct_window = _check_window(ct_window)
        self._ct = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
        self._mr = NormalizeIntensity(subtrahend=0.0)

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        is_np = isinstance(img, np.ndarray)
        x = torch.as_tensor(img).float() if is_np else img.float()
        if self.modality == "CT":
            out = self._ct(x)
        else:
            std = float(x.std(unbiased=False))
            if not np.isfinite(std) or std <= 0:
                raise ValueError(
                    f"MR normalisation divides by the image's standard deviation, which is {std}: "
                    "the image is constant or holds NaN/inf values."
                )
            out = self._mr(x)
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
    segmentation) and the MR normalisation would fail without naming the file. An item carrying its own
    ``modality_key`` entry (a multi-task pool's case, :func:`common.data.make_datalist`) is normalised for that
    modality (a CT one with ``ct_window``); the entry is removed from the item.
    """

    def __init__(
        self, keys: KeysCollection, modality: str, allow_missing_keys: bool = False, check_finite: bool = True,
        modality_key: str = "modality", ct_window: Sequence[float] = CT_WINDOW,
    ) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeModality(modality, ct_window)
        self.check_finite = check_finite
        self.modality_key = modality_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        own = d.pop(self.modality_key, None)  # a multi-task pool's case names its dataset's modality
        normalizer = self.normalizer if own is None else NormalizeModality(own, self.normalizer.ct_window)
        for key in self.key_iterator(d):
            if self.check_finite:
                _check_finite(d[key], key)
            d[key] = normalizer(d[key])
        return d


class CheckFinited(MapTransform):
    """Raise a clear error when an image holds NaN or inf voxels (names the file from its metadata)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            _check_finite(d[key], key)
        return d


class Spacingd(_MonaiSpacingd):
    """MONAI's ``Spacingd`` (same arguments and result) that sets aside the ``<key>_*`` entries that are not
    dictionaries (MONAI Label's ``image_path`` string) during the call, so MONAI 1.6.1 does not call ``.update``
    on them; they are put back unchanged."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        aside = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and not isinstance(d[k], Mapping) and any(k.startswith(f"{key}_") for key in self.keys)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out


class RandGaussianNoised(_MonaiRandGaussianNoised):
    """MONAI's ``RandGaussianNoised`` with the noise optionally drawn by torch on the image's device.

    With ``on_device=False`` (default) it is MONAI's transform, unchanged (numpy float64 noise on the CPU,
    then copied to the image's device: 28 ms for a 96^3 block on a CPU core, longer than a GPU step). With
    ``on_device=True`` the decision (probability), the standard deviation and a seed are drawn from the
    transform's own generator ``self.R`` (so ``set_random_state`` and the RNG states that
    ``common.checkpoints.RNGState`` saves, which hold ``self.R`` only, make it reproducible, also across a
    resume), and the noise itself is ``torch.randn`` from a generator on the image's device seeded
    with that seed: the same distribution, another random stream.
    """

    def __init__(self, keys, prob: float = 0.1, mean: float = 0.0, std: float = 0.1, dtype=np.float32,
                 allow_missing_keys: bool = False, sample_std: bool = True,
                 on_device: bool = False) -> None:  # fmt: skip
        super().__init__(keys, prob=prob, mean=mean, std=std, dtype=dtype, allow_missing_keys=allow_missing_keys,
                         sample_std=sample_std)  # fmt: skip
        self.on_device = bool(on_device)

    def __call__(self, data):
        if not self.on_device:
            return super().__call__(data)
        from monai.data import get_track_meta
        from monai.utils import convert_data_type, convert_to_tensor

        d = dict(data)
        self.randomize(None)
        first_key = self.first_key(d) if self._do_transform else ()
        if first_key == ():
            for key in self.key_iterator(d):
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
            return d
        inner = self.rand_gaussian_noise
        std = self.R.uniform(0, inner.std) if inner.sample_std else inner.std
        seed = int(self.R.randint(0, 2**31 - 1))
        ref = convert_to_tensor(d[first_key], track_meta=get_track_meta())
        gen = torch.Generator(device=ref.device).manual_seed(seed)
        noise = torch.randn(ref.shape, generator=gen, device=ref.device, dtype=torch.float32)
        noise = noise.mul_(float(std)).add_(float(inner.mean))
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=get_track_meta())
            if inner.dtype is not None:
                img, *_ = convert_data_type(img, dtype=inner.dtype)
            d[key] = img + noise.to(device=img.device, dtype=img.dtype)
        return d


class SelectChanneld(MapTransform):
    """Keep one channel of a channel-first image, the one its item names under ``channel_key`` (an index);
    items without it are returned unchanged. The key is removed from the item (so batches collate).

    Shapes: ``(C, X, Y, Z)`` -> ``(1, X, Y, Z)``.
    """

    def __init__(self, keys: KeysCollection, channel_key: str = "channel", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channel_key = channel_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        channel = d.pop(self.channel_key, None)
        if channel is None:
            return d
        for key in self.key_iterator(d):
            c = int(channel)
            if not 0 <= c < d[key].shape[0]:
                name = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{name}: channel {c} was asked for, the image has {d[key].shape[0]} channel(s).")
            d[key] = d[key][c : c + 1]
        return d


class MapLabelsd(MapTransform):
    """Map the label values of an item with the map its item carries under ``map_key`` (``{"source value":
    class}``, every value of the label present: :func:`common.data.check_case` checked it); items without a map
    are returned unchanged. The key is removed from the item (so batches collate).
    """

    def __init__(self, keys: KeysCollection, map_key: str = "label_map", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.map_key = map_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label_map = d.pop(self.map_key, None)
        if label_map is None:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            out = img.clone() if isinstance(img, torch.Tensor) else np.array(img, copy=True)
            rounded = torch.round(img) if isinstance(img, torch.Tensor) else np.round(img)
            for src, dst in label_map.items():
                out[rounded == float(src)] = float(dst)
            if hasattr(out, "meta"):  # evaluation re-reads the original label file and maps it the same way
                out.meta[LABEL_MAP_META] = json.dumps({str(k): int(v) for k, v in label_map.items()}, sort_keys=True)
            d[key] = out
        return d
