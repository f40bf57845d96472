# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the ecosystem tests (packaging, export, multi-GPU, tracking, MONAI Label).

Everything runs on the CPU with tiny volumes: synthetic 24x24x16 liver-CT phantoms, the paper's FCN at
``features=4`` and 16^3 blocks.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from typing import Iterator, Sequence

import torch

from common.networks import KarimiFCN
from common.synthetic import make_scenario

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(ROOT, "bundles")
BUNDLE_NAMES = sorted(
    os.path.basename(os.path.dirname(os.path.dirname(p)))
    for p in glob.glob(os.path.join(BUNDLES_DIR, "*", "configs", "metadata.json"))
)
FIRST_BUNDLE = "liver_ct_from_liver_mri"

#: the small network and block size of every test run
SMALL = ["--network_def#features", "4", "--block_size", "[16,16,16]"]
SMALL_FEATURES = 4
#: folders a bundle copy leaves out (run outputs, data)
COPY_IGNORE = shutil.ignore_patterns("runs", "data", "predictions", "eval", "mlruns", "__pycache__", "*.pyc")


def tiny_dataset(path: str, n: int, seed: int = 0) -> str:
    """``n`` synthetic liver-CT cases (24x24x16 voxels of 2x2x3 mm) in the Decathlon layout."""
    return make_scenario("liver_ct", str(path), n, seed=seed, shape=(24, 24, 16), spacing=(2.0, 2.0, 3.0))


def small_network(all_foreground: bool = False, seed: int = 0) -> KarimiFCN:
    """The FCN at ``features=4`` (eval mode). With ``all_foreground`` the head gives class 1 a +100 logit
    everywhere, so a pipeline that really loaded these weights segments every voxel as foreground
    (random weights, e.g. after a silent ``strict=False`` key mismatch, would not)."""
    torch.manual_seed(seed)
    net = KarimiFCN(features=SMALL_FEATURES)
    if all_foreground:
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.copy_(torch.tensor([0.0, 100.0]))
    return net.eval()


def copy_bundle(dst: str, name: str = FIRST_BUNDLE) -> str:
    """Copy ``bundles/<name>`` to ``dst`` (without run outputs); returns ``dst``."""
    shutil.copytree(os.path.join(BUNDLES_DIR, name), dst, ignore=COPY_IGNORE)
    return dst


def run(cmd: Sequence[str], cwd: str, timeout: float = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``check`` a non-zero exit fails the test with the output tails. Torch and OpenMP use one
    thread unless ``env`` says otherwise (tiny networks: more threads only spin on a shared machine)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def bundle_cmd(*args: str) -> list[str]:
    """``python -m monai.bundle <args>`` with this interpreter."""
    return [sys.executable, "-m", "monai.bundle", *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests_seen: list[str]

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        self.requests_seen.append(self.path)


@contextlib.contextmanager
def serve_directory(root: str) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root`` over HTTP on 127.0.0.1 (a free port) from a thread; yields ``(base_url, paths requested)``
    and stops the server on exit."""
    seen: list[str] = []
    handler = functools.partial(type("Handler", (_QuietHandler,), {"requests_seen": seen}), directory=root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="test-http-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
