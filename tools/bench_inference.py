#!/usr/bin/env python3
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Time sliding-window inference of the paper's FCN (random weights) at overlap 0.25 and 0.75.

The paper's setting: a 256 x 256 x 200 volume (random image), the full network (features 14, 4 levels,
4.66 M parameters), 96^3 blocks, overlap 0.25 (the paper's "24-voxel overlap") and 0.75 (the authors'
code, a 24-voxel step). The inferer is MONAI's ``SlidingWindowInferer`` with the bundles' ``inferer`` settings, the one the bundles' configs
spell out (softmax and argmax are included in the timing; loading and resampling are not).

On a CPU a 96^3 forward pass takes seconds, so the 0.75 run at full size takes many minutes: use
``--size`` (and ``--block``) for a smaller run. The JSON then reports the windows counted and the seconds
per window, and an EXTRAPOLATION of the full-size time (seconds per window x the full-size window count),
valid when ``--block`` is the paper's 96 (the cost of a window does not depend on the volume size; the
stitching cost, which does, is small next to the network's on a CPU).

HD95 + ASSD timing (ours vs MONAI) is ``tools/bench_metrics.py`` (it exposes no function to call).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from _bench import device_name, synchronize  # noqa: E402  (also puts this checkout on sys.path)

PAPER_SIZE = (256, 256, 200)
PAPER_BLOCK = 96


_sync = synchronize


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--size", type=int, nargs=3, default=PAPER_SIZE, metavar=("X", "Y", "Z"),
                        help="volume size in voxels (default: the paper's 256 256 200)")  # fmt: skip
    parser.add_argument("--block", type=int, default=PAPER_BLOCK, help="cubic block size (default 96; divisible by 8)")
    parser.add_argument(
        "--overlaps", type=float, nargs="+", default=(0.25, 0.75), help="overlaps to time (default 0.25 0.75)"
    )
    parser.add_argument("--features", type=int, default=14, help="network width (default 14, the paper)")
    parser.add_argument("--sw_batch_size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    parser.add_argument("--amp", action="store_true", help="autocast to float16 on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from monai.inferers import SlidingWindowInferer

    from common.inference import CPU_STITCH_VOXELS, num_windows, stitch_device
    from common.networks import KarimiFCN

    if args.block % 8:
        parser.error(f"--block must be divisible by 8 (the network has 4 levels), got {args.block}.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device.")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    network = KarimiFCN(in_channels=1, out_channels=2, features=args.features).to(device).eval()
    calls = {"windows": 0}

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls["windows"] += x.shape[0]
        return network(x)

    size = tuple(args.size)
    image = torch.rand((1, 1, *size), device=device)
    block = (args.block,) * 3
    autocast = torch.autocast("cuda", dtype=torch.float16) if (args.amp and device.type == "cuda") else None

    with torch.inference_mode():
        # warm-up: one window (allocations, cuDNN algorithm choice)
        t0 = time.perf_counter()
        network(torch.rand((1, 1, *block), device=device))
        _sync(device)
        warmup_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = []
        for overlap in args.overlaps:
            inferer = SlidingWindowInferer(block, sw_batch_size=args.sw_batch_size, overlap=overlap, mode="constant",
                                           sw_device=device, cpu_thresh=CPU_STITCH_VOXELS)
            calls["windows"] = 0
            _sync(device)
            t0 = time.perf_counter()
            if autocast is not None:
                with autocast:
                    logits = inferer(image, counted)
            else:
                logits = inferer(image, counted)
            labels = torch.softmax(logits.float(), 1).argmax(1)
            _sync(device)
            seconds = time.perf_counter() - t0
            n = calls["windows"]
            assert n == num_windows(size, block, overlap), (n, num_windows(size, block, overlap))
            run = {
                "overlap": overlap,
                "windows": n,
                "seconds": round(seconds, 3),
                "seconds_per_window": round(seconds / n, 4),
                "stitch_device": str(stitch_device(size, device)),
                "foreground_fraction": round(float(labels.float().mean()), 4),
            }
            if tuple(size) != PAPER_SIZE:
                n_full = num_windows(PAPER_SIZE, PAPER_BLOCK, overlap)
                run["full_size_windows"] = n_full
                run["full_size_seconds_EXTRAPOLATED"] = (
                    round(seconds / n * n_full, 1) if args.block == PAPER_BLOCK else None
                )
            runs.append(run)
            del logits, labels

    result = {
        "benchmark": "sliding-window inference, KarimiFCN with random weights, softmax + argmax",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device_name('cpu'),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "size": list(size),
        "block": args.block,
        "features": args.features,
        "parameters": sum(p.numel() for p in network.parameters()),
        "sw_batch_size": args.sw_batch_size,
        "amp": bool(autocast is not None),
        "cpu_stitch_threshold_voxels": CPU_STITCH_VOXELS,
        "warmup_one_window_s": round(warmup_s, 3),
        "runs": runs,
        "note": (
            "full_size_seconds_EXTRAPOLATED = seconds_per_window x windows of 256x256x200 with 96^3 blocks; an "
            "extrapolation, not a measurement" if tuple(size) != PAPER_SIZE else "measured at the paper's size"
        ),
        "metrics_benchmark": "HD95+ASSD ours vs MONAI: run tools/bench_metrics.py (no function exposed to call here)",
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
