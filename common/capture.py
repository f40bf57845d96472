# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Activation capture for the representation analyses (Karimi et al., Section II-C).

The paper samples "blocks from random locations in the test images" and records "the values of the
convolutional layer neurons": every voxel of a layer's feature map is a data point, every channel a
neuron. Here:

* :class:`BlockSampler` cuts seeded random blocks (``96^3`` by default, each size divisible by the
  networks' divisor, 8 for the paper's FCN) from preprocessed test images, cycling through the images
  in a seeded order; images smaller than a block are zero-padded (as ``SpatialPadd`` does in
  training). Block ``i`` depends only on ``(seed, i)``, so every comparison sees the same blocks.
  The preprocessing is the bundle's deterministic chain (load, channel first, RAS, spacing,
  ``NormalizeModalityd``), taken from its config by :func:`bundle_transforms` so there is one source
  of truth; any callable on ``{"image": path}`` dicts (a ``Compose``) will do.
* :class:`ActivationRecorder` puts forward hooks on named probe layers: by default the six of the
  paper (``encoder-1..3``, ``decoder-1..3``) from the network's ``probe_modules()`` (the section protocol
  of :mod:`common.networks`); any module can also be named by its ``named_modules()`` name. Outputs are
  cloned: the FCN's in-place ReLU would otherwise overwrite a convolution's recorded output. (That, and
  running under ``torch.inference_mode``, is why this is not MONAI's ``monai.visualize`` ``ModelWithHooks``,
  which keeps references to the hooked outputs.)
* :func:`layer_moments` runs the same blocks through a reference network ``y`` and one or more
  networks ``x`` (eval mode, no autograd), subsamples the voxels of each layer (the same voxel
  indices for every network, seeded by block and layer) and streams them block by block into one
  :class:`common.rsim.MomentAccumulator` per (network, layer): memory stays bounded by one block's
  feature maps. Each layer gets at least ``points_per_channel`` (default 100) data points per channel
  of its wider side: ``ceil(target / n_blocks)`` voxels per block, and more blocks are drawn when a
  layer is too small to supply them (up to ``max_blocks``; a warning if still short).

Each accumulator holds the first and second moments of both sides, so RSIM can be read with the
weights from either side (:func:`swap` exchanges ``x`` and ``y``) without another pass.

:class:`AnalysisSetup` (made from a bundle's training config by :func:`make_setup`) holds what every
analysis of :mod:`common.analysis` needs: how to build the network, the image blocks and these settings.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from .networks import PROBE_NAMES, spatial_divisor, unwrap
from .checkpoints import checkpoint_state_dict
from .rsim import MomentAccumulator

if TYPE_CHECKING:
    from .runs import Run

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_N_BLOCKS",
    "DEFAULT_POINTS_PER_CHANNEL",
    "probe_layers",
    "probe_filters",
    "bundle_parser",
    "bundle_transforms",
    "BlockSampler",
    "ActivationRecorder",
    "layer_moments",
    "swap",
    "AnalysisSetup",
    "make_setup",
]

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = (96, 96, 96)
#: Blocks per comparison before any extension (spreads the data points over several images).
DEFAULT_N_BLOCKS = 8
#: Data points per channel (of the wider side) per layer; the PWCCA floor of random data is ~0.08 at 100x.
DEFAULT_POINTS_PER_CHANNEL = 100
#: At most this many blocks are drawn to reach the points-per-channel target.
DEFAULT_MAX_BLOCKS = 256

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _default_probes(network: nn.Module) -> "OrderedDict[str, nn.Module]":
    if hasattr(network, "probe_modules"):
        return OrderedDict(network.probe_modules())
    raise ValueError(
        f"{type(network).__name__} has no probe_modules(): name the layers to analyse by their named_modules() names."
    )


def probe_layers(network: nn.Module, layers: Sequence[str] | str | None = None) -> "OrderedDict[str, nn.Module]":
    """Name -> module of the layers to probe.

    ``layers``: None for the paper's six (the network's ``probe_modules()``),
    or names, each a probe name (``"encoder-1"``) or any ``named_modules()`` name (``"encoder.0.residual"``).
    A comma-separated string is split.
    """
    network = unwrap(network)
    if layers is None:
        return _default_probes(network)
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    try:
        probes = _default_probes(network)
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


def probe_filters(network: nn.Module, layers: Sequence[str] | str | None = None) -> "OrderedDict[str, nn.Module]":
    """Name -> the convolution producing each probe layer (for filter pictures and filter change).

    Uses the network's ``probe_filters()`` for its probe names; for any other module name, the module itself
    when it is a convolution, else the last convolution inside it (``named_modules()`` order).
    """
    network = unwrap(network)
    mods = probe_layers(network, layers)
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


