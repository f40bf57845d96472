# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""A study's report: the paper's tables, curves, analyses and findings, computed from the study's own runs.

:func:`write_report` (called by :func:`common.study.run_study`) writes ``<study>/report/``:

* ``report.md``: what was run (bundle, sizes, seeds, modes, blocks, iterations, network); a table per
  training-set size of mean ± sample standard deviation over seeds of test DSC, HD95 and ASSD in mm (and
  lesion-count F1 for lesion tasks), like the paper's Tables II-VI; paired t-tests between modes (runs of one
  size and seed share the split and the seed, so they are paired: ``scipy.stats.ttest_rel``, two-sided); the
  convergence of each mode (the paper's rule: the first epoch whose validation DSC is within 0.5 % of the best;
  iterations and training seconds to it, validation time apart); the representation analyses
  (:func:`common.analysis.run_analyses`: RSIM evolution, similarity with Welch t-tests, feature reuse, filter
  change, filter pictures) with the random floor of the RSIM values; one line per headline finding of the paper
  saying whether this study reproduces it, computed here from the numbers above;
* ``curves_n<size>.png``: test DSC against iterations and against training seconds for each mode (mean over
  seeds, one thin line per seed) (Figs. 2, 4, 11);
* ``runs.csv``: one row per run (metrics, convergence, times).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from .health import STALLED_FRACTION
from .io import write_csv, write_text

__all__ = ["write_report", "paired_test", "findings", "failed_runs_section"]

logger = logging.getLogger(__name__)

METRICS = (("dice", "DSC"), ("hd95", "HD95 (mm)"), ("assd", "ASSD (mm)"), ("f1", "lesion F1"))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _fmt(m: float, s: float | None = None, nd: int = 3) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{nd}f}" + ("" if s is None or not math.isfinite(s) else f" ± {s:.{nd}f}")


def paired_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, int]:
    """Paired two-sided t-test (``scipy.stats.ttest_rel``) of ``a`` against ``b`` (same length, paired by
    position); returns ``(mean difference a - b, p, n)``, p NaN when fewer than 2 pairs or no variation."""
    from scipy import stats

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    n = len(pairs)
    if n == 0:
        return float("nan"), float("nan"), 0
    d = np.asarray([x - y for x, y in pairs])
    if n < 2 or np.allclose(d, d[0]):
        return float(d.mean()), float("nan"), n
    res = stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs])
    return float(d.mean()), float(res.pvalue), n


def _label(mode: str) -> str:
    from .study import MODES

    return MODES[mode][0] if mode in MODES else mode


def _by(rows: Sequence[Mapping[str, Any]], n: Any, mode: str) -> list[Mapping[str, Any]]:
    return sorted((r for r in rows if r["n_train"] == n and r["mode"] == mode), key=lambda r: r["seed"])


def _size(n: Any) -> str:
    return "all" if n is None else str(n)


