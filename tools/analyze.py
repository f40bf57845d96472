#!/usr/bin/env python3
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Representation analyses of Karimi et al. (Figs. 6-10, Tables VII-VIII) on bundle run folders.

Subcommands (each writes CSV and Markdown/PNG into --out; see common/analysis.py and common/figures.py for the definitions):

  evolution      RUN [RUN ...]            RSIM of every snapshot vs the convergence epoch (Figs. 6-7)
  similarity     --ri RUN ... --tl RUN ...  RSIM between pairs of converged runs + Welch t-tests (Table VII)
  feature_reuse  --ri RUN ... --tl RUN ...  mean RSIM(init, converged) of T.L. minus R.I. (Table VIII)
  filter_change  RUN [RUN ...]            relative change of the conv weights, init -> convergence
  filters        RUN [RUN ...]            pictures of filters at init / convergence / difference (Figs. 8-9)
  feature_maps   RUN [RUN ...]            pictures of feature maps of one block (Fig. 10)
  all            --ri ... --tl ... [--evolution RUN ...]   everything above

A RUN is a run folder, a run name under --runs_dir (default <bundle>/runs), or LABEL=PATH. The runs
must have been trained with the bundle's SnapshotSaver (save_snapshots true, the default).

Probes (--probe): conv (default) records the output of the last convolution of each of the six probed blocks,
before its activation (the paper's "values of the convolutional layer neurons"; the filter pictures show the
same convolutions); residual records the blocks' outputs (the residual sums). The blocks have the runs'
training block size unless --block_size is given; every layer gets >= --points_per_channel (1000) data points
per channel; every table prints the random floor (RSIM of independent Gaussians of the same shapes). Each
network is forwarded once per command (its sampled activations are kept; --no_cache to recompute per pair).
The network and the preprocessing come from the bundle's training config (--config, default
<bundle>/configs/train.json) with the same overrides as training (--set KEY=VALUE, e.g.
--set network_def#features=4).

Example (tiny runs):
  python tools/analyze.py --bundle bundles/liver_ct_from_liver_mri --set network_def#features=4 \\
      --n_blocks 2 --points_per_channel 100 --out runs/analysis evolution train finetune
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUNDLE = os.path.join(REPO, "bundles", "liver_ct_from_liver_mri")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), _value(v)


