#!/usr/bin/env python
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Convert the paper's datasets (Table I) to the Decathlon layout the bundles read, or check in-house data.

One sub-command per dataset as distributed (each has --help; docs/prepare_data.md has the details)::

    python tools/prepare_data.py msd      --source Task09_Spleen --output data/Spleen --spacing 1.5
    python tools/prepare_data.py msd      --source Task01_BrainTumour --output data/BRATS --channel FLAIR --label_map 1:1,2:1,3:1
    python tools/prepare_data.py kits19   --source kits19/data --output data/KiTS --spacing 2.0
    python tools/prepare_data.py lits     --source LiTS --output data/LiTS --spacing 2.0
    python tools/prepare_data.py sliver07 --source sliver07 --output data/Liver-CT --spacing 1.5
    python tools/prepare_data.py chaos    --source CHAOS_Train_Sets/MR --output data/Liver-MRI-SPIR --sequence t2spir
    python tools/prepare_data.py dhcp     --source dhcp/derivatives --output data/CP-newborn --spacing 0.8
    python tools/prepare_data.py inhouse  --source cases.csv --output data/TSC --task tsc

A bad source file stops the conversion with exit code 2 and a message naming the file (--skip_bad: skip
it and list it at the end). A killed conversion leaves nothing (or the previous complete dataset) at
--output; the same command again finishes the job, keeping the cases already converted.
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import common  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.data import DataError  # noqa: E402
from common.inhouse import TASKS, prepare_inhouse  # noqa: E402
from common.prepare import CHAOS_SEQUENCES, CONVERTERS, convert  # noqa: E402

__all__ = ["build_parser", "main"]

_DETAILS = {
    "msd": "MSD task folder TaskXX_* (dataset.json, imagesTr/, labelsTr/). 4-D images: --channel NAME picks one "
    "channel by its name in the task's 'modality' map (e.g. FLAIR for BraTS, T2 for Prostate). "
    "Default label map nonzero:1.",
    "kits19": "KiTS19 data folder with case_XXXXX/imaging.nii.gz and segmentation.nii.gz. The affine is read "
    "(KiTS19's puts the slice axis first); outputs are reoriented to RAS. Default label map 1:1,2:1 (kidney + tumour).",
    "lits": "LiTS folder(s) with volume-N.nii and segmentation-N.nii (searched recursively). Default label map 1:1,2:1 "
    "(liver + tumour -> liver).",
    "sliver07": "SLIVER07 folder with liver-origXXX.mhd/.raw and liver-segXXX.mhd/.raw (read with ITK, LPS -> RAS). "
    "Default label map nonzero:1.",
    "chaos": "CHAOS MR training folder of patient folders: <p>/T1DUAL/DICOM_anon/{InPhase,OutPhase}, "
    "<p>/T2SPIR/DICOM_anon, one PNG mask per slice in <p>/{T1DUAL,T2SPIR}/Ground (PNG order = the DICOM "
    "InstanceNumber order). Default label map 55-70:1 (MR liver, grey value 63).",
    "dhcp": "dHCP folder with sub-X/ses-Y/anat/sub-X_ses-Y_T2w.nii.gz (or _desc-restore_T2w) and "
    "sub-X_ses-Y_desc-drawem9_dseg.nii.gz. Default label map 2:1 (drawem9 cortical grey matter -> cortical plate).",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-parser per dataset and ``inhouse``."""
    p = argparse.ArgumentParser(
        prog="prepare_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for key, conv in CONVERTERS.items():
        s = sub.add_parser(key, help=conv.help, description=_DETAILS[key])
        s.add_argument("--source", required=True, help="the dataset folder as downloaded")
        s.add_argument("--output", required=True, help="the dataset folder to write (Decathlon layout)")
        s.add_argument("--spacing", type=float, default=None, metavar="MM",
                       help="resample to this isotropic voxel size in mm (default: keep the source grid; "
                            "the paper used 0.8-2.0 mm)")
        s.add_argument("--label_map", default=None, metavar="SPEC",
                       help=f"source value -> class rules, e.g. '1:1,2:1', '55-70:1', 'nonzero:1'; values no rule "
                            f"matches become 0 (default: {conv.label_map})")
        s.add_argument("--organ", default=None, help="name of class 1 in dataset.json 'labels' (comma-separated "
                                                     "names when the label map makes several classes)")
        s.add_argument("--name", default=None, help="the dataset's name in dataset.json (default: the paper's)")
        s.add_argument("--skip_bad", action="store_true",
                       help="skip bad cases (listed at the end and under 'skipped' in dataset.json) instead of stopping")
        if key == "msd":
            s.add_argument("--channel", default=None, metavar="NAME",
                           help="the channel to keep, by its name in the task's dataset.json 'modality' (e.g. FLAIR, T2)")
        if key == "chaos":
            s.add_argument("--sequence", required=True, choices=sorted(CHAOS_SEQUENCES),
                           help="t1_in (T1-DUAL in phase), t1_out (out of phase) or t2spir; each is its own dataset")
    s = sub.add_parser(
        "inhouse", help="check an in-house case list (CSV/JSON) and write its dataset.json",
        description="Check every case of an in-house case list (CSV columns image,label,group[,case], or a JSON "
        "list of such objects; paths relative to the list's folder) and report every bad case; when all are good "
        "write dataset.json pointing at the files in place (or at copies, --copy).",
    )
    s.add_argument("--source", required=True, help="the case list: cases.csv or cases.json")
    s.add_argument("--output", required=True, help="the dataset folder to write")
    s.add_argument("--task", required=True, choices=sorted(TASKS),
                   help="cp: groups younger, older; tsc: groups center1..center5")
    s.add_argument("--labels", default=None, help="class ids and names, e.g. '0:background,1:lesion' (default: the task's)")
    s.add_argument("--groups", default=None, help="comma-separated groups each case must belong to, each required "
                                                  "(default: the task's)")
    s.add_argument("--copy", action="store_true", help="copy the files into imagesTr/ and labelsTr/")
    s.add_argument("--name", default=None, help="the dataset's name in dataset.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns 0, or 2 for a bad input (the message names the file and the problem)."""
    args = build_parser().parse_args(argv)
    from common.io import utf8_console

    utf8_console()
    try:
        if args.dataset == "inhouse":
            groups = [g for g in args.groups.split(",") if g.strip()] if args.groups else None
            prepare_inhouse(args.source, args.output, args.task, labels=args.labels, groups=groups,
                            copy=args.copy, name=args.name)
        else:
            options = {}
            if args.dataset == "msd":
                options["channel"] = args.channel
            if args.dataset == "chaos":
                options["sequence"] = args.sequence
            convert(args.dataset, args.source, args.output, spacing=args.spacing, label_map=args.label_map,
                    organ=args.organ, name=args.name, skip_bad=args.skip_bad, **options)
    except (DataError, ValueError, FileExistsError) as err:
        print(f"prepare_data.py {args.dataset}: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
