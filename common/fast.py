"""Fast paths for training and inference on a GPU, each switchable from the bundle configs.

Every switch is a config id of ``configs/train.json`` (and, where it applies, ``inference.json`` /
``evaluate.json``). The defaults turn a path on where it helps, i.e. when ``device`` is a CUDA device,
and leave it off on the CPU; with every switch off the bundles run exactly the plain path (the same
MONAI classes, the same random streams, bit-identical weights).

=====================  =====================================================  =================================
config id              what it does                                           default
=====================  =====================================================  =================================
``amp``                mixed precision (``torch.autocast``) in MONAI's        ``$common.fast.is_cuda(@device)``
                       ``SupervisedTrainer`` / ``SupervisedEvaluator``
``amp_dtype``          ``null`` (bf16 where the GPU has native bf16, else     ``null``
                       fp16), ``"bf16"`` or ``"fp16"``
``amp_kwargs``         ``{"dtype": ...}`` for the engines (:func:`amp_kwargs`)
``channels_last``      network weights (and training inputs) in               ``$common.fast.is_cuda(@device)``
                       ``torch.channels_last_3d`` memory format
``cudnn_benchmark``    ``torch.backends.cudnn.benchmark = True`` (and         ``$common.fast.is_cuda(@device)``
                       ``deterministic = False``, see :func:`set_cudnn_benchmark`)
``compile``            ``torch.compile`` of the network, in place             ``false``
``compile_kwargs``     arguments of ``torch.compile`` (e.g. ``{"mode":        ``{}``
                       "max-autotune"}``)
``cache_on_gpu``       the preprocessed volumes cached on the GPU when they   ``$common.fast.is_cuda(@device)``
                       fit (:class:`DeviceCacheDataset`), so the random
                       crop / flip / rotation / noise run on GPU tensors
``thread_loader``      MONAI ``ThreadDataLoader`` instead of ``DataLoader``   ``$common.fast.is_cuda(@device)``
                       (the random transforms run in a background thread)
``noise_on_device``    the Gaussian-noise augmentation drawn with torch on    ``$common.fast.is_cuda(@device)``
                       the image's device (:class:`RandGaussianNoised`)
``strip_meta``         training batches as plain tensors, not MONAI           ``$common.fast.is_cuda(@device)``
                       ``MetaTensor`` (:func:`prepare_batch_fn`)
``sw_batch_size``      windows per forward pass of the sliding window         4 on CUDA, 1 on the CPU
=====================  =====================================================  =================================

Notes on the paths:

* AMP. MONAI 1.6.1's ``SupervisedTrainer`` autocasts with ``torch.autocast("cuda", **amp_kwargs)`` and,
  whenever ``amp`` is on, creates a ``GradScaler`` in ``Trainer.run``. A scaler is only needed for float16
  (its 5-bit exponent underflows small gradients); bfloat16 has float32's exponent range. With bf16,
  :class:`AmpGradScalerHandler` (in ``train#handlers``) replaces MONAI's scaler by a disabled one at
  ``Events.STARTED``, so the step is a plain ``backward`` + ``optimizer.step`` under autocast, without the
  unscale pass and its device-to-host sync. ``SupervisedEvaluator`` takes ``amp`` / ``amp_kwargs`` too and
  autocasts around the inferer (the sliding window stitches in the input's dtype, float32).
* channels-last. ``torch.channels_last_3d`` weights make cuDNN run NDHWC kernels (tensor cores without
  layout transposes); on the CPU the results equal the contiguous ones up to float rounding
  (``tests/test_fast_paths.py``).
* ``torch.compile`` is applied with ``nn.Module.compile`` (in place), so the state-dict keys stay the same
  (no ``_orig_mod.`` prefix): checkpoints, snapshots, ``CheckpointLoader`` and transfer learning are
  unaffected. MONAI ``MetaTensor`` inputs are turned into plain tensors before the compiled call (dynamo
  otherwise recompiles on the tensor subclass). DDP (``multi_gpu_train.json``): the inner module is
  compiled before it is wrapped; this works, but torch's DDP-aware graph splitting (``DDPOptimizer``,
  which overlaps gradient all-reduce with the backward pass) only applies to ``torch.compile(ddp_model)``.
  TorchScript: a compiled module cannot be scripted; ``ckpt_export`` builds a fresh ``network_def`` and
  is unaffected. The first steps are slow (compilation, minutes for this network).
* No metadata in the training loop. The cached volumes are plain tensors (``EnsureTyped(track_meta=False)``),
  but MONAI's random transforms wrap them again as ``MetaTensor`` (the global ``track_meta`` is on, and must
  stay on while the volumes are loaded and resampled), so without this path every operation of the
  network's forward and backward pass goes through ``MetaTensor.__torch_function__`` (tens of
  milliseconds of Python per step). :func:`prepare_batch_fn` gives the trainer a ``prepare_batch`` that
  hands the network plain tensors. Sliding-window inference already feeds the network plain tensors.
* The frozen encoder of ``transfer_mode = frozen_random_encoder`` runs under ``torch.no_grad()``
  (``common.networks.KarimiFCN.encoder_frozen``): no activations kept, no backward pass through it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "synchronize",
    "device_name",
    "is_cuda",
    "autocast_dtype",
    "amp_kwargs",
    "autocast",
    "needs_grad_scaler",
    "AmpGradScalerHandler",
    "set_cudnn_benchmark",
    "compile_network",
    "prepare_for_speed",
    "to_kwargs",
    "to_device",
    "prepare_batch_fn",
    "prepare_batch_plain",
    "default_sw_batch_size",
    "cache_device",
    "cache_dataset",
    "DeviceCacheDataset",
    "RandGaussianNoised",
    "tensor_nbytes",
]

logger = logging.getLogger(__name__)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def is_cuda(device: Any) -> bool:
    """True when ``device`` (a ``torch.device``, a string such as ``"cuda:0"``, or None) is a CUDA device."""
    if device is None:
        return False
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        return False


def _bf16_native(device: torch.device) -> bool:
    if not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        with torch.cuda.device(index):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without including_emulation
        return torch.cuda.get_device_capability(index)[0] >= 8


def autocast_dtype(device: Any, dtype: Any = None) -> torch.dtype:
    """The mixed-precision dtype for ``device``.

    ``dtype`` None: on CUDA bfloat16 where the GPU has native bf16 (compute capability >= 8: A100, H100,
    H200), float16 otherwise; on the CPU bfloat16 (CPU autocast supports it). A given ``dtype`` (a
    ``torch.dtype`` or ``"bf16"`` / ``"fp16"``) is returned as a ``torch.dtype``.
    """
    if dtype is not None:
        if isinstance(dtype, torch.dtype):
            return dtype
        key = str(dtype).lower().replace("torch.", "")
        if key not in _DTYPES:
            raise ValueError(f"amp_dtype must be null, 'bf16' or 'fp16', got {dtype!r}.")
        return _DTYPES[key]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.bfloat16 if _bf16_native(dev) else torch.float16
    return torch.bfloat16


def amp_kwargs(device: Any, dtype: Any = None) -> dict[str, torch.dtype]:
    """``amp_kwargs`` of MONAI's engines: ``{"dtype": autocast_dtype(device, dtype)}``."""
    return {"dtype": autocast_dtype(device, dtype)}


