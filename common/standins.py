# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""A bundle's synthetic stand-ins: its scenario's recipe made into datasets, and the overrides that point the
bundle's configs at them, so every bundle runs end to end without a download (tests, the demo, quick studies).

A bundle's ``scenario.json`` (the render source, see ``tools/render_bundles.py``) names, per config file, the
synthetic data that stands in for each dataset it reads::

    "synthetic": {
        "train.json": {"dataset_dir": {"preset": "tsc_centers", "n": 3, "test_per_group": 1}},
        "pretrain.json": {"dataset_dir": {"preset": "brats_mr", "n": 6, "channel": "FLAIR",
                                          "label_map": {"0": 0, "1": 1, "2": 1, "3": 1}}}
    }

Each spec is a preset of :mod:`common.synthetic` (``preset``, ``n`` cases, for a grouped preset ``n`` per group
and ``test_per_group``) plus the dataset's options of the run (``label_map``, ``channel``, ``task``, ``modality``,
``num_classes``, ``name``: :func:`common.data.read_sources`); a list is a pool. :func:`stand_in_overrides`
writes the datasets under a folder and returns ``{"dataset_dir": ..., "dataset_options": ...}`` for that config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .synthetic import make_scenario

__all__ = ["SYNTHETIC_KEY", "read_recipe", "make_stand_in", "stand_in_overrides"]

SYNTHETIC_KEY = "synthetic"
_DATA_KEYS = ("preset", "n", "test_per_group", "seed", "shape", "spacing")


def read_recipe(bundle_dir: str) -> dict[str, Any]:
    """The ``synthetic`` section of ``<bundle_dir>/scenario.json`` (config file -> overrides with specs)."""
    path = os.path.join(bundle_dir, "scenario.json")
    with open(path, encoding="utf-8") as f:
        recipe = json.load(f).get(SYNTHETIC_KEY)
    if not recipe:
        raise ValueError(f"{path} has no '{SYNTHETIC_KEY}' section: the bundle names no synthetic stand-ins.")
    return recipe


def make_stand_in(
    spec: Mapping[str, Any], out_dir: str, seed: int = 0, scale: float = 1.0, **phantom: Any
) -> tuple[str, dict | None]:
    """Write the dataset of one spec to ``out_dir`` (unless it is already there); returns ``(folder, options)``.

    ``scale`` multiplies the case counts (at least 1 per dataset or group); ``phantom`` overrides fields of every
    phantom (e.g. a small ``shape`` and ``spacing`` for tests)."""
    if "preset" not in spec:
        raise ValueError(f"Synthetic spec {dict(spec)!r} names no preset.")
    if not os.path.isfile(os.path.join(out_dir, "dataset.json")):
        n = max(1, round(int(spec.get("n", 4)) * scale))
        extra = {**{k: tuple(spec[k]) for k in ("shape", "spacing") if k in spec}, **phantom}
        make_scenario(spec["preset"], out_dir, n, seed=int(spec.get("seed", seed)),
                      test_per_group=int(spec.get("test_per_group", 0)), **extra)  # fmt: skip
    options = {k: v for k, v in spec.items() if k not in _DATA_KEYS}
    return out_dir, (options or None)


def stand_in_overrides(
    recipe: Mapping[str, Any], config: str, root: str, seed: int = 0, scale: float = 1.0, **phantom: Any
) -> dict[str, Any]:
    """The overrides of config file ``config`` (e.g. ``"train.json"``) that replace its datasets by their stand-ins,
    written under ``root`` (one folder per config and dataset); ``{}`` when the recipe has none for it.
    ``scale`` and ``phantom``: see :func:`make_stand_in`."""
    out: dict[str, Any] = {}
    for key, value in (recipe.get(config) or {}).items():
        if key != "dataset_dir":
            out[key] = value
            continue
        specs = value if isinstance(value, list) else [value]
        made = [
            make_stand_in(s, os.path.join(root, f"{os.path.splitext(config)[0]}_{i}_{s['preset']}"), seed + 101 * i, scale,
                          **phantom)
            for i, s in enumerate(specs)
        ]
        dirs = [d for d, _ in made]
        options = [o for _, o in made]
        if isinstance(value, list):
            out["dataset_dir"] = dirs
            out["dataset_options"] = options if any(options) else None
        else:
            out["dataset_dir"] = dirs[0]
            out["dataset_options"] = options[0]
    return out
