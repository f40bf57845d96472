# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""How the engines run the network on a device: mixed precision, memory format, compilation, cuDNN
autotuning, batch preparation and the sliding-window batch.

Every option is an entry of the ``speed`` config id of the bundles (``configs/train.json``, and where it
applies ``inference.json``), e.g. ``--speed#amp false``. The defaults turn an option on where it was
measured to help, i.e. when ``device`` is a CUDA device (``@gpu``), and leave it off on the CPU; with every
option off the bundles run exactly the plain path (the same MONAI classes, the same random streams,
bit-identical weights; ``tests/test_fast_paths.py``). The data-side options (``cache_on_gpu``,
``thread_loader``, ``noise_on_device``) are implemented in :mod:`common.datasets` and
:class:`common.transforms.RandGaussianNoised`.

=========================  =================================================  ========================
``speed#...`` entry        what it does                                       default
=========================  =================================================  ========================
``amp``                    mixed precision (``torch.autocast``) in MONAI's    ``@gpu``
                           ``SupervisedTrainer`` / ``SupervisedEvaluator``;
                           on a CPU the network's forward under CPU
                           autocast (:func:`autocast_on_cpu`); quick
                           studies turn it on where the CPU has native
                           bf16 whose convolutions pass a known-answer
                           check (:func:`cpu_bf16_usable`)
``amp_dtype``              ``null`` (bf16 where the GPU has native bf16,      ``null``
                           else fp16), ``"bf16"`` or ``"fp16"``
``channels_last``          network weights (and training inputs) in           ``@gpu``
                           ``torch.channels_last_3d`` memory format
``cudnn_benchmark``        ``torch.backends.cudnn.benchmark = True`` (and     ``@gpu``
                           ``deterministic = False``)
``compile``                ``torch.compile`` of the network, in place         ``false``
``compile_kwargs``         arguments of ``torch.compile``                     ``{}``
``cache_on_gpu``           the preprocessed volumes cached on the GPU when    ``@gpu``
                           they fit (:class:`common.datasets.DeviceCacheDataset`)
``thread_loader``          MONAI ``ThreadDataLoader`` instead of              ``@gpu``
                           ``DataLoader`` (random transforms in a thread)
``noise_on_device``        the Gaussian-noise augmentation drawn with torch   ``@gpu``
                           on the image's device
``strip_meta``             training batches as plain tensors, not MONAI       ``@gpu``
                           ``MetaTensor`` (:func:`prepare_batch_fn`)
``sw_batch_size``          windows per forward pass of the sliding window     4 on CUDA, 1 on the CPU
``onednn_conv``            float32 CPU ``Conv3d`` layers through oneDNN       ``false``
                           (:func:`onednn_convolutions`; quick studies
                           turn it on)
=========================  =================================================  ========================

The engines' ``amp_kwargs`` id is :func:`amp_kwargs` of ``device`` and ``speed#amp_dtype``.

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
import functools
import logging
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = [
    "is_cuda",
    "autocast_dtype",
    "amp_kwargs",
    "autocast",
    "needs_grad_scaler",
    "AmpGradScalerHandler",
    "set_cudnn_benchmark",
    "compile_network",
    "cpu_bf16_native",
    "cpu_bf16_check",
    "cpu_bf16_usable",
    "autocast_on_cpu",
    "onednn_convolutions",
    "prepare_for_speed",
    "prepare_network",
    "to_kwargs",
    "to_device",
    "prepare_batch_fn",
    "prepare_batch_plain",
    "TaskBatch",
    "default_sw_batch_size",
]

logger = logging.getLogger(__name__)


def is_cuda(device: Any) -> bool:
    """True when ``device`` (a ``torch.device``, a string such as ``"cuda:0"``, or None) is a CUDA device."""
    if device is None:
        return False
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        return False


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


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


