#!/usr/bin/env python
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Write small synthetic datasets (Decathlon layout) standing in for every dataset of the paper: no downloads,
seeded (the same seed gives byte-identical arrays).

Each dataset gets ``dataset.json`` (``modality`` names the channels, ``labels`` the label values,
``synthetic`` the generator's parameters and seed), ``imagesTr/*.nii.gz`` (3-D, or 4-D ``(X, Y, Z, C)`` for
several channels) and ``labelsTr/*.nii.gz`` (3-D uint8). Grouped presets (``tsc_centers``, ``cp_fetus``) write
ONE dataset whose training entries carry their ``group`` (``--n`` cases per group) and, with
``--test_per_group K``, ``"split": "test"`` on the first K cases of each group (the fixed test scans).

Examples::

    python tools/make_synthetic.py --list
    python tools/make_synthetic.py --preset liver_mr --out data/Liver-MRI --n 12
    python tools/make_synthetic.py --preset liver_ct --out data/Liver-CT --n 12 --shape 64 64 32 --spacing 1.5 1.5 3
    python tools/make_synthetic.py --preset brats_mr --out data/BRATS --n 10
    python tools/make_synthetic.py --preset prostate_mr --out data/Prostate-T2 --n 8 --channels 1
    python tools/make_synthetic.py --preset lesions_mr_lowq --out data/TSC-center5 --n 8 --noise 2.5
    python tools/make_synthetic.py --preset tsc_centers --out data/TSC --n 6 --test_per_group 2
    python tools/make_synthetic.py --group center1=lesions_mr:20 --group center5=lesions_mr_lowq:8 --out data/TSC2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from common.synthetic import (
    GROUPED_PRESETS,
    PRESET_DESCRIPTIONS,
    SCENARIO_PRESETS,
    make_grouped_dataset,
    make_scenario,
)

_OVERRIDES = ("shape", "spacing", "age", "blur", "downsample", "noise", "lesions", "channels", "subregions")


def _parse_group(text: str) -> tuple[str, str, int]:
    """``NAME=PRESET:N`` -> (name, preset, n)."""
    m = re.fullmatch(r"([A-Za-z0-9_-]+)=([A-Za-z0-9_]+):(\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--group {text!r}: expected NAME=PRESET:N, e.g. center5=lesions_mr_lowq:8")
    if m.group(2) not in SCENARIO_PRESETS:
        raise argparse.ArgumentTypeError(f"--group {text!r}: unknown preset {m.group(2)!r} (see --list)")
    return m.group(1), m.group(2), int(m.group(3))


def _listing(as_json: bool) -> str:
    if as_json:
        out: dict = {n: {"description": PRESET_DESCRIPTIONS.get(n, ""), "spec": s} for n, s in SCENARIO_PRESETS.items()}
        for name, groups in GROUPED_PRESETS.items():
            out[name] = {"description": PRESET_DESCRIPTIONS.get(name, ""),
                         "groups": {g: {"preset": p, "overrides": o} for g, (p, o) in groups.items()}}  # fmt: skip
        return json.dumps(out, indent=2, default=list)
    names = [*SCENARIO_PRESETS, *GROUPED_PRESETS]
    width = max(len(n) for n in names)
    return "\n".join(f"{n:<{width}}  {PRESET_DESCRIPTIONS.get(n, '')}" for n in names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=[*SCENARIO_PRESETS, *GROUPED_PRESETS], metavar="NAME",
                   help="dataset preset (see --list): " + ", ".join([*SCENARIO_PRESETS, *GROUPED_PRESETS]))  # fmt: skip
    p.add_argument("--group", action="append", type=_parse_group, metavar="NAME=PRESET:N",
                   help="instead of --preset: one group of a grouped dataset (repeat the option), "
                        "e.g. center5=lesions_mr_lowq:8")  # fmt: skip
    p.add_argument("--out", help="output folder (gets dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--n", type=int, default=10, help="number of cases; per group for grouped presets (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--test_per_group", type=int, default=0,
                   help="grouped datasets: mark the first K cases of each group \"split\": \"test\" "
                        "(default 0: none)")  # fmt: skip
    p.add_argument("--shape", type=int, nargs=3, default=None,
                   help="voxels per axis (default: the preset's, e.g. 64 64 32)")  # fmt: skip
    p.add_argument("--spacing", type=float, nargs=3, default=None,
                   help="voxel size in mm (default: the preset's, e.g. 1.5 1.5 3)")  # fmt: skip
    p.add_argument("--age", type=float, default=None, help="organ size/folding, 0 (young) .. 1 (adult)")
    p.add_argument("--blur", type=float, default=None, help="image-quality shift: Gaussian blur sigma in voxels")
    p.add_argument("--downsample", type=float, default=None, help="image-quality shift: loss of resolution factor")
    p.add_argument("--noise", type=float, default=None, help="image-quality shift: noise multiplier")
    p.add_argument("--lesions", type=int, default=None, help="number of lesions (tumours) per case")
    p.add_argument("--channels", type=int, default=None,
                   help="MR channels (keeps the preset's first ones, e.g. --channels 1 on prostate_mr: "
                        "T2 only)")  # fmt: skip
    p.add_argument("--subregions", action=argparse.BooleanOptionalAction, default=None,
                   help="prostate_mr / hippocampus_mr: label the Decathlon sub-regions (PZ 1 / TZ 2, anterior 1 / "
                        "posterior 2; the presets' default) or, with --no-subregions, one class")  # fmt: skip
    p.add_argument("--list", action="store_true", help="print the presets with a one-line description and exit")
    p.add_argument("--json", action="store_true", help="with --list: print the presets' parameters as JSON")
    args = p.parse_args(argv)
    if args.list:
        print(_listing(args.json))
        return 0
    if not args.out or bool(args.preset) == bool(args.group):
        p.error("give --out and either --preset NAME or --group NAME=PRESET:N ... (or --list)")
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    overrides = {
        k: (tuple(v) if isinstance(v, list) else v) for k in _OVERRIDES if (v := getattr(args, k)) is not None
    }
    t = time.time()
    try:
        if args.group:
            groups = {}
            for name, preset, n in args.group:
                if name in groups:
                    p.error(f"--group {name} is given twice")
                groups[name] = (preset, n)
            make_grouped_dataset(args.out, groups, seed=args.seed, test_per_group=args.test_per_group, **overrides)
            what = ", ".join(f"{n} {g} ({pr})" for g, (pr, n) in groups.items())
        else:
            if args.test_per_group and args.preset not in GROUPED_PRESETS:
                p.error(f"--test_per_group applies to grouped presets ({', '.join(GROUPED_PRESETS)}) and --group")
            make_scenario(args.preset, args.out, args.n, seed=args.seed, test_per_group=args.test_per_group,
                          **overrides)  # fmt: skip
            per = f" per group ({', '.join(GROUPED_PRESETS[args.preset])})" if args.preset in GROUPED_PRESETS else ""
            what = f"{args.n} cases{per} of {args.preset}"
    except ValueError as err:
        print(f"make_synthetic: {err}", file=sys.stderr)
        return 2
    print(f"wrote {what} to {args.out} in {time.time() - t:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
