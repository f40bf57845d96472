#!/usr/bin/env python3
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Speed of the paper's FCN on the GPU: every option of the bundles' ``speed`` id (``common.execution``, ``common.datasets``) on and off, side by side.

One command, the same on CPU and CUDA, one JSON object on stdout (a readable summary on stderr)::

    python tools/bench_speed.py                  # the full benchmark (CUDA when torch sees a GPU)
    python tools/bench_speed.py --quick          # a small configuration that ends in minutes on a CPU
    python tools/bench_speed.py --sections train inference --output bench.json

Sections (``--sections``, default all):

``train``      training iterations/s at batch 1 and 2 (``--batches``) on ``--block``^3 blocks (96) with
               synthetic tensors, for the full network and the frozen random encoder
               (``transfer_mode=frozen_random_encoder``), each fast path alone and all together:
               ``baseline`` (float32, contiguous, cuDNN deterministic and no benchmark: the bundles' plain
               path), ``amp`` (autocast, bf16 where supported), ``channels_last``, ``cudnn_benchmark``,
               ``all`` (every path that applies to the device, compile aside; with ``strip_meta``, plain
               tensors instead of MONAI MetaTensors in the step) and ``all+compile``
               (``torch.compile``; at ``--compile_batches`` only, compilation takes minutes). Per run: ms
               per step, iterations/s, speed-up over the baseline, peak GPU memory, and achieved TFLOP/s =
               2 x multiply-adds of the step (``tools/bench_train_step.count_step_macs``) / time, also as a
               fraction of the GPU's bf16 dense peak. The frozen/full time ratio is compared with the ratio
               of their multiply-add counts.
``pipeline``   the same step fed by the bundle's real training data pipeline: ``configs/train.json``'s
               ``train#dataset`` / ``train#dataloader`` (load, resample, normalise, cache, random block,
               flips, rotations, noise) on synthetic phantoms (``common.synthetic``), ``plain`` (CPU cache,
               ``DataLoader``, numpy noise) and ``fast`` (GPU cache, ``ThreadDataLoader``, noise drawn on the
               device), against the synthetic-tensor step of the same run; the loader alone; and the
               bundle's own ``SupervisedTrainer`` (with its per-iteration post-processing and train Dice).
``inference``  sliding-window inference (softmax + argmax) of a ``--infer_size`` volume (256x256x200) with
               ``--infer_block`` windows at overlap 0.25 and 0.75: ``baseline`` (float32, 1 window per pass)
               against ``sw_batch_size`` 4, ``amp``, ``channels_last`` and ``all``; the masks of each are
               compared with the baseline's (share of equal voxels).
``pwcca``      ``common.rsim.pwcca`` on 64 channels x 1 000 000 points: on the CPU in float64 (baseline)
               against the GPU in float64 and with float32 Gram products.

A path that needs CUDA is reported as ``skipped`` with the reason. ``--quick`` shrinks everything
(32^3 blocks, 3 timed steps, a 48x48x40 volume with 32^3 windows, small phantoms, no compile); the
sliding-window times are then EXTRAPOLATED to 256x256x200 with 96^3 windows (seconds per window x
(96/32)^3 x the full-size window count) and labelled so. Targets (for an H100) are printed next to the
figures: training step <= 25 ms; real-data pipeline within 10 % of synthetic; frozen-encoder time ratio at
or below the one its multiply-add count predicts; sliding window 256x256x200 <= 1 s at overlap 0.25 and
<= 4 s at 0.75; PWCCA 64 ch x 1M points <= 0.1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from _bench import device_name, synchronize  # noqa: E402  (also puts this checkout on sys.path)

from common.io import atomic_write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_CONFIGS = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs")
SECTIONS = ("train", "pipeline", "inference", "pwcca")
PAPER_SIZE = (256, 256, 200)
PAPER_BLOCK = 96

#: bf16 dense tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's data sheets; first match on the name wins.
PEAK_BF16_DENSE_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
]

TARGETS_H100 = {
    "train_step_ms_max": 25.0,
    "pipeline_overhead_max": 0.10,
    "frozen_ratio": "at or below the multiply-add ratio frozen / full",
    "sliding_window_s_max": {"0.25": 1.0, "0.75": 4.0},
    "pwcca_64x1M_s_max": 0.1,
}