#: ``ONEDNN_MAX_CPU_ISA`` values that keep oneDNN from the CPU's bf16 instructions.
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_bf16_native(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bfloat16 natively: an x86 CPU whose flags (``cpuinfo``, Linux) name
    ``avx512_bf16`` or ``amx_bf16`` (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later), unless
    ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) holds oneDNN below those instructions (e.g. ``AVX2``, the way to
    run as an AVX2-only CPU would). Elsewhere, or when the flags cannot be read, False: CPU autocast then emulates
    bfloat16 and is several times slower than float32 (measured: 5 s against 0.3 s per quick-study step)."""
    import os

    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if isa in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


#: The relative error (Frobenius norm) at which a bf16 convolution result counts as wrong: bf16 rounds to 2^-8 (about
#: 0.4 %), and the measured error of a correct kernel is 0.3 % (docs/benchmarks.md, "Training collapse"); a broken one
#: gives errors near 100 % or infinite values.
BF16_CHECK_RTOL = 0.05


@functools.lru_cache(maxsize=None)
def cpu_bf16_check() -> str | None:
    """Known-answer check of CPU bf16 autocast on this machine: None when the 3x3x3 convolutions and transposed
    convolutions the networks use (16 and 32 channels; 2^3, 4^3 and 8^3 voxels) give, under bf16 autocast, the output,
    input gradient and weight gradient of float32 within :data:`BF16_CHECK_RTOL`; else a sentence saying what failed.
    Computed once per process (a few tens of milliseconds).

    Why: with torch 2.13.0's oneDNN 3.12 on a 2-core AMD EPYC (Zen 4: ``avx512_bf16``, no AMX) the bf16 weight gradient
    of a stride-1 3x3x3 convolution on a 2^3 input (the deepest level of the paper's network at 16^3 blocks) is wrong:
    relative error 0.85-1.0 at 16, 64 and 112 channels, infinite at 32 (docs/benchmarks.md, "Training collapse"). Every
    R.I. run of the quick study then ended in NaN weights. The CPU flags alone do not show it."""
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for transposed in (False, True):
            for channels in (16, 32):
                for size in (2, 4, 8):
                    cls = nn.ConvTranspose3d if transposed else nn.Conv3d
                    kwargs = {"stride": 2, "padding": 1, "output_padding": 1} if transposed else {"padding": 1}
                    conv = cls(channels, channels, 3, **kwargs)
                    x = torch.randn(1, channels, size, size, size, generator=gen)
                    results = []
                    for amp in (False, True):
                        conv.zero_grad()
                        xi = x.clone().requires_grad_(True)
                        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=amp):
                            out = conv(xi)
                        g = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
                        (out.float() * g).sum().backward()
                        results.append((out.detach().float(), xi.grad.float(), conv.weight.grad.float()))
                    for name, ref, got in zip(("output", "input gradient", "weight gradient"), *results):
                        err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
                        if not err <= BF16_CHECK_RTOL:
                            what = "transposed convolution" if transposed else "convolution"
                            return (f"the bf16 {name} of a 3x3x3 {what} with {channels} channels on a {size}^3 input is "
                                    f"{err:.3g} away from float32 (relative; a correct kernel: about 0.003)")
    return None


def cpu_bf16_usable(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bfloat16 natively (:func:`cpu_bf16_native`) and its bf16 convolutions pass the
    known-answer check :func:`cpu_bf16_check`: the condition under which quick studies train under CPU bf16 autocast."""
    return cpu_bf16_native(cpuinfo) and cpu_bf16_check() is None


def _autocast_cpu_forward(forward: Callable, dtype: torch.dtype) -> Callable:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type="cpu", dtype=dtype):
            return forward(*args, **kwargs)

    run.__tlseg_cpu_autocast__ = dtype  # type: ignore[attr-defined]
    return run


