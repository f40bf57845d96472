# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""The contract every bundle folder keeps, and the single source its configs are rendered from.

For every folder of ``bundles/`` with a ``configs/metadata.json`` (none hard-coded):

* its rendered files (configs, metadata, logging.conf, LICENSE, models/README.md) are exactly what
  ``tools/render_bundles.py`` makes from ``bundles/_template`` and the bundle's ``scenario.json``, so a fix
  made once at the source reaches every bundle, and an edit made in a committed config is caught;
* MONAI's own bundle checks pass: ``check_properties`` of the train and inference workflows,
  ``verify_metadata`` against the schema kept in ``bundles/_template/metadata_schema.json`` (offline) and
  ``verify_net_in_out``;
* train, inference, evaluate and rsim use the same network and apply the same preprocessing to an image;
* the forms users type work from another working directory: ``run training``, the bare ``run``,
  ``run evaluating``, ``run inference``;
* a failed run ends with its reason (the file and the problem in the last lines of the output).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from _ecosystem import BUNDLE_NAMES, BUNDLES_DIR, FIRST_BUNDLE, ROOT, SMALL, bundle_cmd, run, tiny_dataset

sys.path.insert(0, os.path.join(ROOT, "tools"))
import render_bundles  # noqa: E402

SCHEMA = os.path.join(BUNDLES_DIR, "_template", "metadata_schema.json")
SMALL_OVERRIDES = {"network_def#features": 4, "block_size": [16, 16, 16]}


def cfg(name: str, *files: str) -> list[str]:
    return [os.path.join(BUNDLES_DIR, name, "configs", f) for f in files]


def as_arg(files: list[str]) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(str(tmp_path_factory.mktemp("bundle_data") / "ds"), 4)


# ---------------------------------------------------------------------------------------------- one source
def test_every_bundle_has_a_source():
    assert BUNDLE_NAMES, "no bundle found"
    assert render_bundles.bundle_names() == BUNDLE_NAMES


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_committed_bundle_is_what_its_source_renders(name):
    assert render_bundles.differences(name) == [], "run: python tools/render_bundles.py"


def test_an_edit_made_in_a_rendered_config_is_caught_and_a_source_edit_reaches_every_config(tmp_path):
    tree = str(tmp_path / "bundles")
    shutil.copytree(BUNDLES_DIR, tree, ignore=shutil.ignore_patterns("runs", "data", "__pycache__"))
    name = BUNDLE_NAMES[0]
    path = os.path.join(tree, name, "configs", "train.json")
    config = json.loads(open(path, encoding="utf-8").read())
    config["base_lr"] = 0.5  # a fix made in one committed bundle, not at its source
    open(path, "w", encoding="utf-8").write(json.dumps(config, indent=4) + "\n")
    diff = render_bundles.differences(name, tree)
    assert diff == [f"{name}/configs/train.json: differs from its source (bundles/_template + {name}/scenario.json)"]

    # one edit of the scenario reaches every config that has the id, and rendering writes nothing else
    scenario_path = os.path.join(tree, name, "scenario.json")
    scenario = json.loads(open(scenario_path, encoding="utf-8").read())
    scenario["params"]["pixdim"] = [1.25, 1.25, 1.25]
    open(scenario_path, "w", encoding="utf-8").write(json.dumps(scenario))
    rendered = render_bundles.render_bundle(name, tree)
    with_pixdim = [rel for rel, text in rendered.items() if rel.endswith(".json") and "pixdim" in json.loads(text)]
    assert {"configs/train.json", "configs/inference.json", "configs/rsim.json"} <= set(with_pixdim)
    assert all(json.loads(rendered[rel])["pixdim"] == [1.25, 1.25, 1.25] for rel in with_pixdim)

    # a param that no config has is refused (a typo would otherwise be ignored)
    scenario["params"]["pixdimm"] = [1, 1, 1]
    open(scenario_path, "w", encoding="utf-8").write(json.dumps(scenario))
    with pytest.raises(render_bundles.RenderError, match="pixdimm"):
        render_bundles.render_bundle(name, tree)


