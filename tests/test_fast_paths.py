# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The GPU fast paths (``common.execution``, ``common.datasets``, ``common.transforms.RandGaussianNoised``) and the
bundles' ``speed`` switches, checked on the CPU with tiny volumes.

Each path must give the plain path's results: channels-last and the sliding-window batch up to float
rounding, bf16 autocast loosely, the thread loader exactly; with every switch off the bundle trains
bit-identically, and with every switch at its CUDA default it still runs on a CPU, to the same DSC.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from monai.inferers import SlidingWindowInferer

from common import datasets, execution
from common.networks import KarimiFCN
from common.transforms import RandGaussianNoised
from common.synthetic import make_scenario

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs")
TRAIN = os.path.join(CONFIGS, "train.json")
CPU = "$torch.device('cpu')"


def _switch_ids() -> list[str]:
    """The ``speed`` entries of train.json that are on by default on CUDA only (``@gpu``)."""
    with open(TRAIN, encoding="utf-8") as f:
        cfg = json.load(f)
    return sorted(k for k, v in cfg["speed"].items() if v == "@gpu")


def make_inferer(roi, overlap, sw_batch_size):
    """The bundles' ``inferer`` (MONAI's sliding window with constant blending)."""
    return SlidingWindowInferer(roi_size=roi, overlap=overlap, sw_batch_size=sw_batch_size, mode="constant")


def _net(features: int = 4, dropout: float = 0.1, seed: int = 0) -> KarimiFCN:
    torch.manual_seed(seed)
    return KarimiFCN(features=features, dropout=dropout)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast") / "ct"
    make_scenario("liver_ct", str(d), 4, shape=(16, 16, 8), spacing=(2.0, 2.0, 4.0))
    return str(d)


# ------------------------------------------------------------------------------ network-side paths
def test_channels_last_forward_equals_contiguous():
    """Same weights, channels_last_3d weights + input: outputs equal up to float32 rounding
    (tolerance 1e-5 of the output scale; seen: ~2e-6)."""
    net = _net().eval()
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net(x)
        execution.prepare_for_speed(net, channels_last=True)
        assert net.head.weight.is_contiguous(memory_format=torch.channels_last_3d)
        out = net(execution.to_device(x, "cpu", channels_last=True))
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.contiguous(), ref, rtol=0, atol=1e-5 * scale)


def test_onednn_convolutions_give_the_plain_forward_and_gradients():
    """The oneDNN path of the float32 CPU convolutions: same outputs and gradients as torch's own choice, up to float32
    rounding (tolerance 1e-5 of each tensor's scale; sums over 27 x C taps in another order); the state-dict keys are
    unchanged, and a bf16-autocast input takes the layer's own forward (bit-identical to an unwrapped copy)."""
    net = _net(dropout=0.0).eval()
    ref_net = copy.deepcopy(net)
    keys = list(net.state_dict())
    execution.prepare_for_speed(net, onednn_conv=True)
    assert list(net.state_dict()) == keys
    wrapped = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert wrapped and all(getattr(m.forward, "__tlseg_onednn__", False) for m in wrapped)
    x = torch.rand(1, 1, 16, 16, 16)
    out, ref = net(x), ref_net(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5 * scale + 1e-12, msg=name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(net(x), ref_net(x))


def test_channels_last_training_step_same_loss_and_grads():
    """One Adam step with the bundles' Dice loss: same loss (rtol 1e-5), gradients (1e-4 of their scale) and
    updated weights. Dropout off: its mask is drawn in memory order, so channels-last draws other masks
    (same distribution), which is why the bundle comparison below is on DSC, not on bits."""
    from monai.losses import DiceLoss

    loss_fn = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5,
                       batch=True)  # fmt: skip
    x = torch.rand(1, 1, 16, 16, 16)
    y = (torch.rand(1, 1, 16, 16, 16) > 0.6).float()
    results = []
    base = _net(dropout=0.0).train()
    for cl in (False, True):
        net = copy.deepcopy(base)
        execution.prepare_for_speed(net, channels_last=cl)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        opt.zero_grad()
        loss = loss_fn(net(execution.to_device(x, "cpu", channels_last=cl)), execution.to_device(y, "cpu", channels_last=cl))
        loss.backward()
        grads = {n: p.grad.detach().clone().contiguous() for n, p in net.named_parameters()}
        opt.step()
        results.append((loss.item(), grads, {n: p.detach().contiguous() for n, p in net.named_parameters()}))
    (l0, g0, w0), (l1, g1, w1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    lr, adam_eps = 1e-3, 1e-8
    for n in g0:
        scale = g0[n].abs().max().item() + 1e-12
        gtol = 1e-4 * scale
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=gtol, msg=n)
        # Adam's first step moves a weight by lr * g / (|g| + eps); a gradient difference dg <= gtol moves it by at
        # most lr * gtol * eps / (|g| - gtol + eps)^2 (a tiny gradient amplifies its rounding), and never by more
        # than 2 lr; plus float32 rounding of the weights
        g_low = (g0[n].abs() - gtol).clamp_min(0.0)
        wtol = (lr * gtol * adam_eps / (g_low + adam_eps) ** 2).clamp(max=2 * lr) + 1e-6
        assert bool(((w1[n] - w0[n]).abs() <= wtol).all()), n


