# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the benchmark tools only (not part of the ``common`` package): device names and
synchronisation for timings."""

from __future__ import annotations

import os
import platform
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python tools/bench_x.py` from any folder imports this checkout's `common`
    sys.path.insert(0, REPO_ROOT)

__all__ = ["REPO_ROOT", "synchronize", "device_name"]


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str = "cpu") -> str:
    """A readable name of the device: the GPU's name, or the CPU model from ``/proc/cpuinfo``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
