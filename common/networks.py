# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The paper's 3D FCN (Karimi et al., Fig. 1) and the V-Net of its Fig. 9, with the section protocol the
transfer modes and the analyses use.

The FCN is written after the authors' published TensorFlow network (``davood_net``):

* 4 resolution levels, widths ``f, 2f, 4f, 8f`` with ``f = 14``; no pooling: every downsampling is a
  3x3x3 convolution with stride 2; no normalisation layers; every convolution has a bias, a ReLU
  and dropout (keep-probability 0.9 while training).
* Encoder level 0: one 3x3x3 convolution ``in_channels -> f``. Encoder level ``L >= 1`` (the dense
  multi-scale connections): the channel concatenation of the raw input brought down by ``L`` stride-2
  convolutions (``in -> f``, then ``f -> f``) and of the output of every shallower level ``r < L``
  brought down by its own chain of ``L - r`` stride-2 convolutions that keep that level's width
  ``f * 2**r``. The widths add up to ``f * 2**L``.
* Every level then applies two residual blocks of two convolutions:
  ``x1 = conv(conv(x0)) + x0`` and ``x2 = conv(conv(x1)) + x1 + x0``.
  Encoder convolutions per level: 5, 6, 9, 13 = 33.
* Decoder at levels 2, 1, 0: stride-2 transposed 3x3x3 convolution halving the channels (+ReLU),
  concatenation with the encoder output of that level, one 3x3x3 convolution
  (``112 -> 112``, ``84 -> 56``, ``42 -> 28`` for ``f = 14``) and the same two residual blocks:
  6 convolutions per level = 18.
* Head: 3x3x3 convolution ``2f -> out_channels`` giving logits (softmax is applied by the loss and
  the post-processing, the MONAI convention).
* Initialisation: He, ``std = sqrt(2 / n)`` with ``n = c_in * 27``, drawn from a normal distribution
  truncated at +-2 std as in the authors' code; biases 0.001. Plain (untruncated) He init makes the
  untrained logits large enough to saturate the softmax; see ``tests/test_networks.py``.

Probe points (the six layers the paper analyses, Fig. 1): ``encoder-1..3`` are encoder levels 0, 1, 2 and
``decoder-1..3`` decoder levels 2, 1, 0 (deepest first), so that ``encoder-3`` and ``decoder-1`` are the two most
intermediate layers, as in the paper's Table VII. The paper "recorded the values of the convolutional layer
neurons" at the six marked convolutional layers, so the default probe (``kind="conv"``) of each point is the last
convolution of that level, ``<level>.residual.block2[1].conv`` (the ``nn.Conv3d`` of the last ``ConvUnit`` before
the residual addition): its recorded output is the convolution plus bias, **before** the in-place ReLU (a
recorder must copy it in the hook, as :mod:`common.capture` does, or the ReLU overwrites it) and before the
residual sum. ``kind="residual"`` gives the level's output instead, the residual sum ``x2 = block2(x1) + x1 + x0``
of post-ReLU block outputs and the identity paths. :meth:`KarimiFCN.probe_filters` returns the same convolutions
as ``kind="conv"``, so the filter pictures show the filters whose outputs the RSIM analyses compare.

The section protocol. Every network here has ``encoder_parameters()``, ``decoder_parameters()`` (the head
included), ``last_layers(k)``, ``head_names()`` (state-dict keys that depend on the class count),
``probe_modules(kind)`` / ``probe_filters()`` (the six analysed layers, as their last convolutions or their
residual outputs, and those convolutions),
``divisor`` (every spatial input size must be divisible by it) and ``encoder_frozen`` (the encoder runs
without autograd). :mod:`common.transfer` and :mod:`common.capture` only use this protocol, so the
networks' own knowledge stays in this module. :class:`VNet` gives MONAI's V-Net the same protocol.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from monai.networks.nets import VNet as _MonaiVNet

__all__ = [
    "unwrap",
    "ConvUnit",
    "ResidualPair",
    "EncoderLevel",
    "DecoderLevel",
    "KarimiFCN",
    "VNet",
    "MultiTaskFCN",
    "PROBE_NAMES",
    "he_truncated_normal_",
    "count_convs",
    "build_network",
    "spatial_divisor",
]

