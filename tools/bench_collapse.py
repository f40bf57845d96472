#!/usr/bin/env python
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Collapse rate of a bundle's training: many seeds x modes x precisions, in-process loops over the bundle's own
parsed objects (``network``, ``training_loss``, ``optimizer``, ``lr_warmup``, ``train#dataloader``, ``inferer``), on its
synthetic stand-ins, with the run's own collapse detector (:class:`common.health.TrainingHealth`) watching.

Each run trains ``--steps`` iterations (stopping early when the detector fires), evaluates the test split every
``--eval_every`` iterations (mean DSC, foreground fraction and the logit margin ``z_fg - z_bg``) and records per
iteration the loss, the gradient norm and the logit margin of the training block. Prints JSON: per run the seed,
mode, precision, the detector's verdict (``status``, ``failure``), the test DSC at every evaluation; and per
(mode, precision) the number of runs, of collapsed or diverged runs, and the final test DSC of the others.

Examples::

    # the quick settings (tools/study.py --quick), 10 seeds, R.I. and frozen encoder, float32 and bf16
    python tools/bench_collapse.py --quick --seeds 10 --modes ri frozen --precisions fp32 bf16 --steps 400
    # the same without the learning-rate warm-up (the state before issue 18)
    python tools/bench_collapse.py --quick --seeds 10 --set lr_warmup_iterations=0
    # the paper's learning rate and window on larger blocks
    python tools/bench_collapse.py --quick --set base_lr=1e-4 --set "ct_window=[-1000,1000]" --set "block_size=[32,32,32]"

``bf16`` runs the network under CPU bf16 autocast whether or not this CPU passes
:func:`common.execution.cpu_bf16_check`; ``--bf16_tiny_fp32`` runs the stride-1 convolutions whose input has at
most 2 voxels along an axis in float32 (the kernel that fails the check on AMD Zen 4 with torch 2.13.0), to measure
bf16 training numerics on such a CPU (a proxy: the rest of the network, >99 % of the multiply-adds, in bf16).
Each run has one torch thread; ``--workers`` runs at once.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)


def _tiny_convs_in_float32(network) -> None:
    """``--bf16_tiny_fp32``: stride-1 convolutions on inputs of <= 2 voxels along an axis run in float32."""
    import torch

    for mod in network.modules():
        if isinstance(mod, torch.nn.Conv3d) and tuple(mod.stride) == (1, 1, 1):
            forward = mod.forward

            def run(x, forward=forward):
                if min(x.shape[2:]) <= 2:
                    with torch.autocast("cpu", enabled=False):
                        return forward(x.float())
                return forward(x)

            mod.forward = run


def _dsc(pred, ref) -> float:
    p, r = pred.bool(), ref.bool()
    s = int(p.sum() + r.sum())
    return 2.0 * int((p & r).sum()) / s if s else 1.0


