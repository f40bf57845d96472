# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The paper's representation analyses (Karimi et al., Sections II-C, III-E, III-F; Figs. 6-10,
Tables VII-VIII), on run folders written by the bundles.

A run folder (``runs/<run_name>``) holds ``datalist.json`` (its test cases give the image blocks),
``model.pt`` and, when trained with ``save_snapshots`` (``common.handlers.SnapshotSaver``),
``snapshots/epoch_XXXX.pt`` (``epoch_0000`` = the weights when training started: He init for R.I.,
the loaded source weights for T.L.) and ``snapshots/history.json`` (validation DSC per snapshot).
The convergence epoch is the first epoch whose validation DSC is ``>= 0.995 x`` the best
(:func:`common.handlers.convergence_epoch`); "the converged model" is that epoch's snapshot (runs
without snapshots fall back to ``model.pt``, the best-validation model, for the similarity analysis).

Analyses (each writes CSV, and Markdown tables or PNG figures, into ``out_dir``):

``evolution``  (Figs. 6-7) for every run, RSIM of each snapshot against the run's convergence-epoch
    snapshot at the six layers. RSIM is PWCCA **weighted by the snapshot's side** (``x`` = snapshot,
    ``y`` = convergence snapshot); the CSV also has the other weighting (``rsim_reverse``) and linear
    CKA. ``evolution.csv`` (run, epoch, layer, rsim, rsim_reverse, cka, convergence_epoch, val_dice)
    and ``evolution.png`` (a panel per layer, x = epoch, one line per run, a star at each convergence
    epoch, where RSIM = 1).
``similarity``  (Table VII) RSIM between the converged models of every pair of runs, within the
    R.I. group, within the T.L. group and across. RSIM is asymmetric: each pair is computed in both
    directions (one pass gives both) and **the two are averaged** (``rsim``; ``rsim_ab`` weights by
    the first run, ``rsim_ba`` by the second). Mean and sample std (ddof=1) per layer and group, and
    Welch t-tests (``scipy.stats.ttest_ind(equal_var=False)``) between the three groups of pair
    values at ``alpha`` = 0.05. ``similarity_pairs.csv``, ``similarity_summary.csv``,
    ``similarity_ttests.csv``, ``similarity.md``.
``feature_reuse``  (Table VIII, after Raghu et al. 2019) per layer, the mean over T.L. runs of
    RSIM(init snapshot, converged model) minus the same mean over R.I. runs; RSIM symmetrised as in
    ``similarity``. ``feature_reuse_runs.csv``, ``feature_reuse.csv``, ``feature_reuse.md``.
``filter_change``  per convolution (weights only, biases excluded), between the init snapshot and the
    converged model: ``rel_change = ||W_c - W_0||_F / ||W_0||_F``, ``filter_rel_change`` = mean over
    output filters of ``||W_c[j] - W_0[j]|| / ||W_0[j]||`` and ``filter_norm_change`` = mean over
    filters of ``(||W_c[j]|| - ||W_0[j]||) / ||W_0[j]||`` (signed). ``filter_change.csv`` (one row per
    run and conv; ``probe`` names the probe layer a conv produces) and ``filter_change.png``.
``filters``  (Figs. 8-9) the central slice of selected filters (input channel 0) of the convs
    producing ``encoder-1, encoder-3, decoder-1, decoder-3`` at init, at convergence and their
    difference (same grey scale per row). ``filters_<run>.png``.
``feature_maps``  (Fig. 10) one image block and the central axial slices of the highest-variance
    channels at chosen layers of the converged model. ``feature_maps_<run>.png``.

