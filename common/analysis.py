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

Analyses (each writes CSV, and Markdown tables or PNG figures, into ``out_dir``; every table and figure title
says which probes were used and gives the **random floor** beside the RSIM values: per layer, the RSIM of
independent Gaussian representations with the same number of data points and channels, the mean of
``setup.floor_draws`` draws through the same PWCCA code, :func:`common.rsim.random_floor`; ``rsim_floor.csv``):

``evolution``  (Figs. 6-7) for every run, RSIM of each snapshot against the run's convergence-epoch
    snapshot at the six layers. RSIM is PWCCA **weighted by the snapshot's side** (``x`` = snapshot,
    ``y`` = convergence snapshot); the CSV also has the other weighting (``rsim_reverse``) and linear
    CKA. ``evolution.csv`` (run, epoch, layer, rsim, rsim_reverse, cka, convergence_epoch, val_dice, floor,
    n_points, probe_kind) and ``evolution.png`` (a panel per layer, x = epoch, one line per run, a star at each
    convergence epoch, where RSIM = 1, the floor dashed).
``similarity``  (Table VII) RSIM between the converged models of every pair of runs, within the
    R.I. group, within the T.L. group and across. RSIM is asymmetric: each pair is computed in both
    directions (one set of moments gives both) and **the two are averaged** (``rsim``; ``rsim_ab`` weights by
    the first run, ``rsim_ba`` by the second). Mean and sample std (ddof=1) per layer and group, and
    **Welch's** t-tests (unequal variances, two-sided, ``scipy.stats.ttest_ind(equal_var=False)``) between the
    three groups of pair values at ``alpha`` = 0.05. ``similarity_pairs.csv``, ``similarity_summary.csv``,
    ``similarity_ttests.csv``, ``similarity.md``.
``feature_reuse``  (Table VIII, after Raghu et al. 2019) per layer, the mean over T.L. runs of
    RSIM(init snapshot, converged model) minus the same mean over R.I. runs; RSIM symmetrised as in
    ``similarity``; a Welch t-test of the T.L. against the R.I. values (the paper reports none).
    ``feature_reuse_runs.csv``, ``feature_reuse.csv``, ``feature_reuse.md``.
``filter_change``  per convolution (weights only, biases excluded), between the init snapshot and the
    converged model: ``rel_change = ||W_c - W_0||_F / ||W_0||_F``, ``filter_rel_change`` = mean over
    output filters of ``||W_c[j] - W_0[j]|| / ||W_0[j]||`` and ``filter_norm_change`` = mean over
    filters of ``(||W_c[j]|| - ||W_0[j]||) / ||W_0[j]||`` (signed). ``filter_change.csv`` (one row per
    run and conv; ``probe`` names the probe layer whose convolution it is) and ``filter_change.png``.
``filters``  (Figs. 8-9) the central slice of selected filters (input channel 0) of the probe convolutions
    of ``encoder-1, encoder-3, decoder-1, decoder-3`` at init, at convergence and their difference (same grey
    scale per row). ``filters_<run>.png``.
``feature_maps``  (Fig. 10) one image block and the central axial slices of the highest-variance
    channels at chosen layers of the converged model. ``feature_maps_<run>.png``.

