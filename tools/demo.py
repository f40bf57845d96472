#!/usr/bin/env python
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The main job on the embedded default data: a small study of the first scenario (liver CT from liver MRI).

It is ``tools/study.py run --quick --synthetic`` on the bundle ``liver_ct_from_liver_mri``:

1. writes the bundle's synthetic stand-ins: a pool of three MR-like liver sources and a CT-like liver target
   (``common.standins``, ``common.synthetic``);
2. pretrains the paper's network on the MR pool, then for each seed trains on the CT target from scratch (R.I.),
   by fine-tuning the MR model (T.L.) and with a frozen random encoder, each run a ``python -m monai.bundle run
   training`` command, two at a time on a 2-core CPU;
3. evaluates every run and every weight snapshot on its test split (DSC, HD95, ASSD in mm), runs the
   representation analyses (RSIM evolution, similarity, feature reuse, filter change, pictures);
4. writes ``<work_dir>/report/report.md`` with the tables, the curves and the paper's findings tested on these
   numbers, and prints its tables and findings.

Started again with the same command it resumes (finished runs are not redone). The quick settings (small blocks,
4 mm voxels, few iterations) are listed in the report; the same study with the paper's settings on a GPU is
``tools/study.py run --bundle liver_ct_from_liver_mri --synthetic --out <folder>`` (without ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)

BUNDLE = "liver_ct_from_liver_mri"


def summary(report_md: str) -> str:
    """The report's accuracy table, convergence table and findings lines (the sections a reader looks at first)."""
    with open(report_md, encoding="utf-8") as f:
        text = f.read()
    keep, out = False, []
    for line in text.splitlines():
        if line.startswith("## "):
            keep = line.startswith(("## Test accuracy", "## Convergence", "## The paper's findings"))
        if keep:
            out.append(line)
    return "\n".join(out).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--work_dir", default="demo", help="the study folder (default ./demo; the same folder resumes)")
    p.add_argument("--seeds", nargs="+", default=["0", "1"], help="seeds (default: 0 1)")
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="runs at once (default: 2, or 1 on a 1-core machine)")  # fmt: skip
    args = p.parse_args(argv)

    import study
    from common.io import utf8_console

    utf8_console()
    t0 = time.perf_counter()
    code = study.main(["run", "--bundle", BUNDLE, "--out", args.work_dir, "--quick", "--synthetic", "--seeds", *args.seeds,
                       "--modes", "ri", "tl", "frozen", "--workers", str(args.workers)])  # fmt: skip
    report = os.path.join(os.path.abspath(args.work_dir), "report", "report.md")
    print(f"\n{summary(report)}\nThe study took {(time.perf_counter() - t0) / 60:.1f} min. Report: {report}")
    return code


if __name__ == "__main__":
    sys.exit(main())