def one_run(spec: dict) -> dict:
    """Train one (mode, precision, seed) and watch it; returns its record (see the module docstring)."""
    import torch
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from common.execution import autocast_on_cpu
    from common.health import TrainingHealth, gradient_norm
    from common.networks import unwrap

    torch.set_num_threads(1)
    bundle = spec["bundle"]
    files = [os.path.join(bundle, "configs", "train.json")] + (
        [os.path.join(bundle, "configs", "frozen_encoder.json")] if spec["mode"] == "frozen" else []
    )
    work = tempfile.mkdtemp(prefix="collapse_")
    ov = {**spec["overrides"], "bundle_root": work, "seed": spec["seed"], "split_seed": spec["seed"], "speed#amp": False}
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(ov)
    set_determinism(seed=spec["seed"])
    net = parser.get_parsed_content("network")
    if spec["precision"] == "bf16":
        autocast_on_cpu(unwrap(net), check=False)
        if spec["bf16_tiny_fp32"]:
            _tiny_convs_in_float32(unwrap(net))
    loss_fn = parser.get_parsed_content("training_loss")
    opt = parser.get_parsed_content("optimizer")
    warmup = parser.get_parsed_content("lr_warmup")
    split = parser.get_parsed_content("split")
    loader = parser.get_parsed_content("train#dataloader")
    inferer = parser.get_parsed_content("inferer")
    prep = parser.get_parsed_content("train#trainer#prepare_batch")
    pre = parser.get_parsed_content("preprocessing")
    tests = [pre(dict(c)) for c in split["test"]]
    health = TrainingHealth(work, opt, patience=int(parser.get_parsed_content("health_patience")),
                            grad_floor=float(parser.get_parsed_content("health_grad_floor")))  # fmt: skip
    state = SimpleNamespace(output=None, batch=None, epoch=1, iteration=0)
    engine = SimpleNamespace(state=state, stopped=False)
    engine.terminate = lambda: setattr(engine, "stopped", True)

    def evaluate() -> dict:
        net.eval()
        dscs, fgs, margins = [], [], []
        with torch.no_grad():
            for case in tests:
                image = torch.as_tensor(case["image"])[None]
                logits = inferer(image, net).float()
                pred = logits.argmax(1)[0]
                dscs.append(_dsc(pred, torch.as_tensor(case["label"])[0] > 0))
                fgs.append(float((pred > 0).float().mean()))
                margin = logits[0, 1] - logits[0, 0]
                margins.append(float(margin.abs().max()))
        net.train()
        return {"dsc": sum(dscs) / len(dscs), "fg_fraction": fgs, "max_abs_margin": max(margins)}

    epoch_length = max(1, int(parser.get_parsed_content("iterations_per_epoch")))
    steps, evals, t0 = [], [], time.perf_counter()
    it = 0
    while it < spec["steps"] and not engine.stopped:
        for batch in loader:
            x, y = prep(batch, torch.device("cpu"))[:2]
            opt.zero_grad(set_to_none=True)
            out = net(x)
            loss = loss_fn(out.float(), y)
            loss.backward()
            opt.step()
            warmup.step()
            it += 1
            with torch.no_grad():
                pred = out.float().argmax(1, keepdim=True)
                onehot = torch.cat([pred == 0, pred == 1], 1)[0]
                margin = (out[:, 1] - out[:, 0]).float()
            state.iteration, state.epoch = it, 1 + (it - 1) // epoch_length
            state.output = [{"loss": loss.detach(), "pred": onehot}]
            state.batch = [{"label": y[0]}]
            steps.append({"it": it, "loss": float(loss.detach()), "grad_norm": gradient_norm(opt), "lr": opt.param_groups[0]["lr"],
                          "margin_std": float(margin.std()), "margin_mean": float(margin.mean())})  # fmt: skip
            health.iteration_completed(engine)
            if it % spec["eval_every"] == 0 or it == spec["steps"] or engine.stopped:
                evals.append({"it": it, "seconds": time.perf_counter() - t0, **evaluate()})
            if it >= spec["steps"] or engine.stopped:
                break
    record = {k: spec[k] for k in ("mode", "precision", "seed")}
    record.update(status=health.status if health.failed else "completed", failure=health.failure, iterations=it,
                  final_dsc=evals[-1]["dsc"], best_dsc=max(e["dsc"] for e in evals), evals=evals,
                  seconds=time.perf_counter() - t0)  # fmt: skip
    if spec.get("keep_steps"):
        record["steps"] = steps
    return record


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["mode"], r["precision"]), []).append(r)
    out = []
    for (mode, precision), rs in sorted(groups.items()):
        failed = [r for r in rs if r["status"] != "completed"]
        ok = [r["final_dsc"] for r in rs if r["status"] == "completed"]
        out.append({"mode": mode, "precision": precision, "runs": len(rs), "failed": len(failed),
                    "failed_seeds": sorted(r["seed"] for r in failed),
                    "final_dsc_of_the_others": (sum(ok) / len(ok)) if ok else math.nan,
                    "min_final_dsc_of_the_others": min(ok) if ok else math.nan})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--bundle", default="liver_ct_from_liver_mri")
    p.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1 (default 10)")
    p.add_argument("--first_seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=["ri", "frozen"], choices=["ri", "frozen"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tools/study.py's --quick overrides (16^3 blocks, 4 mm, lr 3e-4)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ID=VALUE")
    p.add_argument("--bf16_tiny_fp32", action="store_true", help="see above (a proxy where cpu_bf16_check fails)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default=None, help="folder of the stand-in data (default: a temporary folder)")
    p.add_argument("--keep_steps", action="store_true", help="also record every iteration (large)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from _bench import device_name
    from common.standins import read_recipe, stand_in_overrides

    bundle = args.bundle if os.path.isdir(args.bundle) else os.path.join(ROOT, "bundles", args.bundle)
    overrides: dict = {}
    if args.quick:
        from study import QUICK

        overrides.update({k: v for k, v in QUICK.items() if k != "speed#amp"})
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    data = args.data or tempfile.mkdtemp(prefix="collapse_data_")
    overrides.update(stand_in_overrides(read_recipe(bundle), "train.json", data))
    specs = [{"bundle": bundle, "mode": m, "precision": pr, "seed": s, "overrides": overrides, "steps": args.steps,
              "eval_every": args.eval_every, "bf16_tiny_fp32": args.bf16_tiny_fp32, "keep_steps": args.keep_steps}
             for m in args.modes for pr in args.precisions for s in range(args.first_seed, args.first_seed + args.seeds)]  # fmt: skip
    records, t0 = [], time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(one_run, s) for s in specs]
        for k, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            records.append(r)
            print(f"[{k}/{len(specs)}] {r['mode']} {r['precision']} seed {r['seed']}: {r['status']} after {r['iterations']} "
                  f"iterations, test DSC {r['final_dsc']:.3f} (best {r['best_dsc']:.3f}), {r['seconds']:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    result = {"settings": {**vars(args), "overrides": {k: v for k, v in overrides.items() if k not in ("dataset_dir", "dataset_options")}},
              "cpu": device_name("cpu"), "seconds": time.perf_counter() - t0, "summary": summarize(records),
              "runs": sorted(records, key=lambda r: (r["mode"], r["precision"], r["seed"]))}  # fmt: skip
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(json.dumps({"summary": result["summary"], "cpu": result["cpu"], "seconds": result["seconds"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