PROBE_NAMES = ("encoder-1", "encoder-2", "encoder-3", "decoder-1", "decoder-2", "decoder-3")


def unwrap(network: Any) -> Any:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (nested wrappers too), else ``network``.

    The one unwrap of the package: checkpoints, snapshots and activation capture save and probe the inner
    module, so their keys and layer names are the same with one GPU or several.
    """
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    return network


def he_truncated_normal_(module: nn.Module, bias: float = 0.001) -> None:
    """He initialisation drawn as the authors draw it: truncated normal (cut at +-2 std).

    ``std = sqrt(2 / n)`` with ``n = c_in * prod(kernel_size)``, the number of connections from the
    previous layer to one output voxel. Applies to ``Conv3d`` and ``ConvTranspose3d`` modules; the
    bias is set to ``bias``.
    """
    if isinstance(module, nn.ConvTranspose3d):
        c_in = module.in_channels
    elif isinstance(module, nn.Conv3d):
        c_in = module.in_channels // module.groups
    else:
        return
    fan_in = c_in * math.prod(module.kernel_size)
    std = math.sqrt(2.0 / fan_in)
    nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    if module.bias is not None:
        nn.init.constant_(module.bias, bias)


class ConvUnit(nn.Sequential):
    """3x3x3 convolution (with bias) -> ReLU -> dropout.

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D/stride, H/stride, W/stride)``.
    With ``transposed=True`` the convolution is a stride-2 transposed convolution that doubles
    each spatial size exactly.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.1, transposed: bool = False
    ) -> None:
        if transposed:
            conv: nn.Module = nn.ConvTranspose3d(
                in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=True
            )
        else:
            conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)
        super().__init__(OrderedDict(conv=conv, act=nn.ReLU(inplace=True), drop=nn.Dropout(dropout)))


class ResidualPair(nn.Module):
    """Two residual blocks of two convolutions each, at constant width ``channels``.

    ``x1 = conv(conv(x0)) + x0`` and ``x2 = conv(conv(x1)) + x1 + x0``; returns ``x2``.
    """

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block1 = nn.Sequential(ConvUnit(channels, channels, dropout=dropout), ConvUnit(channels, channels, dropout=dropout))
        self.block2 = nn.Sequential(ConvUnit(channels, channels, dropout=dropout), ConvUnit(channels, channels, dropout=dropout))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x1 = self.block1(x0) + x0
        return self.block2(x1) + x1 + x0


def _down_chain(in_channels: int, width: int, steps: int, dropout: float) -> nn.Sequential:
    """``steps`` stride-2 convolutions: ``in_channels -> width`` then ``width -> width``."""
    layers = [ConvUnit(in_channels if i == 0 else width, width, stride=2, dropout=dropout) for i in range(steps)]
    return nn.Sequential(*layers)


class EncoderLevel(nn.Module):
    """Encoder level ``level`` of the FCN.

    Level 0 applies one convolution ``in_channels -> f`` to the image. Level ``L >= 1`` concatenates
    the image brought down by ``L`` stride-2 convolutions (``f`` channels) and each shallower level's
    output ``r < L`` brought down by ``L - r`` stride-2 convolutions (``f * 2**r`` channels). Both
    then apply :class:`ResidualPair` at width ``f * 2**L``.

    ``forward(image, shallower)`` takes the network input ``(B, C_in, D, H, W)`` and the list of the
    outputs of levels ``0 .. L-1``; it returns ``(B, f * 2**L, D / 2**L, H / 2**L, W / 2**L)``.
    """

    def __init__(self, level: int, in_channels: int, features: int, dropout: float) -> None:
        super().__init__()
        self.level = level
        self.width = features * 2**level
        if level == 0:
            self.image_path: nn.Module = ConvUnit(in_channels, features, dropout=dropout)
        else:
            self.image_path = _down_chain(in_channels, features, level, dropout)
        self.level_paths = nn.ModuleList(
            [_down_chain(features * 2**r, features * 2**r, level - r, dropout) for r in range(level)]
        )
        self.residual = ResidualPair(self.width, dropout)

    def forward(self, image: torch.Tensor, shallower: list[torch.Tensor]) -> torch.Tensor:
        parts = [self.image_path(image)]
        for r, path in enumerate(self.level_paths):
            parts.append(path(shallower[r]))
        x0 = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.residual(x0)