# ---------------------------------------------------------------------------------------------- MONAI's checks
@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_check_properties_of_train_and_inference_workflows(name, data, tmp_path):
    from monai.bundle import ConfigWorkflow

    plain = {"groups": None, "dataset_options": None}  # the tiny liver data has no groups or per-dataset options
    train = ConfigWorkflow(config_file=cfg(name, "train.json"), workflow_type="train", dataset_dir=data,
                           bundle_root=str(tmp_path), **SMALL_OVERRIDES, **plain)  # fmt: skip
    train.initialize()
    assert train.check_properties() == []
    assert train.max_epochs == json.loads(open(cfg(name, "train.json")[0], encoding="utf-8").read())["max_epochs"]
    infer = ConfigWorkflow(config_file=cfg(name, "inference.json"), workflow_type="infer", bundle_root=str(tmp_path),
                           dataset_dir=os.path.join(data, "imagesTr"), **SMALL_OVERRIDES)  # fmt: skip
    infer.initialize()
    assert infer.check_properties() == []


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_metadata_verifies_against_the_schema_kept_in_the_repository(name, tmp_path):
    from monai.bundle import verify_metadata

    meta_file = cfg(name, "metadata.json")[0]
    verify_metadata(meta_file=meta_file, filepath=SCHEMA)  # the schema file exists: nothing is downloaded
    meta = json.loads(open(meta_file, encoding="utf-8").read())
    scenario = json.loads(open(os.path.join(BUNDLES_DIR, name, "scenario.json"), encoding="utf-8").read())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == scenario["labels"]  # MONAI Label's labels
    import common

    assert meta["required_packages_version"]["tlseg-common"] == common.__version__
    bad = dict(meta)
    del bad["task"]
    bad_file = tmp_path / "metadata.json"
    bad_file.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(Exception):
        verify_metadata(meta_file=str(bad_file), filepath=SCHEMA)


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_verify_net_in_out(name):
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=cfg(name, "metadata.json")[0],
                      config_file=cfg(name, "inference.json")[0], device="cpu", **{"network_def#features": 4})  # fmt: skip


@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_train_inference_evaluate_rsim_share_network_and_preprocessing(name, data):
    from monai.bundle import ConfigParser

    mode = ["finetune.json"] if os.path.isfile(cfg(name, "finetune.json")[0]) else []
    layouts = {
        "train": cfg(name, "train.json"),
        "inference": cfg(name, "inference.json"),
        "evaluate": cfg(name, "train.json", *mode, "evaluate.json"),
        "rsim": cfg(name, "rsim.json"),
    }
    with open(os.path.join(data, "dataset.json"), encoding="utf-8") as f:
        case = json.load(f)["training"][0]
    item = {k: os.path.join(data, case[k]) for k in ("image", "label")}
    images, nets, defs = {}, {}, {}
    for what, files in layouts.items():
        parser = ConfigParser()
        parser.read_config(files)
        parser.update(SMALL_OVERRIDES)
        defs[what] = parser.get("network_def")
        net = parser.get_parsed_content("network_def")
        nets[what] = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        given = {"image": item["image"]} if what == "inference" else dict(item)  # inference reads images only
        out = parser.get_parsed_content("preprocessing")(given)
        label = out["label"] if what != "inference" else None
        images[what] = (torch.as_tensor(out["image"]).float(), None if label is None else torch.as_tensor(label))
    ref = "train"
    for what in layouts:
        assert defs[what] == defs[ref], f"{what}: network_def differs from train.json's"
        assert nets[what] == nets[ref]
        assert torch.equal(images[what][0], images[ref][0]), f"{what}: the image is preprocessed differently"
        if images[what][1] is not None:
            assert torch.equal(images[what][1], images[ref][1]), f"{what}: the label is preprocessed differently"
    # the ct_window id reaches the preprocessing of every layout: for a CT bundle the abdominal window's image is
    # the default window's image mapped linearly from [-160, 240] HU to [0, 1] and clipped
    train_cfg = json.loads(open(cfg(name, "train.json")[0], encoding="utf-8").read())
    if train_cfg["modality"] == "CT":
        hu = images[ref][0] * 2000.0 - 1000.0
        expected = ((hu + 160.0) / 400.0).clamp(0.0, 1.0)
        for what in ("train", "inference"):
            parser = ConfigParser()
            parser.read_config(layouts[what])
            parser.update({**SMALL_OVERRIDES, "ct_window": [-160.0, 240.0]})
            given = {"image": item["image"]} if what == "inference" else dict(item)
            out = torch.as_tensor(parser.get_parsed_content("preprocessing")(given)["image"]).float()
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)  # float32 rounding of a 2000 HU range
    # and the preprocessing is the one the scenario asks for (voxel size): the image was resampled to pixdim
    pixdim = train_cfg["pixdim"]
    src = nib.load(item["image"])
    # the grid keeps the extent between the first and the last voxel centre: (n - 1) * spacing / pixdim + 1 voxels
    expected = [(n - 1) * s / p + 1 for n, s, p in zip(src.shape, src.header.get_zooms()[:3], pixdim)]
    assert [abs(a - b) <= 1 for a, b in zip(images[ref][0].shape[1:], expected)] == [True] * 3


