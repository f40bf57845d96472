#!/usr/bin/env python3
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Run a study of one scenario bundle: the paper's tables, curves, analyses and findings, resumable.

Examples::

    # the paper's settings on a GPU, real data (the bundle's defaults), 3 seeds, two training-set sizes
    python tools/study.py run --bundle liver_ct_from_liver_mri --out studies/liver --n_train 15 6 --seeds 0 1 2 \\
        --target dataset_dir=data/Liver-CT --source "dataset_dir=['data/Liver-MRI-SPIR','data/Liver-MRI-DUAL-in','data/Liver-MRI-DUAL-out']"
    # a quick study on the bundle's synthetic stand-ins (minutes on a CPU)
    python tools/study.py run --bundle liver_ct_from_liver_mri --out studies/quick --quick --synthetic
    # on a SLURM cluster: every run a job with one GPU
    python tools/study.py run --bundle tsc_from_brats --out studies/tsc --executor slurm --partition gpu --gpus 1 --time 720

The same command started again continues a stopped study (finished runs are not redone). See common/study.py
and common/report.py; the report is <out>/report/report.md.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from common.transforms import ABDOMEN_CT_WINDOW  # noqa: E402

#: ``--quick``: the paper's network, small blocks, a coarser voxel, few iterations and the abdominal CT window, so
#: that a study of three modes and two seeds ends in minutes on a 2-core CPU (``make demo``). Every departure from
#: the bundle's defaults is listed in the report. Why these values (docs/benchmarks.md, "Quick study"): a training
#: step of the 14-channel network costs 0.37 s at 16^3 and 2.2 s at 32^3 on one core of an AVX2 CPU in float32,
#: 0.11 s at 16^3 in bf16 on one core of an AMX CPU (9x its float32 step); at 4 mm the synthetic volumes (96 mm across) are 24^3, so a 16^3
#: block holds most of the organ; at the paper's lr 1e-4 the network needs thousands of steps; at 3e-4 the runs are
#: stable with the bundles' warm-up and logit bound (without them 3 of 10 float32 R.I. runs collapsed; at 1e-3 3 of
#: 10 collapsed even with the warm-up: docs/benchmarks.md, "Training collapse"); the noise augmentation is 0.005 of the normalised range
#: (2 HU in the abdominal window) instead of 0.02, which the few steps of a quick run cannot average out.
QUICK = {
    "block_size": [16, 16, 16],
    "pixdim": [4.0, 4.0, 4.0],
    "base_lr": 3e-4,
    # instead of the paper's [-1000, 1000] HU (why: common.transforms.ABDOMEN_CT_WINDOW); MR sources are unaffected
    "ct_window": list(ABDOMEN_CT_WINDOW),
    "noise_std": 0.005,
    "iterations_per_epoch": 50,
    "max_epochs": 16,
    "val_interval": 1,
    "checkpoint_interval": 25,
    "n_val": 1,
    # bf16 autocast where the CPU computes bf16 natively and its bf16 convolutions pass a known-answer check (9x the
    # float32 step on an AMX CPU, docs/benchmarks.md); float32 elsewhere (emulated bf16 is slower, and the bf16 weight
    # gradients of torch 2.13's oneDNN on an AMD Zen 4 are wrong at 2^3 voxels)
    "speed#amp": "$@gpu or common.execution.cpu_bf16_usable()",
    # float32 convolutions through oneDNN on a CPU (torch picks its slower native kernel at 16^3 blocks, batch 1):
    # the step 0.21 s instead of 0.25 s (common.execution.onednn_convolutions)
    "speed#onednn_conv": True,
    # training batches as plain tensors (MONAI's metadata is not used by a training step): 0.230 s a step against 0.243
    "speed#strip_meta": True,
}
QUICK_PRETRAIN = {"max_epochs": 8}
#: ``--quick``: the representation analyses forward each network (every snapshot of the evolution runs) through
#: at most 12 test blocks instead of the up to 4,096 that 1,000 points per channel of the deepest probes need at
#: 16^3 blocks (2^3 voxels per block there): about 1 s per network on a CPU instead of minutes. The deep layers
#: then have fewer points than channels; the report prints the random floor of those very shapes beside each
#: RSIM value, and the analyses warn about every layer short of points.
QUICK_ANALYSIS = {"max_blocks": 12}


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _pairs(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def _absolute(pairs: dict) -> dict:
    """Paths given to the study (``dataset_dir``, ``source_checkpoint``) made absolute from this command's folder: the
    runs start in the study folder."""
    def fix(v):
        if isinstance(v, str) and v and not v.startswith("$") and not os.path.isabs(v):
            return os.path.abspath(v)
        return [fix(x) for x in v] if isinstance(v, list) else v

    return {k: fix(v) if k in ("dataset_dir", "source_checkpoint") else v for k, v in pairs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run or resume a study")
    r.add_argument("--bundle", required=True, help="a bundle name in bundles/ or a bundle folder")
    r.add_argument("--out", required=True, help="the study folder (created; the same folder resumes)")
    r.add_argument("--n_train", nargs="+", default=None, help="training-set sizes (default: all); 'all' for every case")
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (default: 0 1)")
    r.add_argument("--modes", nargs="+", default=["ri", "tl", "frozen"],
                   help="ri tl frozen last_k encoder decoder (default: ri tl frozen)")  # fmt: skip
    r.add_argument("--set", dest="overrides", action="append", metavar="ID=VALUE", help="a config override for every run")
    r.add_argument("--target", action="append", metavar="ID=VALUE", help="an override of the target runs (e.g. dataset_dir=...)")
    r.add_argument("--source", action="append", metavar="ID=VALUE", help="an override of the source (pretrain) run")
    r.add_argument("--source_checkpoint", help="a source model to fine-tune instead of pretraining one")
    r.add_argument("--quick", action="store_true", help="small blocks, few iterations (a CPU study in minutes)")
    r.add_argument("--synthetic", action="store_true", help="the bundle's synthetic stand-ins instead of its data folders")
    r.add_argument("--analyses", default="all", help="all, none, or a comma-separated list of common.analysis.ANALYSES")
    r.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local")
    r.add_argument("--workers", type=int, default=1,
                   help="local executor: jobs at once, each with cpu_count/workers threads (default 1)")  # fmt: skip
    r.add_argument("--partition", help="SLURM partition")
    r.add_argument("--gpus", type=int, default=1, help="GPUs per SLURM job (default 1)")
    r.add_argument("--time", type=int, default=24 * 60, help="SLURM time limit per job in minutes")
    r.add_argument("--cpus", type=int, default=8, help="CPUs per SLURM job")
    r.add_argument("--mem_gb", type=int, default=64, help="memory per SLURM job (GB)")
    args = p.parse_args(argv)
    import logging

    from common.io import utf8_console

    utf8_console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from common.study import StudySettings, run_study

    bundle = args.bundle if os.path.isdir(args.bundle) else os.path.join(REPO_ROOT, "bundles", args.bundle)
    if not os.path.isfile(os.path.join(bundle, "configs", "train.json")):
        raise SystemExit(f"error: {bundle} is not a bundle (no configs/train.json)")
    overrides = {**(QUICK if args.quick else {}), **_pairs(args.overrides)}
    target, source = _absolute(_pairs(args.target)), _absolute(_pairs(args.source))
    pretrain_overrides = dict(QUICK_PRETRAIN) if args.quick else {}
    description = "A quick study (--quick): small blocks and few iterations on a CPU; not the paper's settings." if args.quick else ""
    if args.synthetic:
        from common.standins import read_recipe, stand_in_overrides

        recipe = read_recipe(bundle)
        data = os.path.join(os.path.abspath(args.out), "data")
        target = {**stand_in_overrides(recipe, "train.json", data), **target}
        source = {**(stand_in_overrides(recipe, "pretrain.json", data) or stand_in_overrides(recipe, "train.json", data)), **source}
        description += " Data: the bundle's synthetic stand-ins (common.standins)."
    sizes = [None if str(n) == "all" else int(n) for n in (args.n_train or ["all"])]
    settings = StudySettings(
        bundle_dir=os.path.abspath(bundle), out_dir=os.path.abspath(args.out), n_train=sizes, seeds=args.seeds,
        modes=args.modes, overrides=overrides, target=target, source=source, pretrain_overrides=pretrain_overrides,
        source_checkpoint=os.path.abspath(args.source_checkpoint) if args.source_checkpoint else None, analyses=[] if args.analyses == "none" else args.analyses,
        description=description.strip(), analysis_overrides=dict(QUICK_ANALYSIS) if args.quick else {},
    )  # fmt: skip
    slurm = {"partition": args.partition, "gpus": args.gpus, "timeout_min": args.time, "cpus": args.cpus, "mem_gb": args.mem_gb}
    state = run_study(settings, executor=args.executor, slurm=slurm, workers=args.workers)
    print(f"Report: {state.get('report')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