class DecoderLevel(nn.Module):
    """Decoder level: upsample ``in_channels -> in_channels // 2`` by a stride-2 transposed
    convolution, concatenate the encoder output of the same level (``skip_channels``), one
    convolution to ``out_channels`` and :class:`ResidualPair`.

    Shapes: ``(B, in_channels, d, h, w)`` and skip ``(B, skip_channels, 2d, 2h, 2w)`` ->
    ``(B, out_channels, 2d, 2h, 2w)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.up = ConvUnit(in_channels, in_channels // 2, dropout=dropout, transposed=True)
        self.fuse = ConvUnit(in_channels // 2 + skip_channels, out_channels, dropout=dropout)
        self.residual = ResidualPair(out_channels, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.up(x), skip], dim=1)
        return self.residual(self.fuse(x))


class ConvLayers:
    """Mixin of the section protocol: the convolutions of a network in forward (module) order."""

    def conv_layers(self) -> list[tuple[str, nn.Module]]:
        """All convolution modules in forward order, with their names."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]

    def last_layers(self, k: int = 2) -> list[nn.Module]:
        """The last ``k`` convolution layers in forward order (``k=2``: the head and the convolution before it)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        return [m for _, m in self.conv_layers()[-k:]]


class KarimiFCN(ConvLayers, nn.Module):
    """The paper's Fig. 1 FCN (see the module docstring for the topology).

    Args:
        in_channels: image channels (1 for the paper's single-modality tasks).
        out_channels: output classes including background (2 for a binary task).
        features: width of the first level (the paper: 14).
        levels: number of resolution levels (the paper: 4).
        dropout: dropout probability of every convolution (the paper: 0.1, keep-probability 0.9).

    Input ``(B, in_channels, D, H, W)`` with each of ``D, H, W`` divisible by ``2**(levels-1)``;
    output logits ``(B, out_channels, D, H, W)``. With ``levels=4, features=14, in=1, out=2`` there
    are 33 encoder convolutions, 18 decoder convolutions, a head, and 4,656,976 parameters
    (1,997,758 in the encoder).
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 2, features: int = 14, levels: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"KarimiFCN needs at least 2 levels, got levels={levels}.")
        if in_channels < 1 or out_channels < 1 or features < 1:
            raise ValueError(
                f"in_channels, out_channels and features must be positive, got {in_channels}, {out_channels}, {features}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.levels = levels
        self.divisor = 2 ** (levels - 1)
        #: When True the encoder runs under ``torch.no_grad()`` (set by ``common.transfer``).
        self.encoder_frozen = False

        self.encoder = nn.ModuleList([EncoderLevel(L, in_channels, features, dropout) for L in range(levels)])
        decoder = []
        in_ch = features * 2 ** (levels - 1)
        for L in range(levels - 2, -1, -1):
            skip = features * 2**L
            out_ch = 2 * features * 2**L
            decoder.append(DecoderLevel(in_ch, skip, out_ch, dropout))
            in_ch = out_ch
        self.decoder = nn.ModuleList(decoder)
        self.head = nn.Conv3d(in_ch, out_channels, 3, padding=1, bias=True)
        self.apply(he_truncated_normal_)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(
                f"KarimiFCN expects a 5-D input (batch, channels, D, H, W), got shape {list(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"KarimiFCN was built for {self.in_channels} input channel(s), got {x.shape[1]} (shape {list(x.shape)})."
            )
        for s in x.shape[2:]:
            if s % self.divisor != 0:
                raise ValueError(
                    f"KarimiFCN with {self.levels} levels needs every spatial size divisible by {self.divisor}, "
                    f"got {list(x.shape[2:])}; pad or crop the block (e.g. 96^3 or 48^3)."
                )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder; returns the outputs of every level, shallowest first."""
        feats: list[torch.Tensor] = []
        for level in self.encoder:
            feats.append(level(x, feats))
        return feats

    def decode_features(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Run the decoder on the encoder outputs; returns the last decoder feature map ``(B, 2f, D, H, W)``."""
        x = feats[-1]
        n = len(feats)
        for i, level in enumerate(self.decoder):
            x = level(x, feats[n - 2 - i])
        return x

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Run the decoder and head on the encoder outputs; returns logits."""
        return self.head(self.decode_features(feats))

    def encode_checked(self, x: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`encode` after the input checks, without autograd when the encoder is frozen."""
        self._check_input(x)
        if self.encoder_frozen:
            with torch.no_grad():
                return self.encode(x)
        return self.encode(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_checked(x))

    # ------------------------------------------------------------------ parameter groups
    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder section (33 convolutions for the paper's 4 levels)."""
        return self.encoder.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the decoder section and the output head."""
        yield from self.decoder.parameters()
        yield from self.head.parameters()

    def head_names(self) -> tuple[str, ...]:
        """State-dict keys of the output head (re-initialised when the class count changes)."""
        return ("head.weight", "head.bias")

    # ------------------------------------------------------------------ probe points
    def _probe_levels(self) -> "OrderedDict[str, ResidualPair]":
        enc = [self.encoder[i].residual for i in range(min(3, self.levels - 1))]
        dec = [self.decoder[i].residual for i in range(min(3, len(self.decoder)))]
        named = [(f"encoder-{i + 1}", m) for i, m in enumerate(enc)] + [(f"decoder-{i + 1}", m) for i, m in enumerate(dec)]
        return OrderedDict(named)

    def probe_modules(self, kind: str = "conv") -> "OrderedDict[str, nn.Module]":
        """The paper's six analysed layers: name -> the module whose forward output is the representation.

        ``kind="conv"`` (default): the last convolution of each probed level, ``<level>.residual.block2[1].conv``
        (output ``(B, C, ...)``: convolution + bias, before the in-place ReLU and the residual addition);
        ``kind="residual"``: the level's :class:`ResidualPair` (output: the residual sum ``x2``).
        """
        levels = self._probe_levels()
        if kind == "conv":
            return OrderedDict((name, mod.block2[1].conv) for name, mod in levels.items())
        if kind == "residual":
            return levels
        raise ValueError(f"Unknown probe kind {kind!r}: use 'conv' or 'residual'.")

    def probe_filters(self) -> "OrderedDict[str, nn.Conv3d]":
        """For each probe point, the last convolution of its level (for filter pictures, Figs. 8-9, and the filter
        change): the modules of ``probe_modules("conv")``."""
        return self.probe_modules("conv")  # type: ignore[return-value]


class MultiTaskFCN(KarimiFCN):
    """The paper's multi-task network (Section III-F): one Fig. 1 body (encoder + decoder) shared by several
    datasets, with one output head per dataset, each keeping its own labels.

    The paper gives no design; this is the one a user would expect: the body of :class:`KarimiFCN` and, in place
    of its head, a 3x3x3 convolution ``2f -> n_classes`` per task (``heads``, in a ``ModuleDict`` named
    ``heads.<task>``). ``forward(x, task)`` runs the body once and the named task's head; every sample of a batch
    must belong to that task (the bundles train with batch 1; their ``prepare_batch`` passes each batch's
    ``task``). The section protocol counts all heads in the decoder section and the head keys; the probe layers
    and filters are the body's, so the filter change is comparable with the single-task runs.

    Args:
        heads: task name -> output classes including background (e.g. ``{"liver_ct": 2, "kits": 3}``).
        in_channels, features, levels, dropout: as for :class:`KarimiFCN`.
        default_task: the head used when ``forward`` gets no task (inference tools that call ``network(x)``:
            MONAI Label, ``verify_net_in_out``, the analyses); None: a task is required (unless there is one head).

    Input ``(B, in_channels, D, H, W)`` and ``task`` (a name, an index into ``heads``, or a list of the same name
    per sample); output logits ``(B, heads[task], D, H, W)``.
    """

    def __init__(
        self, heads: "Mapping[str, int]", in_channels: int = 1, features: int = 14, levels: int = 4, dropout: float = 0.1,
        default_task: str | None = None,
    ) -> None:  # fmt: skip
        if not heads:
            raise ValueError("MultiTaskFCN needs at least one task in heads.")
        if default_task is not None and str(default_task) not in {str(t) for t in heads}:
            raise ValueError(f"default_task {default_task!r} is not one of the heads {list(heads)}.")
        super().__init__(in_channels, max(int(n) for n in heads.values()), features, levels, dropout)
        width = self.head.in_channels
        del self.head
        self.tasks = [str(t) for t in heads]
        self.heads = nn.ModuleDict({str(t): nn.Conv3d(width, int(n), 3, padding=1, bias=True) for t, n in heads.items()})
        self.heads.apply(he_truncated_normal_)
        if default_task is None and len(self.tasks) == 1:
            default_task = self.tasks[0]
        #: "" when there is none (a TorchScript-friendly string)
        self.default_task: str = "" if default_task is None else str(default_task)

    def task_name(self, task: Any) -> str:
        """The head name of ``task``: a name, an index, or a list/tuple naming one task for every sample (a
        collated batch); None: the default task. (Python-side; :meth:`forward` takes the name.)"""
        if isinstance(task, (list, tuple)):
            names = {self.task_name(t) for t in task}
            if len(names) != 1:
                raise ValueError(f"A batch mixes the tasks {sorted(names)}: every sample must go to one head.")
            return names.pop()
        if isinstance(task, torch.Tensor):
            return self.task_name(task.flatten().tolist() if task.numel() > 1 else task.item())
        if isinstance(task, int):
            return self.tasks[task]
        if task is None:
            if not (self.default_task or len(self.tasks) == 1):
                raise ValueError(f"No task given and no default_task; the network's heads are {self.tasks}.")
            return self.default_task or self.tasks[0]
        if str(task) not in self.heads:
            raise ValueError(f"Unknown task {task!r}; the network's heads are {self.tasks}.")
        return str(task)

    def forward(self, x: torch.Tensor, task: Optional[str] = None) -> torch.Tensor:  # type: ignore[override]
        """Logits of ``task``'s head (a head name; None: ``default_task``). TorchScript-compatible, so
        ``ckpt_export`` scripts it; :class:`common.execution.TaskBatch` turns a batch's task list into the name."""
        y = self.decode_features(self.encode_checked(x))
        key = self.default_task if task is None else task
        for name, head in self.heads.items():
            if name == key:
                return head(y)
        raise ValueError("Unknown task: not one of the network's heads (see MultiTaskFCN.tasks).")

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the decoder section and every head."""
        yield from self.decoder.parameters()
        yield from self.heads.parameters()

    def head_names(self) -> tuple[str, ...]:
        """State-dict keys of every head."""
        return tuple(k for k in self.state_dict() if k.startswith("heads."))

    def last_layers(self, k: int = 2) -> list[nn.Module]:
        """The heads and the last ``k - 1`` convolutions of the body."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        body = [m for n, m in self.conv_layers() if not n.startswith("heads.")]
        return (body[-(k - 1):] if k > 1 else []) + list(self.heads.values())


class VNet(ConvLayers, _MonaiVNet):
    """MONAI's V-Net (Milletari et al. 2016; the paper's Fig. 9) with this module's section protocol, as the
    paper used it: He initialisation like the FCN, one dropout setting, and frozen sections that stay frozen.

    Differences from ``monai.networks.nets.VNet`` (whose module names, and so checkpoints, it keeps):

    * initialisation: every convolution He truncated-normal (:func:`he_truncated_normal_`), biases 0.001
      where present; PyTorch's default init draws weights ~2.45x smaller, which would inflate the relative
      filter change the paper measures (Fig. 9);
    * ``dropout``: one probability for the down and the up path (MONAI's defaults differ: 0.5 up);
    * normalisation layers whose parameters a transfer mode froze stay in eval mode (their running
      statistics do not move) whatever ``train()`` is called with (:attr:`frozen_norms`, set by
      :mod:`common.transfer`).

    Sections: the encoder is ``in_tr`` and the ``down_tr*`` stages, the decoder the ``up_tr*`` stages and the
    head ``out_tr``. Probe points: ``encoder-1..3`` = ``in_tr``, ``down_tr32``, ``down_tr64`` (full, 1/2, 1/4
    resolution) and ``decoder-1..3`` = ``up_tr128``, ``up_tr64``, ``up_tr32`` (1/4, 1/2, full), the same
    resolution pattern as the FCN's. As for the FCN, the default probe (``kind="conv"``) of a stage is its last
    convolution, the ``nn.Conv3d`` of the last ``LUConv`` (``<stage>.ops[-1].conv_block.conv``; ``in_tr`` has one,
    ``in_tr.conv_block.conv``): convolution output before the batch normalisation, the in-place ELU and the
    residual addition. ``kind="residual"`` gives the stage modules (their output: ELU of the residual sum).
    Input ``(B, in_channels, D, H, W)`` with each size divisible by 16.
    """

    ENCODER = ("in_tr", "down_tr32", "down_tr64", "down_tr128", "down_tr256")
    DECODER = ("up_tr256", "up_tr128", "up_tr64", "up_tr32", "out_tr")
    PROBES = (
        ("encoder-1", "in_tr"),
        ("encoder-2", "down_tr32"),
        ("encoder-3", "down_tr64"),
        ("decoder-1", "up_tr128"),
        ("decoder-2", "up_tr64"),
        ("decoder-3", "up_tr32"),
    )
    divisor = 16

    def __init__(self, in_channels: int = 1, out_channels: int = 2, dropout: float = 0.1) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout,
            dropout_prob_down=dropout,
            dropout_prob_up=(dropout, dropout),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        #: With frozen encoder parameters autograd already skips the encoder's backward pass; MONAI's forward
        #: interleaves the sections, so (unlike :class:`KarimiFCN`) the encoder is not run under ``no_grad``.
        self.encoder_frozen = False
        self.frozen_norms: list[nn.Module] = []
        for m in self.modules():  # MONAI hard-codes 0.5 on the skip connections of up_tr64 and up_tr32
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = float(dropout)
        self.apply(he_truncated_normal_)

    def train(self, mode: bool = True) -> "VNet":
        super().train(mode)
        for m in self.frozen_norms:
            m.eval()
        return self

    def _section(self, names: tuple[str, ...]) -> Iterator[nn.Parameter]:
        for name in names:
            yield from getattr(self, name).parameters()

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of ``in_tr`` and the ``down_tr*`` stages."""
        return self._section(self.ENCODER)

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the ``up_tr*`` stages and the head ``out_tr``."""
        return self._section(self.DECODER)

    def head_names(self) -> tuple[str, ...]:
        """State-dict keys of the head ``out_tr`` (its convolutions and normalisation depend on the class count)."""
        return tuple(k for k in self.state_dict() if k.startswith("out_tr."))

    def probe_modules(self, kind: str = "conv") -> "OrderedDict[str, nn.Module]":
        """The six analysed layers (see the class docstring): ``kind="conv"`` (default) the last convolution of
        each stage, ``kind="residual"`` the stage modules."""
        stages = OrderedDict((p, getattr(self, m)) for p, m in self.PROBES)
        if kind == "residual":
            return stages
        if kind != "conv":
            raise ValueError(f"Unknown probe kind {kind!r}: use 'conv' or 'residual'.")
        out = OrderedDict()
        for p, mod in stages.items():  # the last LUConv's conv (in_tr: its only conv), never the up/down conv
            block = mod.ops[-1].conv_block if hasattr(mod, "ops") and len(mod.ops) else mod.conv_block
            out[p] = block.conv
        return out

    def probe_filters(self) -> "OrderedDict[str, nn.Module]":
        """For each probe stage, its last convolution (for the filter pictures): ``probe_modules("conv")``."""
        return self.probe_modules("conv")


def count_convs(module: nn.Module) -> int:
    """Number of ``Conv3d`` / ``ConvTranspose3d`` modules inside ``module``."""
    return sum(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in module.modules())


def build_network(
    name: str = "karimi_fcn",
    in_channels: int = 1,
    out_channels: int = 2,
    features: int = 14,
    levels: int = 4,
    dropout: float = 0.1,
) -> nn.Module:
    """Build a network by name: ``"karimi_fcn"`` (the paper's Fig. 1, :class:`KarimiFCN`) or ``"vnet"``
    (:class:`VNet`; ``features`` and ``levels`` do not apply to it)."""
    if name == "karimi_fcn":
        return KarimiFCN(in_channels, out_channels, features, levels, dropout)
    if name == "vnet":
        return VNet(in_channels, out_channels, dropout)
    raise ValueError(f"Unknown network name {name!r}; choose 'karimi_fcn' or 'vnet'.")


def spatial_divisor(network: nn.Module) -> int:
    """The number every spatial input size must be divisible by (8 for the paper's FCN, 16 for V-Net)."""
    return int(getattr(unwrap(network), "divisor", 16))
