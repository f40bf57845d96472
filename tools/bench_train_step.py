#!/usr/bin/env python
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Benchmark one training step of the paper's FCN: full network vs frozen random encoder.

Prints JSON with, for each mode: ms per step (median of ``--steps`` after ``--warmup``), the peak memory
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak resident set of a fresh process running only
that mode, and its growth over the resident set before the first step), and the multiply-adds the step
computes, counted from the convolutions actually run: the forward pass of every convolution, plus in the
backward pass the weight gradient of every trained convolution and the input gradient of every
convolution whose input requires a gradient. The predicted ratio frozen/full is the ratio of those counts;
the paper measured 0.63 s / 1.08 s = 0.58.

The same command runs on CPU and CUDA::

    python tools/bench_train_step.py                      # 96^3, CPU (about 16 s a full step here)
    python tools/bench_train_step.py --device cuda
    python tools/bench_train_step.py --size 48 --steps 3  # a quicker CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

from _bench import device_name  # noqa: E402  (also puts this checkout on sys.path)

MODES = ("scratch", "frozen_random_encoder")


def count_step_macs(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Multiply-adds of one training step (batch 1), from hooks on every convolution during a forward pass.

    A convolution's forward cost is ``output voxels x c_in x c_out x 27`` (``input voxels x ...`` for a
    transposed convolution); its weight gradient costs the same when the weight trains, and its input
    gradient the same when its input requires a gradient.
    """
    fwd = wgrad = igrad = 0.0

    def hook(mod: nn.Module, inputs, output) -> None:
        nonlocal fwd, wgrad, igrad
        k = float(torch.tensor(mod.kernel_size).prod())
        vox = (inputs[0] if isinstance(mod, nn.ConvTranspose3d) else output)[0, 0].numel()
        macs = vox * mod.in_channels * mod.out_channels * k / mod.groups
        fwd += macs
        if mod.weight.requires_grad and torch.is_grad_enabled():
            wgrad += macs
        if inputs[0].requires_grad and torch.is_grad_enabled():
            igrad += macs

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return {"forward": fwd, "backward_weights": wgrad, "backward_inputs": igrad, "total": fwd + wgrad + igrad}


def run_mode(mode: str, size: int, steps: int, warmup: int, device: str, features: int, seed: int = 0) -> dict:
    """Time ``steps`` training steps of ``mode`` (Adam, the bundles' Dice loss) on random ``size^3`` blocks."""
    from monai.losses import DiceLoss

    from common.networks import KarimiFCN
    from common.transfer import prepare_network, trainable_parameters

    torch.manual_seed(seed)
    dev = torch.device(device)
    net = prepare_network(KarimiFCN(features=features), mode).to(dev).train()
    opt = torch.optim.Adam(trainable_parameters(net), lr=1e-4)
    loss_fn = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)
    x = torch.randn(1, 1, size, size, size, device=dev)
    y = (torch.rand(1, 1, size, size, size, device=dev) > 0.7).float()
    macs = count_step_macs(net, x)
    rss_before = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    out = {
        "mode": mode,
        "ms_per_step": 1000 * statistics.median(times),
        "ms_per_step_all": [round(1000 * t, 1) for t in times],
        "gmacs_per_step": macs["total"] / 1e9,
        "gmacs": {k: v / 1e9 for k, v in macs.items()},
        "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
    }
    if dev.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["memory_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_memory_mb"] = _rss_mb()
        out["memory_growth_mb"] = out["peak_memory_mb"] - rss_before
        out["memory_kind"] = "peak RSS of a process running this mode alone"
    return out


def _rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=96, help="cubic block size in voxels (default 96, divisible by 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--features", type=int, default=14, help="first-level width (the paper: 14)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--one_mode", choices=MODES, help=argparse.SUPPRESS)  # internal: run one mode, print its JSON
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_mode:
        print(json.dumps(run_mode(args.one_mode, args.size, args.steps, args.warmup, args.device, args.features)))
        return 0
    results = {}
    for mode in MODES:  # a fresh process per mode, so the peak memory of one does not hide the other's
        cmd = [sys.executable, os.path.abspath(__file__), "--one_mode", mode] + [
            a for a in (argv if argv is not None else sys.argv[1:])
        ]
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace")
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: {results[mode]['ms_per_step']:.0f} ms/step", file=sys.stderr)
    full, frozen = results["scratch"], results["frozen_random_encoder"]
    measured = frozen["ms_per_step"] / full["ms_per_step"]
    predicted = frozen["gmacs_per_step"] / full["gmacs_per_step"]
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(args.device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "block": [args.size] * 3,
        "batch": 1,
        "full": full,
        "frozen_random_encoder": frozen,
        "ratio_measured_frozen_over_full": measured,
        "ratio_predicted_from_macs": predicted,
        "target_ratio_at_most": predicted + 0.05,
        "meets_ratio_target": measured <= predicted + 0.05,
        "frozen_peak_memory_lower": frozen["peak_memory_mb"] < full["peak_memory_mb"],
        "paper_ratio": 0.63 / 1.08,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