Activations (see ``common.capture``): seeded random blocks (96^3) from the preprocessed test images of
the first run (the bundle's deterministic transforms), the same blocks and voxel indices for both
networks, at least 100 data points per channel by default, streamed into moment accumulators. The
networks are built from the bundle's ``network_def`` (with the same overrides as training) and run in
eval mode. Probe names: ``encoder-1..3`` / ``decoder-1..3`` (the networks' ``probe_modules()``), or any
``named_modules()`` name.

Entry points: :func:`common.capture.make_setup` / :class:`common.capture.AnalysisSetup`, the functions
named above, and :func:`run_analyses` (used by the bundles' ``configs/rsim.json`` and
``tools/analyze.py``). Run folders are read by :func:`common.runs.load_run`; the figures are drawn by
:mod:`common.figures`.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import capture
from .capture import AnalysisSetup
from .checkpoints import checkpoint_state_dict
from .figures import plot_evolution, plot_feature_maps, plot_filter_change, plot_filters
from .io import write_csv, write_text
from .networks import unwrap
from .runs import Run, load_run

__all__ = [
    "ANALYSES",
    "rsim_values",
    "evolution",
    "similarity",
    "summarize_similarity",
    "welch_ttest",
    "feature_reuse",
    "filter_change",
    "filter_change_runs",
    "run_analyses",
]

logger = logging.getLogger(__name__)

ANALYSES = ("evolution", "similarity", "feature_reuse", "filter_change", "filters", "feature_maps")
GROUPS = ("RI-RI", "TL-TL", "RI-TL")
_GROUP_LABEL = {"RI-RI": "RSIM(R.I., R.I.)", "TL-TL": "RSIM(T.L., T.L.)", "RI-TL": "RSIM(R.I., T.L.)"}


# ---------------------------------------------------------------------------------------------- helpers
def _measure(acc, what: str) -> float:
    try:
        if what == "x":
            return float(acc.pwcca())
        if what == "y":
            return float(capture.swap(acc).pwcca())
        if what == "cka":
            return float(acc.linear_cka())
    except ValueError as err:
        logger.warning("RSIM undefined (%s): %s", what, err)
        return float("nan")
    raise ValueError(what)


def rsim_values(acc, direction: str = "mean") -> dict[str, float]:
    """``{"x": RSIM weighted by x, "y": weighted by y, "mean": their mean, "cka": linear CKA}`` and
    ``"rsim"`` = the one selected by ``direction``."""
    x, y = _measure(acc, "x"), _measure(acc, "y")
    out = {"x": x, "y": y, "mean": 0.5 * (x + y), "cka": _measure(acc, "cka")}
    if direction not in ("x", "y", "mean"):
        raise ValueError(f"direction must be 'x', 'y' or 'mean', got {direction!r}")
    out["rsim"] = out[direction]
    return out


def _runs(specs: Sequence[str | Run] | None, runs_dir: str | None = None) -> list[Run]:
    return [load_run(s, runs_dir) for s in (specs or [])]


def _fmt(v: float, nd: int = 3) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"


# ---------------------------------------------------------------------------------------------- evolution
def evolution(
    setup: AnalysisSetup,
    runs: Sequence[str | Run],
    out_dir: str,
    direction: str = "x",
    runs_dir: str | None = None,
) -> list[dict[str, Any]]:
    """RSIM of every snapshot of every run against the run's convergence-epoch snapshot (Figs. 6-7).

    ``direction="x"`` (default): weights from the snapshot's side. Writes ``evolution.csv`` and
    ``evolution.png``; returns the rows.
    """
    runs = _runs(runs, runs_dir)
    if not runs:
        raise ValueError("evolution needs at least one run.")
    rows: list[dict[str, Any]] = []
    for run in runs:
        ref_path = run.weights("convergence")
        conv = run.epoch_of("convergence")
        epochs = sorted(run.snapshots)
        logger.info("Evolution of %s: %d snapshots against convergence epoch %s.", run.name, len(epochs), conv)
        ref = setup.network(ref_path)
        bar = setup.tqdm(range(0, len(epochs), setup.chunk), desc=f"evolution {run.name}", unit="chunk")
        for start in bar:
            chunk = epochs[start : start + setup.chunk]
            nets = [setup.network(run.snapshots[e]) for e in chunk]
            accs = setup.moments(nets, ref, runs)
            for e, acc in zip(chunk, accs):
                for layer, a in acc.items():
                    v = rsim_values(a, direction)
                    rows.append(
                        {
                            "run": run.name,
                            "epoch": e,
                            "layer": layer,
                            "rsim": v["rsim"],
                            "rsim_reverse": v["y" if direction == "x" else "x"],
                            "cka": v["cka"],
                            "convergence_epoch": conv,
                            "val_dice": run.val_dice(e),
                        }
                    )
            del nets
            logger.info("Evolution of %s: epochs %d-%d done.", run.name, chunk[0], chunk[-1])
    write_csv(os.path.join(out_dir, "evolution.csv"), rows)
    plot_evolution(rows, os.path.join(out_dir, "evolution.png"))
    return rows


# ---------------------------------------------------------------------------------------------- similarity
def welch_ttest(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-test (``scipy.stats.ttest_ind(a, b, equal_var=False)``); NaN when a group has < 2 values."""
    from scipy import stats

    a = [float(v) for v in a if v is not None and math.isfinite(float(v))]
    b = [float(v) for v in b if v is not None and math.isfinite(float(v))]
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def summarize_similarity(
    pairs: Sequence[Mapping[str, Any]], layers: Sequence[str] | None = None, alpha: float = 0.05
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """From pair rows (``layer``, ``group`` in RI-RI/TL-TL/RI-TL, ``rsim``): the summary rows
    (layer, group, mean, std (ddof=1), n) and the Welch t-test rows (layer, group_a, group_b, t, p,
    significant at ``alpha``)."""
    layers = list(layers or OrderedDict.fromkeys(p["layer"] for p in pairs))
    vals = {(l, g): [float(p["rsim"]) for p in pairs if p["layer"] == l and p["group"] == g] for l in layers for g in GROUPS}
    summary, tests = [], []
    for l in layers:
        for g in GROUPS:
            v = np.array([x for x in vals[(l, g)] if math.isfinite(x)])
            summary.append(
                {
                    "layer": l,
                    "group": g,
                    "mean": float(v.mean()) if v.size else float("nan"),
                    "std": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
                    "n": int(v.size),
                }
            )
        for ga, gb in (("RI-RI", "TL-TL"), ("RI-RI", "RI-TL"), ("TL-TL", "RI-TL")):
            t, p = welch_ttest(vals[(l, ga)], vals[(l, gb)])
            tests.append({"layer": l, "group_a": ga, "group_b": gb, "t": t, "p": p, "significant": bool(p < alpha) if math.isfinite(p) else ""})
    return summary, tests


def similarity_markdown(summary: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]], alpha: float = 0.05) -> str:
    layers = list(OrderedDict.fromkeys(s["layer"] for s in summary))
    get = {(s["layer"], s["group"]): s for s in summary}
    lines = [
        "Similarity of representations between pairs of converged networks (cf. Karimi et al., Table VII).",
        "RSIM = PWCCA, averaged over both weighting directions of each pair; mean ± sample std over pairs.",
        "",
        "| | " + " | ".join(layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for g in GROUPS:
        cells = []
        for l in layers:
            s = get[(l, g)]
            cells.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])}" if s["n"] else "n/a")
        n = get[(layers[0], g)]["n"] if layers else 0
        lines.append(f"| {_GROUP_LABEL[g]} (n={n}) | " + " | ".join(cells) + " |")
    lines += ["", f"Welch t-tests (unequal variances) between the groups of pair values; * p < {alpha}.", ""]
    lines += ["| p-value | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for ga, gb in (("RI-RI", "TL-TL"), ("RI-RI", "RI-TL"), ("TL-TL", "RI-TL")):
        cells = []
        for l in layers:
            t = next(x for x in tests if x["layer"] == l and x["group_a"] == ga and x["group_b"] == gb)
            p = t["p"]
            cells.append("n/a" if not math.isfinite(p) else f"{p:.3g}{'*' if p < alpha else ''}")
        lines.append(f"| {_GROUP_LABEL[ga]} vs {_GROUP_LABEL[gb]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _group_members(
    ri_runs: Sequence[str | Run], tl_runs: Sequence[str | Run], runs_dir: str | None, analysis: str
) -> list[tuple[str, Run]]:
    """``[("RI", run), ..., ("TL", run), ...]``; at least one run of each group is required."""
    ri, tl = _runs(ri_runs, runs_dir), _runs(tl_runs, runs_dir)
    if not ri or not tl:
        raise ValueError(f"{analysis} needs at least one R.I. run and one T.L. run.")
    return [("RI", r) for r in ri] + [("TL", r) for r in tl]


def similarity(
    setup: AnalysisSetup,
    ri_runs: Sequence[str | Run],
    tl_runs: Sequence[str | Run],
    out_dir: str,
    which: str | int = "convergence",
    direction: str = "mean",
    alpha: float = 0.05,
    runs_dir: str | None = None,
) -> dict[str, Any]:
    """RSIM between the ``which`` models (default: convergence epoch) of all pairs of runs: R.I./R.I.,
    T.L./T.L. and R.I./T.L. (Table VII). ``direction="mean"`` averages the two weightings of each pair.
    Returns ``{"pairs", "summary", "tests"}`` and writes the CSVs and ``similarity.md``."""
    members = _group_members(ri_runs, tl_runs, runs_dir, "similarity")
    wanted: list[tuple[int, int, str]] = []
    for i in range(len(members)):
        for j in range(i + 1, len(members)):
            gi, gj = members[i][0], members[j][0]
            group = f"{gi}-{gj}" if gi == gj or gi == "RI" else f"{gj}-{gi}"
            wanted.append((i, j, group))
    paths = [r.weights(which) for _, r in members]
    # one pass per reference model, comparing it with every later model it is paired with
    by_ref: OrderedDict[str, list[tuple[int, int, str]]] = OrderedDict()
    for i, j, g in wanted:
        by_ref.setdefault(paths[i], []).append((i, j, g))
    cache: dict[tuple[str, str], Any] = {}
    allr = [r for _, r in members]
    total = sum(len(v) for v in by_ref.values())
    logger.info("Similarity: %d runs, %d pairs.", len(members), total)
    bar = setup.tqdm(total=total, desc="similarity pairs", unit="pair")
    for ref_path, items in by_ref.items():
        others = list(
            OrderedDict.fromkeys(
                paths[j] for _, j, _ in items if (ref_path, paths[j]) not in cache and (paths[j], ref_path) not in cache
            )
        )
        if not others:
            continue
        ref = setup.network(ref_path)
        for s in range(0, len(others), setup.chunk):
            part = others[s : s + setup.chunk]
            accs = setup.moments([setup.network(p) for p in part], ref, allr)
            for p, acc in zip(part, accs):
                cache[(ref_path, p)] = acc
                bar.update(sum(1 for _, j, _ in items if paths[j] == p))
    bar.close()
    pairs: list[dict[str, Any]] = []
    for i, j, g in wanted:
        if (paths[i], paths[j]) in cache:
            accs = cache[(paths[i], paths[j])]  # x = run j, y = run i
        else:  # computed the other way round (the same model in both groups)
            accs = OrderedDict((k, capture.swap(a)) for k, a in cache[(paths[j], paths[i])].items())
        for layer, acc in accs.items():
            v = rsim_values(acc, "mean")
            val = {"mean": v["mean"], "x": v["y"], "y": v["x"]}[direction]  # x/y of the pair = runs i/j
            pairs.append(
                {
                    "layer": layer,
                    "group": g,
                    "run_a": members[i][1].name,
                    "run_b": members[j][1].name,
                    "rsim": val,
                    "rsim_ab": v["y"],
                    "rsim_ba": v["x"],
                    "cka": v["cka"],
                }
            )
    layers = list(OrderedDict.fromkeys(p["layer"] for p in pairs))
    summary, tests = summarize_similarity(pairs, layers, alpha)
    for g in ("RI-RI", "TL-TL"):
        if not any(p["group"] == g for p in pairs):
            logger.warning("Similarity: no %s pairs (a group needs at least 2 runs).", g)
    write_csv(os.path.join(out_dir, "similarity_pairs.csv"), pairs)
    write_csv(os.path.join(out_dir, "similarity_summary.csv"), summary)
    write_csv(os.path.join(out_dir, "similarity_ttests.csv"), tests)
    write_text(os.path.join(out_dir, "similarity.md"), similarity_markdown(summary, tests, alpha))
    return {"pairs": pairs, "summary": summary, "tests": tests}


# ---------------------------------------------------------------------------------------------- feature reuse
def feature_reuse(
    setup: AnalysisSetup,
    ri_runs: Sequence[str | Run],
    tl_runs: Sequence[str | Run],
    out_dir: str,
    which: str | int = "convergence",
    direction: str = "mean",
    title: str = "feature reuse",
    runs_dir: str | None = None,
) -> dict[str, Any]:
    """Feature reuse per layer (Table VIII): mean over T.L. runs of RSIM(init snapshot, converged model)
    minus the mean over R.I. runs. Returns ``{"runs": rows per run and layer, "reuse": rows per layer}``."""
    members = _group_members(ri_runs, tl_runs, runs_dir, "feature_reuse")
    allr = [r for _, r in members]
    rows: list[dict[str, Any]] = []
    for group, run in setup.tqdm(members, desc="feature reuse", unit="run"):
        init = setup.network(run.weights("init"))
        conv = setup.network(run.weights(which))
        acc = setup.moments([init], conv, allr)[0]  # x = init, y = converged
        logger.info("Feature reuse: %s run %s done.", group, run.name)
        for layer, a in acc.items():
            v = rsim_values(a, direction)
            rows.append(
                {"group": group, "run": run.name, "layer": layer, "rsim": v["rsim"], "rsim_init_weighted": v["x"],
                 "rsim_converged_weighted": v["y"], "cka": v["cka"], "converged_epoch": run.epoch_of(which)}
            )
    layers = list(OrderedDict.fromkeys(r["layer"] for r in rows))
    reuse = []
    for layer in layers:
        m = {g: [r["rsim"] for r in rows if r["layer"] == layer and r["group"] == g] for g in ("TL", "RI")}
        mt, mr = float(np.nanmean(m["TL"])), float(np.nanmean(m["RI"]))
        reuse.append({"layer": layer, "mean_rsim_tl": mt, "mean_rsim_ri": mr, "reuse": mt - mr, "n_tl": len(m["TL"]), "n_ri": len(m["RI"])})
    write_csv(os.path.join(out_dir, "feature_reuse_runs.csv"), rows)
    write_csv(os.path.join(out_dir, "feature_reuse.csv"), reuse)
    md = [
        "Feature reuse per layer (cf. Karimi et al., Table VIII): mean over T.L. runs of RSIM(init, converged) "
        "minus the mean over R.I. runs; RSIM = PWCCA averaged over both weighting directions.",
        "",
        "| | " + " | ".join(layers) + " |",
        "|---|" + "---|" * len(layers),
        f"| {title} (T.L. n={sum(g == 'TL' for g, _ in members)}, R.I. n={sum(g == 'RI' for g, _ in members)}) | " + " | ".join(_fmt(r["reuse"]) for r in reuse) + " |",
    ]
    write_text(os.path.join(out_dir, "feature_reuse.md"), "\n".join(md) + "\n")
    return {"runs": rows, "reuse": reuse}


# ---------------------------------------------------------------------------------------------- filter change
def _state(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return unwrap(obj).state_dict()
    if isinstance(obj, (str, os.PathLike)):
        return checkpoint_state_dict(os.fspath(obj))
    return dict(obj)


def _conv_kinds(network: nn.Module | None) -> dict[str, bool]:
    """Conv weight key -> True for a transposed conv."""
    if network is None:
        return {}
    net = unwrap(network)
    return {f"{n}.weight": isinstance(m, nn.modules.conv._ConvTransposeNd) for n, m in net.named_modules() if isinstance(m, capture._CONVS)}


def filter_change(init: Any, converged: Any, network: nn.Module | None = None) -> list[dict[str, Any]]:
    """Relative change of the convolution weights between ``init`` and ``converged`` (networks, state dicts
    or files), one row per conv: ``conv`` (module name), ``probe`` (the probe layer it produces, if any),
    ``rel_change``, ``filter_rel_change``, ``filter_norm_change`` (see the module docstring), ``n_filters``.

    ``network`` (or ``init``/``converged`` when they are modules) tells the conv modules apart (transposed
    convs keep their output filters on axis 1); without one, every weight of >= 3 dimensions is taken as a
    conv with its output filters on axis 0.
    """
    net = network if network is not None else (init if isinstance(init, nn.Module) else converged if isinstance(converged, nn.Module) else None)
    s0, s1 = _state(init), _state(converged)
    kinds = _conv_kinds(net)
    probes: dict[str, str] = {}
    if net is not None:
        try:
            mods = {id(m): n for n, m in unwrap(net).named_modules()}
            probes = {f"{mods[id(m)]}.weight": p for p, m in capture.probe_filters(net).items()}
        except ValueError:
            probes = {}
    keys = [k for k in s0 if k in kinds] if kinds else [k for k, v in s0.items() if k.endswith("weight") and v.ndim >= 3]
    rows = []
    for k in keys:
        if k not in s1:
            raise KeyError(f"{k} is missing from the converged weights.")
        w0, w1 = s0[k].detach().double().cpu(), s1[k].detach().double().cpu()
        if w0.shape != w1.shape:
            raise ValueError(f"{k}: shapes differ, {tuple(w0.shape)} vs {tuple(w1.shape)}.")
        if kinds.get(k, False):
            w0, w1 = w0.transpose(0, 1), w1.transpose(0, 1)
        n0 = float(w0.norm())
        f0 = w0.reshape(w0.shape[0], -1).norm(dim=1)
        f1 = w1.reshape(w1.shape[0], -1).norm(dim=1)
        fd = (w1 - w0).reshape(w0.shape[0], -1).norm(dim=1)
        ok = f0 > 0
        rows.append(
            {
                "conv": k[: -len(".weight")],
                "probe": probes.get(k, ""),
                "rel_change": float((w1 - w0).norm()) / n0 if n0 > 0 else float("nan"),
                "filter_rel_change": float((fd[ok] / f0[ok]).mean()) if ok.any() else float("nan"),
                "filter_norm_change": float(((f1[ok] - f0[ok]) / f0[ok]).mean()) if ok.any() else float("nan"),
                "n_filters": int(w0.shape[0]),
            }
        )
    return rows


def filter_change_runs(
    setup: AnalysisSetup,
    runs: Sequence[str | Run],
    out_dir: str,
    which: str | int = "convergence",
    runs_dir: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`filter_change` between the init snapshot and the ``which`` model of each run; writes
    ``filter_change.csv`` and ``filter_change.png`` (relative change per conv, one bar series per run,
    the probe layers' convs labelled)."""
    runs = _runs(runs, runs_dir)
    template = setup.network_factory()
    rows = []
    for run in setup.tqdm(runs, desc="filter change", unit="run"):
        for i, r in enumerate(filter_change(run.weights("init"), run.weights(which), template)):
            rows.append({"run": run.name, "index": i, **r, "converged_epoch": run.epoch_of(which)})
    write_csv(os.path.join(out_dir, "filter_change.csv"), rows)
    plot_filter_change(rows, os.path.join(out_dir, "filter_change.png"))
    return rows


# ---------------------------------------------------------------------------------------------- driver
def run_analyses(
    setup: AnalysisSetup,
    analyses: Sequence[str] | str,
    out_dir: str,
    runs_dir: str | None = None,
    evolution_runs: Sequence[str] = (),
    ri_runs: Sequence[str] = (),
    tl_runs: Sequence[str] = (),
    filter_runs: Sequence[str] | None = None,
    picture_runs: Sequence[str] | str | None = None,
    reuse_title: str = "feature reuse",
    alpha: float = 0.05,
    which: str | int = "convergence",
) -> dict[str, Any]:
    """Run the named analyses (``"all"`` or a list from :data:`ANALYSES`); returns their results by name.

    Runs are names under ``runs_dir`` or paths. ``filter_runs`` default to the evolution runs, then the
    R.I. + T.L. runs; ``picture_runs`` (filters, feature maps) default to the filter runs. ``which``
    selects "the converged model" (see :meth:`Run.weights`) for every analysis but the evolution.
    """
    if isinstance(analyses, str):
        analyses = list(ANALYSES) if analyses == "all" else [a.strip() for a in analyses.split(",") if a.strip()]
    bad = [a for a in analyses if a not in ANALYSES]
    if bad:
        raise ValueError(f"Unknown analyses {bad}; choose from {list(ANALYSES)} or 'all'.")
    filter_runs = list(filter_runs or evolution_runs or list(ri_runs) + list(tl_runs))
    if isinstance(picture_runs, str):
        picture_runs = [picture_runs]
    picture_runs = list(picture_runs or filter_runs)
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, Any] = {}
    for name in analyses:
        logger.info("Analysis %s -> %s", name, out_dir)
        if name == "evolution":
            results[name] = evolution(setup, evolution_runs, out_dir, runs_dir=runs_dir)
        elif name == "similarity":
            results[name] = similarity(setup, ri_runs, tl_runs, out_dir, which=which, alpha=alpha, runs_dir=runs_dir)
        elif name == "feature_reuse":
            results[name] = feature_reuse(setup, ri_runs, tl_runs, out_dir, which=which, title=reuse_title, runs_dir=runs_dir)
        elif name == "filter_change":
            results[name] = filter_change_runs(setup, filter_runs, out_dir, which=which, runs_dir=runs_dir)
        elif name == "filters":
            results[name] = [plot_filters(setup, r, which=which, out_dir=out_dir, runs_dir=runs_dir) for r in picture_runs]
        elif name == "feature_maps":
            results[name] = [plot_feature_maps(setup, r, which=which, out_dir=out_dir, runs_dir=runs_dir) for r in picture_runs]
    return results
