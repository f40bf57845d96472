#!/usr/bin/env python
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Write small synthetic datasets (Decathlon layout) for the paper's scenarios: no downloads, seeded.

Examples::

    python tools/make_synthetic.py --preset liver_mr --out data/Liver-MRI --n 12
    python tools/make_synthetic.py --preset liver_ct --out data/Liver-CT --n 12 --shape 64 64 32 --spacing 1.5 1.5 3
    python tools/make_synthetic.py --preset lesions_mr_lowq --out data/TSC-center5 --n 8 --noise 2.5
    python tools/make_synthetic.py --list
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common.synthetic import SCENARIO_PRESETS, make_scenario


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SCENARIO_PRESETS), help="scenario preset (see --list)")
    p.add_argument("--out", help="output folder (gets dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--n", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=None, help="voxels per axis (default 64 64 32)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="voxel size in mm (default 1.5 1.5 3)")
    p.add_argument("--age", type=float, default=None, help="organ size/folding, 0 (young) .. 1 (adult)")
    p.add_argument("--blur", type=float, default=None, help="image-quality shift: Gaussian blur sigma in voxels")
    p.add_argument("--downsample", type=float, default=None, help="image-quality shift: loss of resolution factor")
    p.add_argument("--noise", type=float, default=None, help="image-quality shift: noise multiplier")
    p.add_argument("--lesions", type=int, default=None, help="number of lesions per case")
    p.add_argument("--list", action="store_true", help="print the presets and exit")
    args = p.parse_args(argv)
    if args.list:
        print(json.dumps(SCENARIO_PRESETS, indent=2))
        return 0
    if not args.preset or not args.out:
        p.error("--preset and --out are required (or --list)")
    overrides = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k in ("shape", "spacing", "age", "blur", "downsample", "noise", "lesions")
        if (v := getattr(args, k)) is not None
    }
    t = time.time()
    make_scenario(args.preset, args.out, args.n, seed=args.seed, **overrides)
    print(f"wrote {args.n} cases of {args.preset} to {args.out} in {time.time() - t:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