def autocast(device: Any, enabled: bool = True, dtype: Any = None):
    """A ``torch.autocast`` context for ``device`` (``nullcontext`` when disabled or for other device types)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not enabled or dev.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=autocast_dtype(dev, dtype))


def needs_grad_scaler(dtype: torch.dtype) -> bool:
    """A gradient scaler is needed for float16 only (bfloat16 has float32's exponent range)."""
    return dtype == torch.float16


class AmpGradScalerHandler:
    """Ignite handler: no gradient scaling in MONAI's ``SupervisedTrainer`` when AMP runs in bfloat16.

    MONAI 1.6.1 creates ``torch.cuda.amp.GradScaler()`` in ``Trainer.run`` whenever ``amp`` is on and only
    autocasts when a scaler exists. At ``Events.STARTED`` (after ``Trainer.run`` made its scaler) this
    handler swaps it for a disabled ``GradScaler`` when the dtype is not float16: ``scale`` then returns
    the loss unchanged, ``step`` is ``optimizer.step`` and ``update`` does nothing, while MONAI still
    autocasts. With float16, or with ``amp`` off, it does nothing.

    Args:
        amp_kwargs: the engines' ``amp_kwargs`` (``{"dtype": ...}``; MONAI's default dtype is float16).
    """

    def __init__(self, amp_kwargs: Mapping[str, Any] | None = None) -> None:
        self.dtype = autocast_dtype("cuda", (amp_kwargs or {}).get("dtype", torch.float16))

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        if getattr(engine, "amp", False) and not needs_grad_scaler(self.dtype):
            engine.scaler = torch.amp.GradScaler("cuda", enabled=False)
            logger.info("AMP in %s: no gradient scaling.", str(self.dtype).replace("torch.", ""))


def set_cudnn_benchmark(enabled: bool = True) -> None:
    """``torch.backends.cudnn.benchmark = True`` and ``deterministic = False`` (when ``enabled``; else nothing).

    ``monai.utils.set_determinism`` (the configs' ``initialize``) sets ``deterministic = True``, which limits
    the benchmark to deterministic cuDNN algorithms (often the slow ones for 3-D weight gradients), so the
    fast path lifts it: the choice by timing is not bit-reproducible anyway. Harmless on the CPU.
    """
    if enabled:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


def _plain_tensor(a: Any) -> Any:
    as_tensor = getattr(a, "as_tensor", None)  # monai.data.MetaTensor -> torch.Tensor (shares memory)
    return as_tensor() if isinstance(a, torch.Tensor) and callable(as_tensor) else a


def compile_network(network: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """``torch.compile`` ``network`` in place (``nn.Module.compile``); returns it.

    The state-dict keys do not change. MetaTensor arguments reach the compiled code as plain tensors.
    """
    network.compile(**compile_kwargs)
    compiled = getattr(network, "_compiled_call_impl", None)
    if compiled is not None:

        def call(*args: Any, **kwargs: Any) -> Any:
            return compiled(*(_plain_tensor(a) for a in args), **{k: _plain_tensor(v) for k, v in kwargs.items()})

        network._compiled_call_impl = call
    logger.info("Network compiled with torch.compile(%s).", compile_kwargs or "")
    return network


def prepare_for_speed(
    network: nn.Module,
    channels_last: bool = False,
    compile: bool = False,
    cudnn_benchmark: bool = False,
    compile_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Apply the network-side fast paths to ``network`` (in place) and return it.

    ``channels_last``: weights in ``torch.channels_last_3d``; ``cudnn_benchmark``: see
    :func:`set_cudnn_benchmark`; ``compile``: :func:`compile_network` with ``compile_kwargs``. With all
    three off the network is returned untouched (the plain path).
    """
    set_cudnn_benchmark(bool(cudnn_benchmark))
    if channels_last:
        network.to(memory_format=torch.channels_last_3d)
    if compile:
        compile_network(network, **dict(compile_kwargs or {}))
    return network


def to_kwargs(channels_last: bool = False) -> dict[str, Any]:
    """``to_kwargs`` of MONAI's engines (arguments of ``Tensor.to`` for each batch)."""
    return {"memory_format": torch.channels_last_3d} if channels_last else {}


def to_device(data: Any, device: Any, channels_last: bool = False, non_blocking: bool = False) -> Any:
    """Move every tensor in ``data`` (a tensor, or dicts / lists / tuples of them) to ``device``; 5-D
    tensors in ``channels_last_3d`` format when ``channels_last``. Other values are returned as they are."""
    if isinstance(data, torch.Tensor):
        kw = {"memory_format": torch.channels_last_3d} if channels_last and data.dim() == 5 else {}
        return data.to(device=device, non_blocking=non_blocking, **kw)
    if isinstance(data, Mapping):
        return {k: to_device(v, device, channels_last, non_blocking) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(v, device, channels_last, non_blocking) for v in data)
    return data


def prepare_batch_plain(batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """MONAI's ``default_prepare_batch`` (move to ``device``, ``Tensor.to`` ``kwargs``), returning plain
    ``torch.Tensor`` s instead of ``MetaTensor`` s (no metadata tracking in the training step)."""
    from monai.engines.utils import default_prepare_batch

    out = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
    if isinstance(out, torch.Tensor):
        return _plain_tensor(out)
    return tuple(_plain_tensor(t) for t in out)


def prepare_batch_fn(strip_meta: bool = False) -> Callable:
    """The trainer's ``prepare_batch``: :func:`prepare_batch_plain` when ``strip_meta``, else MONAI's
    ``default_prepare_batch`` (the plain path)."""
    from monai.engines.utils import default_prepare_batch

    return prepare_batch_plain if strip_meta else default_prepare_batch


def default_sw_batch_size(device: Any) -> int:
    """Sliding-window batch: 4 windows per forward pass on CUDA (96^3 windows in bf16 take well under
    1 GB), 1 on the CPU (no speed-up there)."""
    return 4 if is_cuda(device) else 1


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


def _import_cache_dataset():
    from monai.data import CacheDataset

    return CacheDataset


def cache_dataset(data: Sequence, transform: Callable | None = None, device: Any = None,
                  max_fraction: float = 0.5, **kwargs: Any):  # fmt: skip
    """MONAI ``CacheDataset(data, transform, **kwargs)`` when ``device`` is None (the plain path), else a
    :class:`DeviceCacheDataset` keeping the cache on ``device`` when it fits."""
    if device is None:
        return _import_cache_dataset()(data, transform, **kwargs)
    return DeviceCacheDataset(data, transform, device=device, max_fraction=max_fraction, **kwargs)


class DeviceCacheDataset(_import_cache_dataset()):
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


def _noise_base():
    from monai.transforms import RandGaussianNoised as _MonaiRandGaussianNoised

    return _MonaiRandGaussianNoised


class RandGaussianNoised(_noise_base()):
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


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU. For timing benchmarks."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str = "cpu") -> str:
    """A readable name of the device: the GPU's name, or the CPU model from ``/proc/cpuinfo``."""
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