TRAIN_VARIANTS = ("baseline", "amp", "channels_last", "cudnn_benchmark", "all", "all+compile")
INFER_VARIANTS = ("baseline", "sw_batch_size", "amp", "channels_last", "all")
CONFIG_KEYS = ("block", "batches", "features", "steps", "warmup", "train_variants", "no_compile", "compile_batches",
               "phantoms", "phantom_shape", "infer_size", "infer_block", "infer_variants", "overlaps", "infer_repeats",
               "pwcca_channels", "pwcca_points", "sections")  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


sync = synchronize


def cpu_name() -> str:
    return device_name("cpu")


def gpu_peak_tflops(name: str | None) -> float | None:
    if not name:
        return None
    for key, peak in PEAK_BF16_DENSE_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def count_step_macs(net: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """``tools/bench_train_step.count_step_macs`` (multiply-adds of one batch-1 training step)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from bench_train_step import count_step_macs as _count
    finally:
        sys.path.pop(0)
    return _count(net, x)


# ------------------------------------------------------------------------------------------ switches
def variant_paths(variant: str, device: torch.device) -> dict[str, bool]:
    """Which fast paths a variant turns on (``all``: every path that applies to ``device``)."""
    cuda = device.type == "cuda"
    paths = {"amp": False, "channels_last": False, "cudnn_benchmark": False, "compile": False, "strip_meta": False}
    if variant in paths:
        paths[variant] = True
    elif variant in ("all", "all+compile"):
        paths.update(amp=True, channels_last=True, cudnn_benchmark=cuda, strip_meta=True)
        paths["compile"] = variant == "all+compile"
    elif variant != "baseline":
        raise ValueError(variant)
    return paths


def skip_reason(variant: str, device: torch.device, args: argparse.Namespace, batch: int) -> str | None:
    if variant == "cudnn_benchmark" and device.type != "cuda":
        return "cuDNN is CUDA-only"
    if variant == "all+compile":
        if args.no_compile:
            return "--no_compile" + (" (--quick: compilation takes minutes on a CPU)" if args.quick else "")
        if batch not in args.compile_batches:
            return (f"compile measured at batch {args.compile_batches} only "
                    "(--compile_batches; compilation takes minutes)")  # fmt: skip
    return None


@contextlib.contextmanager
def cudnn_flags(benchmark: bool):
    """The bundles' plain path runs after ``monai.utils.set_determinism`` (deterministic cuDNN, no benchmark);
    the ``cudnn_benchmark`` path sets benchmark on and deterministic off (``common.execution.set_cudnn_benchmark``)."""
    old = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = not benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old


# ------------------------------------------------------------------------------------------ training
class Stepper:
    """One training step as MONAI's ``SupervisedTrainer`` runs it (the bundles' Dice loss, Adam), with the
    fast paths of ``paths``: autocast around forward + loss, a ``GradScaler`` for float16 only."""

    def __init__(self, mode: str, paths: dict[str, bool], device: torch.device, features: int, seed: int) -> None:
        from monai.losses import DiceLoss

        from common import execution as fast
        from common.networks import KarimiFCN
        from common.transfer import prepare_network, trainable_parameters

        self.device, self.paths = device, paths
        torch.manual_seed(seed)
        net = prepare_network(KarimiFCN(features=features), mode).to(device).train()
        self.net = fast.prepare_for_speed(
            net, channels_last=paths["channels_last"], compile=paths["compile"],
            cudnn_benchmark=False,  # set by cudnn_flags around the run
        )  # fmt: skip
        self.opt = torch.optim.Adam(trainable_parameters(self.net), lr=1e-4)
        self.loss_fn = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5,
                                smooth_dr=1e-5, batch=True)  # fmt: skip
        self.dtype = fast.autocast_dtype(device) if paths["amp"] else None
        use_scaler = self.dtype is not None and fast.needs_grad_scaler(self.dtype) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from common import execution as fast

        if self.paths.get("strip_meta"):  # the bundles' strip_meta path (MetaTensor -> torch.Tensor)
            x, y = fast._plain_tensor(x), fast._plain_tensor(y)
        x = fast.to_device(x, self.device, self.paths["channels_last"], non_blocking=True)
        y = fast.to_device(y, self.device, self.paths["channels_last"], non_blocking=True)
        self.opt.zero_grad(set_to_none=True)
        with fast.autocast(self.device, enabled=self.dtype is not None, dtype=self.dtype):
            loss = self.loss_fn(self.net(x), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        return loss


def timed_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    """Run ``warmup`` untimed then ``steps`` timed calls, each followed by a device sync (as a training loop
    that reads the loss every iteration); ``ms_per_step`` is the median (robust on a shared machine)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"ms_per_step": 1000 * med, "ms_mean": 1000 * statistics.fmean(times), "it_per_s": 1.0 / med,
           "warmup_s": warm_s}  # fmt: skip
    if device.type == "cuda":
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synthetic_batch(batch: int, block: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, block, block, block, generator=g)
    y = (torch.rand(batch, 1, block, block, block, generator=g) > 0.7).float()
    return x.to(device), y.to(device)