# ---------------------------------------------------------------------------------------------- as users run it
@pytest.mark.slow
@pytest.mark.parametrize("name", ["liver_ct_from_liver_mri", "tsc_from_brats"])
def test_command_forms_from_another_working_directory(name, tmp_path):
    """``run training`` (pretrain), the bare ``run`` (fine-tune), ``run evaluating`` and ``run inference``, each
    started from a folder that is neither the repository nor the bundle, on the bundle's synthetic stand-ins (the
    first bundle, and a lesion bundle with centres whose users type exactly this)."""
    from common.standins import read_recipe, stand_in_overrides

    recipe = read_recipe(os.path.join(BUNDLES_DIR, name))
    tiny = {"shape": (24, 24, 16), "spacing": (2.0, 2.0, 3.0)}
    target = stand_in_overrides(recipe, "train.json", str(tmp_path / "data"), **tiny)
    source = stand_in_overrides(recipe, "pretrain.json", str(tmp_path / "data"), **tiny)

    def ids(overrides):
        return [x for k, v in overrides.items() for x in (f"--{k}", v if isinstance(v, str) else repr(v))]

    work = tmp_path / "elsewhere"
    work.mkdir()
    short = ["--max_epochs", "1", "--iterations_per_epoch", "2", "--pixdim", "[2.0,2.0,2.0]", *SMALL, "--bundle_root", str(work)]
    run(bundle_cmd("run", "training", "--config_file", as_arg(cfg(name, "train.json", "pretrain.json")), *ids(source), *short),
        cwd=str(work))  # fmt: skip
    proc = run(bundle_cmd("run", "--config_file", as_arg(cfg(name, "train.json", "finetune.json")), *ids(target), *short),
               cwd=str(work))  # fmt: skip
    assert "Loaded source weights from" in proc.stdout + proc.stderr
    groups = json.loads(open(cfg(name, "train.json")[0], encoding="utf-8").read()).get("groups") or []
    out = work / "runs" / ("finetune" + "".join(f"_{g}" for g in groups))
    run(bundle_cmd("run", "evaluating", "--config_file", as_arg(cfg(name, "train.json", "finetune.json", "evaluate.json")),
                   *ids(target), "--pixdim", "[2.0,2.0,2.0]", *SMALL, "--bundle_root", str(work)), cwd=str(work))  # fmt: skip
    summary = json.loads((out / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == len(json.loads((out / "datalist.json").read_text(encoding="utf-8"))["test"])
    images = os.path.join(target["dataset_dir"], "imagesTr")
    run(bundle_cmd("run", "inference", "--config_file", cfg(name, "inference.json")[0], "--dataset_dir", images,
                   "--ckpt_path", str(out / "model.pt"), "--output_dir", str(work / "pred"), "--pixdim", "[2.0,2.0,2.0]",
                   *SMALL), cwd=str(work))  # fmt: skip
    n_images = len([f for f in os.listdir(images) if f.endswith(".nii.gz")])
    assert len([f for f in os.listdir(work / "pred") if f.endswith("_seg.nii.gz")]) == n_images


@pytest.mark.slow
def test_a_failed_run_ends_with_its_reason(tmp_path):
    """A dataset whose label holds a value outside the classes: the last lines name the file and the problem
    (not MONAI's ``Failed to evaluate ConfigExpression`` wrapper)."""
    data = tiny_dataset(str(tmp_path / "ds"), 4)
    bad = os.path.join(data, "labelsTr", "case_002.nii.gz")
    img = nib.load(bad)
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(arr, img.affine), bad)
    name = FIRST_BUNDLE  # the liver data of tiny_dataset
    proc = run(bundle_cmd("run", "training", "--config_file", cfg(name, "train.json")[0], "--dataset_dir", data,
                          "--bundle_root", str(tmp_path), *SMALL), cwd=str(tmp_path), check=False)  # fmt: skip
    assert proc.returncode != 0
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-2:]
    assert "The run stopped: common.data.DataError:" in tail[-1] or "The run stopped: DataError:" in tail[-1], tail
    assert bad in tail[-1] and "label values [7] are outside the declared classes 0..1" in tail[-1], tail
    assert "Failed to evaluate" not in tail[-1]


