# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Datasets of the bundles: MONAI's ``CacheDataset``, optionally with the cache on the GPU.

``cache_dataset`` is the ``_target_`` of the bundles' ``train#dataset`` / ``validate#dataset``: MONAI's
``CacheDataset`` on the plain path, :class:`DeviceCacheDataset` when ``speed#cache_on_gpu`` is on (the
default on CUDA). Why our own class: MONAI's ``CacheDataset`` keeps its cache in CPU memory, so every
training step copies the cached volume's random block to the GPU after cropping on the CPU; with the
cache on the GPU the random transforms run on GPU tensors and nothing crosses PCIe (measured in
``docs/benchmarks.md``, "GPU fast paths").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
from monai.data import CacheDataset

from .execution import is_cuda, to_device

__all__ = ["cache_device", "cache_dataset", "DeviceCacheDataset", "tensor_nbytes"]

logger = logging.getLogger(__name__)


def cache_device(device: Any, enabled: bool = True, num_workers: int = 0) -> torch.device | None:
    """Where :func:`cache_dataset` should keep the preprocessed volumes: ``device`` when it is CUDA and
    ``enabled``, else None (CPU memory, the plain path). GPU tensors cannot be handed out by worker
    processes, so ``num_workers > 0`` keeps the cache on the CPU (with a warning)."""
    if not enabled or not is_cuda(device):
        return None
    if num_workers and int(num_workers) > 0:
        logger.warning("cache_on_gpu needs num_workers 0 (got %s): the cache stays in CPU memory.", num_workers)
        return None
    return torch.device(device)


def tensor_nbytes(obj: Any) -> int:
    """Bytes held by the tensors / arrays in ``obj`` (nested dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, Mapping):
        return sum(tensor_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_nbytes(v) for v in obj)
    return 0


def cache_dataset(data: Sequence, transform: Callable | None = None, device: Any = None,
                  max_fraction: float = 0.5, **kwargs: Any):  # fmt: skip
    """MONAI ``CacheDataset(data, transform, **kwargs)`` when ``device`` is None (the plain path), else a
    :class:`DeviceCacheDataset` keeping the cache on ``device`` when it fits."""
    if device is None:
        return CacheDataset(data, transform, **kwargs)
    return DeviceCacheDataset(data, transform, device=device, max_fraction=max_fraction, **kwargs)


class DeviceCacheDataset(CacheDataset):
    """A MONAI ``CacheDataset`` whose cached items (the output of the deterministic transforms) live on a GPU.

    After caching, the items are moved to ``device`` when every item is cached and their total size is at
    most ``max_fraction`` of the GPU's free memory; otherwise they stay in CPU memory (logged), which is
    the plain path. The random transforms that follow (crop, flips, rotations, noise) then run on GPU
    tensors in the data loader, so only the random block is touched per step and nothing crosses PCIe.
    Use it with ``num_workers=0`` (a ``ThreadDataLoader`` overlaps it with the training step).
    ``on_device`` says where the cache ended up.
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, device: Any = "cuda",
                 max_fraction: float = 0.5, **kwargs: Any) -> None:  # fmt: skip
        self.cache_device = torch.device(device)
        self.max_fraction = float(max_fraction)
        self.on_device = False
        super().__init__(data, transform, **kwargs)

    def set_data(self, data: Sequence) -> None:
        super().set_data(data)
        self._move_cache()

    def _move_cache(self) -> None:
        self.on_device = False
        n_items = len({self.hash_func(v) for v in self.data}) if self.hash_as_key else len(self.data)
        if self.runtime_cache not in (False, None) or self.cache_num < n_items or not self._cache:
            if self._cache:
                logger.warning("Cache kept in CPU memory: only %d of %d items are cached.", self.cache_num, n_items)
            return
        nbytes = sum(tensor_nbytes(item) for item in self._cache)
        if self.cache_device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.cache_device)
            budget = self.max_fraction * free
        else:
            budget = float("inf")
        if nbytes > budget:
            logger.warning(
                "Cache of %.2f GB kept in CPU memory: more than %.0f%% of the %.2f GB free on %s.",
                nbytes / 1e9, 100 * self.max_fraction, budget / self.max_fraction / 1e9, self.cache_device,
            )  # fmt: skip
            return
        self._cache = [to_device(item, self.cache_device) for item in self._cache]
        self.on_device = True
        logger.info("Cache of %d items (%.2f GB) on %s.", len(self._cache), nbytes / 1e9, self.cache_device)