class BlockSampler:
    """Seeded random blocks cut from preprocessed images.

    Args:
        images: items (``{"image": path, ...}`` dicts or paths) to preprocess with ``transform``, or
            already preprocessed arrays/tensors of shape ``(C, D, H, W)``.
        transform: the deterministic preprocessing (a ``Compose`` on dicts); None for preprocessed arrays.
        block_size: block size (default 96^3); every size must be divisible by ``divisor``.
        seed: block ``i`` is cut from image ``order[i % n]`` (``order`` a seeded permutation) at a corner
            drawn from ``numpy.random.default_rng([seed, i])``.
        divisor: the networks' spatial divisor (8 for the paper's FCN, 16 for VNet).

    ``sampler[i]`` is block ``i`` as a ``(1, C, *block_size)`` float32 tensor (cached); images are
    loaded when a block needs them (the last one is kept).
    """

    def __init__(
        self,
        images: Sequence[Any],
        transform: Callable | None = None,
        block_size: int | Sequence[int] = DEFAULT_BLOCK_SIZE,
        seed: int = 0,
        divisor: int = 8,
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
        self._blocks: dict[int, torch.Tensor] = {}
        self._last: tuple[int, torch.Tensor] | None = None

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
        return img

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        if i not in self._blocks:
            img = self._image(int(self.order[i % len(self.images)]))
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
            self._blocks[i] = img[(slice(None),) + sl].contiguous()[None]
        return self._blocks[i]


# ---------------------------------------------------------------------------------------------- hooks
class ActivationRecorder:
    """Forward hooks recording the outputs of named layers; use as a context manager.

    ``recorder.outputs[name]`` is the (cloned, detached) output of the last forward pass.
    """

    def __init__(self, network: nn.Module, layers: Sequence[str] | str | None = None) -> None:
        self.network = network
        self.layers = probe_layers(network, layers)
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


def _flatten(act: torch.Tensor) -> torch.Tensor:
    """``(1, C, *spatial)`` -> ``(voxels, C)``."""
    if act.ndim < 3 or act.shape[0] != 1:
        raise ValueError(f"Expected a (1, C, ...) feature map, got shape {tuple(act.shape)}.")
    return act[0].reshape(act.shape[1], -1).T


def _indices(seed: int, block: int, layer_idx: int, voxels: int, k: int, device: torch.device) -> torch.Tensor:
    if k >= voxels:
        return torch.arange(voxels, device=device)
    rng = np.random.default_rng([seed, 104729, block, layer_idx])
    idx = np.sort(rng.choice(voxels, size=k, replace=False))
    return torch.as_tensor(idx, device=device)


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
) -> list["OrderedDict[str, MomentAccumulator]"]:
    """Moments of the paired activations of ``networks`` (the ``x`` sides) and ``reference`` (``y``).

    The same blocks (``sampler[0], sampler[1], ...``) go through the reference once and through every
    network; at each layer the same voxels (seeded by ``seed``, block and layer) are kept for all. Returns,
    per network, ``OrderedDict(layer -> MomentAccumulator)`` with ``x`` = that network, ``y`` = the
    reference. Networks are used in eval mode under ``torch.inference_mode`` and moved to ``device``
    (default: the reference's device); their training flags and devices are restored afterwards.

    Data points: for each layer ``target = points_per_channel * max(channels_x, channels_y)``;
    each of the first ``n_blocks`` blocks contributes ``ceil(target / n)`` voxels where ``n`` is
    ``n_blocks`` or, when the layer's map has too few voxels per block, the number of blocks needed
    (at most ``max_blocks``; a warning names any layer still short).
    """
    single = isinstance(networks, nn.Module)
    nets = [networks] if single else list(networks)
    if not nets:
        return []
    if seed is None:
        seed = sampler.seed
    ref_dev = next(reference.parameters()).device if device is None else torch.device(device)
    dev = torch.device(ref_dev)
    originals = [(m, next(m.parameters()).device, m.training) for m in [reference, *nets]]
    divisor = max(spatial_divisor(unwrap(m)) for m in [reference, *nets])
    if any(s % divisor for s in sampler.block_size):
        raise ValueError(f"block_size {list(sampler.block_size)} must be divisible by {divisor} for these networks.")
    try:
        for m, _, _ in originals:
            m.to(dev).eval()
        ref_rec = ActivationRecorder(reference, layers)
        recs = [ActivationRecorder(m, layers) for m in nets]
        names = list(ref_rec.layers)
        accs = [OrderedDict((n, MomentAccumulator(gram_dtype=gram_dtype)) for n in names) for _ in nets]
        quota: dict[str, int] = {}
        target: dict[str, int] = {}
        total_blocks = max(1, int(n_blocks))
        b = 0
        while b < total_blocks:
            block = sampler[b].to(dev)
            with ref_rec:
                ref_out = OrderedDict((k, _flatten(v)) for k, v in ref_rec.run(block).items())
            picked: dict[str, torch.Tensor] = {}
            for i, (rec, acc) in enumerate(zip(recs, accs)):
                with rec:
                    out = OrderedDict((k, _flatten(v)) for k, v in rec.run(block).items())
                if b == 0 and i == 0:
                    for name in names:
                        voxels, cy = ref_out[name].shape
                        target[name] = int(points_per_channel) * max(out[name].shape[1], cy)
                        total_blocks = max(total_blocks, min(math.ceil(target[name] / voxels), int(max_blocks)))
                    for name in names:
                        quota[name] = math.ceil(target[name] / total_blocks)
                for li, name in enumerate(names):
                    x, y = out[name], ref_out[name]
                    if x.shape[0] != y.shape[0]:
                        raise ValueError(
                            f"Layer {name!r}: the feature maps have {x.shape[0]} and {y.shape[0]} voxels; "
                            "the compared layers must have the same spatial size."
                        )
                    if name not in picked:
                        picked[name] = _indices(seed, b, li, y.shape[0], quota[name], dev)
                    idx = picked[name]
                    acc[name].update(x.index_select(0, idx), y.index_select(0, idx))
                del out
            del ref_out
            b += 1
        for name in names:
            n = accs[0][name].n
            if n < target[name]:
                logger.warning(
                    "Layer %s: %d data points, fewer than the %d wanted (%d per channel); raise max_blocks or block_size.",
                    name, n, target[name], points_per_channel,
                )
        logger.debug("Captured %d blocks for %d network(s); data points per layer: %s", b, len(nets),
                     {n: accs[0][n].n for n in names})
    finally:
        for m, d, tr in originals:
            m.to(d).train(tr)
    return accs[0:1] if single else accs