def flops_fields(macs_per_sample: float, batch: int, ms: float, peak: float | None) -> dict[str, Any]:
    tflops = 2.0 * macs_per_sample * batch / (ms / 1000.0) / 1e12
    return {"achieved_tflops": tflops, "fraction_of_bf16_peak": (tflops / peak) if peak else None}


def section_train(args: argparse.Namespace, device: torch.device, peak: float | None) -> dict[str, Any]:
    from common.networks import KarimiFCN
    from common.transfer import prepare_network

    block = args.block
    macs = {}
    for model, mode in (("full", "scratch"), ("frozen_encoder", "frozen_random_encoder")):
        torch.manual_seed(args.seed)
        net = prepare_network(KarimiFCN(features=args.features), mode).to(device)
        macs[model] = count_step_macs(net, torch.zeros(1, 1, block, block, block, device=device))
        del net
        free_memory(device)
    runs: list[dict[str, Any]] = []
    for model, mode in (("full", "scratch"), ("frozen_encoder", "frozen_random_encoder")):
        for batch in args.batches:
            x, y = synthetic_batch(batch, block, device, args.seed)
            base_ms = None
            for variant in args.train_variants:
                row: dict[str, Any] = {"model": model, "batch": batch, "variant": variant, "block": [block] * 3}
                reason = skip_reason(variant, device, args, batch)
                if reason:
                    runs.append({**row, "status": "skipped", "reason": reason})
                    continue
                paths = variant_paths(variant, device)
                row["paths"] = paths
                try:
                    with cudnn_flags(paths["cudnn_benchmark"]):
                        stepper = Stepper(mode, paths, device, args.features, args.seed)
                        warm = args.warmup + (2 if paths["compile"] else 0)
                        res = timed_steps(lambda: stepper(x, y), warm, args.steps, device)
                except Exception as err:  # report, do not lose the other figures
                    runs.append({**row, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:500]})
                    log(f"train {model} b{batch} {variant}: FAILED {err}")
                    continue
                finally:
                    stepper = None  # noqa: F841
                    if paths["compile"]:
                        torch._dynamo.reset()
                    free_memory(device)
                if paths["amp"]:
                    from common.execution import autocast_dtype

                    row["amp_dtype"] = str(autocast_dtype(device)).replace("torch.", "")
                if variant == "baseline":
                    base_ms = res["ms_per_step"]
                row.update(status="measured", **res)
                row["speedup_vs_baseline"] = (base_ms / res["ms_per_step"]) if base_ms else None
                row.update(flops_fields(macs[model]["total"], batch, res["ms_per_step"], peak))
                runs.append(row)
                log(f"train {model:14s} b{batch} {variant:15s} {res['ms_per_step']:9.1f} ms/step "
                    f"{res['it_per_s']:7.2f} it/s")  # fmt: skip
            x = y = None
            free_memory(device)
    predicted = macs["frozen_encoder"]["total"] / macs["full"]["total"]
    ratios = []
    for batch in args.batches:
        for variant in args.train_variants:
            full = _find(runs, model="full", batch=batch, variant=variant)
            frozen = _find(runs, model="frozen_encoder", batch=batch, variant=variant)
            if full and frozen:
                measured = frozen["ms_per_step"] / full["ms_per_step"]
                ratios.append({"batch": batch, "variant": variant, "measured_frozen_over_full": measured,
                               "predicted_from_macs": predicted, "meets_target": measured <= predicted})  # fmt: skip
    return {
        "gmacs_per_sample": {k: {kk: vv / 1e9 for kk, vv in v.items()} for k, v in macs.items()},
        "runs": runs,
        "frozen_ratio": ratios,
        "note": "ms_per_step: mean over the timed steps (one sync at each end); TFLOP/s = 2 x multiply-adds / time",
    }