def accuracy_tables(rows: Sequence[Mapping[str, Any]], sizes: Sequence[Any], modes: Sequence[str],
                    failed: Sequence[Mapping[str, Any]] = ()) -> list[str]:  # fmt: skip
    """Markdown tables of mean ± std over seeds per size and mode, and the paired tests against R.I.; ``rows`` are
    the runs that trained (the ``failed`` ones are only counted, in the runs column)."""
    metrics = [(k, t) for k, t in METRICS if any(k in r for r in rows)]
    lines = []
    for n in sizes:
        lines += [f"### n_train = {_size(n)}", "", "| mode | runs | " + " | ".join(t for _, t in metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]  # fmt: skip
        for mode in modes:
            rs = _by(rows, n, mode)
            cells = [_fmt(*_mean_std([r.get(k) for r in rs]), nd=2 if k != "dice" and k != "f1" else 3) for k, _ in metrics]
            k = len(_by(failed, n, mode))
            lines.append(f"| {_label(mode)} | {len(rs)}{f' (+{k} failed, left out)' if k else ''} | " + " | ".join(cells) + " |")
        ref = "ri" if "ri" in modes else modes[0]
        others = [m for m in modes if m != ref]
        if others:
            lines += ["", f"Paired t-tests against {_label(ref)} (pairs: the same split and seed; two-sided; "
                      "scipy.stats.ttest_rel): mean difference, p.", "",  # fmt: skip
                      "| mode | " + " | ".join(t for _, t in metrics) + " |", "|---|" + "---|" * len(metrics)]
            for mode in others:
                a, b = _by(rows, n, mode), _by(rows, n, ref)
                seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in b})
                cells = []
                for k, _ in metrics:
                    x = [next(r.get(k) for r in a if r["seed"] == s) for s in seeds]
                    y = [next(r.get(k) for r in b if r["seed"] == s) for s in seeds]
                    d, p, m = paired_test(x, y)
                    cells.append(f"{d:+.3f}, p={p:.3g} (n={m})" if math.isfinite(p) else f"{d:+.3f} (n={m}, no test)")
                lines.append(f"| {_label(mode)} vs {_label(ref)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def convergence_table(rows: Sequence[Mapping[str, Any]], sizes: Sequence[Any], modes: Sequence[str]) -> list[str]:
    lines = ["| n_train | mode | convergence epoch | iterations to it | training s to it | training s (all) | validation s (all) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for n in sizes:
        for mode in modes:
            rs = _by(rows, n, mode)
            cells = [_fmt(*_mean_std([r.get(k) for r in rs]), nd=1) for k in
                     ("convergence_epoch", "convergence_iteration", "convergence_seconds", "train_seconds", "val_seconds")]  # fmt: skip
            lines.append(f"| {_size(n)} | {_label(mode)} | " + " | ".join(cells) + " |")
    return lines


def _read_curve(path: str) -> list[dict[str, float]]:
    with open(path, encoding="utf-8") as f:
        return [{k: float(v) if v not in ("", "None") else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]


def plot_curves(jobs: Sequence[Any], sizes: Sequence[Any], modes: Sequence[str], out_dir: str,
                failed: Collection[str] = ()) -> list[str]:  # fmt: skip
    """``curves_n<size>.png``: test DSC against iterations and against training seconds, per mode; the runs named in
    ``failed`` are drawn dotted and left out of the mean."""
    from .figures import _figure, _save_figure
    from .study import CURVE_FILE

    paths = []
    for n in sizes:
        fig = _figure(11.0, 4.2)
        ax_it, ax_s = fig.subplots(1, 2)
        for k, mode in enumerate(modes):
            runs = [j for j in jobs if j.mode == mode and j.n_train == n and os.path.isfile(os.path.join(j.run_dir, CURVE_FILE))]
            color = f"C{k % 10}"
            for j in runs:
                if j.name in failed:
                    c = _read_curve(os.path.join(j.run_dir, CURVE_FILE))
                    for ax, key in ((ax_it, "iteration"), (ax_s, "train_seconds")):
                        ax.plot([r[key] for r in c], [r.get("test_dice", float("nan")) for r in c], color=color, lw=0.8, ls=":")
            curves = [_read_curve(os.path.join(j.run_dir, CURVE_FILE)) for j in runs if j.name not in failed]
            if not curves:
                continue
            for c in curves:
                ax_it.plot([r["iteration"] for r in c], [r.get("test_dice", float("nan")) for r in c], color=color, lw=0.6, alpha=0.4)
                ax_s.plot([r["train_seconds"] for r in c], [r.get("test_dice", float("nan")) for r in c], color=color, lw=0.6, alpha=0.4)
            length = min(len(c) for c in curves)
            mean = lambda key: np.nanmean([[r.get(key, float("nan")) for r in c[:length]] for c in curves], axis=0)  # noqa: E731
            ax_it.plot(mean("iteration"), mean("test_dice"), color=color, lw=2, label=_label(mode))
            ax_s.plot(mean("train_seconds"), mean("test_dice"), color=color, lw=2, label=_label(mode))
        for ax, xl in ((ax_it, "training iterations"), (ax_s, "training time (s; validation excluded)")):
            ax.set_xlabel(xl)
            ax.set_ylabel("test DSC")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        ax_it.legend(fontsize=8, loc="lower right")
        fig.suptitle(f"Test DSC during training, n_train = {_size(n)} (thin: each seed; thick: mean"
                     + ("; dotted: failed runs, not in the mean)" if failed else ")"))
        fig.tight_layout()
        paths.append(_save_figure(fig, os.path.join(out_dir, f"curves_n{_size(n)}.png")))
    return paths


#: The ids of a study's overrides that the analyses take over from the target runs: the network and what the
#: preprocessing does to an image (the analyses must see the images the networks were trained on).
ANALYSIS_IDS = ("network_def", "pixdim", "modality", "ct_window", "block_size")


def _analysis_results(settings: Any, jobs: Sequence[Any], root: str, failed: Collection[str] = ()) -> dict[str, Any]:
    """The representation analyses across the study's runs (largest size, every seed; not the ``failed`` ones)."""
    from . import analysis
    from .capture import make_setup

    target = [j for j in jobs if j.mode != "pretrain" and j.name not in failed]
    sizes = list(dict.fromkeys(j.n_train for j in target))
    n = max(sizes, key=lambda x: float("inf") if x is None else x)
    ri = [j.run_dir for j in target if j.mode == "ri" and j.n_train == n]
    tl = [j.run_dir for j in target if j.mode == "tl" and j.n_train == n]
    evo = [j.run_dir for j in target if j.n_train == n and j.seed == target[0].seed]
    if not (ri and tl):
        return {}
    files = [os.path.join(settings.bundle_dir, "configs", "train.json")]
    given = {**settings.overrides, **settings.target}  # what the target runs were trained with
    overrides = {k: v for k, v in given.items() if k.startswith(ANALYSIS_IDS)}
    setup = make_setup(files, overrides, **{"progress": True, **settings.analysis_overrides})
    out = os.path.join(root, "analysis")
    return analysis.run_analyses(setup, settings.analyses, out, evolution_runs=evo, ri_runs=ri, tl_runs=tl,
                                 filter_runs=ri[:1] + tl[:1], picture_runs=ri[:1] + tl[:1],
                                 reuse_title=os.path.basename(settings.bundle_dir))  # fmt: skip


def findings(rows: Sequence[Mapping[str, Any]], sizes: Sequence[Any], analyses: Mapping[str, Any]) -> list[str]:
    """One line per headline finding of the paper: reproduced or not by this study, from its own numbers."""
    out = []

    def mean(mode: str, key: str, n: Any = None) -> float:
        rs = [r for r in rows if r["mode"] == mode and (n is None or r["n_train"] == n)]
        return _mean_std([r.get(key) for r in rs])[0]

    def pairs(mode_a: str, mode_b: str, key: str, n: Any = None) -> tuple[float, float, int]:
        a = {(r["n_train"], r["seed"]): r.get(key) for r in rows if r["mode"] == mode_a and (n is None or r["n_train"] == n)}
        b = {(r["n_train"], r["seed"]): r.get(key) for r in rows if r["mode"] == mode_b and (n is None or r["n_train"] == n)}
        keys = sorted(set(a) & set(b), key=str)
        return paired_test([a[k] for k in keys], [b[k] for k in keys])

    def verdict(ok: bool | None, p: float = float("nan")) -> str:
        if ok is None:
            return "not tested"
        if not ok:
            return "NOT reproduced"
        if math.isfinite(p) and p < 0.05:
            return "REPRODUCED (significant at 0.05)"
        return "same direction as the paper, not significant" + (" (too few pairs for a test)" if not math.isfinite(p) else "")

    modes = {r["mode"] for r in rows}
    if {"ri", "tl"} <= modes:
        d, p, n = pairs("tl", "ri", "convergence_seconds")
        ok = None if not math.isfinite(d) else d < 0
        out.append(f"- T.L. converges faster than R.I. (paper: Figs. 2, 4): {verdict(ok, p)}: training seconds to the "
                   f"convergence epoch T.L. - R.I. = {d:+.1f} s (paired t-test, n={n}, p={p:.3g}).")
        if len(sizes) >= 2:
            small, large = min(sizes, key=lambda x: float('inf') if x is None else x), max(sizes, key=lambda x: float('inf') if x is None else x)
            g_small = mean("tl", "dice", small) - mean("ri", "dice", small)
            g_large = mean("tl", "dice", large) - mean("ri", "dice", large)
            ok = None if not (math.isfinite(g_small) and math.isfinite(g_large)) else g_small > g_large
            out.append(f"- The accuracy gain of T.L. is small with many training images and larger with few (paper: Tables "
                       f"II-V): {verdict(ok)}: DSC gain {g_large:+.3f} at n_train={_size(large)}, {g_small:+.3f} at "
                       f"n_train={_size(small)} (means over seeds).")
        else:
            d, p, n = pairs("tl", "ri", "dice")
            out.append(f"- The accuracy gain of T.L. is small with many training images and larger with few: not tested "
                       f"(one training-set size); DSC T.L. - R.I. = {d:+.3f} (paired t-test, n={n}, p={p:.3g}).")
    if {"ri", "frozen"} <= modes:
        d, p, n = pairs("frozen", "ri", "dice")
        ok = None if not math.isfinite(d) else abs(d) <= 0.05
        word = "REPRODUCED" if ok else ("not tested" if ok is None else "NOT reproduced")
        out.append(f"- A frozen random encoder comes within a few hundredths of DSC of a trained one (paper: 0.940 vs "
                   f"0.967, 0.884 vs 0.896): {word}: DSC frozen - R.I. = {d:+.3f} (|difference| <= 0.05 counts; "
                   f"paired t-test of the difference, n={n}, p={p:.3g}).")
    evo = analyses.get("evolution") or []
    if evo:
        first = {}
        for r in evo:  # RSIM of the initialisation (epoch 0) with the convergence epoch: how much each layer changed
            if r["epoch"] == 0 and math.isfinite(r["rsim"]):
                first.setdefault(r["layer"], []).append(r["rsim"])
        enc = [np.mean(v) for k, v in first.items() if k.startswith("encoder")]
        dec = [np.mean(v) for k, v in first.items() if k.startswith("decoder")]
        ok = None if not (enc and dec) else float(np.mean(enc)) > float(np.mean(dec))
        out.append(f"- Encoder representations change less than decoder ones during training (paper: Figs. 6-7): "
                   f"{verdict(ok)}: RSIM(initialisation, convergence) encoder {np.mean(enc) if enc else float('nan'):.3f} "
                   f"vs decoder {np.mean(dec) if dec else float('nan'):.3f} (mean over layers and runs; higher = less change).")
    fc = analyses.get("filter_change") or []
    if fc:
        rel = [r["filter_rel_change"] for r in fc if math.isfinite(r["filter_rel_change"])]
        ok = None if not rel else float(np.mean(rel)) < 0.25
        out.append(f"- Filters change little from initialisation to convergence (paper: typically below 25 % of the norm): "
                   f"{verdict(ok)}: mean relative change of the filters {np.mean(rel) if rel else float('nan'):.3f} over "
                   f"{len(rel)} convolutions.")
    reuse = (analyses.get("feature_reuse") or {}).get("reuse") or []
    if reuse:
        from scipy import stats

        vals = [r["reuse"] for r in reuse]
        rho, p = stats.spearmanr(range(len(vals)), vals) if len(vals) > 2 else (float("nan"), float("nan"))
        ok = None if not math.isfinite(rho) else rho > 0
        out.append(f"- Feature reuse can grow with depth (paper: Table VIII): {verdict(ok)}: reuse per layer "
                   + ", ".join(f"{r['layer']} {r['reuse']:+.3f}" for r in reuse)
                   + f"; Spearman rank correlation with depth {rho:+.2f} (p={p:.3g}).")
    return out


def failed_runs_section(failed: Sequence[Mapping[str, Any]], n_runs: int) -> list[str]:
    """The report's "Failed runs" section: every run that collapsed or diverged (or whose model predicts no
    foreground at all), with its reason; these runs are left out of the tables, tests, curves' means, analyses and
    findings. Empty when none failed."""
    if not failed:
        return []
    lines = ["## Failed runs", "",
             f"{len(failed)} of {n_runs} runs failed. They are listed here and left out of every table, test, mean curve, "
             "analysis and finding of this report (common.health: a collapsed network passes no gradient and cannot "
             "learn again; its model.pt is the best network validated before the failure).", "",
             "| run | mode | n_train | seed | status | test DSC of its model.pt | what happened |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in failed:
        d = r.get("dice")
        lines.append(f"| {r['run']} | {_label(r['mode'])} | {_size(r['n_train'])} | {r['seed']} | {r['status']} | "
                     f"{_fmt(d) if isinstance(d, (int, float)) else 'n/a'} | {r['failure']} |")  # fmt: skip
    return lines + [""]


def _overrides_text(overrides: Mapping[str, Any]) -> str:
    """``id=value`` pairs of config overrides, in a stable order; ``none`` when there are none."""
    return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(overrides.items())) or "none"


def write_report(settings: Any, jobs: Sequence[Any], root: str) -> str:
    """Write ``<root>/report/`` (see the module docstring); returns the path of ``report.md``."""
    from .study import job_table

    out_dir = os.path.join(root, "report")
    os.makedirs(out_dir, exist_ok=True)
    all_rows = job_table(jobs)
    write_csv(os.path.join(out_dir, "runs.csv"), all_rows)
    rows = [r for r in all_rows if not r["failed"]]  # a failed run is never averaged into a table
    failed = [r for r in all_rows if r["failed"]]
    sizes = list(dict.fromkeys(j.n_train for j in jobs if j.mode != "pretrain"))
    modes = [m for m in settings.modes]
    curves = plot_curves(jobs, sizes, modes, out_dir, failed={r["run"] for r in failed})
    try:
        analyses = _analysis_results(settings, jobs, root, failed={r["run"] for r in failed})
    except Exception as err:  # the analyses must not lose the report of the runs
        logger.warning("The representation analyses failed: %s", err)
        analyses = {"error": f"{type(err).__name__}: {err}"}
    train = json.load(open(os.path.join(settings.bundle_dir, "configs", "train.json"), encoding="utf-8"))
    ov = settings.overrides
    lines = [
        f"# Study report: {os.path.basename(os.path.normpath(settings.bundle_dir))}",
        "",
        settings.description or "",
        "",
        "## What was run",
        "",
        f"- Modes: {', '.join(_label(m) for m in modes)}; training-set sizes: {', '.join(_size(n) for n in sizes)}; "
        f"seeds: {', '.join(str(s) for s in settings.seeds)} (the seed sets the split and the initialisation; runs of "
        f"one size and seed are paired).",
        f"- Network: {train['network_def']['_target_']} with features {ov.get('network_def#features', train['network_def'].get('features'))}"
        f"; blocks {ov.get('block_size', train['block_size'])}; voxels {ov.get('pixdim', train['pixdim'])} mm; "
        f"{ov.get('max_epochs', train['max_epochs'])} epochs x {ov.get('iterations_per_epoch', train['iterations_per_epoch'])} "
        f"iterations (the paper: 96^3 blocks, about 100 epochs x 200 iterations).",
        f"- Added to the paper's method (issue 18, the bundle docs' \"Training stability\"): a linear learning-rate "
        f"warm-up over the first {ov.get('lr_warmup_iterations', train.get('lr_warmup_iterations', 0))} iterations "
        f"(lr_warmup_iterations); a penalty on each voxel's logit spread beyond "
        f"{ov.get('logit_range_limit', train.get('logit_range_limit'))} added to the soft Dice, zero inside it "
        f"(logit_range_limit; 0 or null: the paper's loss); a run "
        f"whose network passes no gradient on {STALLED_FRACTION:.0%} of its last "
        f"{ov.get('health_patience', train.get('health_patience'))} training batches with foreground (a saturated "
        f"softmax), or whose loss is not finite, stops as failed (common.health).",
        f"- Every run's overrides of the bundle's defaults: {_overrides_text(ov)}; the source run's own: "
        f"{_overrides_text(settings.pretrain_overrides)}.",
        f"- Data: target {settings.target.get('dataset_dir', train['dataset_dir'])}; source "
        f"{settings.source.get('dataset_dir', 'the bundle default') if settings.source_checkpoint is None else settings.source_checkpoint}.",
        "",
        *failed_runs_section(failed, len(all_rows)),
        "## Test accuracy (mean ± sample std over seeds)",
        "",
        *accuracy_tables(rows, sizes, modes, failed),
        "## Convergence (the paper's rule: first epoch within 0.5 % of the best validation DSC)",
        "",
        *convergence_table(rows, sizes, modes),
        "",
        "## Test DSC against iterations and training time",
        "",
        *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in curves],
        "",
        "## Representation analyses",
        "",
    ]
    if "error" in analyses:
        lines.append(f"Not computed: {analyses['error']}")
    elif not analyses:
        lines.append("Not computed: they need R.I. and T.L. runs.")
    else:
        adir = os.path.join(root, "analysis")
        for name in ("similarity.md", "feature_reuse.md"):
            path = os.path.join(adir, name)
            if os.path.isfile(path):
                lines += [open(path, encoding="utf-8").read(), ""]
        for png in sorted(f for f in os.listdir(adir) if f.endswith(".png")):
            lines.append(f"![{png}](../analysis/{png})")
    lines += ["", "## The paper's findings, tested on this study's numbers", ""]
    if failed:
        lines.append(f"- Failed runs: {len(failed)} of {len(all_rows)} "
                     f"({', '.join(r['run'] for r in failed)}) are left out of every line below (see \"Failed runs\").")  # fmt: skip
    lines += [*findings(rows, sizes, analyses), ""]
    return write_text(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")