def swap(acc: MomentAccumulator) -> MomentAccumulator:
    """The same moments with ``x`` and ``y`` exchanged (RSIM weighted by the other side)."""
    out = copy.copy(acc)
    out.mean_x, out.mean_y = acc.mean_y, acc.mean_x
    out.mxx, out.myy = acc.myy, acc.mxx
    out.mxy = None if acc.mxy is None else acc.mxy.T.copy()
    return out


# ---------------------------------------------------------------------------------------------- setup
class AnalysisSetup:
    """What every analysis needs: how to build the network, the image blocks, and the capture settings.

    Args:
        network: the runs' architecture: a network (deep-copied for each use; e.g. the bundle's ``network_def``)
            or a callable returning a fresh one. Weights are loaded into the copies.
        transform: the deterministic preprocessing (a ``Compose`` on ``{"image": path}`` dicts).
        images: the images to cut blocks from (items, paths, or preprocessed ``(C, D, H, W)`` arrays);
            None: the ``test`` cases of the first run analysed.
        layers: probe layers (None: the paper's six).
        block_size, n_blocks, points_per_channel, max_blocks, seed: see ``common.capture``.
        device: where the networks run (default: CUDA if available).
        chunk: how many networks are compared with one reference in one pass (memory vs speed).
        progress: show tqdm progress bars.
    """

    def __init__(
        self,
        network: nn.Module | Callable[[], nn.Module],
        transform: Callable | None = None,
        images: Sequence[Any] | str | None = None,
        layers: Sequence[str] | str | None = None,
        block_size: int | Sequence[int] = DEFAULT_BLOCK_SIZE,
        n_blocks: int = DEFAULT_N_BLOCKS,
        points_per_channel: int = DEFAULT_POINTS_PER_CHANNEL,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        seed: int = 0,
        device: str | torch.device | None = None,
        chunk: int = 8,
        progress: bool = True,
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
        self.block_size = _as_block_size(block_size)
        self.n_blocks = int(n_blocks)
        self.points_per_channel = int(points_per_channel)
        self.max_blocks = int(max_blocks)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.chunk = max(1, int(chunk))
        self.progress = bool(progress)
        self._sampler: BlockSampler | None = None

    # ------------------------------------------------------------------ pieces
    def network_factory(self) -> nn.Module:
        """A fresh network of the runs' architecture (random or template weights)."""
        if isinstance(self._network, nn.Module):
            return copy.deepcopy(unwrap(self._network)).cpu()
        return self._network()

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
        return list(probe_layers(self.network_factory(), self.layers))

    def sampler(self, runs: Sequence["Run"] = ()) -> BlockSampler:
        """The block sampler (built once): the setup's images, else the first run's test cases."""
        if self._sampler is None:
            images = self.images
            if images is None:
                images = _test_images(runs)
            divisor = max(8, spatial_divisor(unwrap(self.network_factory())))
            self._sampler = BlockSampler(images, self.transform, self.block_size, self.seed, divisor)
        return self._sampler

    def moments(self, networks: Sequence[nn.Module], reference: nn.Module, runs: Sequence["Run"] = ()):
        return layer_moments(
            list(networks),
            reference,
            self.sampler(runs),
            layers=self.layers,
            n_blocks=self.n_blocks,
            points_per_channel=self.points_per_channel,
            max_blocks=self.max_blocks,
            device=self.device,
            seed=self.seed,
        )

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
    preprocessing ``preprocessing`` of that config (with ``overrides``, e.g.
    ``{"network_def#features": 4}`` when the runs were trained with that override)."""
    parser = bundle_parser(config_files, overrides)
    transform = bundle_transforms(parser, key=transforms_id)

    def factory() -> nn.Module:
        return parser.get_parsed_content(network_id, lazy=False)

    return AnalysisSetup(factory, transform, images=images or None, **kwargs)