def _find(rows: list[dict[str, Any]], **kv: Any) -> dict[str, Any] | None:
    for r in rows:
        if r.get("status") == "measured" and all(r.get(k) == v for k, v in kv.items()):
            return r
    return None


# ------------------------------------------------------------------------------------------ pipeline
def bundle_parser(overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_CONFIGS, "train.json"))
    for k, v in overrides.items():
        parser[k] = v
    parser.parse()
    return parser


def loader_overrides(fast_loader: bool, data_dir: str, root: str, args: argparse.Namespace, device: torch.device):
    return {
        "dataset_dir": data_dir,
        "bundle_root": root,
        "run_name": "fast" if fast_loader else "plain",
        "block_size": [args.block] * 3,
        "device": f"$torch.device('{device}')",
        "network_def#features": args.features,
        "speed#cache_on_gpu": fast_loader,
        "speed#thread_loader": fast_loader,
        "speed#noise_on_device": fast_loader,
    }


def cycle(loader):
    while True:
        yield from loader


def section_pipeline(args: argparse.Namespace, device: torch.device, peak: float | None) -> dict[str, Any]:
    from common.synthetic import make_scenario

    tmp = tempfile.mkdtemp(prefix="bench_speed_")
    data_dir = os.path.join(tmp, "data")
    t0 = time.perf_counter()
    make_scenario("liver_ct", data_dir, args.phantoms, seed=args.seed, shape=tuple(args.phantom_shape),
                  spacing=(2.0, 2.0, 4.0))  # fmt: skip
    out: dict[str, Any] = {
        "phantoms": {"n": args.phantoms, "shape": args.phantom_shape, "spacing_mm": [2.0, 2.0, 4.0],
                     "resampled_to_mm": [2.0, 2.0, 2.0], "make_s": time.perf_counter() - t0},  # fmt: skip
        "loaders": {},
        "runs": [],
        "loader_only": [],
        "bundle_trainer": [],
    }
    loaders: dict[str, Any] = {}
    for name in ("plain", "fast"):
        t0 = time.perf_counter()
        parser = bundle_parser(loader_overrides(name == "fast", data_dir, tmp, args, device))
        dataset = parser.get_parsed_content("train#dataset")
        loader = parser.get_parsed_content("train#dataloader")
        on_device = bool(getattr(dataset, "on_device", False))
        noise = [t for t in dataset.transform.transforms if type(t).__name__ == "RandGaussianNoised"]
        info = {
            "dataset": type(dataset).__name__,
            "cache_on_device": on_device,
            "loader": type(loader).__name__,
            "noise_on_device": bool(getattr(noise[0], "on_device", False)) if noise else None,
            "training_cases": len(dataset),
            "build_and_cache_s": time.perf_counter() - t0,
        }
        if name == "fast" and device.type != "cuda":
            info["gpu_cache"] = "skipped: CUDA-only (the cache stays in CPU memory)"
        out["loaders"][name] = info
        loaders[name] = (dataset, type(loader))
    for batch in args.batches:
        for name, (dataset, cls) in loaders.items():
            loader = cls(dataset, batch_size=batch, shuffle=True, num_workers=0)
            it = cycle(loader)
            res = timed_steps(lambda: next(it), args.warmup, args.steps, device)
            out["loader_only"].append({"loader": name, "batch": batch, "ms_per_batch": res["ms_per_step"]})
            log(f"loader {name:5s} b{batch} {res['ms_per_step']:8.1f} ms/batch")
    for model, mode in (("full", "scratch"), ("frozen_encoder", "frozen_random_encoder")):
        for batch in args.batches:
            for variant in ("baseline", "all"):
                paths = variant_paths(variant, device)
                with cudnn_flags(paths["cudnn_benchmark"]):
                    stepper = Stepper(mode, paths, device, args.features, args.seed)
                    x, y = synthetic_batch(batch, args.block, device, args.seed)
                    synth = timed_steps(lambda: stepper(x, y), args.warmup, args.steps, device)
                    rows = [{"model": model, "batch": batch, "step": variant, "data": "synthetic", **synth}]
                    for name, (dataset, cls) in loaders.items():
                        loader = cls(dataset, batch_size=batch, shuffle=True, num_workers=0)
                        it = cycle(loader)

                        def real_step() -> None:
                            b = next(it)
                            stepper(b["image"], b["label"])

                        res = timed_steps(real_step, args.warmup, args.steps, device)
                        overhead = res["ms_per_step"] / synth["ms_per_step"] - 1.0
                        rows.append({"model": model, "batch": batch, "step": variant, "data": f"real_{name}_loader",
                                     **res, "overhead_vs_synthetic": overhead,
                                     "meets_target": overhead <= TARGETS_H100["pipeline_overhead_max"]})  # fmt: skip
                        loader = it = None
                stepper = x = y = None
                free_memory(device)
                for r in rows:
                    log(f"pipeline {model:14s} b{batch} step={variant:8s} {r['data']:18s} "
                        f"{r['ms_per_step']:9.1f} ms/step")  # fmt: skip
                out["runs"].extend(rows)
    if not args.no_bundle_trainer:
        for batch in args.batches:
            for name in ("plain", "fast"):
                out["bundle_trainer"].append(bundle_trainer_run(name, batch, data_dir, tmp, args, device))
    return out


