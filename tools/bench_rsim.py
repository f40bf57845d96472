#!/usr/bin/env python3
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Time ``common.rsim.pwcca`` against google/svcca's numpy ``pwcca.compute_pwcca`` on the same data.

google/svcca is not part of this project: pass a checkout of it with ``--svcca_path`` (outside this
repository, e.g. ``git clone https://github.com/google/svcca /tmp/svcca``); its ``pwcca.py`` is imported
from there. Two cases by default, 64 channels x 200 000 points and 14 channels x 1 000 000 points, with
correlated activation-like data (unequal channel scales, non-zero means, ``y = x @ A + noise``).

Each contender is timed best-of-``--repeats`` in the same run, the contenders interleaved round by
round. ``--threads`` (default 1) caps the BLAS / OpenMP threads of both numpy and torch (set before
they are imported): on a shared machine multi-threaded BLAS timings swing by 10x. google's API takes
``(neurons, datapoints)``, so it gets C-contiguous transposes made before timing. Prints one JSON
object: per case the times (s), the values, the absolute difference ours (``mode="google"``) - google
and the speed-up google time / our time; our ``mode="paper"`` time and value are listed as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def best_of_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """Best time and last value of each contender; every round runs each contender once."""
    best: dict[str, tuple[float, Any]] = {k: (float("inf"), None) for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            value = fn()
            best[k] = (min(best[k][0], time.perf_counter() - t0), value)
    return best


def make_data(n: int, c: int, seed: int):
    """Correlated (n, c) pair: x with unequal scales and non-zero means, y = x @ A + noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c)) * rng.uniform(0.5, 2.0, c) + rng.uniform(-1.0, 1.0, c)
    a = rng.standard_normal((c, c)) / np.sqrt(c)
    y = x @ a + rng.standard_normal((n, c)) + 0.5
    return x, y


def parse_case(s: str) -> tuple[int, int]:
    c, n = s.lower().split("x")
    return int(c), int(n)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--svcca_path", required=True, help="checkout of google/svcca (folder holding pwcca.py)")
    p.add_argument(
        "--cases",
        nargs="+",
        default=["64x200000", "14x1000000"],
        help="CHANNELSxDATAPOINTS cases (default: 64x200000 14x1000000)",
    )
    p.add_argument("--repeats", type=int, default=3, help="best-of repeats per contender (default 3)")
    p.add_argument("--device", default="cpu", help="torch device for our Gram products (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for both (default 1; 0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads > 0:
        if "numpy" in sys.modules or "torch" in sys.modules:
            print("warning: numpy/torch already imported, --threads may not apply to numpy", file=sys.stderr)
        for var in _THREAD_VARS:
            os.environ[var] = str(args.threads)
    import numpy as np
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    svcca_path = os.path.abspath(args.svcca_path)
    if not os.path.isfile(os.path.join(svcca_path, "pwcca.py")):
        p.error(f"no pwcca.py in {svcca_path}")
    sys.path.insert(0, svcca_path)
    import pwcca as google_pwcca  # noqa: E402  (google/svcca, imported from outside the repository)

    from common import rsim

    out: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "repeats": args.repeats,
        "cases": [],
    }
    for i, case in enumerate(args.cases):
        c, n = parse_case(case)
        x, y = make_data(n, c, args.seed + i)
        xt, yt = np.ascontiguousarray(x.T), np.ascontiguousarray(y.T)  # google's (neurons, datapoints)
        xd, yd = torch.from_numpy(x).to(args.device), torch.from_numpy(y).to(args.device)

        res = best_of_interleaved(
            {
                "google": lambda: google_pwcca.compute_pwcca(xt, yt)[0],
                "ours_google": lambda: rsim.pwcca(xd, yd, mode="google"),
                "ours_paper": lambda: rsim.pwcca(xd, yd, mode="paper"),
            },
            args.repeats,
        )
        (t_google, g), (t_ours, o), (t_paper, op) = res["google"], res["ours_google"], res["ours_paper"]
        out["cases"].append(
            {
                "channels": c,
                "datapoints": n,
                "google_compute_pwcca_s": round(t_google, 4),
                "ours_google_mode_s": round(t_ours, 4),
                "ours_paper_mode_s": round(t_paper, 4),
                "speedup": round(t_google / t_ours, 2),
                "google_value": float(g),
                "ours_google_mode_value": o,
                "abs_diff_google_mode": abs(o - float(g)),
                "ours_paper_mode_value": op,
            }
        )
    out["min_speedup"] = min(case["speedup"] for case in out["cases"])
    out["max_abs_diff_google_mode"] = max(case["abs_diff_google_mode"] for case in out["cases"])
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