def test_bf16_autocast_on_cpu_runs_and_agrees_loosely():
    """CPU autocast in bfloat16 (8-bit mantissa): logits within 5 % of their scale, labels >= 95 % equal."""
    net = _net().eval()
    x = torch.rand(1, 1, 16, 16, 16)
    assert execution.autocast_dtype("cpu") == torch.bfloat16
    with torch.no_grad():
        ref = net(x)
        with execution.autocast("cpu", dtype=None):
            out = net(x)
    assert out.dtype == torch.bfloat16
    scale = ref.abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 0.05 * scale
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.95


def test_amp_dtype_choice_and_scaler_handler():
    assert execution.amp_kwargs("cpu", "fp16") == {"dtype": torch.float16}
    assert execution.autocast_dtype("cuda:0", "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="amp_dtype"):
        execution.autocast_dtype("cpu", "int8")
    assert not execution.needs_grad_scaler(torch.bfloat16) and execution.needs_grad_scaler(torch.float16)
    monai_scaler = object()
    engine = SimpleNamespace(amp=True, scaler=monai_scaler)
    execution.AmpGradScalerHandler({"dtype": torch.bfloat16})(engine)
    assert engine.scaler is not monai_scaler and not engine.scaler.is_enabled()
    engine = SimpleNamespace(amp=True, scaler=monai_scaler)
    execution.AmpGradScalerHandler({"dtype": torch.float16})(engine)  # fp16 keeps MONAI's scaler
    assert engine.scaler is monai_scaler
    engine = SimpleNamespace(amp=False, scaler=None)
    execution.AmpGradScalerHandler({"dtype": torch.bfloat16})(engine)
    assert engine.scaler is None


def test_compile_keeps_state_dict_keys_and_outputs():
    """``torch.compile`` in place (the 'eager' backend here: tracing only, quick on a CPU); MetaTensor inputs
    are handed over as plain tensors."""
    from monai.data import MetaTensor

    net = _net().eval()
    keys = list(net.state_dict())
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net(x)
        execution.prepare_for_speed(net, compile=True, compile_kwargs={"backend": "eager"})
        assert list(net.state_dict()) == keys
        torch.testing.assert_close(net(x), ref)
        torch.testing.assert_close(torch.as_tensor(net(MetaTensor(x))), ref)
    torch._dynamo.reset()


def test_prepare_batch_strips_meta():
    from monai.data import MetaTensor
    from monai.engines.utils import default_prepare_batch

    batch = {"image": MetaTensor(torch.rand(1, 1, 8, 8, 8)), "label": MetaTensor(torch.zeros(1, 1, 8, 8, 8))}
    assert execution.prepare_batch_fn(False) is default_prepare_batch
    image, label = execution.prepare_batch_fn(True)(batch, torch.device("cpu"), False, **execution.to_kwargs(True))
    assert type(image) is torch.Tensor and type(label) is torch.Tensor
    torch.testing.assert_close(image, batch["image"].as_tensor())


# ------------------------------------------------------------------------------ inference
def test_sliding_window_batch_4_equals_batch_1_and_fast_masks_agree():
    """sw_batch_size 4 gives the logits of sw_batch_size 1 (up to float rounding); with channels-last as well,
    the masks agree on >= 99.9 % of voxels; in bf16 autocast loosely (>= 99 %)."""
    net = _net().eval()
    image = torch.rand(1, 1, 28, 24, 16)  # 12 windows at overlap 0.75 (3 batches of 4), 4 at 0.25
    with torch.no_grad():
        for overlap in (0.25, 0.75):
            ref = make_inferer(16, overlap, 1)(image, net)
            out = make_inferer(16, overlap, 4)(image, net)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
            cl = copy.deepcopy(net)
            execution.prepare_for_speed(cl, channels_last=True)
            out_cl = make_inferer(16, overlap, 4)(image, cl)
            assert (out_cl.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.999
            with execution.autocast("cpu"):
                out_bf16 = make_inferer(16, overlap, 4)(image, net)
            assert out_bf16.dtype == torch.float32  # stitched in the input's dtype
            assert (out_bf16.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.99


# ------------------------------------------------------------------------------ data paths
def _loader(tiny_dataset, root, **switches):
    import monai
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(TRAIN)
    for k, v in {"dataset_dir": tiny_dataset, "bundle_root": str(root), "block_size": [16, 16, 16], "device": CPU,
                 **switches}.items():  # fmt: skip
        parser[k if "#" in k or k not in _switch_ids() else f"speed#{k}"] = v
    parser.parse()
    monai.utils.set_determinism(seed=0)  # as the bundle's initialize, before the loader is built
    return parser.get_parsed_content("train#dataloader"), parser


def test_thread_loader_gives_the_same_batches(tiny_dataset, tmp_path):
    """ThreadDataLoader (+ CacheDataset) yields exactly DataLoader's batches for the same seed, over 3 epochs
    (shuffle order, random crops, flips, rotations, noise)."""
    from monai.data import ThreadDataLoader

    batches = {}
    for thread in (False, True):
        loader, _ = _loader(tiny_dataset, tmp_path / str(thread), thread_loader=thread)
        assert isinstance(loader, ThreadDataLoader) == thread
        batches[thread] = [(b["image"].clone(), b["label"].clone()) for _ in range(3) for b in loader]
    assert len(batches[True]) == len(batches[False]) >= 3
    for (i0, l0), (i1, l1) in zip(batches[False], batches[True]):
        assert torch.equal(i0, i1) and torch.equal(l0, l1)


@pytest.mark.parametrize("device, expected", [("$torch.device('cuda:1')", True), ("cuda:0", True), ("cpu", False),
                                              ("$torch.device('cpu')", False)])  # fmt: skip
def test_gpu_id_reads_the_device_given_either_way(device, expected):
    """``gpu`` (the default of the ``speed`` switches) is True exactly for a CUDA device, given as a torch.device
    (the configs' default) or as a string (MONAI Label sets ``device`` to "cuda:0" or "cpu")."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser["device"] = device
    assert parser.get_parsed_content("gpu") is expected
    assert parser.get_parsed_content("speed#amp") is expected


def test_switches_off_build_the_plain_objects(tiny_dataset, tmp_path):
    """With the switches off (the CPU defaults) the config builds MONAI's own classes and settings."""
    from monai.data import CacheDataset, DataLoader, ThreadDataLoader
    from monai.engines.utils import default_prepare_batch

    loader, parser = _loader(tiny_dataset, tmp_path, **{"network_def#features": 4})
    assert type(loader) is DataLoader and not isinstance(loader, ThreadDataLoader)
    assert type(loader.dataset) is CacheDataset
    noise = [t for t in loader.dataset.transform.transforms if type(t).__name__ == "RandGaussianNoised"]
    assert len(noise) == 1 and noise[0].on_device is False
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.amp is False and trainer.prepare_batch is default_prepare_batch and trainer.to_kwargs == {}
    assert parser.get_parsed_content("speed#sw_batch_size") == 1
    assert parser.get_parsed_content("train#dataset#device") is None  # the cache stays in CPU memory
    assert not parser.get_parsed_content("network").head.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_device_cache_dataset_and_noise_on_device(tiny_dataset, tmp_path):
    """DeviceCacheDataset holds the same items as CacheDataset (here on the CPU 'device'); a partial cache stays put.
    The on-device noise: reproducible from the transform's random state, the configured spread."""
    from monai.data import CacheDataset

    loader, parser = _loader(tiny_dataset, tmp_path)
    data = parser.get_parsed_content("split")["training"]
    transform = parser.get_parsed_content("train#preprocessing")
    plain = CacheDataset(data, transform, cache_rate=1.0, progress=False)
    dev = datasets.cache_dataset(data, transform, device="cpu", cache_rate=1.0, progress=False)
    assert isinstance(dev, datasets.DeviceCacheDataset) and dev.on_device
    for a, b in zip(plain._cache, dev._cache):
        assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
    part = datasets.cache_dataset(data, transform, device="cpu", cache_rate=0.5, progress=False)
    assert not part.on_device
    assert datasets.cache_device("cpu") is None and datasets.cache_device("cuda:0", enabled=False) is None
    assert datasets.cache_device("cuda:0", num_workers=2) is None
    assert str(datasets.cache_device("cuda:0")) == "cuda:0"

    img = {"image": torch.zeros(1, 32, 32, 32)}
    t = RandGaussianNoised("image", prob=1.0, std=0.1, on_device=True, sample_std=False)
    a = t.set_random_state(3)(img)["image"]
    b = t.set_random_state(3)(img)["image"]
    # 32^3 draws: the sample std lies within 5 standard errors (std / sqrt(2 n), 0.4 %) of the configured 0.1
    assert torch.equal(a, b) and a.std().item() == pytest.approx(0.1, rel=5 / np.sqrt(2 * a.numel()))
    off = RandGaussianNoised("image", prob=1.0, std=0.1, on_device=False).set_random_state(3)(img)["image"]
    from monai.transforms import RandGaussianNoised as MonaiRandGaussianNoised

    monai_out = MonaiRandGaussianNoised("image", prob=1.0, std=0.1).set_random_state(3)(img)["image"]
    assert torch.equal(torch.as_tensor(off), torch.as_tensor(monai_out))  # off: MONAI's transform exactly


# ------------------------------------------------------------------------------ the bundle, end to end
def _run_bundle(tiny_dataset, root, switches: dict[str, object], caplog) -> dict:
    """train.json with the ``speed`` switches, run in this process as ``python -m monai.bundle run`` runs it."""
    from monai.bundle import ConfigWorkflow

    overrides = {"dataset_dir": tiny_dataset, "bundle_root": str(root), "device": CPU, "block_size": [16, 16, 16],
                 "network_def#features": 4, "iterations_per_epoch": 2, "max_epochs": 1,
                 **{f"speed#{k}": v for k, v in switches.items()}}  # fmt: skip
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO):
            wf = ConfigWorkflow(config_file=TRAIN, workflow_type=None, logging_file=False, **overrides)
            wf.initialize()
            wf.run()
            wf.finalize()
    finally:  # cudnn_benchmark sets these process-wide
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
    run = root / "runs" / "train"
    model = torch.load(run / "checkpoint_final.pt", map_location="cpu", weights_only=False)["model"]
    history = json.loads((run / "snapshots" / "history.json").read_text(encoding="utf-8"))
    return {"model": model, "dice": history["entries"][-1]["val_dice"], "log": caplog.text}


def test_bundle_plain_path_bit_identical_and_cuda_defaults_run_on_cpu(tiny_dataset, tmp_path, caplog):
    """Every switch off, twice (in one process; tests/test_resume.py runs the same command twice in two): bit-identical
    weights (the plain path; it was also checked bit-identical to the configs before the fast paths existed). Every switch at its CUDA default on a CPU: the run completes
    (the cache stays in CPU memory) and its validation
    DSC is within 0.01 of the plain run's: on a CPU ``amp`` is the network's forward under CPU bf16 autocast (MONAI's
    engines autocast for CUDA only and are left without it), so this is also bf16 against float32 on the same run."""
    switch_ids = _switch_ids()
    assert {"amp", "channels_last", "cudnn_benchmark", "cache_on_gpu", "thread_loader", "noise_on_device",
            "strip_meta"} <= set(switch_ids)  # fmt: skip
    off = {k: False for k in switch_ids}
    on = {**{k: True for k in switch_ids}, "sw_batch_size": execution.default_sw_batch_size("cuda")}
    plain1 = _run_bundle(tiny_dataset, tmp_path / "plain1", off, caplog)
    plain2 = _run_bundle(tiny_dataset, tmp_path / "plain2", off, caplog)
    assert plain1["model"].keys() == plain2["model"].keys()
    for k in plain1["model"]:
        assert torch.equal(plain1["model"][k], plain2["model"][k]), k
    fast_run = _run_bundle(tiny_dataset, tmp_path / "fast", on, caplog)
    if execution.cpu_bf16_check() is None:
        assert "Network forward under CPU autocast (torch.bfloat16)" in fast_run["log"]
    else:  # this CPU's bf16 convolutions fail the known-answer check: float32, and the log says why
        assert "CPU bf16 autocast refused on this machine" in fast_run["log"]
    assert fast_run["model"].keys() == plain1["model"].keys()
    assert np.isfinite(fast_run["dice"]) and abs(fast_run["dice"] - plain1["dice"]) <= 0.01


def test_cpu_autocast_wraps_the_forward_keeps_the_keys_and_stays_close_to_float32(tmp_path):
    """``speed#amp`` on a CPU: the forward runs in bfloat16 (MONAI's engines autocast for CUDA only), the state-dict
    keys are unchanged, and the logits stay within bf16's precision of the float32 ones (8-bit mantissa: 2^-8 per
    rounding; relative error of the logits well under 10 % through the network's ~50 layers)."""
    from common.execution import autocast_on_cpu, cpu_bf16_check, cpu_bf16_native, prepare_network
    from common.networks import KarimiFCN

    torch.manual_seed(0)
    net = KarimiFCN(features=4).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net(x)
    keys = list(net.state_dict())
    same = autocast_on_cpu(net, check=False)  # the wrapper itself, whatever this CPU's bf16 kernels do
    assert same is net and list(net.state_dict()) == keys
    seen = []
    hook = net.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        out = net(x)
    hook.remove()
    assert seen == [torch.bfloat16]
    rel = float((out.float() - ref).norm() / ref.norm())
    assert 0 < rel < 0.1, rel
    autocast_on_cpu(net)  # idempotent: one wrapper
    assert not hasattr(net.forward.__wrapped__, "__tlseg_cpu_autocast__")
    # off: the plain path
    plain = prepare_network(KarimiFCN(features=4), "cpu", {"amp": False})
    assert "forward" not in vars(plain)
    # through prepare_network: bf16 only where this CPU's bf16 convolutions pass the known-answer check
    checked = prepare_network(KarimiFCN(features=4), "cpu", {"amp": True})
    assert ("forward" in vars(checked)) == (cpu_bf16_check() is None)
    # the CPU flag reader
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n", encoding="utf-8")
    assert cpu_bf16_native(str(info))
    info.write_text("processor : 0\nflags : fpu sse avx2\n", encoding="utf-8")
    assert not cpu_bf16_native(str(info)) and not cpu_bf16_native(str(tmp_path / "missing"))
    assert isinstance(cpu_bf16_native(), bool)


def test_bf16_autocast_is_refused_where_the_cpu_kernels_fail_the_check(monkeypatch, caplog):
    """A CPU whose bf16 convolutions fail :func:`cpu_bf16_check` (seen: oneDNN 3.12's weight gradient on a 2^3 input,
    AMD Zen 4) trains in float32, with a warning naming the failure; one that passes gets bf16."""
    from common import execution
    from common.networks import KarimiFCN

    problem = execution.cpu_bf16_check()
    assert problem is None or "away from float32" in problem
    monkeypatch.setattr(execution, "cpu_bf16_check", lambda: "the bf16 weight gradient of a test is 1 away from float32")
    with caplog.at_level(logging.WARNING, logger="common.execution"):
        net = execution.prepare_network(KarimiFCN(features=4), "cpu", {"amp": True})
    assert "forward" not in vars(net)  # the plain float32 forward
    assert "CPU bf16 autocast refused on this machine: the bf16 weight gradient of a test" in caplog.text
    assert not execution.cpu_bf16_usable()
    monkeypatch.setattr(execution, "cpu_bf16_check", lambda: None)
    net = execution.prepare_network(KarimiFCN(features=4), "cpu", {"amp": True})
    assert net.forward.__tlseg_cpu_autocast__ == torch.bfloat16


def test_onednn_held_below_bf16_is_not_native_bf16(tmp_path, monkeypatch):
    """``ONEDNN_MAX_CPU_ISA=AVX2`` (how an AVX2-only CPU is imitated): oneDNN emulates bf16, so the CPU does not count as
    bf16-native even when its flags name ``avx512_bf16``."""
    from common.execution import cpu_bf16_native

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n", encoding="utf-8")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert cpu_bf16_native(str(info))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_bf16_native(str(info))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_bf16_native(str(info))