def bundle_trainer_run(name: str, batch: int, data_dir: str, root: str, args: argparse.Namespace,
                       device: torch.device) -> dict[str, Any]:  # fmt: skip
    """The bundle's own ``train#trainer`` (MONAI SupervisedTrainer with post-processing and the train Dice
    metric, no other handlers): ``plain`` = every switch off, ``fast`` = every switch at its CUDA default."""
    from ignite.engine import Events

    fast_on = name == "fast"
    ov = loader_overrides(fast_on, data_dir, root, args, device)
    cuda = device.type == "cuda"
    ov.update({
        "speed#amp": fast_on, "speed#channels_last": fast_on, "speed#cudnn_benchmark": fast_on and cuda,
        "speed#compile": False,
        "train#dataloader#batch_size": batch, "iterations_per_epoch": args.warmup + args.steps,
        "train#trainer#max_epochs": 1,
        "speed#strip_meta": fast_on,
        "train#trainer#train_handlers": [{"_target_": "common.execution.AmpGradScalerHandler", "amp_kwargs": "@amp_kwargs"}],
    })  # fmt: skip
    row: dict[str, Any] = {"config": name, "batch": batch}
    try:
        import monai

        monai.utils.set_determinism(seed=args.seed)  # as the bundle's run does first
        parser = bundle_parser(ov)
        trainer = parser.get_parsed_content("train#trainer")
        stamps: list[float] = []

        def stamp(_engine) -> None:
            sync(device)
            stamps.append(time.perf_counter())

        trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
        trainer.run()
        timed = stamps[args.warmup - 1 :] if args.warmup > 0 else stamps
        ms = 1000 * statistics.median(b - a for a, b in zip(timed, timed[1:]))
        row.update(status="measured", ms_per_step=ms, it_per_s=1000 / ms, amp=bool(trainer.amp))
        log(f"bundle trainer {name:5s} b{batch} {ms:9.1f} ms/step")
    except Exception as err:
        row.update(status="failed", reason=f"{type(err).__name__}: {err}"[:500])
        log(f"bundle trainer {name} b{batch}: FAILED {err}")
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False
        free_memory(device)
    return row


