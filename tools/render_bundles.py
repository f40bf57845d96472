#!/usr/bin/env python3
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Render every bundle from one source: the shared template plus each bundle's ``scenario.json``.

What is the same in every bundle is written once, in ``bundles/_template/``:

* ``_base.json``: the ids every workflow shares (imports, paths, modality, voxel size, classes, device, the
  ``speed`` options, ``network_def`` / ``network``, the deterministic ``preprocessing``, the sliding-window
  ``inferer``, the inverting ``postprocessing``);
* one template per config file (``train.json``, ``inference.json``, ``evaluate.json``, ``rsim.json``,
  ``pretrain.json``, ``finetune.json``, ``frozen_encoder.json``, ``multi_gpu_train.json``,
  ``progress_bar.json``). A complete config's template has a ``"_base_"`` entry (``"all"`` or a list of ids)
  that says which ids of ``_base.json`` it starts from; its own ids are merged over them with MONAI's layering
  rules (``a#b`` ids, ``+id`` appends to a list or updates a dict), exactly as ``--config_file "[a, b]"``
  merges files. A template without ``"_base_"`` is an override file (``evaluate.json``, ``finetune.json``,
  ...), layered on ``train.json`` at run time, and is rendered as it is;
* ``metadata.json`` (filled from the scenario), ``logging.conf``, ``LICENSE``, ``models_README.md``,
  ``training_stability.md`` (copied to each bundle's ``docs/``).

What is specific to a bundle is its ``bundles/<name>/scenario.json``:

* ``version`` and ``changelog``; ``labels`` (``{"0": "background", "1": "liver"}``: gives ``num_classes``, unless
  ``params`` sets it, and the metadata's classes); ``in_channels`` and ``channel_names`` (optional, default one
  ``image`` channel);
* ``params``: ids set in every rendered config that has them (e.g. ``modality``, ``pixdim``, ``dataset_dir``);
  a param that no config has is an error (a typo would otherwise be silently ignored);
* ``configs``: per config file, ids to set (MONAI id paths); a file name that is not a template makes an extra
  layered config of the bundle (e.g. one ``pretrain_<source>.json`` per source);
* ``metadata``: the text fields of ``metadata.json`` (name, task, description, data_source, ...);
* ``exclude``: template config files this bundle does not have (e.g. no source model: no ``finetune.json``);
* ``synthetic``: the recipe of its synthetic stand-ins (:mod:`common.standins`; not rendered).

Each bundle's ``docs/`` (README.md, data_license.txt) is written by hand, but for ``docs/training_stability.md``. The rendered files are committed, so
that MONAI Label, ``ckpt_export`` and ``monai.bundle download`` find complete, model-zoo-shaped bundles;
``tests/test_bundles.py`` fails when a committed file differs from what this tool renders (``--check``).

Usage::

    python tools/render_bundles.py             # (re)write every bundle's rendered files
    python tools/render_bundles.py --check     # exit 1 and list the files that differ
    python tools/render_bundles.py --names liver_ct_from_liver_mri
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
TEMPLATE_DIR = os.path.join(BUNDLES_DIR, "_template")
SCENARIO_FILE = "scenario.json"
BASE_FILE = "_base.json"
BASE_KEY = "_base_"
#: The JSON schema the rendered metadata.json files are verified against (tests/test_bundles.py); not rendered.
SCHEMA_FILE = "metadata_schema.json"
#: Template files copied verbatim: template name -> path in the bundle.
VERBATIM = {"logging.conf": "configs/logging.conf", "LICENSE": "LICENSE", "models_README.md": "models/README.md",
            "training_stability.md": "docs/training_stability.md"}
MODALITY_FORMAT = {"CT": "hounsfield", "MR": "magnitude"}

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


class RenderError(Exception):
    """A scenario or template that cannot be rendered (the message names the file and the problem)."""


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise RenderError(f"{path}: cannot be read as JSON: {err}") from err


def dump(obj: Any) -> str:
    """The rendered text of a JSON file (4-space indent, a final newline)."""
    return json.dumps(obj, indent=4, ensure_ascii=False) + "\n"


def merge(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge config dicts in order with MONAI's own layering rules (``monai.bundle.utils.merge_kv``)."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import merge_kv

    parser = ConfigParser(config={})
    for layer in layers:
        for k, v in layer.items():
            merge_kv(parser, k, copy.deepcopy(v))
    out = parser.get()
    out.pop(parser.meta_key, None)
    return out


def template_configs(template_dir: str = TEMPLATE_DIR) -> dict[str, dict[str, Any]]:
    """The config templates (file name -> content), ``_base.json``, ``metadata.json`` and the schema excluded."""
    names = sorted(f for f in os.listdir(template_dir) if f.endswith(".json") and f not in (BASE_FILE, "metadata.json", SCHEMA_FILE))
    return {n: _load(os.path.join(template_dir, n)) for n in names}


def _with_base(name: str, template: Mapping[str, Any], base: Mapping[str, Any], template_dir: str) -> list[Mapping[str, Any]]:
    template = dict(template)
    wanted = template.pop(BASE_KEY)
    if wanted == "all":
        return [base, template]
    missing = [k for k in wanted if k not in base]
    if missing:
        raise RenderError(f"{os.path.join(template_dir, name)}: {BASE_KEY} names ids that {BASE_FILE} lacks: {missing}")
    return [{k: base[k] for k in wanted}, template]


def scenario_of(bundle_dir: str) -> dict[str, Any]:
    """The bundle's ``scenario.json``, checked."""
    path = os.path.join(bundle_dir, SCENARIO_FILE)
    sc = _load(path)
    for key in ("version", "labels", "metadata"):
        if key not in sc:
            raise RenderError(f"{path}: missing '{key}'.")
    labels = sc["labels"]
    if sorted(int(k) for k in labels) != list(range(len(labels))) or len(labels) < 2:
        raise RenderError(f"{path}: 'labels' must number the classes 0..n-1 (n >= 2, 0 the background), got {labels}.")
    if sc["version"] not in sc.get("changelog", {}):
        raise RenderError(f"{path}: version {sc['version']} has no changelog entry.")
    return sc


def render_configs(
    scenario: Mapping[str, Any], source: str = SCENARIO_FILE, template_dir: str = TEMPLATE_DIR
) -> dict[str, dict[str, Any]]:
    """The bundle's config files (``configs/<name>`` -> content) rendered from the template and ``scenario``."""
    base = _load(os.path.join(template_dir, BASE_FILE))
    params = dict(scenario.get("params", {}))
    params.setdefault("num_classes", len(scenario["labels"]))  # a multi-task scenario gives its largest head
    if "in_channels" in scenario:
        params["network_def#in_channels"] = int(scenario["in_channels"])
    overrides = dict(scenario.get("configs", {}))
    out: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    templates = template_configs(template_dir)
    for name, tmpl in templates.items():
        full = BASE_KEY in tmpl  # a complete config; the others are override files layered on one
        merged = merge(_with_base(name, tmpl, base, template_dir)) if full else copy.deepcopy(dict(tmpl))
        mine = {}
        for k, v in params.items():
            if k.split("#", 1)[0] in merged:
                mine[k] = v
                used.add(k)
        if full:
            out[name] = merge([merged, mine, overrides.get(name, {})])
        else:  # ids of an override file are set as they are (they may name ids of the config it is layered on)
            out[name] = {**merged, **copy.deepcopy(mine), **copy.deepcopy(overrides.get(name, {}))}
    unused = sorted(set(params) - used)
    if unused:
        raise RenderError(f"{source}: params {unused} are ids of no config file (a typo?).")
    for name, extra in overrides.items():
        if name not in templates:
            out[name] = copy.deepcopy(dict(extra))
    for name in scenario.get("exclude", []):  # templates that make no sense for this bundle
        if name not in out:
            raise RenderError(f"{source}: 'exclude' names {name}, which no template or override renders.")
        del out[name]
    return out


def render_metadata(scenario: Mapping[str, Any], template_dir: str = TEMPLATE_DIR) -> dict[str, Any]:
    """``configs/metadata.json`` from the template and the scenario (labels, modality, version, texts)."""
    import common

    meta = _load(os.path.join(template_dir, "metadata.json"))
    labels = {str(k): v for k, v in sorted(scenario["labels"].items(), key=lambda kv: int(kv[0]))}
    modality = str(scenario.get("params", {}).get("modality", "CT")).upper()
    channels = scenario.get("channel_names") or ["image"] * int(scenario.get("in_channels", 1))
    meta["version"] = scenario["version"]
    meta["changelog"] = dict(sorted(scenario["changelog"].items(), reverse=True))
    meta["required_packages_version"]["tlseg-common"] = common.__version__
    meta.update(scenario["metadata"])
    classes = ", ".join(f"{k}: {v}" for k, v in labels.items())
    meta["label_classes"] = meta["pred_classes"] = classes
    image = meta["network_data_format"]["inputs"]["image"]
    image.update(
        modality=modality,
        format=MODALITY_FORMAT.get(modality, "magnitude"),
        num_channels=len(channels),
        value_range=[0, 1] if modality == "CT" else [],
        channel_def={str(i): c for i, c in enumerate(channels)},
    )
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred.update(num_channels=len(labels), channel_def=labels)
    return meta


def render_bundle(name: str, bundles_dir: str = BUNDLES_DIR) -> dict[str, str]:
    """Every rendered file of bundle ``name``: path relative to the bundle folder -> text."""
    bdir = os.path.join(bundles_dir, name)
    template_dir = os.path.join(bundles_dir, "_template")
    scenario = scenario_of(bdir)
    configs = render_configs(scenario, os.path.join(bdir, SCENARIO_FILE), template_dir)
    files = {f"configs/{n}": dump(c) for n, c in configs.items()}
    files["configs/metadata.json"] = dump(render_metadata(scenario, template_dir))
    for src, dst in VERBATIM.items():
        with open(os.path.join(template_dir, src), encoding="utf-8") as f:
            files[dst] = f.read()
    return files


def bundle_names(bundles_dir: str = BUNDLES_DIR) -> list[str]:
    """The bundles that have a ``scenario.json`` (sorted)."""
    return sorted(d for d in os.listdir(bundles_dir) if os.path.isfile(os.path.join(bundles_dir, d, SCENARIO_FILE)))


def differences(name: str, bundles_dir: str = BUNDLES_DIR) -> list[str]:
    """Rendered files of ``name`` whose committed copy differs or is missing, and config files that no source
    produces (e.g. a template removed)."""
    bdir = os.path.join(bundles_dir, name)
    want = render_bundle(name, bundles_dir)
    diff = []
    for rel, text in want.items():
        path = os.path.join(bdir, rel)
        if not os.path.isfile(path):
            diff.append(f"{name}/{rel}: missing")
        else:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    diff.append(f"{name}/{rel}: differs from its source (bundles/_template + {name}/{SCENARIO_FILE})")
    cfg = os.path.join(bdir, "configs")
    for f in sorted(os.listdir(cfg)) if os.path.isdir(cfg) else []:
        if f"configs/{f}" not in want:
            diff.append(f"{name}/configs/{f}: no source renders it")
    return diff


def write_bundle(name: str) -> list[str]:
    """Write the rendered files of ``name``; returns the ones that changed."""
    from common.io import write_text

    changed = []
    bdir = os.path.join(BUNDLES_DIR, name)
    files = render_bundle(name)
    for rel, text in files.items():
        path = os.path.join(bdir, rel)
        old = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
        if old != text:
            write_text(path, text)
            changed.append(rel)
    cfg = os.path.join(bdir, "configs")
    for f in sorted(os.listdir(cfg)):  # configs/ is rendered entirely: a file no source renders any more goes
        if f"configs/{f}" not in files:
            os.remove(os.path.join(cfg, f))
            changed.append(f"configs/{f} (removed)")
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Rendered files: configs/*.json, configs/metadata.json, configs/logging.conf, LICENSE, "
                                "models/README.md. Edit bundles/_template or bundles/<name>/scenario.json, then render.")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a committed file differs from its source")
    p.add_argument("--names", nargs="+", help="bundles to render (default: every folder of bundles/ with a scenario.json)")
    args = p.parse_args(argv)
    names = args.names or bundle_names()
    try:
        if args.check:
            diff = [d for n in names for d in differences(n)]
            for d in diff:
                print(d)
            print(f"{len(names)} bundle(s) checked: " + ("all rendered files match their source." if not diff else f"{len(diff)} file(s) differ; run python tools/render_bundles.py"))
            return 1 if diff else 0
        for n in names:
            changed = write_bundle(n)
            print(f"{n}: " + (", ".join(changed) if changed else "up to date"))
    except RenderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
