#!/usr/bin/env python3
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Peak memory of sliding-window inference of a large volume on the CPU (issue 6: bounded memory).

Each measurement runs in a FRESH child process (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the
process's high-water mark, so nothing measured before can hide in it). The child:

1. builds the inferer FROM ``configs/inference.json`` (``ConfigParser``, the config's own ``inferer``:
   MONAI ``SlidingWindowInferer`` with its ``block_size``, ``sw_overlap``, ``sw_batch_size``, ``mode``
   ``"constant"``, ``cpu_thresh`` = ``common.inference.CPU_STITCH_VOXELS``; ``device`` overridden to the CPU);
2. builds a small network of the bundle's interface (``(B, 1, X, Y, Z)`` -> ``(B, num_classes, X, Y, Z)``):
   ``--network conv`` (default) is one 3x3x3 ``Conv3d(1, num_classes)``; ``--network fcn`` is the config's
   ``network_def`` (``common.networks.KarimiFCN``) with ``--features`` (default 2). A full-width FCN takes
   seconds per 96^3 window on a CPU (hundreds of windows here); the memory of the STITCHING does not depend
   on the network beyond its output channels, while a network's own per-window activations are measured by
   a warm-up pass on one window before the volume exists (the "warm" baseline);
3. records the resident set now (``*_now``, /proc/self/statm) after imports and network (``setup_now``), the
   high-water mark after a warm-up pass on ONE window (``warmup_max``: its difference to ``setup_now`` is
   one window's working memory), the resident set after allocating the random input volume (a float32
   ``MetaTensor``, as the data loader gives it; ``with_input_now``), and the high-water mark after
   ``inferer(image, network)`` under ``torch.no_grad()`` as the evaluator runs it (``peak``);
4. optionally (``--postprocess``) applies softmax and argmax as ``Activationsd`` / ``AsDiscreted`` of the
   config do (``Invertd`` is left out: it needs a real preprocessing trace) and records the new peak.

MONAI's ``sliding_window_inference`` (monai/inferers/utils.py) allocates ONE output buffer
``(1, C, X, Y, Z)`` and ONE count map ``(1, 1, X, Y, Z)`` (float32), adds every window's weighted output
into them in place (``out[slices] += p``) and divides in place at the end (``out /= count``); a window's
input slice and output are dropped before the next. So the expected bound is::

    peak <= setup + input + output * (C + 1) / C + W
    (setup: imports + network; output = C * X*Y*Z * 4 bytes; count map = output / C; W: a constant of the
     window size and the network: one window's activations, input slice, output and importance map, and
     allocator slack; it does not grow with the volume or the number of windows)

The parent prints one JSON object: per run the sizes (MiB), the RSS marks (MiB), what the inference added
(``peak - with_input_now``) next to ``output + count map``, the rest (``per_window_constant``, the W above)
next to the network's own one-window working memory (``warmup_max - setup_now``), the windows and the
seconds. Two overlaps (e.g. ``--overlaps 0.25 0.75``) visit different numbers of windows: the same peak
shows that no per-window copy is kept (with ``--fixed_mmap_threshold`` the peaks agree to 0.5 MiB; without it
glibc's dynamic mmap threshold keeps some freed window buffers in its heap, a few tens of MiB that do not
grow with the number of windows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs", "inference.json")
MIB = 2**20


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_now_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> dict:
    """One measurement (runs in a fresh process)."""
    import torch
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    import common  # noqa: F401  (the config's "$import common")
    from common.inference import num_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    parser = ConfigParser()
    parser.read_config(args.config)
    parser.update(
        {
            "device": "$torch.device('cpu')",
            "block_size": list(args.block_size),
            "sw_overlap": args.overlap,
            "speed#sw_batch_size": args.sw_batch_size,
            "num_classes": args.num_classes,
            "network_def#features": args.features,
        }
    )
    inferer = parser.get_parsed_content("inferer")
    if args.network == "fcn":
        network = parser.get_parsed_content("network_def")
    else:
        network = torch.nn.Conv3d(1, args.num_classes, 3, padding=1)
    network.eval()
    # "now": resident set at that moment (/proc/self/statm); "max": the process's high-water mark (ru_maxrss)
    marks = {"setup_now": _rss_now_bytes()}
    with torch.no_grad():
        network(torch.zeros(args.sw_batch_size, 1, *args.block_size))
    marks["warmup_max"] = _maxrss_bytes()  # setup + one window's working memory (input slice, activations, output)
    marks["warm_now"] = _rss_now_bytes()

    torch.manual_seed(0)
    image = MetaTensor(torch.rand(1, 1, *args.shape), affine=torch.eye(4))
    marks["with_input_now"] = _rss_now_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = inferer(image, network)
    seconds = time.perf_counter() - t0
    marks["peak"] = _maxrss_bytes()
    marks["after_inference_now"] = _rss_now_bytes()  # input + output held; the count map is freed
    out_shape = tuple(out.shape)
    result_post = {}
    if args.postprocess:
        t1 = time.perf_counter()
        prob = torch.softmax(out, dim=1)  # Activationsd(softmax=True): a new C x N tensor
        del out
        label = torch.argmax(prob, dim=1, keepdim=True)  # AsDiscreted(argmax=True): int64 (1, 1, X, Y, Z)
        del prob
        result_post = {
            "postprocess_seconds": time.perf_counter() - t1,
            "label_bytes": label.element_size() * label.numel(),
        }
        marks["peak_with_postprocess"] = _maxrss_bytes()
    n = math.prod(args.shape)
    input_bytes = image.element_size() * image.numel()
    output_bytes = 4 * math.prod(out_shape)
    count_bytes = 4 * n
    return {
        "shape": list(args.shape),
        "overlap": args.overlap,
        "network": args.network if args.network == "conv" else f"KarimiFCN(features={args.features})",
        "num_classes": args.num_classes,
        "block_size": list(args.block_size),
        "sw_batch_size": args.sw_batch_size,
        "windows": num_windows(args.shape, args.block_size, args.overlap),
        "inferer": type(inferer).__name__,
        "cpu_thresh": inferer.cpu_thresh,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        **result_post,
        "bytes": {"input": input_bytes, "output": output_bytes, "count_map": count_bytes},
        "rss_bytes": marks,
    }


def summarize(r: dict) -> dict:
    b, m = r["bytes"], r["rss_bytes"]
    window = m["warmup_max"] - m["setup_now"]  # the network's working memory for one window
    expected = b["output"] + b["count_map"]
    added = m["peak"] - m["with_input_now"]  # what the whole-volume inference added to setup + input
    out = {
        "MiB": {k: round(v / MIB, 1) for k, v in b.items()},
        "rss_MiB": {k: round(v / MIB, 1) for k, v in m.items()},
        "inference_added_MiB (peak - with_input_now)": round(added / MIB, 1),
        "output_plus_count_map_MiB": round(expected / MIB, 1),
        "k_expected (C + 1) / C": round(expected / b["output"], 3),
        "per_window_constant_MiB (added - output - count map)": round((added - expected) / MIB, 1),
        "network_window_working_MiB (warmup_max - setup_now)": round(window / MIB, 1),
    }
    return {**{k: v for k, v in r.items() if k not in ("bytes", "rss_bytes")}, **out}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 400), metavar=("X", "Y", "Z"),
                   help="volume size in voxels (default 512 512 400)")  # fmt: skip
    p.add_argument("--overlaps", type=float, nargs="+", default=(0.25,),
                   help="sw_overlap values, one fresh process each (default 0.25, the config's)")  # fmt: skip
    p.add_argument("--block_size", type=int, nargs=3, default=(96, 96, 96), help="window (default 96 96 96)")
    p.add_argument("--sw_batch_size", type=int, default=1, help="windows per forward pass (default 1, the config's)")
    p.add_argument("--num_classes", type=int, default=2, help="output channels C (default 2)")
    p.add_argument("--network", choices=("conv", "fcn"), default="conv",
                   help="conv: one 3x3x3 Conv3d(1, C) (default); fcn: the config's KarimiFCN, --features")  # fmt: skip
    p.add_argument("--features", type=int, default=2, help="KarimiFCN width for --network fcn (default 2)")
    p.add_argument("--postprocess", action="store_true", help="also apply softmax + argmax (as the config)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--fixed_mmap_threshold", action="store_true",
                   help="run the child with MALLOC_MMAP_THRESHOLD_=1048576 (glibc): every block >= 1 MiB is mmapped "
                        "and returned on free, so allocator retention does not blur the figure")  # fmt: skip
    p.add_argument("--config", default=CONFIG, help="inference config to take the inferer from")
    p.add_argument("--json", default="", help="also write the JSON result to this file")
    p.add_argument("--child_overlap", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child_overlap is not None:
        args.overlap = args.child_overlap
        print(json.dumps(child(args)))
        return {}

    runs = []
    for ov in args.overlaps:
        cmd = [sys.executable, os.path.abspath(__file__), "--child_overlap", str(ov)]
        for name in ("shape", "block_size"):
            cmd += [f"--{name}", *map(str, getattr(args, name))]
        cmd += ["--sw_batch_size", str(args.sw_batch_size), "--num_classes", str(args.num_classes),
                "--network", args.network, "--features", str(args.features), "--threads", str(args.threads),
                "--config", args.config] + (["--postprocess"] if args.postprocess else [])  # fmt: skip
        env = dict(os.environ)
        if args.fixed_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(MIB)
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"measurement with overlap {ov} failed (rc {proc.returncode})")
        runs.append(summarize(json.loads(proc.stdout.strip().splitlines()[-1])))
    result = {"command": " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])]),
              "runs": runs}  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from common.io import atomic_write

        atomic_write(args.json, lambda f: f.write(text + "\n"), mode="w")
    return result


if __name__ == "__main__":
    main()