def _block(text: str) -> list[int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--block_size takes N or N,N,N, got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("setup")
    g.add_argument("--bundle", default=DEFAULT_BUNDLE, help="bundle folder (default: %(default)s)")
    g.add_argument("--config", nargs="+", default=None,
                   help="training config file(s) of the runs, layered (default: <bundle>/configs/train.json)")
    g.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE",
                   help="config override used in training, JSON value (repeatable), e.g. network_def#features=4")
    g.add_argument("--runs_dir", default=None, help="folder of the run folders (default: <bundle>/runs)")
    g.add_argument("--out", default=None, help="output folder (default: <runs_dir>/analysis)")
    g.add_argument("--images", default=None,
                   help="images for the blocks: datalist/dataset JSON, folder or file (default: test cases of the first run)")
    g.add_argument("--layers", default=None, help="comma-separated probe layers (default: encoder-1..3, decoder-1..3)")
    g.add_argument("--probe", choices=["conv", "residual"], default="conv",
                   help="conv: last convolution of each probed block, before its activation (default); "
                        "residual: the block outputs (residual sums)")
    g.add_argument("--block_size", type=_block, default=None,
                   help="N or N,N,N, divisible by 8 (default: the runs' training block size, else the config's)")
    g.add_argument("--n_blocks", type=int, default=8, help="blocks per layer at least (default: %(default)s)")
    g.add_argument("--points_per_channel", type=int, default=1000,
                   help="data points per channel (of the wider side) and layer (default: %(default)s)")
    g.add_argument("--max_blocks", type=int, default=4096, help="most blocks per layer (default: %(default)s)")
    g.add_argument("--chunk", type=int, default=8, help=argparse.SUPPRESS)
    g.add_argument("--no_cache", action="store_true",
                   help="forward both networks of every pair again instead of keeping each network's activations")
    g.add_argument("--cache_gib", type=float, default=1.0,
                   help="RAM for the kept activations in GiB; beyond it they go to a temporary folder (default: %(default)s)")
    g.add_argument("--floor_draws", type=int, default=5,
                   help="draws of independent Gaussians per random-floor value (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of blocks and voxel subsampling (default: %(default)s)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--which", default="convergence",
                   help="the 'converged' model: convergence (default), best (model.pt), last, or an epoch number")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")

    p = argparse.ArgumentParser(
        prog="analyze.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("evolution", parents=[common], help="RSIM of every snapshot vs the convergence epoch (Figs. 6-7)")
    s.add_argument("runs", nargs="+", help="run folders / names / LABEL=PATH")
    s.add_argument("--direction", choices=["x", "y", "mean"], default="x",
                   help="RSIM weights: x = snapshot side (default), y = convergence side, mean = both averaged")

    for name, helptext in (("similarity", "RSIM between pairs of runs and Welch t-tests (Table VII)"),
                           ("feature_reuse", "feature reuse per layer (Table VIII)")):
        s = sub.add_parser(name, parents=[common], help=helptext)
        s.add_argument("--ri", nargs="+", required=True, help="R.I. (from scratch) runs")
        s.add_argument("--tl", nargs="+", required=True, help="T.L. (fine-tuned) runs")
        s.add_argument("--direction", choices=["x", "y", "mean"], default="mean",
                       help="RSIM weights: mean of both directions (default), x = first run / init, y = second / converged")
        if name == "similarity":
            s.add_argument("--alpha", type=float, default=0.05, help="t-test significance level (default: %(default)s)")
        else:
            s.add_argument("--title", default="feature reuse", help="row label of the Markdown table")

    s = sub.add_parser("filter_change", parents=[common], help="relative change of conv weights, init -> convergence")
    s.add_argument("runs", nargs="+")
    s = sub.add_parser("filters", parents=[common], help="filter pictures at init / convergence / difference (Figs. 8-9)")
    s.add_argument("runs", nargs="+")
    s.add_argument("--filter_layers", default=",".join(("encoder-1", "encoder-3", "decoder-1", "decoder-3")),
                   help="comma-separated layers, one row each (default: %(default)s)")
    s.add_argument("--n_filters", type=int, default=4)
    s = sub.add_parser("feature_maps", parents=[common], help="feature maps of one block (Fig. 10)")
    s.add_argument("runs", nargs="+")
    s.add_argument("--map_layers", default="encoder-1,encoder-2,encoder-3", help="comma-separated layers (default: %(default)s)")
    s.add_argument("--n_channels", type=int, default=4)
    s.add_argument("--block_index", type=int, default=0)

    s = sub.add_parser("all", parents=[common], help="every analysis")
    s.add_argument("--ri", nargs="+", required=True)
    s.add_argument("--tl", nargs="+", required=True)
    s.add_argument("--evolution", nargs="+", default=None, help="runs for the evolution (default: --ri and --tl runs)")
    s.add_argument("--alpha", type=float, default=0.05)
    s.add_argument("--title", default="feature reuse")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from common.io import utf8_console

    utf8_console()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from common import analysis, capture, figures

    config = args.config or [os.path.join(args.bundle, "configs", "train.json")]
    runs_dir = args.runs_dir or os.path.join(args.bundle, "runs")
    out = args.out or os.path.join(runs_dir, "analysis")
    which = int(args.which) if str(args.which).isdigit() else args.which
    setup = capture.make_setup(
        config, dict(args.overrides), images=args.images, layers=args.layers, block_size=args.block_size,
        n_blocks=args.n_blocks, points_per_channel=args.points_per_channel, max_blocks=args.max_blocks,
        seed=args.seed, device=args.device, chunk=args.chunk, progress=not args.quiet, probe=args.probe,
        cache=not args.no_cache, cache_bytes=int(args.cache_gib * (1 << 30)), floor_draws=args.floor_draws,
    )
    kw = {"runs_dir": runs_dir}
    cmd = args.command
    t0 = time.perf_counter()
    if cmd == "evolution":
        analysis.evolution(setup, args.runs, out, direction=args.direction, **kw)
    elif cmd == "similarity":
        analysis.similarity(setup, args.ri, args.tl, out, which=which, direction=args.direction, alpha=args.alpha, **kw)
    elif cmd == "feature_reuse":
        analysis.feature_reuse(setup, args.ri, args.tl, out, which=which, direction=args.direction, title=args.title, **kw)
    elif cmd == "filter_change":
        analysis.filter_change_runs(setup, args.runs, out, which=which, **kw)
    elif cmd == "filters":
        layers = [x.strip() for x in args.filter_layers.split(",") if x.strip()]
        for r in args.runs:
            figures.plot_filters(setup, r, layers=layers, n_filters=args.n_filters, which=which, out_dir=out, **kw)
    elif cmd == "feature_maps":
        layers = [x.strip() for x in args.map_layers.split(",") if x.strip()]
        for r in args.runs:
            figures.plot_feature_maps(setup, r, layers=layers, n_channels=args.n_channels,
                                       block_index=args.block_index, which=which, out_dir=out, **kw)
    elif cmd == "all":
        analysis.run_analyses(setup, "all", out, evolution_runs=args.evolution or args.ri + args.tl, ri_runs=args.ri,
                              tl_runs=args.tl, reuse_title=args.title, alpha=args.alpha, which=which, **kw)
    if cmd not in ("all", "filter_change", "filters", "feature_maps"):
        from common.io import write_json

        info = analysis.analysis_info(setup, {cmd: round(time.perf_counter() - t0, 3)})
        write_json(os.path.join(out, "analysis_info.json"), info)
    print(f"Outputs in {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