Activations (see ``common.capture``): seeded random blocks of the runs' training block size from the
preprocessed test images of the first run (the bundle's deterministic transforms), the same blocks and voxel
indices for every network, at least 1,000 data points per channel by default. Probes: by default
(``probe="conv"``) the output of the last convolution of each of the six probed blocks, before its activation
(the paper's "values of the convolutional layer neurons"); ``probe="residual"``: the blocks' residual sums.
Each network (snapshot) is forwarded once per session and its sampled activations kept
(:class:`common.capture.ActivationCache`), so every analysis and every pair reuses them; the networks are built
from the bundle's ``network_def`` (with the same overrides as training) and run in eval mode.

Entry points: :func:`common.capture.make_setup` / :class:`common.capture.AnalysisSetup`, the functions
named above, and :func:`run_analyses` (used by the bundles' ``configs/rsim.json`` and
``tools/analyze.py``). Run folders are read by :func:`common.runs.load_run`; the figures are drawn by
:mod:`common.figures`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import capture
from .capture import AnalysisSetup, describe_probes
from .checkpoints import checkpoint_state_dict
from .figures import plot_evolution, plot_feature_maps, plot_filter_change, plot_filters
from .io import write_csv, write_json, write_text
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
    "analysis_info",
    "similarity_markdown",
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


def _floor_rows(setup: AnalysisSetup, runs: Sequence[Run], out_dir: str) -> "OrderedDict[str, dict[str, float]]":
    """The per-layer random floors of the setup's plan; writes ``rsim_floor.csv``."""
    floors = setup.floors(runs)
    rows = [{"layer": k, "n_points": int(f["points"]), "channels": int(f["channels"]), "floor_x": f["x"],
             "floor_y": f["y"], "floor_mean": f["mean"], "floor_sd": f["sd"], "draws": int(f["draws"]),
             "probe_kind": setup.probe} for k, f in floors.items()]  # fmt: skip
    write_csv(os.path.join(out_dir, "rsim_floor.csv"), rows)
    return floors


def _floor_value(floor: Mapping[str, float], direction: str) -> float:
    return float(floor["mean" if direction == "mean" else direction])


def _header(setup: AnalysisSetup, runs: Sequence[Run], floors: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The lines every table opens with: probes, data points, the floor's definition."""
    draws = next(iter(floors.values()))["draws"] if floors else setup.floor_draws
    return [
        f"{setup.probe_text()[0].upper()}{setup.probe_text()[1:]}.",
        "",
        f"{setup.plan(runs).summary()[0].upper()}{setup.plan(runs).summary()[1:]}.",
        "",
        f"Random floor: RSIM of independent Gaussian representations with the same number of data points and "
        f"channels per layer (mean ± sd of {draws} draws through the same PWCCA code): what RSIM reads for two "
        "representations that share nothing.",
        "",
    ]


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

    ``direction="x"`` (default): weights from the snapshot's side. Every snapshot is captured once (the session's
    activation cache). Writes ``evolution.csv``, ``rsim_floor.csv`` and ``evolution.png``; returns the rows.
    """
    runs = _runs(runs, runs_dir)
    if not runs:
        raise ValueError("evolution needs at least one run.")
    os.makedirs(out_dir, exist_ok=True)
    plan = setup.plan(runs)
    floors = _floor_rows(setup, runs, out_dir)
    rows: list[dict[str, Any]] = []
    for run in runs:
        ref_path = run.weights("convergence")
        conv = run.epoch_of("convergence")
        epochs = sorted(run.snapshots)
        logger.info("Evolution of %s: %d snapshots against convergence epoch %s.", run.name, len(epochs), conv)
        for e in setup.tqdm(epochs, desc=f"evolution {run.name}", unit="snapshot"):
            for layer, a in setup.pair_moments(run.snapshots[e], ref_path, runs).items():
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
                        "floor": _floor_value(floors[layer], direction),
                        "n_points": plan.layers[layer].points,
                        "probe_kind": setup.probe,
                    }
                )
        logger.info("Evolution of %s done.", run.name)
    write_csv(os.path.join(out_dir, "evolution.csv"), rows)
    plot_evolution(rows, os.path.join(out_dir, "evolution.png"), probes=describe_probes(setup.probe, setup.layers, short=True))
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


def similarity_markdown(
    summary: Sequence[Mapping[str, Any]],
    tests: Sequence[Mapping[str, Any]],
    alpha: float = 0.05,
    floors: Mapping[str, Mapping[str, float]] | None = None,
    header: Sequence[str] = (),
) -> str:
    """Table VII as Markdown: mean ± sd per group and layer, the random floor (``floors``: layer -> ``{"mean",
    "sd"}``) and the Welch t-test p-values; ``header`` lines (probes, data points) come first."""
    layers = list(OrderedDict.fromkeys(s["layer"] for s in summary))
    get = {(s["layer"], s["group"]): s for s in summary}
    lines = [
        "Similarity of representations between pairs of converged networks (cf. Karimi et al., Table VII).",
        "RSIM = PWCCA, averaged over both weighting directions of each pair; mean ± sample std over pairs.",
        "",
        *header,
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
    if floors:
        cells = [f"{_fmt(floors[l]['mean'])} ± {_fmt(floors[l]['sd'])}" if l in floors else "n/a" for l in layers]
        lines.append("| random floor (independent Gaussians) | " + " | ".join(cells) + " |")
    lines += ["", f"Welch's t-tests (unequal variances, two-sided; scipy.stats.ttest_ind with equal_var=False) between "
              f"the groups of pair values; * p < {alpha}.", ""]  # fmt: skip
    lines += ["| p-value (Welch) | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
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
    T.L./T.L. and R.I./T.L. (Table VII), with Welch t-tests between the groups. ``direction="mean"`` averages
    the two weightings of each pair. Every model is captured once (the session's activation cache).
    Returns ``{"pairs", "summary", "tests", "floors"}`` and writes the CSVs, ``rsim_floor.csv`` and ``similarity.md``."""
    members = _group_members(ri_runs, tl_runs, runs_dir, "similarity")
    allr = [r for _, r in members]
    os.makedirs(out_dir, exist_ok=True)
    plan = setup.plan(allr)
    floors = _floor_rows(setup, allr, out_dir)
    wanted: list[tuple[int, int, str]] = []
    for i in range(len(members)):
        for j in range(i + 1, len(members)):
            gi, gj = members[i][0], members[j][0]
            group = f"{gi}-{gj}" if gi == gj or gi == "RI" else f"{gj}-{gi}"
            wanted.append((i, j, group))
    paths = [r.weights(which) for _, r in members]
    logger.info("Similarity: %d runs, %d pairs.", len(members), len(wanted))
    pairs: list[dict[str, Any]] = []
    for i, j, g in setup.tqdm(wanted, desc="similarity pairs", unit="pair"):
        accs = setup.pair_moments(paths[j], paths[i], allr)  # x = run j, y = run i
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
                    "floor": _floor_value(floors[layer], direction),
                    "n_points": plan.layers[layer].points,
                    "probe_kind": setup.probe,
                }
            )
    layers = list(OrderedDict.fromkeys(p["layer"] for p in pairs))
    summary, tests = summarize_similarity(pairs, layers, alpha)
    for row in summary:
        row["floor"] = _floor_value(floors[row["layer"]], direction)
        row["probe_kind"] = setup.probe
    for row in tests:
        row["test"] = "Welch"
    for g in ("RI-RI", "TL-TL"):
        if not any(p["group"] == g for p in pairs):
            logger.warning("Similarity: no %s pairs (a group needs at least 2 runs).", g)
    table_floors = {k: {"mean": _floor_value(f, direction), "sd": f["sd"]} for k, f in floors.items()}
    write_csv(os.path.join(out_dir, "similarity_pairs.csv"), pairs)
    write_csv(os.path.join(out_dir, "similarity_summary.csv"), summary)
    write_csv(os.path.join(out_dir, "similarity_ttests.csv"), tests)
    write_text(os.path.join(out_dir, "similarity.md"),
               similarity_markdown(summary, tests, alpha, table_floors, _header(setup, allr, floors)))  # fmt: skip
    return {"pairs": pairs, "summary": summary, "tests": tests, "floors": floors}


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
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Feature reuse per layer (Table VIII): mean over T.L. runs of RSIM(init snapshot, converged model)
    minus the mean over R.I. runs, with a Welch t-test of the T.L. against the R.I. values (NaN with fewer than
    two runs in a group). Returns ``{"runs": rows per run and layer, "reuse": rows per layer, "floors"}``."""
    members = _group_members(ri_runs, tl_runs, runs_dir, "feature_reuse")
    allr = [r for _, r in members]
    os.makedirs(out_dir, exist_ok=True)
    plan = setup.plan(allr)
    floors = _floor_rows(setup, allr, out_dir)
    rows: list[dict[str, Any]] = []
    for group, run in setup.tqdm(members, desc="feature reuse", unit="run"):
        acc = setup.pair_moments(run.weights("init"), run.weights(which), allr)  # x = init, y = converged
        logger.info("Feature reuse: %s run %s done.", group, run.name)
        for layer, a in acc.items():
            v = rsim_values(a, direction)
            rows.append(
                {"group": group, "run": run.name, "layer": layer, "rsim": v["rsim"], "rsim_init_weighted": v["x"],
                 "rsim_converged_weighted": v["y"], "cka": v["cka"], "converged_epoch": run.epoch_of(which),
                 "floor": _floor_value(floors[layer], direction), "n_points": plan.layers[layer].points,
                 "probe_kind": setup.probe}
            )  # fmt: skip
    layers = list(OrderedDict.fromkeys(r["layer"] for r in rows))
    reuse = []
    for layer in layers:
        m = {g: [r["rsim"] for r in rows if r["layer"] == layer and r["group"] == g] for g in ("TL", "RI")}
        mt, mr = float(np.nanmean(m["TL"])), float(np.nanmean(m["RI"]))
        t, p = welch_ttest(m["TL"], m["RI"])
        reuse.append({"layer": layer, "mean_rsim_tl": mt, "mean_rsim_ri": mr, "reuse": mt - mr, "n_tl": len(m["TL"]),
                      "n_ri": len(m["RI"]), "welch_t": t, "welch_p": p, "floor": _floor_value(floors[layer], direction),
                      "probe_kind": setup.probe})  # fmt: skip
    write_csv(os.path.join(out_dir, "feature_reuse_runs.csv"), rows)
    write_csv(os.path.join(out_dir, "feature_reuse.csv"), reuse)
    n_tl, n_ri = sum(g == "TL" for g, _ in members), sum(g == "RI" for g, _ in members)
    pcell = lambda p: "n/a" if not math.isfinite(p) else f"{p:.3g}{'*' if p < alpha else ''}"  # noqa: E731
    md = [
        "Feature reuse per layer (cf. Karimi et al., Table VIII): mean over T.L. runs of RSIM(init, converged) "
        "minus the mean over R.I. runs; RSIM = PWCCA averaged over both weighting directions.",
        "",
        *_header(setup, allr, floors),
        "| | " + " | ".join(layers) + " |",
        "|---|" + "---|" * len(layers),
        f"| {title} (T.L. n={n_tl}, R.I. n={n_ri}) | " + " | ".join(_fmt(r["reuse"]) for r in reuse) + " |",
        "| mean RSIM(init, converged), T.L. | " + " | ".join(_fmt(r["mean_rsim_tl"]) for r in reuse) + " |",
        "| mean RSIM(init, converged), R.I. | " + " | ".join(_fmt(r["mean_rsim_ri"]) for r in reuse) + " |",
        "| random floor (independent Gaussians) | "
        + " | ".join(f"{_fmt(r['floor'])} ± {_fmt(floors[r['layer']]['sd'])}" for r in reuse) + " |",
        "| p-value, Welch's t-test T.L. vs R.I. | " + " | ".join(pcell(r["welch_p"]) for r in reuse) + " |",
        "",
        f"Welch's t-test (unequal variances, two-sided; scipy.stats.ttest_ind with equal_var=False) of the T.L. runs' "
        f"RSIM(init, converged) against the R.I. runs'; * p < {alpha}; n/a with fewer than 2 runs in a group.",
    ]
    write_text(os.path.join(out_dir, "feature_reuse.md"), "\n".join(md) + "\n")
    return {"runs": rows, "reuse": reuse, "floors": floors}


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
            rows.append({"run": run.name, "index": i, **r, "converged_epoch": run.epoch_of(which),
                         "probe_kind": setup.probe})  # fmt: skip
    write_csv(os.path.join(out_dir, "filter_change.csv"), rows)
    plot_filter_change(rows, os.path.join(out_dir, "filter_change.png"),
                       probes=describe_probes(setup.probe, setup.layers, short=True))  # fmt: skip
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
    seconds: dict[str, float] = {}
    for name in analyses:
        logger.info("Analysis %s -> %s", name, out_dir)
        t0 = time.perf_counter()
        if name == "evolution":
            results[name] = evolution(setup, evolution_runs, out_dir, runs_dir=runs_dir)
        elif name == "similarity":
            results[name] = similarity(setup, ri_runs, tl_runs, out_dir, which=which, alpha=alpha, runs_dir=runs_dir)
        elif name == "feature_reuse":
            results[name] = feature_reuse(setup, ri_runs, tl_runs, out_dir, which=which, title=reuse_title,
                                          runs_dir=runs_dir, alpha=alpha)  # fmt: skip
        elif name == "filter_change":
            results[name] = filter_change_runs(setup, filter_runs, out_dir, which=which, runs_dir=runs_dir)
        elif name == "filters":
            results[name] = [plot_filters(setup, r, which=which, out_dir=out_dir, runs_dir=runs_dir) for r in picture_runs]
        elif name == "feature_maps":
            results[name] = [plot_feature_maps(setup, r, which=which, out_dir=out_dir, runs_dir=runs_dir) for r in picture_runs]
        seconds[name] = round(time.perf_counter() - t0, 3)
    results["info"] = analysis_info(setup, seconds)
    write_json(os.path.join(out_dir, "analysis_info.json"), results["info"])
    return results


def analysis_info(setup: AnalysisSetup, seconds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The settings an analysis session ran with (probes, blocks, data points per layer, random floors, networks
    captured) and ``seconds`` per analysis: ``analysis_info.json``."""
    plan = setup._plan
    info: dict[str, Any] = {
        "probe_kind": setup.probe,
        "probes": setup.probe_text(),
        "block_size": list(setup.block_size) if setup.block_size is not None else None,
        "block_size_source": setup.block_size_source,
        "points_per_channel": setup.points_per_channel,
        "cache": setup.use_cache,
        "networks_captured": setup.cache.captures,
        "seconds": dict(seconds or {}),
        "total_seconds": round(sum((seconds or {}).values()), 3),
    }
    if plan is not None:
        floors = setup.floors()
        info["layers"] = [{"layer": lp.name, "channels": lp.channels, "n_points": lp.points, "blocks": lp.blocks,
                           "floor": floors[lp.name]["mean"]} for lp in plan.layers.values()]  # fmt: skip
    return info
