# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Activation capture for the representation analyses (Karimi et al., Section II-C).

The paper samples "blocks from random locations in the test images" and records "the values of the
convolutional layer neurons": every voxel of a layer's feature map is a data point, every channel a
neuron. Here:

* **Probes.** :func:`probe_layers` names the layers: by default the paper's six (``encoder-1..3``,
  ``decoder-1..3``) from the network's ``probe_modules(kind)`` (the section protocol of :mod:`common.networks`),
  or any module by its ``named_modules()`` name. ``probe="conv"`` (default, :data:`DEFAULT_PROBE`): the last
  convolution of each probed block (the FCN: ``<level>.residual.block2[1].conv``; V-Net:
  ``<stage>.ops[-1].conv_block.conv``), whose output, convolution + bias **before** the activation, is recorded.
  Those convolutions are in-place-activated (``ReLU(inplace=True)``/``ELU(inplace=True)``), so every hook here
  copies what it keeps inside the hook, before the activation overwrites it. ``probe="residual"``: the block
  outputs, i.e. the residual sums (FCN: ``x2 = block2(x1) + x1 + x0``). :func:`probe_filters` gives the
  convolutions of the ``conv`` probes for both kinds, so the filter pictures and the filter-change labels
  show the layers the RSIM analyses compare (with ``probe="conv"``, the very modules).
* **Blocks.** :class:`BlockSampler` cuts seeded random blocks from preprocessed test images (block ``i`` depends
  only on ``(seed, i)``; images smaller than a block are zero-padded as ``SpatialPadd`` does in training). The
  preprocessing is the bundle's deterministic chain (:func:`bundle_transforms`). The block size defaults to the
  runs' **training** block size (:meth:`AnalysisSetup.resolve_block_size`: the ``--block_size`` of the runs'
  training command in ``run_info.json``, else the config's ``block_size``), not 96^3.
* **Data points.** A :class:`CapturePlan`, the same for every network of an architecture, fixes per layer the
  number of blocks and the voxels drawn per block (seeded by block and layer, the same voxel indices for every
  network): at least ``points_per_channel`` (default **1,000**, :data:`DEFAULT_POINTS_PER_CHANNEL`) data points
  per channel of the wider side, over at least ``n_blocks`` blocks and more when a layer is too coarse to supply
  them (at most ``max_blocks``; a warning names any layer still short). A block that only the deep layers
  still need is forwarded only up to the last of them (the forward stops there), and every layer computed
  on the way also draws its points from that block, so the points of every layer spread over as many blocks
  as possible at no extra cost. Blocks are forwarded in batches of up to ``batch_voxels`` voxels (eval mode,
  ``torch.inference_mode``).
* **Once per network.** :class:`ActivationCache` keeps, per weights file (keyed by its content), the sampled
  activations of every probe layer (``(points, channels)`` float32) and their first and second moments
  (float64). Every analysis compares networks at the same blocks and voxels, so each network (each snapshot) is
  forwarded once per session and each pair costs one cross-product ``Xc^T Yc`` of stored arrays
  (:meth:`AnalysisSetup.pair_moments`). Memory stays bounded: arrays beyond ``cache_bytes`` (default 1 GiB) are
  spilled to ``.npy`` files in a temporary folder and read back memory-mapped.
* **Random floor.** :meth:`AnalysisSetup.floors` gives, per layer, the RSIM of independent Gaussian
  representations of the same shapes (points, channels), :func:`common.rsim.random_floor`: what RSIM reads
  when two representations share nothing. The analyses print it beside every RSIM table.

:func:`layer_moments` (the streaming path, no stored arrays) gives the same moments from a fresh forward of
the networks, with the same plan; ``AnalysisSetup(cache=False)`` uses it for every pair.
:class:`ActivationRecorder` records whole feature maps (the feature-map pictures). It is not MONAI's
``monai.visualize`` ``ModelWithHooks``, which keeps references to the hooked outputs (overwritten by in-place
activations) and runs with autograd.

