# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The PNG figures of the representation analyses (Karimi et al., Figs. 6-10).

* :func:`plot_evolution`: RSIM of each snapshot against the convergence epoch, a panel per layer (Figs. 6-7);
* :func:`plot_filter_change`: relative change of every convolution's weights, init -> convergence;
* :func:`plot_filters` / :func:`filters_figure`: selected filters at init, at convergence and their
  difference (Figs. 8-9), of the probe convolutions (``common.capture.probe_filters``: the last convolution of
  each probed block, whose output is the default RSIM probe);
* :func:`plot_feature_maps`: feature maps of one image block (Fig. 10).

Figures are drawn with matplotlib's object API on an Agg canvas (no display, no global state) and saved
as PNG; the numbers behind them are in the CSV files of :mod:`common.analysis`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import capture
from .runs import Run, load_run

__all__ = [
    "FILTER_LAYERS",
    "FEATURE_MAP_LAYERS",
    "plot_evolution",
    "plot_filter_change",
    "plot_filters",
    "filters_figure",
    "plot_feature_maps",
]

logger = logging.getLogger(__name__)

#: Rows of the filter pictures (the paper's Fig. 8).
FILTER_LAYERS = ("encoder-1", "encoder-3", "decoder-1", "decoder-3")
#: Layers of the feature-map picture (the paper's Fig. 10 shows the encoder).
FEATURE_MAP_LAYERS = ("encoder-1", "encoder-2", "encoder-3")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: str) -> str:
    from .io import atomic_path

    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    logger.info("Wrote %s.", path)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_evolution(rows: Sequence[Mapping[str, Any]], path: str, title: str | None = None, probes: str | None = None) -> str:
    """One panel per layer, x = epoch, y = RSIM against the convergence epoch, one line per run; a star
    marks each run's convergence epoch; a dashed grey line the random floor of the layer (rows' ``floor``, when
    given); ``probes`` (e.g. ``common.capture.describe_probes(..., short=True)``) goes into the title."""
    layers = list(OrderedDict.fromkeys(r["layer"] for r in rows))
    runs = list(OrderedDict.fromkeys(r["run"] for r in rows))
    ncol = min(3, max(1, len(layers)))
    nrow = math.ceil(len(layers) / ncol)
    fig = _figure(4.2 * ncol, 3.2 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for k, layer in enumerate(layers):
        ax = axes[k // ncol][k % ncol]
        for run, c in zip(runs, colors):
            pts = sorted((r["epoch"], r["rsim"], r.get("convergence_epoch")) for r in rows if r["run"] == run and r["layer"] == layer)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=c, lw=1.5, label=run)
            conv = pts[0][2]
            hit = [p for p in pts if p[0] == conv]
            if hit:
                ax.plot([hit[0][0]], [hit[0][1]], "*", color=c, ms=12, mec="k", mew=0.6)
        floor = [float(r["floor"]) for r in rows if r["layer"] == layer and r.get("floor") is not None]
        if floor and math.isfinite(floor[0]):
            ax.axhline(floor[0], color="0.5", ls="--", lw=1, label="random floor" if k == 0 else None)
        ax.set_title(layer)
        ax.set_xlabel("epoch")
        ax.set_ylabel("RSIM vs convergence epoch")
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
        ax.grid(alpha=0.3)
    for k in range(len(layers), nrow * ncol):
        axes[k // ncol][k % ncol].set_visible(False)
    axes[0][0].legend(fontsize=8, loc="lower right")
    head = title or "Evolution of representations (RSIM with the convergence epoch, marked *; random floor dashed)"
    fig.suptitle(head + (f"\n{probes}" if probes else ""))
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_filter_change(rows: Sequence[Mapping[str, Any]], path: str, probes: str | None = None) -> str:
    """Relative change of every convolution's weights (a bar per run and conv, module order); the convolutions of
    the probe layers labelled (``probes``: which probes, for the title)."""
    runs = list(OrderedDict.fromkeys(r["run"] for r in rows))
    convs = list(OrderedDict.fromkeys(r["conv"] for r in rows))
    probe_of = {r["conv"]: r["probe"] for r in rows if r.get("probe")}
    fig = _figure(max(8.0, 0.22 * len(convs) * max(1, len(runs)) ** 0.5), 4.5)
    ax = fig.subplots()
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(convs))
    for k, run in enumerate(runs):
        v = {r["conv"]: r["rel_change"] for r in rows if r["run"] == run}
        ax.bar(x + (k - (len(runs) - 1) / 2) * width, [v.get(c, np.nan) for c in convs], width, label=run, color=f"C{k % 10}")
    ticks = [i for i, c in enumerate(convs) if c in probe_of]
    ax.set_xticks(ticks)
    ax.set_xticklabels([probe_of[convs[i]] for i in ticks], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("convolution layers in module order (the convs producing the probe layers labelled)")
    ax.set_ylabel(r"$\|W_{conv} - W_{init}\| / \|W_{init}\|$")
    ax.set_title("Relative change of the convolution weights from initialisation to convergence"
                 + (f"\n(labelled: the convolutions of the {probes.replace('probes: ', '')} probes)" if probes else ""),
                 fontsize=10)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


def _filters_2d(conv: nn.Module, picks: Sequence[int]) -> list[np.ndarray]:
    w = conv.weight.detach().double().cpu()
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        w = w.transpose(0, 1)
    out = []
    for j in picks:
        k = w[j, 0]
        while k.ndim > 2:  # central slice along the first spatial axis
            k = k[k.shape[0] // 2]
        out.append(k.numpy())
    return out


def plot_filters(
    setup: capture.AnalysisSetup,
    run: str | Run,
    path: str | None = None,
    layers: Sequence[str] = FILTER_LAYERS,
    n_filters: int = 4,
    which: str | int = "convergence",
    out_dir: str | None = None,
    runs_dir: str | None = None,
) -> str:
    """Selected filters at init, at convergence and their difference (Figs. 8-9): rows = layers, three
    column groups of ``n_filters`` filters (evenly spaced output filters, input channel 0, central slice),
    one grey scale per row. Works for any network whose probe convs ``common.capture.probe_filters`` finds
    (the paper's FCN, MONAI's VNet by module name)."""
    run = load_run(run, runs_dir)
    path = path or os.path.join(out_dir or ".", f"filters_{_safe(run.name)}.png")
    n0, n1 = setup.network(run.weights("init")), setup.network(run.weights(which))
    title = (f"{run.name}: filters at init (epoch 0), convergence (epoch {run.epoch_of(which)}) and difference\n"
             f"rows: the last convolution of each probed block (the conv probes of the RSIM analyses)")  # fmt: skip
    return filters_figure(n0, n1, path, layers, n_filters, title)


def filters_figure(
    init: nn.Module,
    converged: nn.Module,
    path: str,
    layers: Sequence[str] = FILTER_LAYERS,
    n_filters: int = 4,
    title: str = "filters at init, convergence and difference",
) -> str:
    """The picture of :func:`plot_filters` for two networks of the same architecture."""
    f0, f1 = capture.probe_filters(init, list(layers)), capture.probe_filters(converged, list(layers))
    fig = _figure(1.15 * 3 * n_filters + 1.5, 1.3 * len(f0) + 0.8)
    axes = fig.subplots(len(f0), 3 * n_filters, squeeze=False)
    for r, name in enumerate(f0):
        c0, c1 = f0[name], f1[name]
        n_out = c0.weight.shape[1] if isinstance(c0, nn.modules.conv._ConvTransposeNd) else c0.weight.shape[0]
        picks = sorted(set(np.linspace(0, n_out - 1, n_filters).round().astype(int).tolist()))
        a, b = _filters_2d(c0, picks), _filters_2d(c1, picks)
        d = [y - x for x, y in zip(a, b)]
        lim = max(float(np.abs(np.stack(a + b)).max()), 1e-12)
        for g, (imgs, label) in enumerate(((a, "init"), (b, "convergence"), (d, "difference"))):
            for c in range(n_filters):
                ax = axes[r][g * n_filters + c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(imgs):
                    ax.imshow(imgs[c], cmap="gray", vmin=-lim, vmax=lim, interpolation="nearest")
                if r == 0 and c == 0:
                    ax.set_title(label, fontsize=9, loc="left")
                if g == 0 and c == 0:
                    ax.set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)


def plot_feature_maps(
    setup: capture.AnalysisSetup,
    run: str | Run,
    path: str | None = None,
    layers: Sequence[str] = FEATURE_MAP_LAYERS,
    n_channels: int = 4,
    block_index: int = 0,
    which: str | int = "convergence",
    out_dir: str | None = None,
    runs_dir: str | None = None,
) -> str:
    """Feature maps of one image block at ``layers`` of the ``which`` model (Fig. 10): per layer the
    central axial slice (last axis) of the ``n_channels`` channels with the largest variance, beside the
    input block's slice."""
    run = load_run(run, runs_dir)
    path = path or os.path.join(out_dir or ".", f"feature_maps_{_safe(run.name)}.png")
    net = setup.network(run.weights(which))
    block = setup.sampler([run])[block_index].to(setup.device)
    with capture.ActivationRecorder(net, list(layers), setup.probe) as rec:
        outs = rec.run(block)
    fig = _figure(1.9 * (n_channels + 1), 1.9 * len(outs) + 0.6)
    axes = fig.subplots(len(outs), n_channels + 1, squeeze=False)
    img = block[0, 0].cpu().numpy()
    for r, (name, act) in enumerate(outs.items()):
        a = act[0].float().cpu()
        var = a.reshape(a.shape[0], -1).var(dim=1)
        chans = torch.argsort(var, descending=True)[:n_channels].tolist()
        ax = axes[r][0]
        ax.imshow(img[..., img.shape[-1] // 2].T, cmap="gray", origin="lower")
        ax.set_ylabel(name, fontsize=9)
        if r == 0:
            ax.set_title("input", fontsize=9)
        for c in range(n_channels):
            ax = axes[r][c + 1]
            if c < len(chans):
                m = a[chans[c]].numpy()
                ax.imshow(m[..., m.shape[-1] // 2].T, cmap="gray", origin="lower")
                ax.set_title(f"channel {chans[c]}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{run.name}: feature maps (epoch {run.epoch_of(which)}), block {block_index}\n"
                 f"{capture.describe_probes(setup.probe, short=True)}", fontsize=10)  # fmt: skip
    return _save_figure(fig, path)