def autocast_on_cpu(network: nn.Module, dtype: Any = None, check: bool = True) -> nn.Module:
    """Run ``network``'s forward under CPU autocast (``dtype``: :func:`autocast_dtype` of the CPU, bfloat16); in
    place, returns ``network``.

    Why our own: MONAI 1.6.1's ``SupervisedTrainer`` and ``SupervisedEvaluator`` autocast with
    ``torch.autocast("cuda")`` only, which switches itself off on a CPU, so ``speed#amp`` alone gives a CPU the plain
    float32 step. Measured on a bf16 CPU (docs/benchmarks.md, "GPU fast paths", Intel Xeon, 32^3 blocks): the bf16
    autocast step 279 ms against 1112 ms in float32. The forward is wrapped on the instance (``network.forward``),
    so the state-dict keys, checkpoints, DDP and ``ckpt_export`` (which builds a fresh ``network_def``) are
    unaffected; the backward follows the forward's dtypes through autograd.

    With ``check`` (default) bf16 is only turned on when this CPU's bf16 convolutions pass :func:`cpu_bf16_check`;
    otherwise a warning says why and the network is returned unchanged (float32): a wrong kernel would train a
    network on garbage gradients.
    """
    dt = autocast_dtype("cpu", dtype)
    if dt == torch.bfloat16 and check:
        problem = cpu_bf16_check()
        if problem is not None:
            logger.warning("CPU bf16 autocast refused on this machine: %s. The network runs in float32.", problem)
            return network
    if getattr(network.forward, "__tlseg_cpu_autocast__", None) is None:
        network.forward = _autocast_cpu_forward(network.forward, dt)  # type: ignore[method-assign]
        logger.info("Network forward under CPU autocast (%s).", dt)
    return network