:class:`AnalysisSetup` (made from a bundle's training config by :func:`make_setup`) holds what every analysis of
:mod:`common.analysis` needs: how to build the network, the image blocks, these settings and the cache.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from .checkpoints import checkpoint_state_dict
from .networks import PROBE_NAMES, spatial_divisor, unwrap
from .rsim import MomentAccumulator, centred_moments, cross_moment, random_floor

if TYPE_CHECKING:
    from .runs import Run

__all__ = [
    "PROBE_KINDS",
    "DEFAULT_PROBE",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_N_BLOCKS",
    "DEFAULT_POINTS_PER_CHANNEL",
    "DEFAULT_MAX_BLOCKS",
    "DEFAULT_BATCH_VOXELS",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_FLOOR_DRAWS",
    "probe_layers",
    "probe_filters",
    "describe_probes",
    "bundle_parser",
    "bundle_transforms",
    "training_block_size",
    "BlockSampler",
    "ActivationRecorder",
    "LayerPlan",
    "CapturePlan",
    "make_plan",
    "capture_samples",
    "layer_moments",
    "swap",
    "ActivationCache",
    "AnalysisSetup",
    "make_setup",
]

logger = logging.getLogger(__name__)

#: Probe kinds of the networks' ``probe_modules(kind)``: the last convolution of each probed block (its output
#: before the activation) or the block's residual output.
PROBE_KINDS = ("conv", "residual")
DEFAULT_PROBE = "conv"
#: Only when neither the runs nor the config give a training block size.
DEFAULT_BLOCK_SIZE = (96, 96, 96)
#: Blocks per layer at least (spreads the data points over several images).
DEFAULT_N_BLOCKS = 8
#: Data points per channel (of the wider side) per layer. The PWCCA floor of independent Gaussian
#: representations of 64 channels is ~0.083 at 100 points per channel and ~0.026 at 1,000.
DEFAULT_POINTS_PER_CHANNEL = 1000
#: At most this many blocks per layer.
DEFAULT_MAX_BLOCKS = 4096
#: Blocks forwarded together: up to this many input voxels per forward (one 96^3 block).
DEFAULT_BATCH_VOXELS = 96**3
#: RAM for the stored activations of an :class:`ActivationCache`; beyond it they go to disk.
DEFAULT_CACHE_BYTES = 1 << 30
#: Draws of independent Gaussians per random-floor value.
DEFAULT_FLOOR_DRAWS = 5

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PROBE_SHORT = {"conv": "conv (last convolution of each block, before its activation)",
                "residual": "residual (block outputs, the residual sums)"}
_PROBE_TEXT = {
    "conv": "conv = the output of the last convolution of each probed block (convolution + bias, before its activation and the residual addition)",
    "residual": "residual = the output of each probed block (the residual sum)",
}


# ---------------------------------------------------------------------------------------------- probes
def _check_probe(probe: str) -> str:
    if probe not in PROBE_KINDS:
        raise ValueError(f"Unknown probe kind {probe!r}: use one of {list(PROBE_KINDS)}.")
    return probe


def _default_probes(network: nn.Module, probe: str = DEFAULT_PROBE) -> "OrderedDict[str, nn.Module]":
    if not hasattr(network, "probe_modules"):
        raise ValueError(
            f"{type(network).__name__} has no probe_modules(): name the layers to analyse by their named_modules() names."
        )
    fn = network.probe_modules
    try:
        takes_kind = len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        takes_kind = False
    if takes_kind:
        return OrderedDict(fn(_check_probe(probe)))
    return OrderedDict(fn())  # a network with one kind of probe (e.g. a test's toy network)


def probe_layers(
    network: nn.Module, layers: Sequence[str] | str | None = None, probe: str = DEFAULT_PROBE
) -> "OrderedDict[str, nn.Module]":
    """Name -> module of the layers to probe (their forward outputs are the representations).

    ``layers``: None for the paper's six (the network's ``probe_modules(probe)``), or names, each a probe name
    (``"encoder-1"``, resolved with ``probe``) or any ``named_modules()`` name (``"encoder.0.residual"``). A
    comma-separated string is split. ``probe``: ``"conv"`` (default) or ``"residual"``, see the module docstring.
    """
    network = unwrap(network)
    _check_probe(probe)
    if layers is None:
        return _default_probes(network, probe)
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    try:
        probes = _default_probes(network, probe)
    except ValueError:
        probes = OrderedDict()
    names = dict(network.named_modules())
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name in layers:
        if name in probes:
            out[name] = probes[name]
        elif name in names and name != "":
            out[name] = names[name]
        else:
            raise ValueError(
                f"Unknown layer {name!r} for {type(network).__name__}: use one of the probe names "
                f"{list(probes) or list(PROBE_NAMES)} or a named_modules() name such as {next(iter(list(names)[1:]), '')!r}."
            )
    if not out:
        raise ValueError("No layers to probe.")
    return out


def probe_filters(
    network: nn.Module, layers: Sequence[str] | str | None = None, probe: str = DEFAULT_PROBE
) -> "OrderedDict[str, nn.Module]":
    """Name -> the convolution of each probe layer (for filter pictures and filter change).

    For probe names, the network's ``probe_filters()``: the last convolution of the probed block, i.e. the module
    of the ``conv`` probe (whatever ``probe`` is, so the pictures show the same layers with either kind); for any
    other module name, the module itself when it is a convolution, else the last convolution inside it.
    """
    network = unwrap(network)
    mods = probe_layers(network, layers, probe)
    own = OrderedDict(network.probe_filters()) if hasattr(network, "probe_filters") else OrderedDict()
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name, mod in mods.items():
        if name in own:
            out[name] = own[name]
        elif isinstance(mod, _CONVS):
            out[name] = mod
        else:
            convs = [m for m in mod.modules() if isinstance(m, _CONVS)]
            if not convs:
                raise ValueError(f"Layer {name!r} holds no convolution.")
            out[name] = convs[-1]
    return out


def describe_probes(probe: str = DEFAULT_PROBE, layers: Sequence[str] | str | None = None,
                    network: nn.Module | None = None, short: bool = False) -> str:  # fmt: skip
    """One line saying which probes an analysis used (printed in every table and figure title), e.g.
    ``"probes: conv = the output of the last convolution of each probed block (...)"``; with a ``network``, the
    module names of the probes are listed too; ``short=True``: a few words for figure titles."""
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    if short:
        return f"probes: {_PROBE_SHORT.get(probe, probe)}" + (f", layers {', '.join(layers)}" if layers else "")
    text = f"probes: {_PROBE_TEXT.get(probe, probe)}"
    if layers:
        text += f"; layers {', '.join(layers)}"
    if network is not None:
        try:
            net = unwrap(network)
            mods = probe_layers(net, layers, probe)
            names = {id(m): n for n, m in net.named_modules()}
            text += " (" + ", ".join(f"{k}: {names.get(id(m), '?')}" for k, m in mods.items()) + ")"
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------------------------------------- preprocessing
def bundle_parser(config_files: str | Sequence[str], overrides: Mapping[str, Any] | None = None):
    """A ``ConfigParser`` of a bundle's training config(s) (e.g. ``configs/train.json``, optionally layered
    with ``finetune.json``) with ``overrides`` (``{"network_def#features": 4, "modality": "MR"}``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    files = [config_files] if isinstance(config_files, str) else list(config_files)
    parser.read_config(files if len(files) > 1 else files[0])
    for k, v in (overrides or {}).items():
        parser[k] = v
    parser.parse()
    return parser


def bundle_transforms(config_files: str | Sequence[str] | Any, overrides: Mapping[str, Any] | None = None,
                      key: str = "preprocessing") -> Callable:
    """The bundle's deterministic preprocessing as a ``Compose`` (``key`` of the config; a list is composed).

    ``config_files`` may also be a parsed ``ConfigParser``. Labels are optional: the map transforms are set
    to allow missing keys, so ``{"image": path}`` items work too.
    """
    from monai.transforms import Compose, MapTransform

    parser = config_files if hasattr(config_files, "get_parsed_content") else bundle_parser(config_files, overrides)
    t = parser.get_parsed_content(key, lazy=False)
    comp = t if isinstance(t, Compose) else Compose(list(t))
    for tr in comp.flatten().transforms:
        if isinstance(tr, MapTransform):
            tr.allow_missing_keys = True
    return comp


def _as_block_size(block_size: int | Sequence[int]) -> tuple[int, int, int]:
    bs = (int(block_size),) * 3 if isinstance(block_size, (int, np.integer)) else tuple(int(s) for s in block_size)
    if len(bs) != 3 or min(bs) < 1:
        raise ValueError(f"block_size must be 3 positive sizes, got {block_size}.")
    return bs  # type: ignore[return-value]


def _parse_block(value: Any) -> tuple[int, int, int] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return None
    try:
        return _as_block_size(value)
    except (TypeError, ValueError):
        return None


def training_block_size(run: "Run | str") -> tuple[int, int, int] | None:
    """The block size a run was trained with, from its ``run_info.json``: the ``--block_size`` value of the
    training command line (``monai.bundle run ... --block_size [32,32,32]``) or a ``block_size`` entry; None when
    the record says nothing (the config's default was used)."""
    path = run if isinstance(run, (str, os.PathLike)) else run.path
    info_path = os.path.join(os.fspath(path), "run_info.json")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if "block_size" in info:
        return _parse_block(info["block_size"])
    argv = [str(a) for a in info.get("argv") or []]
    for i, arg in enumerate(argv):
        if arg == "--block_size" and i + 1 < len(argv):
            return _parse_block(argv[i + 1])
        if arg.startswith("--block_size="):
            return _parse_block(arg.split("=", 1)[1])
    return None


class BlockSampler:
    """Seeded random blocks cut from preprocessed images.

    Args:
        images: items (``{"image": path, ...}`` dicts or paths) to preprocess with ``transform``, or
            already preprocessed arrays/tensors of shape ``(C, D, H, W)``.
        transform: the deterministic preprocessing (a ``Compose`` on dicts); None for preprocessed arrays.
        block_size: block size (voxels per axis); every size must be divisible by ``divisor``.
        seed: block ``i`` is cut from image ``order[i % n]`` (``order`` a seeded permutation) at a corner
            drawn from ``numpy.random.default_rng([seed, i])``.
        divisor: the networks' spatial divisor (8 for the paper's FCN, 16 for VNet).
        cache_bytes: blocks are kept (float32) up to this many bytes in all; later ones are cut again when asked.

    ``sampler[i]`` is block ``i`` as a ``(1, C, *block_size)`` float32 tensor; :meth:`batch` stacks several.
    :meth:`prefetch` cuts many blocks loading each image once (the last image loaded is also kept).
    """

    def __init__(
        self,
        images: Sequence[Any],
        transform: Callable | None = None,
        block_size: int | Sequence[int] = DEFAULT_BLOCK_SIZE,
        seed: int = 0,
        divisor: int = 8,
        cache_bytes: int = 2 << 30,
    ) -> None:
        self.images = list(images)
        if not self.images:
            raise ValueError("BlockSampler needs at least one image (the run's datalist has no test cases?).")
        self.transform = transform
        self.block_size = _as_block_size(block_size)
        if any(s % divisor for s in self.block_size):
            raise ValueError(f"block_size {list(self.block_size)} must be divisible by {divisor} in every dimension.")
        self.seed = int(seed)
        self.order = np.random.default_rng([self.seed, 7919]).permutation(len(self.images))
        self.cache_bytes = int(cache_bytes)
        self._blocks: dict[int, torch.Tensor] = {}
        self._bytes = 0
        self._last: tuple[int, torch.Tensor] | None = None
        #: images preprocessed so far (each load counts)
        self.loads = 0

    def _image(self, j: int) -> torch.Tensor:
        if self._last is not None and self._last[0] == j:
            return self._last[1]
        item = self.images[j]
        if isinstance(item, (np.ndarray, torch.Tensor)):
            img = torch.as_tensor(np.asarray(item) if isinstance(item, np.ndarray) else item)
        else:
            if self.transform is None:
                raise ValueError("BlockSampler needs a transform to load image files.")
            data = {"image": item} if isinstance(item, str) else dict(item)
            out = self.transform(data)
            img = out["image"] if isinstance(out, Mapping) else out
        img = torch.as_tensor(img).detach().to("cpu", torch.float32)
        if hasattr(img, "as_tensor"):
            img = img.as_tensor()
        if img.ndim == 3:
            img = img[None]
        if img.ndim != 4:
            raise ValueError(f"Preprocessed image {j} has shape {tuple(img.shape)}; expected (C, D, H, W).")
        self._last = (j, img)
        self.loads += 1
        return img

    def image_of(self, i: int) -> int:
        """Index (into ``images``) of the image block ``i`` is cut from."""
        return int(self.order[int(i) % len(self.images)])

    def _cut(self, i: int, img: torch.Tensor) -> torch.Tensor:
        spatial = img.shape[1:]
        pad = []
        for s, b in zip(reversed(spatial), reversed(self.block_size)):
            extra = max(0, b - s)
            pad += [extra // 2, extra - extra // 2]
        if any(pad):
            img = torch.nn.functional.pad(img, pad, mode="constant", value=0.0)
        rng = np.random.default_rng([self.seed, i])
        corner = [int(rng.integers(0, s - b + 1)) for s, b in zip(img.shape[1:], self.block_size)]
        sl = tuple(slice(c, c + b) for c, b in zip(corner, self.block_size))
        block = img[(slice(None),) + sl].contiguous()[None]
        size = block.numel() * block.element_size()
        if self._bytes + size <= self.cache_bytes:
            self._blocks[i] = block
            self._bytes += size
        return block

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        if i in self._blocks:
            return self._blocks[i]
        return self._cut(i, self._image(self.image_of(i)))

    def prefetch(self, indices: Iterable[int]) -> None:
        """Cut the blocks ``indices`` (those the cache has room for), loading each image once."""
        todo = sorted({int(i) for i in indices if int(i) not in self._blocks}, key=lambda i: (self.image_of(i), i))
        for i in todo:
            if self._bytes >= self.cache_bytes:
                break
            self._cut(i, self._image(self.image_of(i)))

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop - 1`` stacked: ``(stop - start, C, *block_size)``."""
        self.prefetch(range(start, stop))
        return torch.cat([self[i] for i in range(start, stop)], dim=0)


# ---------------------------------------------------------------------------------------------- hooks
class ActivationRecorder:
    """Forward hooks recording the whole outputs of named layers; use as a context manager.

    ``recorder.outputs[name]`` is the output of the last forward pass, copied inside the hook (before an in-place
    activation can overwrite it) and detached. ``layers`` and ``probe`` as for :func:`probe_layers`.
    """

    def __init__(self, network: nn.Module, layers: Sequence[str] | str | None = None, probe: str = DEFAULT_PROBE) -> None:
        self.network = network
        self.layers = probe_layers(network, layers, probe)
        self.outputs: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._handles: list[Any] = []

    def __enter__(self) -> "ActivationRecorder":
        for name, mod in self.layers.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.outputs[name] = output.detach().clone()

        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, block: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Forward ``block`` (eval mode, no autograd; the training mode is restored); returns the outputs."""
        self.outputs = OrderedDict()
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.inference_mode():
                self.network(block)
        finally:
            self.network.train(was_training)
        missing = [n for n in self.layers if n not in self.outputs]
        if missing:
            raise RuntimeError(f"Layers {missing} produced no output in the forward pass.")
        return self.outputs


# ---------------------------------------------------------------------------------------------- capture plan
@dataclass
class LayerPlan:
    """Where one layer's data points come from: ``quota`` voxels (seeded draw without replacement, the same for
    every network) from each of the blocks ``0 .. blocks - 1``; ``points = blocks * quota`` rows of ``channels``.

    ``index``: the layer's position in the layer list (it seeds the draw), ``order``: its position in the forward
    pass, ``voxels``: the voxels of its feature map per block, ``target``: the points wanted."""

    name: str
    index: int
    order: int
    channels: int
    voxels: int
    blocks: int
    quota: int
    target: int

    @property
    def points(self) -> int:
        return self.blocks * self.quota


@dataclass
class CapturePlan:
    """The data points of every layer (:class:`LayerPlan`), the same for every network of one architecture."""

    layers: "OrderedDict[str, LayerPlan]"
    seed: int
    block_size: tuple[int, int, int]
    probe: str
    points_per_channel: int
    _indices: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def total_blocks(self) -> int:
        return max(lp.blocks for lp in self.layers.values())

    def indices(self, name: str) -> torch.Tensor:
        """``(blocks, quota)`` int64: the voxel indices (row-major in the flattened feature map) of every block."""
        if name not in self._indices:
            lp = self.layers[name]
            rows = [_indices(self.seed, b, lp.index, lp.voxels, lp.quota) for b in range(lp.blocks)]
            self._indices[name] = torch.stack(rows) if rows else torch.zeros((0, lp.quota), dtype=torch.int64)
        return self._indices[name]

    def fingerprint(self) -> str:
        """A short hash of everything that decides the data points (part of the activation cache key)."""
        text = json.dumps([self.seed, self.block_size, self.probe, [(lp.name, lp.index, lp.channels, lp.voxels,
                           lp.blocks, lp.quota) for lp in self.layers.values()]])  # fmt: skip
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def summary(self) -> str:
        """``"encoder-1: 14,000 points (1000/channel, 8 blocks), ..."`` for the tables."""
        parts = []
        for lp in self.layers.values():
            parts.append(f"{lp.name} {lp.points:,} points ({lp.points / max(1, lp.channels):.0f} per channel, {lp.blocks} blocks)")
        bs = "x".join(str(s) for s in self.block_size)
        return f"data points per layer (random voxels of random {bs} test-image blocks, the same for every network): " + "; ".join(parts)


def _indices(seed: int, block: int, layer_idx: int, voxels: int, k: int) -> torch.Tensor:
    if k >= voxels:
        return torch.arange(voxels, dtype=torch.int64)
    rng = np.random.default_rng([seed, 104729, block, layer_idx])
    idx = np.sort(rng.choice(voxels, size=k, replace=False))
    return torch.as_tensor(idx, dtype=torch.int64)


class _StopForward(Exception):
    """Raised by a sampling hook when every layer the current blocks are needed for has been recorded."""


class _Shapes:
    """Hooks recording each layer's channels, voxels per block and forward order (for :func:`make_plan`)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self.shapes: "OrderedDict[str, tuple[int, int]]" = OrderedDict()

    def __enter__(self) -> "_Shapes":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            if name not in self.shapes:
                if output.ndim < 3:
                    raise ValueError(f"Layer {name!r} gives shape {tuple(output.shape)}; expected (B, C, *spatial).")
                self.shapes[name] = (int(output.shape[1]), int(math.prod(output.shape[2:])))

        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def _evaluating(networks: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Networks in eval mode on ``device`` under ``torch.inference_mode``; training flags and devices restored."""
    originals = []
    for m in networks:
        p = next(m.parameters(), None)
        originals.append((m, p.device if p is not None else torch.device("cpu"), m.training))
    try:
        for m, _, _ in originals:
            m.to(device).eval()
        with torch.inference_mode():
            yield
    finally:
        for m, d, tr in originals:
            m.to(d).train(tr)


def make_plan(
    networks: nn.Module | Sequence[nn.Module],
    sampler: BlockSampler,
    layers: Sequence[str] | str | None = None,
    probe: str = DEFAULT_PROBE,
    n_blocks: int = DEFAULT_N_BLOCKS,
    points_per_channel: int = DEFAULT_POINTS_PER_CHANNEL,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
    device: str | torch.device | None = None,
    seed: int | None = None,
) -> CapturePlan:
    """The :class:`CapturePlan` for ``networks`` (one architecture, or several whose compared layers have the same
    spatial size), from one forward of block 0 through each.

    Per layer: ``target = points_per_channel * max(channels)``; the blocks it needs are
    ``ceil(target / voxels)``, at least ``n_blocks``, at most ``max(max_blocks, n_blocks)``. A block is forwarded up
    to the last layer (in forward order) that needs it, so a layer computed earlier in the pass draws its points
    from all those blocks too (``blocks`` = the largest need of the layers at or after it); ``quota =
    ceil(target / blocks)`` voxels per block (all of them when fewer). A warning names a layer still short.
    """
    nets = [networks] if isinstance(networks, nn.Module) else list(networks)
    if not nets:
        raise ValueError("make_plan needs a network.")
    dev = torch.device(device) if device is not None else next(nets[0].parameters()).device
    seed = sampler.seed if seed is None else int(seed)
    divisor = max(spatial_divisor(unwrap(m)) for m in nets)
    if any(s % divisor for s in sampler.block_size):
        raise ValueError(f"block_size {list(sampler.block_size)} must be divisible by {divisor} for these networks.")
    block = sampler[0].to(dev)
    found: list["OrderedDict[str, tuple[int, int]]"] = []
    names: list[str] = []
    with _evaluating(nets, dev):
        for m in nets:
            mods = probe_layers(m, layers, probe)
            names = names or list(mods)
            with _Shapes(mods) as rec:
                m(block)
            missing = [n for n in mods if n not in rec.shapes]
            if missing:
                raise RuntimeError(f"Layers {missing} produced no output in the forward pass.")
            found.append(rec.shapes)
    order = {n: i for i, n in enumerate(found[0])}
    plans: "OrderedDict[str, LayerPlan]" = OrderedDict()
    need: dict[str, int] = {}
    for li, name in enumerate(names):
        voxels = {s[name][1] for s in found}
        if len(voxels) != 1:
            raise ValueError(
                f"Layer {name!r}: the feature maps have {sorted(voxels)} voxels per block; the compared layers must have "
                "the same spatial size."
            )
        vox = voxels.pop()
        ch = max(s[name][0] for s in found)
        target = int(points_per_channel) * ch
        need[name] = min(max(int(n_blocks), math.ceil(target / vox)), max(int(max_blocks), int(n_blocks)))
        plans[name] = LayerPlan(name, li, order[name], ch, vox, 0, 0, target)
    for name, lp in plans.items():
        lp.blocks = max(need[m] for m, other in plans.items() if other.order >= lp.order)
        lp.quota = min(lp.voxels, math.ceil(lp.target / lp.blocks))
        if lp.points < lp.target:
            logger.warning(
                "Layer %s: %d data points, fewer than the %d wanted (%d per channel); raise max_blocks or block_size.",
                name, lp.points, lp.target, points_per_channel,
            )  # fmt: skip
    return CapturePlan(plans, seed, tuple(sampler.block_size), probe, int(points_per_channel))


class _Sampling:
    """Sampling hooks on one network: for the current batch of blocks ``b0 .. b0 + k - 1``, each layer keeps its
    planned voxels of the blocks it needs (copied in the hook, before an in-place activation); when the last layer
    the batch is needed for is done, the forward is stopped."""

    def __init__(self, modules: Mapping[str, nn.Module], plan: CapturePlan) -> None:
        self.modules = modules
        self.plan = plan
        self.active = False
        self.b0 = 0
        self.k = 0
        self.pending: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "_Sampling":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        lp = self.plan.layers[name]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self.active or name not in self.pending:
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            take = min(self.k, lp.blocks - self.b0)
            flat = output[:take].reshape(take, output.shape[1], -1)
            if flat.shape[1] != lp.channels or flat.shape[2] != lp.voxels:
                raise ValueError(
                    f"Layer {name!r}: feature map of {flat.shape[1]} channels x {flat.shape[2]} voxels, the plan has "
                    f"{lp.channels} x {lp.voxels}: the networks compared must share the architecture."
                )
            idx = self.plan.indices(name)[self.b0 : self.b0 + take].to(flat.device)
            picked = torch.gather(flat, 2, idx[:, None, :].expand(take, flat.shape[1], idx.shape[1]))
            self.out[name] = picked.permute(0, 2, 1).reshape(take * idx.shape[1], flat.shape[1]).to("cpu", torch.float32)
            self.pending.discard(name)
            if not self.pending:
                raise _StopForward

        return hook

    def run(self, network: nn.Module, blocks: torch.Tensor, b0: int) -> dict[str, torch.Tensor]:
        """Forward ``blocks`` (blocks ``b0 ..``); returns ``layer -> (rows, channels)`` for the layers that need them."""
        self.b0, self.k = int(b0), int(blocks.shape[0])
        self.pending = {n for n, lp in self.plan.layers.items() if lp.blocks > self.b0}
        self.out = {}
        self.active = True
        try:
            network(blocks)
        except _StopForward:
            pass
        finally:
            self.active = False
        if self.pending:
            raise RuntimeError(f"Layers {sorted(self.pending)} produced no output in the forward pass.")
        return self.out


def _batches(plan: CapturePlan, sampler: BlockSampler, batch_voxels: int) -> list[tuple[int, int]]:
    per = max(1, int(batch_voxels) // max(1, math.prod(sampler.block_size)))
    total = plan.total_blocks
    return [(b, min(total, b + per)) for b in range(0, total, per)]


def capture_samples(
    network: nn.Module,
    sampler: BlockSampler,
    plan: CapturePlan,
    layers: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    batch_voxels: int = DEFAULT_BATCH_VOXELS,
) -> "OrderedDict[str, np.ndarray]":
    """The planned data points of ``network``: ``layer -> (points, channels)`` float32 (rows block by block, voxel
    indices ascending within a block), from one forward of each batch of blocks (stopped after the last layer
    the batch is needed for). ``layers`` must name the plan's layers (default: the plan's probe kind)."""
    dev = torch.device(device) if device is not None else next(network.parameters()).device
    mods = probe_layers(network, layers, plan.probe)
    if list(mods) != list(plan.layers):
        raise ValueError(f"The layers {list(mods)} are not the plan's {list(plan.layers)}.")
    out = OrderedDict((n, np.empty((lp.points, lp.channels), dtype=np.float32)) for n, lp in plan.layers.items())
    sampler.prefetch(range(plan.total_blocks))
    with _evaluating([network], dev), _Sampling(mods, plan) as hooks:
        for b0, b1 in _batches(plan, sampler, batch_voxels):
            got = hooks.run(network, sampler.batch(b0, b1).to(dev), b0)
            for name, rows in got.items():
                q = plan.layers[name].quota
                out[name][b0 * q : b0 * q + rows.shape[0]] = rows.numpy()
    return out


def layer_moments(
    networks: nn.Module | Sequence[nn.Module],
    reference: nn.Module,
    sampler: BlockSampler,
    layers: Sequence[str] | str | None = None,
    n_blocks: int = DEFAULT_N_BLOCKS,
    points_per_channel: int = DEFAULT_POINTS_PER_CHANNEL,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
    device: str | torch.device | None = None,
    seed: int | None = None,
    gram_dtype: torch.dtype = torch.float64,
    probe: str = DEFAULT_PROBE,
    plan: CapturePlan | None = None,
    batch_voxels: int = DEFAULT_BATCH_VOXELS,
) -> list["OrderedDict[str, MomentAccumulator]"]:
    """Moments of the paired activations of ``networks`` (the ``x`` sides) and ``reference`` (``y``), streamed
    batch by batch into one :class:`common.rsim.MomentAccumulator` per (network, layer): nothing is stored.

    The data points are those of ``plan`` (default: :func:`make_plan` of the reference and the first network with
    these settings): the same blocks and voxels for every network. Each batch of blocks goes through the
    reference once and through every network. Networks run in eval mode under ``torch.inference_mode`` on
    ``device`` (default: the reference's); their training flags and devices are restored. Returns, per network,
    ``OrderedDict(layer -> MomentAccumulator)`` with ``x`` = that network, ``y`` = the reference.
    """
    single = isinstance(networks, nn.Module)
    nets = [networks] if single else list(networks)
    if not nets:
        return []
    dev = torch.device(device) if device is not None else next(reference.parameters()).device
    if plan is None:
        plan = make_plan([reference, nets[0]], sampler, layers, probe, n_blocks, points_per_channel, max_blocks, dev, seed)
    ref_mods = probe_layers(reference, layers, plan.probe)
    mods = [probe_layers(m, layers, plan.probe) for m in nets]
    accs = [OrderedDict((n, MomentAccumulator(gram_dtype=gram_dtype)) for n in plan.layers) for _ in nets]
    sampler.prefetch(range(plan.total_blocks))
    with contextlib.ExitStack() as stack:
        stack.enter_context(_evaluating([reference, *nets], dev))
        ref_hooks = stack.enter_context(_Sampling(ref_mods, plan))
        hooks = [stack.enter_context(_Sampling(m, plan)) for m in mods]
        for b0, b1 in _batches(plan, sampler, batch_voxels):
            block = sampler.batch(b0, b1).to(dev)
            ys = dict(ref_hooks.run(reference, block, b0))
            for net, h, acc in zip(nets, hooks, accs):
                xs = h.run(net, block, b0)
                for name, x in xs.items():
                    acc[name].update(x, ys[name])
    logger.debug("Captured %d blocks for %d network(s); data points per layer: %s", plan.total_blocks, len(nets),
                 {n: lp.points for n, lp in plan.layers.items()})  # fmt: skip
    return accs[0:1] if single else accs


def swap(acc: MomentAccumulator) -> MomentAccumulator:
    """The same moments with ``x`` and ``y`` exchanged (RSIM weighted by the other side)."""
    out = copy.copy(acc)
    out.mean_x, out.mean_y = acc.mean_y, acc.mean_x
    out.mxx, out.myy = acc.myy, acc.mxx
    out.mxy = None if acc.mxy is None else acc.mxy.T.copy()
    return out


# ---------------------------------------------------------------------------------------------- cache
class ActivationCache:
    """The sampled activations of every network analysed in a session, and their moments.

    ``key -> {layer: (points, channels) float32}``; the key is given by :meth:`key_of` (a weights file's content
    hash plus the plan's fingerprint), so a file is captured once however many analyses or pairs use it, and
    identical files (e.g. the same source model as the init snapshot of several T.L. runs) share one entry.
    Arrays are kept in RAM up to ``ram_bytes`` (least recently used first out); evicted ones are written to
    ``.npy`` files in ``directory`` (default: a temporary folder removed with the cache) and read back
    memory-mapped. The per-layer ``(n, mean, Xc^T Xc)`` (float64, :func:`common.rsim.centred_moments`) are kept
    in RAM (``channels^2`` each). ``captures`` counts the networks captured.
    """

    def __init__(self, ram_bytes: int = DEFAULT_CACHE_BYTES, directory: str | None = None) -> None:
        self.ram_bytes = int(ram_bytes)
        self.directory = directory
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._ram: "OrderedDict[str, dict[str, np.ndarray]]" = OrderedDict()
        self._disk: dict[str, dict[str, str]] = {}
        self._moments: dict[tuple[str, str], tuple[int, np.ndarray, np.ndarray]] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.captures = 0

    # ------------------------------------------------------------------ keys
    def file_hash(self, path: str | os.PathLike) -> str:
        """SHA-1 of a file's bytes (memoised per path, size and modification time)."""
        path = os.path.realpath(os.fspath(path))
        st = os.stat(path)
        memo = (path, st.st_size, st.st_mtime_ns)
        if memo not in self._hashes:
            h = hashlib.sha1()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            self._hashes[memo] = h.hexdigest()
        return self._hashes[memo]

    def key_of(self, weights: Any, plan: CapturePlan) -> str | None:
        """The cache key of a weights file for ``plan``; None for weights that are not a file (not cached)."""
        if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
            return f"{self.file_hash(weights)}-{plan.fingerprint()}"
        return None

    # ------------------------------------------------------------------ storage
    @staticmethod
    def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
        return sum(int(a.nbytes) for a in arrays.values() if not isinstance(a, np.memmap))

    def _ram_total(self) -> int:
        return sum(self._nbytes(a) for a in self._ram.values())

    def _folder(self) -> str:
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)
            return self.directory
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tlseg-activations-")
        return self._tmp.name

    def _spill(self, key: str) -> None:
        arrays = self._ram.pop(key)
        if key not in self._disk:
            folder = self._folder()
            paths = {}
            for i, (name, a) in enumerate(arrays.items()):
                path = os.path.join(folder, f"{key}-{i}.npy")
                np.save(path, a)
                paths[name] = path
            self._disk[key] = paths
        logger.debug("Activation cache: %s spilled to disk.", key)

    def __contains__(self, key: str) -> bool:
        return key in self._ram or key in self._disk

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        self._ram[key] = OrderedDict(arrays)
        self._ram.move_to_end(key)
        while self._ram and self._ram_total() > self.ram_bytes:
            self._spill(next(iter(self._ram)))

    def get(self, key: str) -> "OrderedDict[str, np.ndarray] | None":
        if key in self._ram:
            self._ram.move_to_end(key)
            return self._ram[key]  # type: ignore[return-value]
        if key in self._disk:
            return OrderedDict((n, np.load(p, mmap_mode="r")) for n, p in self._disk[key].items())
        return None

    def moments(self, key: str, layer: str) -> tuple[int, np.ndarray, np.ndarray]:
        """``(n, mean, Xc^T Xc)`` of a stored layer (float64; computed once)."""
        if (key, layer) not in self._moments:
            arrays = self.get(key)
            if arrays is None:
                raise KeyError(key)
            self._moments[(key, layer)] = centred_moments(arrays[layer])
        return self._moments[(key, layer)]

    def ram_bytes_used(self) -> int:
        return self._ram_total()

    def clear(self) -> None:
        """Forget everything (and remove the temporary folder)."""
        self._ram.clear()
        self._disk.clear()
        self._moments.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ---------------------------------------------------------------------------------------------- setup
class AnalysisSetup:
    """What every analysis needs: how to build the network, the image blocks, the capture settings and the
    activation cache of the session.

    Args:
        network: the runs' architecture: a network (deep-copied for each use; e.g. the bundle's ``network_def``)
            or a callable returning a fresh one. Weights are loaded into the copies.
        transform: the deterministic preprocessing (a ``Compose`` on ``{"image": path}`` dicts).
        images: the images to cut blocks from (items, paths, or preprocessed ``(C, D, H, W)`` arrays);
            None: the ``test`` cases of the first run analysed.
        layers: probe layers (None: the paper's six).
        probe: ``"conv"`` (default: the last convolution of each probed block, its output before the activation)
            or ``"residual"`` (the block outputs); see the module docstring.
        block_size: None (default): the runs' training block size (:meth:`resolve_block_size`).
        n_blocks, points_per_channel, max_blocks, seed: see :func:`make_plan` (defaults 8, 1,000, 4,096, 0).
        device: where the networks run (default: CUDA if available).
        chunk: kept for compatibility (the cache makes it unnecessary).
        progress: show tqdm progress bars.
        cache: keep each network's sampled activations for the session (:class:`ActivationCache`); False: every
            pair forwards both networks again (:func:`layer_moments`), the reference path of the tests.
        cache_bytes: RAM for the stored activations (beyond it they are spilled to ``cache_dir``, default a
            temporary folder).
        floor_draws: draws of independent Gaussians per random-floor value (:meth:`floors`).
        batch_voxels: blocks forwarded together, up to this many input voxels per forward.
        config_block_size: the config's ``block_size`` (set by :func:`make_setup`), the fallback of
            :meth:`resolve_block_size`.
    """

    def __init__(
        self,
        network: nn.Module | Callable[[], nn.Module],
        transform: Callable | None = None,
        images: Sequence[Any] | str | None = None,
        layers: Sequence[str] | str | None = None,
        block_size: int | Sequence[int] | None = None,
        n_blocks: int = DEFAULT_N_BLOCKS,
        points_per_channel: int = DEFAULT_POINTS_PER_CHANNEL,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        seed: int = 0,
        device: str | torch.device | None = None,
        chunk: int = 8,
        progress: bool = True,
        probe: str = DEFAULT_PROBE,
        cache: bool = True,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache_dir: str | None = None,
        floor_draws: int = DEFAULT_FLOOR_DRAWS,
        batch_voxels: int = DEFAULT_BATCH_VOXELS,
        config_block_size: int | Sequence[int] | None = None,
    ) -> None:
        self._network = network
        self.transform = transform
        if isinstance(images, str):
            from .data import list_images

            images = list_images(images)
        self.images = list(images) if images is not None else None
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        self.layers = list(layers) if layers else None
        self.probe = _check_probe(probe or DEFAULT_PROBE)
        self.block_size = _as_block_size(block_size) if block_size is not None else None
        self.config_block_size = _parse_block(config_block_size) if config_block_size is not None else None
        self.n_blocks = int(n_blocks)
        self.points_per_channel = int(points_per_channel)
        self.max_blocks = int(max_blocks)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.chunk = max(1, int(chunk))
        self.progress = bool(progress)
        self.use_cache = bool(cache)
        self.cache = ActivationCache(cache_bytes, cache_dir)
        self.floor_draws = int(floor_draws)
        self.batch_voxels = int(batch_voxels)
        self._sampler: BlockSampler | None = None
        self._plan: CapturePlan | None = None
        #: where the block size came from: "argument", "runs", "config" or "default"
        self.block_size_source = "argument" if self.block_size is not None else None

    # ------------------------------------------------------------------ pieces
    def network_factory(self) -> nn.Module:
        """A fresh network of the runs' architecture (template weights: every caller loads its own weights).

        A factory is called once and its network copied afterwards: building the paper's network draws its
        He-truncated-normal initialisation, about 1.5 s on a CPU, which was half the time of an evolution
        analysis that loads one snapshot after another into it."""
        if not isinstance(self._network, nn.Module):
            self._network = self._network()
        return copy.deepcopy(unwrap(self._network)).cpu()

    def network(self, weights: str | Mapping[str, torch.Tensor] | nn.Module | None = None) -> nn.Module:
        """A fresh network in eval mode on ``device``, with ``weights`` (a file, a state dict or a module) loaded."""
        if isinstance(weights, nn.Module):
            return weights.to(self.device).eval()
        net = self.network_factory()
        if weights is not None:
            state = checkpoint_state_dict(weights) if isinstance(weights, (str, os.PathLike)) else weights
            try:
                net.load_state_dict(state)
            except RuntimeError as err:
                where = weights if isinstance(weights, (str, os.PathLike)) else "the given state dict"
                raise ValueError(
                    f"The weights of {where} do not fit the network built from the config's network_def "
                    f"({type(net).__name__}): give the overrides the run was trained with (e.g. "
                    f"train_overrides / --set network_def#features=4). {str(err)[:300]}"
                ) from err
        return net.to(self.device).eval()

    def layer_names(self) -> list[str]:
        return list(probe_layers(self.network_factory(), self.layers, self.probe))

    def resolve_block_size(self, runs: Sequence["Run"] = ()) -> tuple[int, int, int]:
        """The analysis block size: the one given; else the runs' training block size (``run_info.json``, the first
        run that records one; a warning when runs differ); else the config's ``block_size``; else 96^3."""
        if self.block_size is not None:
            return self.block_size
        found = [(r.name, bs) for r in runs for bs in [training_block_size(r)] if bs is not None]
        if found:
            sizes = {bs for _, bs in found}
            if len(sizes) > 1:
                logger.warning("The runs were trained with different block sizes %s; the analyses use %s (run %s).",
                               sorted(sizes), list(found[0][1]), found[0][0])  # fmt: skip
            self.block_size, self.block_size_source = found[0][1], "runs"
        elif self.config_block_size is not None:
            self.block_size, self.block_size_source = self.config_block_size, "config"
        else:
            self.block_size, self.block_size_source = _as_block_size(DEFAULT_BLOCK_SIZE), "default"
        logger.info("Analysis blocks of %s voxels (from the %s).", "x".join(map(str, self.block_size)),
                    {"runs": "runs' training command", "config": "config's block_size", "default": "default"}[self.block_size_source])  # fmt: skip
        return self.block_size

    def sampler(self, runs: Sequence["Run"] = ()) -> BlockSampler:
        """The block sampler (built once): the setup's images, else the first run's test cases."""
        if self._sampler is None:
            images = self.images
            if images is None:
                images = _test_images(runs)
            divisor = max(8, spatial_divisor(unwrap(self.network_factory())))
            self._sampler = BlockSampler(images, self.transform, self.resolve_block_size(runs), self.seed, divisor)
        return self._sampler

    def plan(self, runs: Sequence["Run"] = ()) -> CapturePlan:
        """The capture plan (built once, from one forward of block 0 through a fresh network)."""
        if self._plan is None:
            self._plan = make_plan(self.network_factory().to(self.device), self.sampler(runs), self.layers, self.probe,
                                   self.n_blocks, self.points_per_channel, self.max_blocks, self.device, self.seed)  # fmt: skip
            logger.info("Capture plan: %s", self._plan.summary())
        return self._plan

    # ------------------------------------------------------------------ activations and moments
    def activations(self, weights: Any, runs: Sequence["Run"] = ()) -> "OrderedDict[str, np.ndarray]":
        """The planned data points of the network with ``weights``: ``layer -> (points, channels)`` float32; a
        weights file is captured once per session (:class:`ActivationCache`) unless ``cache=False``."""
        plan = self.plan(runs)
        key = self.cache.key_of(weights, plan) if self.use_cache else None
        if key is not None:
            got = self.cache.get(key)
            if got is not None:
                return got
        arrays = capture_samples(self.network(weights), self.sampler(runs), plan, self.layers, self.device, self.batch_voxels)
        self.cache.captures += 1
        if key is not None:
            self.cache.put(key, arrays)
            return self.cache.get(key)  # type: ignore[return-value]
        return arrays

    def pair_moments(self, x: Any, y: Any, runs: Sequence["Run"] = ()) -> "OrderedDict[str, MomentAccumulator]":
        """``layer -> MomentAccumulator`` of the networks with weights ``x`` (the ``x`` side) and ``y``, at the planned
        data points. With the cache: from the stored activations (float64 two-pass moments, each network captured
        once); with ``cache=False`` or weights that are not files: both networks forwarded (:func:`layer_moments`)."""
        plan = self.plan(runs)
        kx = self.cache.key_of(x, plan) if self.use_cache else None
        ky = self.cache.key_of(y, plan) if self.use_cache else None
        if kx is None or ky is None:
            self.cache.captures += 2
            return layer_moments(self.network(x), self.network(y), self.sampler(runs), self.layers, device=self.device,
                                 plan=plan, batch_voxels=self.batch_voxels)[0]  # fmt: skip
        ax, ay = self.activations(x, runs), self.activations(y, runs)
        out: "OrderedDict[str, MomentAccumulator]" = OrderedDict()
        for name in plan.layers:
            n, mx, gxx = self.cache.moments(kx, name)
            _, my, gyy = self.cache.moments(ky, name)
            gxy = cross_moment(ax[name], ay[name], mx, my)
            out[name] = MomentAccumulator.from_moments(n, mx, my, gxx, gyy, gxy)
        return out

    def moments(self, networks: Sequence[nn.Module], reference: nn.Module, runs: Sequence["Run"] = ()):
        """:func:`layer_moments` of network modules against ``reference`` at the planned data points (not cached)."""
        return layer_moments(list(networks), reference, self.sampler(runs), self.layers, device=self.device,
                             plan=self.plan(runs), batch_voxels=self.batch_voxels)  # fmt: skip

    def floors(self, runs: Sequence["Run"] = ()) -> "OrderedDict[str, dict[str, float]]":
        """Per layer, the RSIM of independent Gaussian representations with the layer's data points and channel
        count on both sides (:func:`common.rsim.random_floor`, ``floor_draws`` seeded draws): ``{"x", "y", "mean",
        "sd", "se", "mean_cca", "draws"}`` plus ``points`` and ``channels``."""
        plan = self.plan(runs)
        out: "OrderedDict[str, dict[str, float]]" = OrderedDict()
        for name, lp in plan.layers.items():
            f = random_floor(lp.points, lp.channels, lp.channels, draws=self.floor_draws, seed=self.seed)
            out[name] = {**f, "points": lp.points, "channels": lp.channels}
        return out

    def probe_text(self) -> str:
        """Which probes (and modules) the analyses use, for the tables and figure titles."""
        try:
            net = self.network_factory()
        except Exception:  # a factory that cannot build here: the words only
            net = None
        return describe_probes(self.probe, self.layers, net)

    def tqdm(self, it: Iterable | None = None, **kw: Any) -> Any:
        """A tqdm progress bar (disabled unless ``progress``)."""
        from tqdm.auto import tqdm

        return tqdm(it, disable=not self.progress, **kw)


def _test_images(runs: Sequence[Run]) -> list[Any]:
    for run in runs:
        if run.datalist:
            for key in ("test", "validation"):
                items = run.datalist.get(key) or []
                if items:
                    if key != "test":
                        logger.warning("Run %s has no test cases: using its %s cases for the blocks.", run.name, key)
                    others = [r.name for r in runs if r.datalist and r.datalist.get("test") != run.datalist.get("test")]
                    if others:
                        logger.warning("Runs %s have other test cases than %s; all use the blocks of %s.", others, run.name, run.name)
                    return [{"image": c["image"]} if isinstance(c, dict) else c for c in items]
    raise ValueError("No images for the blocks: give images= (a datalist, a folder or a list) or runs with a datalist.json.")


def make_setup(
    config_files: str | Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    images: Sequence[Any] | str | None = None,
    network_id: str = "network_def",
    transforms_id: str = "preprocessing",
    **kwargs: Any,
) -> AnalysisSetup:
    """An :class:`AnalysisSetup` from a bundle's training config(s): the network is ``network_def`` and the
    preprocessing ``preprocessing`` of that config (with ``overrides``, e.g. ``{"network_def#features": 4}`` when
    the runs were trained with that override). ``kwargs`` go to :class:`AnalysisSetup` (``probe``, ``block_size``,
    ``points_per_channel``, ``cache``, ...); without ``block_size`` the blocks have the runs' training block size,
    else the config's ``block_size``."""
    parser = bundle_parser(config_files, overrides)
    transform = bundle_transforms(parser, key=transforms_id)
    if kwargs.get("config_block_size") is None:
        try:
            kwargs["config_block_size"] = parser.get_parsed_content("block_size", lazy=False)
        except (KeyError, ValueError):
            kwargs["config_block_size"] = None

    def factory() -> nn.Module:
        return parser.get_parsed_content(network_id, lazy=False)

    return AnalysisSetup(factory, transform, images=images or None, **kwargs)