# ------------------------------------------------------------------------------------------ inference
def section_inference(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from monai.inferers import SlidingWindowInferer

    from common import execution as fast
    from common.inference import CPU_STITCH_VOXELS, num_windows
    from common.networks import KarimiFCN

    size = tuple(args.infer_size)
    block = (args.infer_block,) * 3
    g = torch.Generator().manual_seed(args.seed)
    image = torch.rand((1, 1, *size), generator=g).to(device)
    extrapolated = size != PAPER_SIZE or args.infer_block != PAPER_BLOCK
    runs: list[dict[str, Any]] = []
    masks: dict[float, torch.Tensor] = {}
    for variant in args.infer_variants:
        paths = variant_paths(variant, device) if variant != "sw_batch_size" else variant_paths("baseline", device)
        paths.pop("compile", None)
        sw_batch = fast.default_sw_batch_size("cuda") if variant in ("sw_batch_size", "all") else 1
        row_base = {"variant": variant, "paths": paths, "sw_batch_size": sw_batch}
        torch.manual_seed(args.seed)
        net = KarimiFCN(features=args.features).to(device).eval()
        fast.prepare_for_speed(net, channels_last=paths["channels_last"])
        dtype = fast.autocast_dtype(device) if paths["amp"] else None
        if dtype is not None:
            row_base["amp_dtype"] = str(dtype).replace("torch.", "")
        with cudnn_flags(paths["cudnn_benchmark"]), torch.inference_mode():
            with fast.autocast(device, enabled=dtype is not None, dtype=dtype):  # warm-up (cuDNN choice)
                net(torch.rand((sw_batch, 1, *block), device=device))
            for overlap in args.overlaps:
                inferer = SlidingWindowInferer(block, sw_batch_size=sw_batch, overlap=overlap, mode="constant",
                                               sw_device=device, cpu_thresh=CPU_STITCH_VOXELS)  # as the bundles' inferer
                seconds = float("inf")
                for _ in range(args.infer_repeats):  # best of: the first pass may pick cuDNN algorithms
                    sync(device)
                    t0 = time.perf_counter()
                    with fast.autocast(device, enabled=dtype is not None, dtype=dtype):
                        logits = inferer(image, net)
                    labels = torch.softmax(logits.float(), 1).argmax(1)
                    sync(device)
                    seconds = min(seconds, time.perf_counter() - t0)
                n = num_windows(size, block, overlap)
                row = {**row_base, "overlap": overlap, "windows": n, "seconds": seconds,
                       "seconds_per_window": seconds / n, "repeats": args.infer_repeats}  # fmt: skip
                if variant == "baseline":
                    masks[overlap] = labels
                    row["speedup_vs_baseline"] = 1.0
                elif overlap in masks:
                    row["mask_agreement_with_baseline"] = float((labels == masks[overlap]).float().mean())
                    base = _find_infer(runs, "baseline", overlap)
                    row["speedup_vs_baseline"] = base["seconds"] / seconds if base else None
                n_full = num_windows(PAPER_SIZE, (PAPER_BLOCK,) * 3, overlap)
                if extrapolated:
                    scale = (PAPER_BLOCK / args.infer_block) ** 3
                    row["full_size_seconds_EXTRAPOLATED"] = seconds / n * scale * n_full
                    row["extrapolation"] = (f"s/window x ({PAPER_BLOCK}/{args.infer_block})^3 x {n_full} windows of "
                                            f"256x256x200 at overlap {overlap}")  # fmt: skip
                full_s = row.get("full_size_seconds_EXTRAPOLATED", seconds)
                target = TARGETS_H100["sliding_window_s_max"].get(str(overlap))
                row["target_s_max_h100"] = target
                row["meets_target"] = (full_s <= target) if target is not None else None
                runs.append(row)
                log(f"inference {variant:14s} overlap {overlap}: {seconds:8.2f} s ({n} windows)"
                    + (f", 256x256x200 EXTRAPOLATED {full_s:.1f} s" if extrapolated else ""))  # fmt: skip
                del logits, labels
        if device.type == "cuda":
            row_peak = torch.cuda.max_memory_allocated(device) / 2**20
            for r in runs:
                if r["variant"] == variant:
                    r["peak_gpu_memory_mb"] = row_peak
            torch.cuda.reset_peak_memory_stats(device)
        del net
        free_memory(device)
    return {
        "size": list(size),
        "block": list(block),
        "extrapolated": extrapolated,
        "runs": runs,
        "note": "random weights, random image; softmax + argmax included; loading/resampling not",
    }


def _find_infer(rows: list[dict[str, Any]], variant: str, overlap: float) -> dict[str, Any] | None:
    for r in rows:
        if r["variant"] == variant and r["overlap"] == overlap:
            return r
    return None


# ------------------------------------------------------------------------------------------ pwcca
def section_pwcca(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from common import rsim

    c, n = args.pwcca_channels, args.pwcca_points
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n, c, generator=g) * (0.5 + 1.5 * torch.rand(c, generator=g)) + torch.rand(c, generator=g)
    a = torch.randn(c, c, generator=g) / c**0.5
    y = x @ a + torch.randn(n, c, generator=g) + 0.5
    runs = []
    contenders = [("cpu_float64", "cpu", torch.float64)]
    if device.type == "cuda":
        contenders += [("gpu_float64", str(device), torch.float64), ("gpu_float32_gram", str(device), torch.float32)]
    base_value = base_s = None
    for name, dev, gram in contenders:
        xd, yd = x.to(dev), y.to(dev)
        rsim.pwcca(xd, yd, gram_dtype=gram)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            sync(torch.device(dev))
            t0 = time.perf_counter()
            value = rsim.pwcca(xd, yd, gram_dtype=gram)
            sync(torch.device(dev))
            best = min(best, time.perf_counter() - t0)
        if base_value is None:
            base_value, base_s = value, best
        runs.append({"contender": name, "seconds": best, "value": value,
                     "abs_diff_vs_cpu_float64": abs(value - base_value), "speedup_vs_cpu_float64": base_s / best,
                     "meets_target": best * (1_000_000 / n) <= TARGETS_H100["pwcca_64x1M_s_max"]})  # fmt: skip
        log(f"pwcca {name:16s} {c} ch x {n} points: {best:.4f} s")
        del xd, yd
    if device.type != "cuda":
        runs.append({"contender": "gpu_float64 / gpu_float32_gram", "status": "skipped", "reason": "no CUDA device"})
    return {"channels": c, "points": n, "repeats": args.repeats, "runs": runs,
            "note": "best of repeats; data already on the device (activations are produced there)"}  # fmt: skip


# ------------------------------------------------------------------------------------------ summary
def summary(report: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    rows = []
    tr = report.get("train")
    if tr:
        for model in ("full", "frozen_encoder"):
            for batch in report["config"]["batches"]:
                base = _find(tr["runs"], model=model, batch=batch, variant="baseline")
                best = min((r for r in tr["runs"] if r.get("status") == "measured" and r["model"] == model
                            and r["batch"] == batch), key=lambda r: r["ms_per_step"], default=None)  # fmt: skip
                for r in (base, _find(tr["runs"], model=model, batch=batch, variant="all")):
                    if r:
                        rows.append({"figure": f"train step {model} b{batch} ({r['variant']}; fastest: "
                                               f"{best['variant']} {best['ms_per_step']:.1f} ms)",
                                     "value": round(r["ms_per_step"], 2), "unit": "ms", "target": "<= 25 ms (H100)",
                                     "met": r["ms_per_step"] <= TARGETS_H100["train_step_ms_max"],
                                     "achieved_tflops": round(r["achieved_tflops"], 3)})  # fmt: skip
        for r in tr["frozen_ratio"]:
            if r["variant"] in ("baseline", "all"):
                rows.append({"figure": f"frozen/full time ratio b{r['batch']} ({r['variant']})",
                             "value": round(r["measured_frozen_over_full"], 3), "unit": "",
                             "target": f"<= {r['predicted_from_macs']:.3f} (MAC ratio)",
                             "met": r["meets_target"]})  # fmt: skip
    pl = report.get("pipeline")
    if pl:
        for r in pl["runs"]:
            if r["data"] == "real_fast_loader" and r["model"] == "full":
                rows.append({"figure": f"real-data pipeline overhead b{r['batch']} (step {r['step']}, fast loader)",
                             "value": round(100 * r["overhead_vs_synthetic"], 1), "unit": "%", "target": "<= 10 %",
                             "met": r["meets_target"]})  # fmt: skip
    inf = report.get("inference")
    if inf:
        for r in inf["runs"]:
            if r["variant"] in ("baseline", "all"):
                v = r.get("full_size_seconds_EXTRAPOLATED", r["seconds"])
                label = " EXTRAPOLATED" if "full_size_seconds_EXTRAPOLATED" in r else ""
                rows.append({"figure": f"sliding window 256x256x200 overlap {r['overlap']} ({r['variant']}){label}",
                             "value": round(v, 3), "unit": "s", "target": f"<= {r['target_s_max_h100']} s (H100)",
                             "met": r["meets_target"],
                             "mask_agreement": r.get("mask_agreement_with_baseline")})  # fmt: skip
    pw = report.get("pwcca")
    if pw:
        for r in pw["runs"]:
            if "seconds" in r:
                rows.append({"figure": f"PWCCA {pw['channels']} ch x {pw['points']} points ({r['contender']})",
                             "value": round(r["seconds"], 4), "unit": "s", "target": "<= 0.1 s (H100, 1M points)",
                             "met": r["meets_target"]})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true",
                   help="small CPU configuration (see above); sizes extrapolated where labelled")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run (default all)")
    p.add_argument("--block", type=int, help="training block size (default 96; --quick 32; divisible by 8)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="training batch sizes (default 1 2)")
    p.add_argument("--features", type=int, default=14, help="network width (default 14, the paper)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5; --quick 1)")
    p.add_argument("--train_variants", nargs="+", choices=TRAIN_VARIANTS, default=list(TRAIN_VARIANTS))
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile (default with --quick)")
    p.add_argument("--compile", dest="force_compile", action="store_true",
                   help="measure torch.compile also with --quick")
    p.add_argument("--compile_batches", type=int, nargs="+", default=[1],
                   help="batch sizes measured with compile (default 1)")
    p.add_argument("--phantoms", type=int, help="synthetic CT phantoms for the pipeline (default 6; --quick 4)")
    p.add_argument("--phantom_shape", type=int, nargs=3,
                   help="phantom voxels at 2x2x4 mm (default 128 128 64; --quick 48 48 24)")
    p.add_argument("--no_bundle_trainer", action="store_true", help="skip the bundle SupervisedTrainer runs")
    p.add_argument("--infer_size", type=int, nargs=3, help="inference volume (default 256 256 200; --quick 48 48 40)")
    p.add_argument("--infer_block", type=int, help="sliding-window block (default 96; --quick 32)")
    p.add_argument("--infer_variants", nargs="+", choices=INFER_VARIANTS,
                   help="default all (--quick: baseline sw_batch_size amp all)")
    p.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.75])
    p.add_argument("--infer_repeats", type=int,
                   help="best-of passes per inference run (default 2 on CUDA, 1 on the CPU)")
    p.add_argument("--pwcca_channels", type=int, default=64)
    p.add_argument("--pwcca_points", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3, help="best-of repeats for PWCCA (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="also write the JSON to this file")
    args = p.parse_args(argv)

    q = args.quick
    args.block = args.block or (32 if q else 96)
    args.steps = args.steps or (3 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 5)
    args.phantoms = args.phantoms or (4 if q else 6)
    args.phantom_shape = args.phantom_shape or ([48, 48, 24] if q else [128, 128, 64])
    args.infer_size = args.infer_size or ([48, 48, 40] if q else list(PAPER_SIZE))
    args.infer_block = args.infer_block or (32 if q else PAPER_BLOCK)
    quick_infer = ["baseline", "sw_batch_size", "amp", "all"]
    args.infer_variants = args.infer_variants or (quick_infer if q else list(INFER_VARIANTS))
    args.no_compile = (args.no_compile or q) and not args.force_compile
    if args.block % 8 or args.infer_block % 8:
        p.error("--block and --infer_block must be divisible by 8 (the network has 4 levels)")
    if args.warmup < 1:
        p.error("--warmup must be >= 1")
    device = torch.device(args.device)
    args.infer_repeats = args.infer_repeats or (2 if device.type == "cuda" else 1)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import monai

    import common  # noqa: F401  (the bundle configs say "$import common")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = gpu_peak_tflops(name)
    report: dict[str, Any] = {
        "benchmark": "tools/bench_speed.py: speed options on/off (common.execution)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)]
                                        + (argv if argv is not None else sys.argv[1:])),
        "device": str(device),
        "device_name": name or cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cuda": torch.version.cuda,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "gpu_peak_bf16_dense_tflops": peak,
        "peak_table_bf16_dense_tflops": dict(PEAK_BF16_DENSE_TFLOPS),
        "quick": q,
        "config": {k: getattr(args, k) for k in CONFIG_KEYS},
        "targets_h100": TARGETS_H100,
    }
    if device.type != "cuda":
        report["note"] = ("no CUDA device: GPU-only paths are reported as skipped, and the targets (H100) are not "
                          "expected to be met on a CPU")  # fmt: skip
    t_all = time.perf_counter()
    if "train" in args.sections:
        report["train"] = section_train(args, device, peak)
    if "pipeline" in args.sections:
        report["pipeline"] = section_pipeline(args, device, peak)
    if "inference" in args.sections:
        report["inference"] = section_inference(args, device)
    if "pwcca" in args.sections:
        report["pwcca"] = section_pwcca(args, device)
    report["summary"] = summary(report, device)
    report["total_s"] = time.perf_counter() - t_all
    log("\nfigure | value | target | met")
    for r in report["summary"]:
        log(f"{r['figure']} | {r['value']} {r['unit']} | {r['target']} | {r['met']}")
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.output:
        atomic_write(args.output, lambda f: f.write(text + "\n"), mode="w")
    return report


if __name__ == "__main__":
    main()