def _onednn_conv_forward(conv: nn.Conv3d) -> Callable:
    forward = conv.forward

    @functools.wraps(forward)
    def run(x: torch.Tensor) -> torch.Tensor:
        w = conv.weight
        if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and conv.padding_mode == "zeros" and not torch.is_autocast_enabled("cpu")):  # fmt: skip
            return torch.mkldnn_convolution(x, w, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
        return forward(x)

    run.__tlseg_onednn__ = True  # type: ignore[attr-defined]
    return run


def onednn_convolutions(network: nn.Module) -> nn.Module:
    """Run ``network``'s float32 CPU ``Conv3d`` layers with oneDNN (``torch.mkldnn_convolution``); in place, returns it.

    Why our own: for a float32 CPU input of batch 1 whose ``N * C * D * H`` is at most 20480, torch 2.13 picks its
    native ``slow_conv3d`` (im2col + GEMM) instead of oneDNN (``ConvParams::use_mkldnn``): every convolution of the
    paper's network at 16^3 blocks. oneDNN's is faster here: the quick study's training step (the paper's network,
    16^3, Adam, one thread, two processes side by side as in ``make demo``, AVX2) 0.209 s against 0.251 s
    (docs/benchmarks.md, "Training collapse", speed). Same arithmetic up to float rounding; the instance's forward
    is wrapped (state-dict keys, checkpoints and ``ckpt_export`` unaffected); a bf16-autocast, non-float32 or
    non-CPU input takes the layer's own forward."""
    for module in network.modules():
        if type(module) is nn.Conv3d and not getattr(module.forward, "__tlseg_onednn__", False):
            module.forward = _onednn_conv_forward(module)  # type: ignore[method-assign]
    return network


def prepare_for_speed(
    network: nn.Module,
    channels_last: bool = False,
    compile: bool = False,
    cudnn_benchmark: bool = False,
    compile_kwargs: Mapping[str, Any] | None = None,
    cpu_amp: bool = False,
    amp_dtype: Any = None,
    onednn_conv: bool = False,
) -> nn.Module:
    """Apply the network-side fast paths to ``network`` (in place) and return it.

    ``channels_last``: weights in ``torch.channels_last_3d``; ``cudnn_benchmark``: see
    :func:`set_cudnn_benchmark`; ``compile``: :func:`compile_network` with ``compile_kwargs``; ``cpu_amp``:
    :func:`autocast_on_cpu` with ``amp_dtype``. With all off the network is returned untouched (the plain path).
    """
    set_cudnn_benchmark(bool(cudnn_benchmark))
    if channels_last:
        network.to(memory_format=torch.channels_last_3d)
    if onednn_conv:
        onednn_convolutions(network)
    if cpu_amp:
        autocast_on_cpu(network, amp_dtype)
    if compile:
        compile_network(network, **dict(compile_kwargs or {}))
    return network


def prepare_network(network: nn.Module, device: Any, speed: Mapping[str, Any] | None = None) -> nn.Module:
    """``network`` moved to ``device`` with the network-side options of the bundles' ``speed`` id applied
    (``channels_last``, ``compile`` with ``compile_kwargs``, ``cudnn_benchmark``, and on a CPU ``amp`` with
    ``amp_dtype``: see :func:`prepare_for_speed`). Returns ``network`` (changed in place)."""
    speed = dict(speed or {})
    on_cpu = torch.device(device if device is not None else "cpu").type == "cpu"
    return prepare_for_speed(
        network.to(device),
        channels_last=bool(speed.get("channels_last", False)),
        compile=bool(speed.get("compile", False)),
        cudnn_benchmark=bool(speed.get("cudnn_benchmark", False)),
        compile_kwargs=speed.get("compile_kwargs"),
        cpu_amp=on_cpu and bool(speed.get("amp", False)),
        amp_dtype=speed.get("amp_dtype"),
        onednn_conv=on_cpu and bool(speed.get("onednn_conv", False)),
    )


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


class TaskBatch:
    """A ``prepare_batch`` for a multi-task network (:class:`common.networks.MultiTaskFCN`): ``inner``'s image and
    label, plus ``{"task": ...}`` as keyword arguments of the forward pass (MONAI's engines pass a prepared batch's
    4th item to the inferer, and the inferer to the network): the batch's own ``task_key`` entry (training and
    evaluation, each case names its dataset) or a fixed ``task`` (inference with one chosen head)."""

    def __init__(self, inner: Callable, task_key: str | None = "task", task: Any = None) -> None:
        self.inner = inner
        self.task_key = task_key
        self.task = task

    def __call__(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        image, label = self.inner(batchdata, device, non_blocking, **kwargs)[:2]
        task = self.task
        if task is None and self.task_key and isinstance(batchdata, Mapping):
            task = batchdata.get(self.task_key)
        if task is None:
            raise ValueError(f"The batch names no task ('{self.task_key}'): a multi-task network needs one.")
        if isinstance(task, (list, tuple)):  # a collated batch: one name per sample, all the same
            if len(set(map(str, task))) != 1:
                raise ValueError(f"A batch mixes the tasks {sorted(set(map(str, task)))}: use batch_size 1 or group by task.")
            task = task[0]
        return image, label, (), {"task": str(task)}


def prepare_batch_fn(strip_meta: bool = False, task_key: str | None = None, task: Any = None) -> Callable:
    """The engines' ``prepare_batch``: :func:`prepare_batch_plain` when ``strip_meta``, else MONAI's
    ``default_prepare_batch`` (the plain path); wrapped in :class:`TaskBatch` when ``task_key`` or ``task`` is given
    (a multi-task network)."""
    from monai.engines.utils import default_prepare_batch

    inner = prepare_batch_plain if strip_meta else default_prepare_batch
    return TaskBatch(inner, task_key, task) if (task_key or task is not None) else inner


def default_sw_batch_size(device: Any) -> int:
    """Sliding-window batch: 4 windows per forward pass on CUDA (96^3 windows in bf16 take well under
    1 GB), 1 on the CPU (no speed-up there)."""
    return 4 if is_cuda(device) else 1
