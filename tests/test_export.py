# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Export of every bundle's network: TorchScript (`python -m monai.bundle ckpt_export`) and ONNX.

The paper's FCN is scripted with ``torch.jit.script`` (no ``--use_trace`` needed: its Python control flow,
the input checks, the dense-connection loops over ``ModuleList``s and the ``torch.no_grad()`` of a frozen
encoder, is all TorchScript-compatible). The exported ``model.ts`` is loaded in a separate interpreter that
has torch but cannot import the project's ``common`` package (``python -I -S`` with only the interpreter's
site-packages directory on ``sys.path``, so the editable-install hook of ``common`` is never run), and its
output must equal the checkpoint's (max abs difference <= 1e-5).
ONNX: ``monai.bundle.onnx_export`` (torch's dynamo exporter, fixed input shape = one block) and ONNX Runtime
on the CPU (max abs difference <= 1e-4); skipped when ``onnx``/``onnxruntime`` are absent
(``pip install -e .[export]``).
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import textwrap

import pytest
import torch

from _ecosystem import BUNDLE_NAMES, BUNDLES_DIR, SMALL, bundle_cmd, run, small_network

#: Exported against eager outputs, relative to the outputs' largest magnitude: float32 rounding through the 52
#: convolutions, summed in another order by another kernel (another process, ONNX Runtime), on any CPU.
TS_RTOL = 1e-5
ONNX_RTOL = 1e-4


def _tolerance(rtol: float, scale: float) -> float:
    """``rtol`` of the outputs' largest magnitude ``scale`` (at least ``rtol`` for outputs below 1)."""
    return rtol * max(1.0, scale)

SHAPE = (1, 1, 16, 16, 16)


def _configs(name: str) -> tuple[str, str]:
    cdir = os.path.join(BUNDLES_DIR, name, "configs")
    return os.path.join(cdir, "inference.json"), os.path.join(cdir, "metadata.json")


def _bundle_network(name: str, seed: int) -> torch.nn.Module:
    """The bundle's own ``network_def`` (features 4), seeded: the weights to export."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_configs(name)[0])
    parser["network_def#features"] = 4
    torch.manual_seed(seed)
    return parser.get_parsed_content("network_def").eval()


def test_fcn_is_scriptable():
    net = small_network()
    scripted = torch.jit.script(net)
    x = torch.rand(SHAPE)
    with torch.no_grad():
        ref = net(x)  # the same float32 operations; the TorchScript executor may order a reduction differently
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    net.encoder_frozen = True  # the frozen-encoder branch scripts too
    torch.jit.script(net)
    with pytest.raises(torch.jit.Error, match="divisible by 8"):
        scripted(torch.rand(1, 1, 12, 16, 16))  # the input check survives scripting


def _one_bundle_per_network() -> list[str]:
    """The first bundle of each distinct ``network_def`` (with its class count) in the bundles' inference configs:
    ``ckpt_export`` builds the network from that entry alone, so bundles that share it export the same program
    (seven bundles share the FCN; ``multitask`` has its heads)."""
    seen: dict[str, str] = {}
    for name in BUNDLE_NAMES:
        with open(os.path.join(BUNDLES_DIR, name, "configs", "inference.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        seen.setdefault(json.dumps([cfg["network_def"], cfg.get("num_classes")], sort_keys=True), name)
    return list(seen.values())


@pytest.mark.parametrize("name", _one_bundle_per_network())
def test_ckpt_export_runs_without_common(name, tmp_path):
    inference, metadata = _configs(name)
    net = _bundle_network(name, seed=1)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    run(
        bundle_cmd("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), "--meta_file", metadata,
                   "--config_file", inference, "--bundle_root", str(tmp_path), *SMALL),
        cwd=str(tmp_path), timeout=300,
    )  # fmt: skip
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        sys.path.extend({site!r})
        assert importlib.util.find_spec("common") is None, "common is importable"
        import torch
        io = torch.load({str(tmp_path / "io.pt")!r})
        extra = {{"metadata.json": "", "inference.json": ""}}
        model = torch.jit.load({str(ts)!r}, _extra_files=extra)
        with torch.no_grad():
            out = model(io["x"])
        print("shape", tuple(out.shape))
        print("maxdiff", float((out - io["expected"]).abs().max()))
        print("scale", float(io["expected"].abs().max()))
        print("version", json.loads(extra["metadata.json"])["version"])
        print("network_def", json.loads(extra["inference.json"])["network_def"]["_target_"])
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = run([sys.executable, "-I", "-S", "-c", script], cwd=str(elsewhere), timeout=300, env=env)
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["shape"] == "(1, 2, 16, 16, 16)"
    assert float(lines["maxdiff"]) <= _tolerance(TS_RTOL, float(lines["scale"])), lines
    with open(inference, encoding="utf-8") as f:  # the configs travel inside model.ts
        assert lines["network_def"] == json.load(f)["network_def"]["_target_"]

    # the isolation is real: the same interpreter settings cannot import common
    probe_code = f"import sys; sys.path.extend({site!r}); import common"
    probe = run([sys.executable, "-I", "-S", "-c", probe_code], cwd=str(elsewhere), env=env, check=False)
    assert probe.returncode != 0 and "No module named 'common'" in probe.stderr


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_onnx_export_matches_checkpoint(name, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs `pip install -e .[export]` (onnx, onnxruntime, onnxscript)")
    ort = pytest.importorskip("onnxruntime", reason="ONNX check needs `pip install -e .[export]`")
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (`pip install -e .[export]`)")
    from monai.bundle import onnx_export

    inference, metadata = _configs(name)
    net = _bundle_network(name, seed=2)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    path = tmp_path / "model.onnx"
    onnx_export(
        net_id="network_def", filepath=str(path), ckpt_file=str(ckpt), meta_file=metadata, config_file=inference,
        input_shape=list(SHAPE), **{"network_def#features": 4, "bundle_root": str(tmp_path)},
    )  # fmt: skip
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = net(x).numpy()
    assert out.shape == expected.shape
    assert abs(out - expected).max() <= _tolerance(ONNX_RTOL, float(abs(expected).max()))
