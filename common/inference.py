# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Sliding-window inference of the paper's FCN, with predictions written on each input's own grid.

The paper (Section II-A): the trained network is applied to "blocks of 96^3 voxels with a 24-voxel
overlap between adjacent blocks". In MONAI terms that is ``SlidingWindowInferer(roi_size=96^3,
overlap=0.25)`` (the default here, :data:`OVERLAP_PAPER`); the authors' published code steps by 24
voxels instead, i.e. ``overlap=0.75`` (:data:`OVERLAP_AUTHORS_CODE`, selectable with the bundles'
``sw_overlap`` config id). Overlapping block outputs are averaged (MONAI's ``"constant"`` blending),
then softmax and argmax give the label map.

The bundles' ``configs/inference.json`` is the MONAI way of doing it: the preprocessing Compose
(load, channel first, RAS orientation, isotropic resampling, intensity normalisation) is inverted by
``Invertd`` on the softmax probabilities (bilinear), then argmax, then ``SaveImaged`` writes
``<output_dir>/<image name>_seg.nii.gz`` (see :func:`prediction_path`) with the shape and affine of
the image file that was given, also for anisotropic and oblique / non-RAS images. The sliding window is
MONAI's ``SlidingWindowInferer``, spelled out once in the configs (``inferer``). This module holds the
pieces those configs call: the large-volume rule, the input listing, the checkpoint check, the naming rule
and an atomic NIfTI writer.

Large volumes: on a GPU the network always runs on the GPU (``sw_device``), but the stitched output
(``out_channels`` + 1 float32 values per voxel, then the softmax, inversion and argmax copies made by
the post-processing) is kept in CPU memory when the volume has more than :data:`CPU_STITCH_VOXELS`
voxels (MONAI's ``SlidingWindowInferer(cpu_thresh=...)``, which then stitches with ``device="cpu"``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import torch
from monai.data import NibabelWriter

from .checkpoints import check_state_fits, checkpoint_state_dict
from .data import DataError, check_image_file, check_output_dir, list_images
from .io import atomic_path

__all__ = [
    "OVERLAP_PAPER",
    "OVERLAP_AUTHORS_CODE",
    "CPU_STITCH_VOXELS",
    "PRED_POSTFIX",
    "stitch_device",
    "num_windows",
    "images_to_segment",
    "prediction_path",
    "check_checkpoint",
    "check_output_dir",
    "AtomicNibabelWriter",
]

logger = logging.getLogger(__name__)

#: The paper's text: a 24-voxel overlap between adjacent 96^3 blocks (24 / 96 = 0.25).
OVERLAP_PAPER = 0.25
#: The authors' published code: the window steps by 24 voxels (overlap 72 / 96 = 0.75).
OVERLAP_AUTHORS_CODE = 0.75

#: Volumes with more voxels than this (2**26 = 67,108,864, e.g. 512 x 512 x 256, or 406^3) are stitched
#: in CPU memory while the network runs on the GPU. Below it everything stays on the GPU. At 2**26 voxels
#: the stitching buffers of a 2-class network take 0.8 GB (3 float32 values per voxel) and the
#: post-processing (softmax, inversion, argmax) a few GB more, which no longer fits comfortably next to
#: the network on an 8-16 GB card; the paper's resampled volumes (0.8-2 mm isotropic) stay far below it
#: (e.g. 256 x 256 x 200 = 13.1 M voxels).
CPU_STITCH_VOXELS = 2**26

#: ``SaveImaged(output_postfix=...)``: ``case.nii.gz`` -> ``case_seg.nii.gz``.
PRED_POSTFIX = "seg"

_NIFTI_EXT = (".nii.gz", ".nii")


def stitch_device(
    spatial_shape: Sequence[int], input_device: torch.device | str, cpu_thresh: int | None = CPU_STITCH_VOXELS
) -> torch.device:
    """Where the bundles' ``inferer`` (``SlidingWindowInferer(cpu_thresh=CPU_STITCH_VOXELS)``) stitches a volume:
    the CPU above ``cpu_thresh`` voxels, else the input's device (MONAI's rule, stated here so it can be checked
    and documented)."""
    n = math.prod(int(s) for s in spatial_shape)
    if cpu_thresh is not None and n > cpu_thresh:
        return torch.device("cpu")
    return torch.device(input_device)


def num_windows(image_size: Sequence[int], block_size: Sequence[int] | int, overlap: float) -> int:
    """Number of windows MONAI's sliding window visits for one image (after padding it to the block size).

    Per axis the step is ``max(1, int(block * (1 - overlap)))`` (a whole block when the padded image is
    exactly one block) and the windows are ``ceil((size - block) / step) + 1``; the total is the product.
    """
    dims = len(image_size)
    blocks = [int(block_size)] * dims if isinstance(block_size, int) else [int(b) for b in block_size]
    total = 1
    for size, block in zip(image_size, blocks):
        size = max(int(size), block)
        if size == block:
            n = 1
        else:
            step = max(1, int(block * (1 - overlap)))
            n = math.ceil((size - block) / step) + 1
        total *= n
    return total


def _has_nifti(folder: str) -> bool:
    return any(f.endswith(_NIFTI_EXT) and not f.startswith(".") for f in os.listdir(folder))  # as list_images


def images_to_segment(source: str | Sequence[str], strict: bool = True, channels: int = 1) -> list[dict[str, str]]:
    """The images an inference run segments, as ``[{"image": path}, ...]`` (no labels needed).

    ``source`` is one of:

    * a folder holding ``.nii`` / ``.nii.gz`` images (every one is segmented, sorted by name);
    * a dataset folder in the Decathlon layout (no images directly inside, a ``dataset.json``): its
      ``test`` images, or its ``training`` images when the test list is empty;
    * a datalist / dataset JSON file (its ``test`` cases, else its ``training`` cases), e.g. the
      ``datalist.json`` a training run writes;
    * a list of image paths;
    * a dataset spec of the training configs (``{"dir": folder, ...}``): that folder.

    With ``strict=False`` a problem is logged and ``[]`` returned instead (the configs' ``dataset`` uses this,
    so that ``ConfigWorkflow(...).initialize(); check_properties()`` works on a bundle without data; their
    ``run`` calls the strict form first).

    Every NIfTI image is checked before any is segmented (:func:`common.data.check_image_file`: the header reads, a
    3-D image with ``channels`` channel(s), the voxel data not truncated), so a bad file stops the run at once
    with its name, not inside the data loader after other cases were written. NaN/inf voxels are found when the
    image is loaded (``NormalizeModalityd``, naming the file).

    Raises:
        DataError: naming the folder or file: it does not exist, holds no images, lists missing images, or an
            image is unreadable, truncated, not 3-D or has another channel count.
    """
    if not strict:
        try:
            return images_to_segment(source, strict=True, channels=channels)
        except DataError as err:
            logger.warning("No images to segment yet: %s", err)
            return []
    if isinstance(source, Mapping):  # a source spec of a training config ({"dir": ..., "label_map": ...})
        if "dir" not in source:
            raise DataError(f"Input {dict(source)!r} names no 'dir'.")
        source = source["dir"]
    if isinstance(source, str):
        if not source:
            raise DataError(
                "No input given: pass --dataset_dir <folder of NIfTI images> or --datalist <datalist JSON>."
            )
        if os.path.isdir(source) and not _has_nifti(source):
            meta = os.path.join(source, "dataset.json")
            if not os.path.isfile(meta):
                raise DataError(
                    f"Input folder {source} holds no images: expected .nii or .nii.gz files in it (or a dataset.json "
                    f"of the Decathlon layout)."
                )
            source = meta
        elif not os.path.exists(source):
            raise DataError(f"Input {source} does not exist: pass a folder of NIfTI images or a datalist JSON.")
    items = list_images(source)
    for item in items:
        if item["image"].endswith(_NIFTI_EXT):  # other formats (e.g. a list of .nrrd paths) go to LoadImaged as is
            check_image_file(item["image"], channels=channels)
    return items


def prediction_path(image: str, output_dir: str, postfix: str = PRED_POSTFIX, ext: str = ".nii.gz") -> str:
    """Where ``configs/inference.json`` writes the segmentation of ``image``.

    ``<output_dir>/<image file name without .nii/.nii.gz>_<postfix>.nii.gz``, e.g. ``liver_07.nii.gz`` ->
    ``<output_dir>/liver_07_seg.nii.gz`` (flat: images of the same name from different folders overwrite
    each other). This is ``SaveImaged(output_postfix="seg", separate_folder=False)``'s rule.
    """
    name = os.path.basename(image)
    for e in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(e):
            name = name[: -len(e)]
            break
    else:
        name = os.path.splitext(name)[0]
    return os.path.join(output_dir, f"{name}_{postfix}{ext}")


def check_checkpoint(path: str, network: torch.nn.Module) -> str:
    """Check, before running, that ``path`` exists and fits ``network`` (names and shapes); returns ``path``.

    The configs call it first in ``run`` so a wrong ``--ckpt_path`` fails at once with the file named,
    instead of inside the engine (MONAI's ``CheckpointLoader`` then loads the same file).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable file, or weights of another architecture / other ``network_def`` settings.
    """
    state = checkpoint_state_dict(path)
    check_state_fits(state, network, f"Checkpoint {path}")
    logger.info("Checkpoint %s fits %s (%d tensors).", path, type(network).__name__, len(state))
    return path


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` made atomic: the NIfTI is written to a hidden temporary file in the target
    folder (``.<name>.<random>.tmp.nii.gz``), flushed to disk and renamed over the target (``os.replace``).

    MONAI's own writer calls ``nib.save(img, filename)`` on the final name, so a full disk or a kill during
    the write leaves a truncated ``*_seg.nii.gz`` that looks like a result. With this writer (``SaveImaged(...,
    writer="common.inference.AtomicNibabelWriter")``) an error leaves the old file (if any) untouched and no
    temporary file; the ``OSError`` names the target. The file gets the usual permissions (umask), not the
    temporary file's 0600. (``SaveImage`` reports any writer error as ``RuntimeError: SaveImage cannot find a
    suitable writer for <file>`` followed by the writer's own traceback, where this message is.)
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs) -> None:
        filename = os.fspath(filename)
        base = os.path.basename(filename)
        ext = next((e for e in _NIFTI_EXT if base.endswith(e)), os.path.splitext(base)[1])
        with atomic_path(filename, suffix=f".tmp{ext}") as tmp:
            super().write(tmp, verbose=False, **obj_kwargs)  # nib.save: the format follows the extension
        if verbose:
            logger.info("Wrote %s.", filename)