# ---------------------------------------------------------------------------------------------- every bundle, end to end
def _workflow(files: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=files, workflow_type=None, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_pretrain_finetune_evaluate_on_the_synthetic_stand_ins(name, tmp_path):
    """Every bundle on its own synthetic stand-ins (its scenario's recipe: modality, channels, label maps, pools,
    centres or age groups, tasks): one epoch of pretraining on the source, fine-tuning on the target, then the
    test-split evaluation, with the bundle's own configs (a smaller network, blocks and voxels)."""
    from common.standins import read_recipe, stand_in_overrides

    bdir = os.path.join(BUNDLES_DIR, name)
    recipe = read_recipe(bdir)
    root = str(tmp_path / "data")
    tiny = {"shape": (24, 24, 16), "spacing": (2.0, 2.0, 3.0)}  # the presets' anatomy, at the size of the tests
    target = stand_in_overrides(recipe, "train.json", root, **tiny)
    source = stand_in_overrides(recipe, "pretrain.json", root, **tiny) or target
    small = {**SMALL_OVERRIDES, "pixdim": [2.0, 2.0, 2.0], "max_epochs": 1, "iterations_per_epoch": 2,
             "bundle_root": str(tmp_path), "num_workers": 0}  # fmt: skip
    train = json.loads(open(cfg(name, "train.json")[0], encoding="utf-8").read())
    multitask = train["network_def"]["_target_"].endswith("MultiTaskFCN")
    if multitask:  # every head must see a case: one epoch is every training case once
        small["iterations_per_epoch"] = None
        wf = _workflow(cfg(name, "train.json"), **small, **target)
        out = wf.parser.get_parsed_content("output_dir")
        init = torch.load(os.path.join(out, "snapshots", "epoch_0000.pt"), weights_only=True)
        final = torch.load(os.path.join(out, "checkpoint_final.pt"), weights_only=True)["model"]
        tasks = list(train["network_def"]["heads"])
        for task in tasks:
            key = f"heads.{task}.weight"
            assert not torch.equal(init[key], final[key]), f"the head of {task} did not train"
        _workflow(cfg(name, "train.json", "evaluate.json"), **small, **target)
        summary = json.loads(open(os.path.join(out, "eval", "summary.json"), encoding="utf-8").read())
        datalist = json.loads(open(os.path.join(out, "datalist.json"), encoding="utf-8").read())
        assert sorted(summary["per_task"]) == sorted({c["task"] for c in datalist["test"]}) == sorted(tasks)
        return
    wf = _workflow(cfg(name, "train.json", "pretrain.json"), **small, **source)
    src_dir = wf.parser.get_parsed_content("output_dir")
    src_list = json.loads(open(os.path.join(src_dir, "datalist.json"), encoding="utf-8").read())
    want = source["dataset_dir"] if isinstance(source["dataset_dir"], list) else [source["dataset_dir"]]
    assert [s["dir"] for s in src_list["sources"]] == [os.path.abspath(d) for d in want]
    wf = _workflow(cfg(name, "train.json", "finetune.json"), **small, **target)
    out = wf.parser.get_parsed_content("output_dir")
    assert os.path.dirname(wf.parser.get_parsed_content("source_checkpoint")) == src_dir
    init = torch.load(os.path.join(out, "snapshots", "epoch_0000.pt"), weights_only=True)
    source_weights = torch.load(os.path.join(src_dir, "model.pt"), weights_only=True)
    assert all(torch.equal(init[k], v) for k, v in source_weights.items()), "fine-tuning did not start from the source"
    _workflow(cfg(name, "train.json", "finetune.json", "evaluate.json"), **small, **target)
    summary = json.loads(open(os.path.join(out, "eval", "summary.json"), encoding="utf-8").read())
    datalist = json.loads(open(os.path.join(out, "datalist.json"), encoding="utf-8").read())
    assert summary["n_cases"] == len(datalist["test"]) > 0
    groups = train.get("groups")
    if groups:
        assert {c["group"] for c in datalist["training"] + datalist["test"]} == set(groups)
    lesion = json.loads(open(cfg(name, "evaluate.json")[0], encoding="utf-8").read())["lesion_task"]
    assert ("f1" in summary) == bool(lesion)
