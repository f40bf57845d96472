#!/usr/bin/env python
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The main job on the embedded default data: the first scenario (liver CT from liver MRI) end to end.

1. writes synthetic datasets: a liver MR-like source pool and a liver CT-like target (common.synthetic);
2. runs the bundle `liver_ct_from_liver_mri` as a user would (`python -m monai.bundle run`):
   `pretrain` on the source, then on the target `train` (R.I.), `finetune` (T.L.) and `frozen_encoder`;
3. evaluates each target run on its test split (`evaluate.json`: DSC, HD95 and ASSD in mm);
4. writes `<work_dir>/results.md` and prints it.

Small blocks and few iterations keep it to minutes on a 2-core CPU; raise `--block`, `--iters` and
`--epochs` for a real run (96, 200, 100 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs")
TARGET_RUNS = (("train", None, "R.I. (from scratch)"), ("finetune", "finetune.json", "T.L. (fine-tuned from MR)"),
               ("frozen_encoder", "frozen_encoder.json", "frozen random encoder"))


def _bundle(workflow: str, configs: list[str], args: list[str], log_path: str) -> None:
    """``python -m monai.bundle run <workflow> --config_file "[...]" <args>``, the form users type."""
    files = "[" + ",".join(f"'{os.path.join(BUNDLE, c)}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", files, *args]
    t = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"failed: {' '.join(cmd)}\n--- last lines of {log_path} ---\n{tail}")
    print(f"  done in {time.time() - t:.0f} s (log: {log_path})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="demo", help="where data, runs and results go (default ./demo)")
    p.add_argument("--n_source", type=int, default=12, help="source (MR) cases")
    p.add_argument("--n_target", type=int, default=10, help="target (CT) cases")
    p.add_argument("--block", type=int, default=32, help="training block edge in voxels (multiple of 8)")
    p.add_argument("--iters", type=int, default=20, help="iterations per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument("--n_train", type=int, default=None, help="target training cases (default: all of the 70 %%)")
    args = p.parse_args(argv)

    from common.synthetic import make_scenario

    work = os.path.abspath(args.work_dir)
    data = os.path.join(work, "data")
    os.makedirs(work, exist_ok=True)
    src, tgt = os.path.join(data, "Liver-MRI"), os.path.join(data, "Liver-CT")
    print(f"[1/4] synthetic data in {data}", flush=True)
    make_scenario("liver_mr", src, args.n_source, seed=1)
    make_scenario("liver_ct", tgt, args.n_target, seed=2)

    common_args = ["--bundle_root", work, "--block_size", f"[{args.block},{args.block},{args.block}]",
                   "--iterations_per_epoch", str(args.iters), "--max_epochs", str(args.epochs)]
    if args.n_train:
        common_args += ["--n_train", str(args.n_train)]
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    print("[2/4] pretrain on the MR source", flush=True)
    _bundle("training", ["train.json", "pretrain.json"], ["--dataset_dir", src, *common_args], os.path.join(logs, "pretrain.log"))
    print("[3/4] train on the CT target: R.I., T.L., frozen random encoder", flush=True)
    for run, layer, _ in TARGET_RUNS:
        print(f"  {run}", flush=True)
        _bundle("training", ["train.json"] + ([layer] if layer else []), ["--dataset_dir", tgt, *common_args],
                os.path.join(logs, f"{run}.log"))
    print("[4/4] evaluate each target run on its test split", flush=True)
    rows = []
    for run, layer, label in TARGET_RUNS:
        out = os.path.join(work, "runs", run)
        _bundle("evaluating", ["train.json"] + ([layer] if layer else []) + ["evaluate.json"],
                ["--dataset_dir", tgt, "--bundle_root", work, "--block_size", f"[{args.block},{args.block},{args.block}]"],
                os.path.join(logs, f"evaluate_{run}.log"))
        with open(os.path.join(out, "eval", "summary.json")) as f:
            summary = json.load(f)
        rows.append((label, run, summary))
    text = results_table(rows, args)
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def results_table(rows: list, args: argparse.Namespace) -> str:
    """Markdown table of the evaluated runs: (label, run name, summary.json dict) per row."""

    def cell(s: dict, k: str) -> str:
        m = s[k]  # summary.json of evaluate.json: mean/std over all cases ("inf" when a mask is empty)
        try:
            return f"{float(m['mean']):.3f} ± {float(m['std']):.3f}"
        except (TypeError, ValueError):
            return f"{m['mean']} ({m['n_inf']} of {s['n_cases']} infinite)"

    lines = [
        "# Demo: liver CT from liver MRI (synthetic data)",
        "",
        f"Blocks {args.block}^3, {args.epochs} epochs x {args.iters} iterations per run; "
        f"{args.n_source} source and {args.n_target} target cases. A smoke run, not the paper's numbers.",
        "",
        "| run | config | test cases | DSC | HD95 (mm) | ASSD (mm) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, run, s in rows:
        lines.append(f"| {label} | {run} | {s['n_cases']} | {cell(s, 'dice')} | {cell(s, 'hd95')} | {cell(s, 'assd')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
