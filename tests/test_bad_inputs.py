# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Bad input catalogue (issue 6, part 3): each bad input given to training, inference and evaluation.

Every case must end in a clear error that names the file and the problem (or, for an all-background label in
training, a documented handling: allowed, logged and counted), with nothing half-written left behind: no
partial ``*_seg.nii.gz``, no partial CSV/JSON/datalist, no temporary file. ``docs/reliability.md`` lists the
cases with the messages they get.

Most cases call the functions the configs call (``common.data.make_datalist`` for ``train.json``,
``common.inference.images_to_segment`` and the preprocessing of ``inference.json``,
``common.evaluation.load_test_cases`` for ``evaluate.json``, ``common.inference.check_checkpoint``,
``common.transfer.load_source_weights``); whole config runs go in-process (``monai.bundle.ConfigWorkflow``, the
error read from the exception chain), and a representative subset runs the bundle as a user does,
``python -m monai.bundle run`` in a subprocess (the error in the output). Volumes are 16 x 16 x 8 voxels, networks
have 4 features.

A non-writable output folder: the tests run as root, and root ignores permission bits (``chmod 0500`` does
not stop it), so the output folder is put below a regular FILE (``<tmp>/afile/sub``): creating it fails with
ENOTDIR for every user. A full disk is simulated in-process: the writer writes half of its bytes and then
raises ``OSError(ENOSPC)``, as ``write(2)`` does on a full file system.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import common.io
from common.io import atomic_torch_save, atomic_write
from common.data import DataError, check_output_dir, make_datalist
from common.evaluation import CaseMetricsWriter, load_test_cases, write_results
from common.inference import AtomicNibabelWriter, check_checkpoint, images_to_segment
from common.networks import KarimiFCN
from common.synthetic import make_scenario
from common.transfer import load_source_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "bundles", "liver_ct_from_liver_mri", "configs")
META = os.path.join(CONFIGS, "metadata.json")
SMALL = ("--network_def#features", "4", "--block_size", "[16,16,16]")


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """4 labelled CT-like cases, 16 x 16 x 8 voxels of 2 x 2 x 4 mm (the split: 2 train, 1 val, 1 test)."""
    d = tmp_path_factory.mktemp("template") / "ct"
    make_scenario("liver_ct", str(d), 4, seed=0, shape=(16, 16, 8), spacing=(2.0, 2.0, 4.0))
    return str(d)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.manual_seed(0)
    torch.save(KarimiFCN(features=4).state_dict(), path)
    return str(path)


def copy_dataset(template: str, dst) -> str:
    shutil.copytree(template, dst)
    return str(dst)


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)


#: bad variant -> (file it spoils, regex of the expected message after the file name)
BAD = {
    "corrupt": ("image", r"cannot be read as an image"),
    "truncated": ("image", r": the file is truncated or corrupt"),
    "nan": ("image", r": 1 voxels are NaN or inf"),
    "inf": ("image", r": 1 voxels are NaN or inf"),
    "2d": ("image", r": expected a 3-D image \(X, Y, Z\), got a 2-D one of shape \(16, 16\)"),
    "4d_2ch": ("image", r": expected a 3-D image with 1 channel, got shape \(16, 16, 8, 2\): 2 channels"),
    "grid_affine": ("label", r": label affine differs from the image's"),
    "grid_shape": ("label", r": label shape \(16, 16, 6\) differs from image shape \(16, 16, 8\)"),
    "label_values": ("label", r": label values \[3\] are outside the declared classes 0\.\.1"),
}


def spoil(path: str, kind: str) -> str:
    """Replace the NIfTI at ``path`` by its bad variant ``kind`` (same file name)."""
    if kind == "corrupt":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).bytes(4096))  # random bytes under a .nii.gz name
        return path
    if kind == "truncated":
        with open(path, "rb") as f:
            raw = f.read()
        with open(path, "wb") as f:
            f.write(raw[: len(raw) // 2])  # the first half of a real file: the header reads, the data end early
        return path
    data, aff = _load(path)
    if kind in ("nan", "inf"):
        data = data.astype(np.float32)
        data[3, 4, 2] = np.nan if kind == "nan" else np.inf
    elif kind == "2d":
        data = data[:, :, 4]
    elif kind == "4d_2ch":
        data = np.stack([data, data], -1)
    elif kind == "grid_affine":
        aff = aff.copy()
        aff[0, 3] += 5.0  # the label 5 mm off the image
    elif kind == "grid_shape":
        data = data[:, :, :6]
    elif kind == "label_values":
        data = data.copy()
        data[0, 0, 0] = 3
    elif kind == "all_background":
        data = np.zeros_like(data)
    else:
        raise ValueError(kind)
    _save(path, data, aff)
    return path


def leftovers(folder) -> list[str]:
    """Temporary files (hidden, ``*.tmp*``) anywhere below ``folder``."""
    out = []
    for root, _, files in os.walk(str(folder)):
        out += [os.path.join(root, f) for f in files if f.startswith(".") or ".tmp" in f]
    return out


def run_bundle(configs: list[str], cwd, *args: str) -> subprocess.CompletedProcess:
    files = [os.path.join(CONFIGS, c) for c in configs]
    config_file = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--meta_file", META, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=str(cwd), capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600)


SMALL_OVERRIDES = {"network_def#features": 4, "block_size": [16, 16, 16]}


def run_in_process(configs: list[str], **overrides) -> None:
    """The configs run as ``python -m monai.bundle run`` runs them, in this process (``ConfigWorkflow``)."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[os.path.join(CONFIGS, c) for c in configs], meta_file=META, workflow_type=None,
                        logging_file=False, **{**SMALL_OVERRIDES, **overrides})  # fmt: skip
    wf.initialize()
    try:
        wf.run()
    finally:
        with contextlib.suppress(Exception):
            wf.finalize()


def fails_in_process(caplog, configs: list[str], *texts: str, **overrides) -> str:
    """Run in-process; it must fail with every text of ``texts`` in the exception chain before any engine (trainer
    or evaluator) started: ignite logs "Engine run starting/resuming ..." to a logger that propagates, unlike MONAI's
    StatsHandler lines. Returns the chain's text."""
    with caplog.at_level(logging.INFO), pytest.raises(Exception) as err:
        run_in_process(configs, **overrides)
    chain, exc = [], err.value
    while exc is not None:  # MONAI wraps the reason in RuntimeErrors; it is in the chain with its type
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    text = "\n".join(chain)
    for t in texts:
        assert t in text, f"{t!r} not in the error:\n{text[-3000:]}"
    assert "Engine run" not in caplog.text
    return text


def failed_with(proc: subprocess.CompletedProcess, *texts: str) -> str:
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the run should have failed:\n{log[-3000:]}"
    for t in texts:
        assert t in log, f"{t!r} not in the output:\n{log[-4000:]}"
    return log


def _save_step() -> tuple[int, dict]:
    with open(os.path.join(CONFIGS, "inference.json"), encoding="utf-8") as f:
        steps = json.load(f)["postprocessing"]["transforms"]
    i = next(k for k, t in enumerate(steps) if str(t.get("_target_", "")).endswith("SaveImaged"))
    return i, steps[i]


def writer_wired() -> bool:
    return "AtomicNibabelWriter" in str(_save_step()[1].get("writer", ""))


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", list(BAD))
def test_training_refuses_bad_case(kind, template, tmp_path):
    """``train.json``'s datalist (``make_datalist``, all cases checked) refuses every bad case before training,
    naming the file; nothing is written to the run folder."""
    d = copy_dataset(template, tmp_path / "ds")
    which, message = BAD[kind]
    bad = spoil(os.path.join(d, "imagesTr" if which == "image" else "labelsTr", "case_002.nii.gz"), kind)
    out = tmp_path / "run"
    with pytest.raises(DataError) as err:
        make_datalist(d, str(out), num_classes=2)
    assert str(err.value).startswith(bad), str(err.value)
    assert err.match(message)
    assert not out.exists() and not leftovers(tmp_path)


def test_training_label_nan_is_refused(template, tmp_path):
    d = copy_dataset(template, tmp_path / "ds")
    path = os.path.join(d, "labelsTr", "case_001.nii.gz")
    data, aff = _load(path)
    data = data.astype(np.float32)
    data[1, 1, 1] = np.nan
    _save(path, data, aff)
    with pytest.raises(DataError, match=rf"{path}: 1 label voxels are NaN or inf"):
        make_datalist(d, None)


def test_all_background_label_is_counted_and_logged(template, tmp_path, caplog):
    d = copy_dataset(template, tmp_path / "ds")
    path = spoil(os.path.join(d, "labelsTr", "case_000.nii.gz"), "all_background")
    with caplog.at_level(logging.WARNING, logger="common.data"):
        dl = make_datalist(d, str(tmp_path / "run"))
    assert dl["checks"] == {"n_cases": 4, "n_all_background": 1}
    assert f"{path}: the label is all background." in caplog.text
    assert "1 of 4 labels are all background." in caplog.text
    saved = json.loads((tmp_path / "run" / "datalist.json").read_text(encoding="utf-8"))
    assert saved["checks"]["n_all_background"] == 1


def test_empty_training_list(template, tmp_path):
    d = copy_dataset(template, tmp_path / "ds")
    meta_path = os.path.join(d, "dataset.json")
    meta = json.loads(open(meta_path, encoding="utf-8").read())
    meta["training"] = []
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with pytest.raises(DataError, match=rf"{meta_path} has no labelled cases: its 'training' list is missing or empty"):
        make_datalist(d, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_source_checkpoint_missing_unreadable_or_foreign(tmp_path):
    net = KarimiFCN(features=4)
    with pytest.raises(FileNotFoundError, match=r"Source checkpoint '.*nothere\.pt' not found.*--source_checkpoint"):
        load_source_weights(net, str(tmp_path / "nothere.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(1).bytes(1000))
    with pytest.raises(ValueError, match=rf"Cannot read source checkpoint {junk}"):
        load_source_weights(net, str(junk))
    good = tmp_path / "good.pt"
    torch.save(KarimiFCN(features=4).state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"Cannot read source checkpoint {cut}"):
        load_source_weights(net, str(cut))
    foreign = tmp_path / "vnet.pt"
    torch.save(torch.nn.Conv3d(1, 2, 3).state_dict(), foreign)
    with pytest.raises(ValueError, match=rf"Source checkpoint {foreign} does not fit .*another architecture"):
        load_source_weights(net, str(foreign))
    wider = tmp_path / "wider.pt"
    torch.save(KarimiFCN(features=6).state_dict(), wider)
    with pytest.raises(ValueError, match=rf"Source checkpoint {wider} does not fit the network KarimiFCN: \d+ tensors differ in shape"):
        load_source_weights(net, str(wider))
    # another class count is the transfer-learning case the paper allows: the head is re-initialised, logged
    three = tmp_path / "three.pt"
    torch.save(KarimiFCN(features=4, out_channels=3).state_dict(), three)
    assert load_source_weights(net, str(three))  # the re-initialised head keys


def test_train_run_refuses_corrupt_image(template, tmp_path):
    """Subprocess: a corrupt NIfTI stops ``train.json`` before the first epoch, naming the file."""
    d = copy_dataset(template, tmp_path / "ds")
    bad = spoil(os.path.join(d, "imagesTr", "case_003.nii.gz"), "corrupt")
    proc = run_bundle(["train.json"], tmp_path, "--bundle_root", str(tmp_path), "--dataset_dir", d, *SMALL)
    log = failed_with(proc, "DataError", f"{bad} cannot be read as an image")
    assert "Iter:" not in log  # no training iteration ran (StatsHandler logs each one as "Epoch: e/E, Iter: i/I")
    run = tmp_path / "runs" / "train"
    assert not (run / "datalist.json").exists() and not (run / "model.pt").exists()
    assert not leftovers(tmp_path)


def test_train_run_with_all_background_label(template, tmp_path, caplog):
    """An all-background training label is allowed; the run logs and counts it and trains."""
    d = copy_dataset(template, tmp_path / "ds")
    train_case = make_datalist(d, None)["training"][0]
    spoil(train_case["label"], "all_background")
    with caplog.at_level(logging.INFO):
        run_in_process(["train.json"], bundle_root=str(tmp_path), dataset_dir=d, iterations_per_epoch=1, max_epochs=1)
    log = caplog.text
    assert f"{train_case['label']}: the label is all background." in log
    assert "1 of 4 labels are all background." in log
    final = torch.load(tmp_path / "runs" / "train" / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == 1  # it trained
    assert "Engine run resuming from iteration 0" in log  # ignite's line that fails_in_process must not find
    saved = json.loads((tmp_path / "runs" / "train" / "datalist.json").read_text(encoding="utf-8"))
    assert saved["checks"] == {"n_cases": 4, "n_all_background": 1}
    assert not leftovers(tmp_path / "runs")


def test_finetune_run_refuses_unreadable_source(template, tmp_path, caplog):
    d = copy_dataset(template, tmp_path / "ds")
    junk = tmp_path / "source.pt"
    junk.write_bytes(np.random.default_rng(2).bytes(2000))
    fails_in_process(caplog, ["train.json", "finetune.json"], f"Cannot read source checkpoint {junk}",
                     bundle_root=str(tmp_path), dataset_dir=d, source_checkpoint=str(junk))  # fmt: skip
    assert not (tmp_path / "runs" / "finetune" / "checkpoint.pt").exists()


def test_train_run_refuses_output_under_a_file(template, tmp_path, caplog):
    """The run folder cannot be created (its parent is a file; this stops root too)."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder", encoding="utf-8")
    out = blocker / "sub"
    fails_in_process(caplog, ["train.json"], str(out), "Not a directory", bundle_root=str(tmp_path),
                     dataset_dir=template, output_dir=str(out))  # fmt: skip
    assert blocker.read_text(encoding="utf-8") == "not a folder"


# ------------------------------------------------------------------------------------------------ inference
@pytest.mark.parametrize("kind", ["corrupt", "truncated", "2d", "4d_2ch"])
def test_inference_input_check_refuses_bad_image(kind, template, tmp_path):
    """``inference.json`` runs ``images_to_segment`` (strict) before the evaluator: every image is checked
    (header, 3-D with 1 channel, data complete) before any is segmented."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("case_000.nii.gz", "case_001.nii.gz"):
        shutil.copy(os.path.join(template, "imagesTr", name), images / name)
    bad = spoil(str(images / "case_001.nii.gz"), kind)
    with pytest.raises(DataError) as err:
        images_to_segment(str(images))
    assert str(err.value).startswith(bad) and err.match(BAD[kind][1]), str(err.value)
    assert images_to_segment(str(images), strict=False) == []  # the config's dataset: logged, no crash at parse


def test_inference_preprocessing_refuses_nan_and_inf(template, tmp_path):
    """NaN/inf voxels need the data: ``inference.json``'s own preprocessing (``NormalizeModalityd``) refuses them
    naming the file (the CT window would keep NaN and give a silently wrong mask)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "inference.json"))
    pre = parser.get_parsed_content("preprocessing")
    for kind in ("nan", "inf"):
        path = shutil.copy(os.path.join(template, "imagesTr", "case_000.nii.gz"), tmp_path / f"{kind}.nii.gz")
        spoil(str(path), kind)
        with pytest.raises(RuntimeError) as err:
            pre({"image": str(path)})
        # the one bad voxel spreads over its neighbours in the resampling to 2 mm: "<n> voxels"
        assert re.search(rf"^{re.escape(str(path))}: \d+ voxels are NaN or inf", _chain_text(err.value), re.M)


def test_inference_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty holds no images: expected .nii or .nii.gz files"):
        images_to_segment(str(tmp_path / "empty"))
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".case_seg.nii.gz.x1.tmp.nii.gz").write_bytes(b"\x1f\x8b")  # an interrupted write's leftover
    (hidden / "._case.nii.gz").write_bytes(b"")  # macOS metadata
    with pytest.raises(DataError, match=r"hidden holds no images"):
        images_to_segment(str(hidden))
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [], "validation": [], "test": []}), encoding="utf-8")
    with pytest.raises(DataError, match=rf"Input '{dl}' holds no images"):
        images_to_segment(str(dl))
    dl.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{dl} cannot be read as JSON"):
        images_to_segment(str(dl))


def test_checkpoint_missing_unreadable_foreign_or_other_class_count(tmp_path):
    """``check_checkpoint`` (first in ``run`` of inference.json and evaluate.json): a wrong checkpoint is an
    error, never a network left with random weights."""
    net = KarimiFCN(features=4)
    with pytest.raises(FileNotFoundError, match=r"Checkpoint '.*nothere\.pt' not found.*--ckpt_path"):
        check_checkpoint(str(tmp_path / "nothere.pt"), net)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(3).bytes(1000))
    with pytest.raises(ValueError, match=rf"Cannot read checkpoint {junk}: it is not a complete PyTorch checkpoint"):
        check_checkpoint(str(junk), net)
    good = tmp_path / "good.pt"
    torch.save(KarimiFCN(features=4).state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"Cannot read checkpoint {cut}: it is not a complete PyTorch checkpoint"):
        check_checkpoint(str(cut), net)
    three = tmp_path / "three.pt"
    torch.save(KarimiFCN(features=4, out_channels=3).state_dict(), three)
    with pytest.raises(ValueError, match=rf"Checkpoint {three} does not fit the network KarimiFCN: 2 tensors differ"):
        check_checkpoint(str(three), net)
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(ValueError, match=rf"Checkpoint {empty} holds no network weights"):
        check_checkpoint(str(empty), net)
    for name in ("inference.json", "evaluate.json"):  # the check runs before the evaluator (and after check_release)
        with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
            run = json.load(f)["run"]
        check = [i for i, step in enumerate(run) if step.startswith("$common.inference.check_checkpoint(@ckpt_path")]
        engine = [i for i, step in enumerate(run) if "evaluator.run()" in step]
        assert len(check) == 1 and len(engine) == 1 and check[0] < engine[0], (name, run)


def test_inference_run_refuses_truncated_image(template, small_ckpt, tmp_path, caplog):
    """One truncated image among good ones: the run stops before segmenting any, naming it."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"):
        shutil.copy(os.path.join(template, "imagesTr", name), images / name)
    bad = spoil(str(images / "case_001.nii.gz"), "truncated")
    out = tmp_path / "pred"
    fails_in_process(caplog, ["inference.json"], "DataError", f"{bad}: the file is truncated or corrupt",
                     bundle_root=str(tmp_path), dataset_dir=str(images), ckpt_path=small_ckpt,
                     output_dir=str(out))  # fmt: skip
    assert not out.exists() and not leftovers(tmp_path)


def test_inference_run_stops_at_nan_image_leaving_whole_files(template, small_ckpt, tmp_path):
    """Subprocess: a NaN image after a good one: the good one's mask is complete, the bad one has none."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("case_000.nii.gz", "case_001.nii.gz"):
        shutil.copy(os.path.join(template, "imagesTr", name), images / name)
    bad = spoil(str(images / "case_001.nii.gz"), "nan")
    out = tmp_path / "pred"
    proc = run_bundle(
        ["inference.json"], tmp_path, "--bundle_root", str(tmp_path), "--dataset_dir", str(images),
        "--ckpt_path", small_ckpt, "--output_dir", str(out), *SMALL,
    )  # fmt: skip
    log = failed_with(proc, "voxels are NaN or inf")
    assert re.search(rf"{re.escape(bad)}: \d+ voxels are NaN or inf", log), log[-3000:]
    assert sorted(os.listdir(out)) == ["case_000_seg.nii.gz"]
    assert nib.load(str(out / "case_000_seg.nii.gz")).get_fdata().shape == (16, 16, 8)  # whole, readable
    assert not leftovers(tmp_path)


def test_inference_run_refuses_checkpoint_of_other_class_count(template, tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(template, "imagesTr", "case_000.nii.gz"), images)
    ckpt = tmp_path / "three_classes.pt"
    torch.save(KarimiFCN(features=4, out_channels=3).state_dict(), ckpt)
    out = tmp_path / "pred"
    fails_in_process(caplog, ["inference.json"], f"Checkpoint {ckpt} does not fit the network KarimiFCN",
                     "differ in shape", bundle_root=str(tmp_path), dataset_dir=str(images), ckpt_path=str(ckpt),
                     output_dir=str(out))  # fmt: skip
    assert not out.exists()


def test_inference_run_refuses_output_under_a_file(template, small_ckpt, tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(template, "imagesTr", "case_000.nii.gz"), images)
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder", encoding="utf-8")
    out = blocker / "sub"
    fails_in_process(caplog, ["inference.json"], str(out), "Not a directory", bundle_root=str(tmp_path),
                     dataset_dir=str(images), ckpt_path=small_ckpt, output_dir=str(out))  # fmt: skip
    assert blocker.read_text(encoding="utf-8") == "not a folder" and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("kind", list(BAD))
def test_evaluation_refuses_bad_test_case(kind, template, tmp_path):
    """``evaluate.json``'s test cases (``load_test_cases``) are checked as training checks its cases."""
    d = copy_dataset(template, tmp_path / "ds")
    which, message = BAD[kind]
    case = make_datalist(d, None)["test"][0]
    bad = spoil(case[which], kind)
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [], "validation": [], "test": [case]}), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_test_cases(str(dl), "", d, num_classes=2)
    assert str(err.value).startswith(bad) and err.match(message), str(err.value)


def test_evaluation_empty_test_list(template, tmp_path):
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": [], "validation": [], "test": []}), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{dl} has no test cases"):
        load_test_cases(str(dl), "", template)


def test_evaluation_output_under_a_file(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x", encoding="utf-8")
    writer = CaseMetricsWriter(str(blocker / "eval"))

    class Engine:
        def add_event_handler(self, *args):
            pass

    with pytest.raises(NotADirectoryError, match=rf"Evaluation output folder {blocker}/eval cannot be created: "
                                                 rf"{blocker} is a file"):
        writer.attach(Engine())
    rows = [{"case": "c", "class": 1, "dice": 1.0, "hd95": 0.0, "assd": 0.0, "empty_pred": False, "empty_ref": False}]
    with pytest.raises(OSError, match=rf"Cannot write {blocker}/eval/metrics.csv"):
        write_results(rows, str(blocker / "eval"))
    assert blocker.read_text(encoding="utf-8") == "x" and not leftovers(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_dir(str(blocker / "a" / "b"))
    assert check_output_dir(str(tmp_path / "new" / "deeper")) and not (tmp_path / "new").exists()


def test_evaluate_run_refuses_label_outside_classes(template, small_ckpt, tmp_path):
    """Subprocess: a test label with a value outside 0..num_classes-1 (which the metrics would silently count
    as background) stops ``evaluate.json`` before any case is evaluated; no metrics file is written."""
    d = copy_dataset(template, tmp_path / "ds")
    case = make_datalist(d, None)["test"][0]
    bad = spoil(case["label"], "label_values")
    proc = run_bundle(
        ["train.json", "evaluate.json"], tmp_path, "--bundle_root", str(tmp_path), "--dataset_dir", d,
        "--ckpt_path", small_ckpt, *SMALL,
    )  # fmt: skip
    failed_with(proc, "DataError", f"{bad}: label values [3] are outside the declared classes 0..1")
    assert not (tmp_path / "runs" / "train" / "eval").exists()


def test_evaluate_run_refuses_missing_checkpoint(template, tmp_path, caplog):
    expected = os.path.join(str(tmp_path), "runs", "train", "model.pt")
    fails_in_process(caplog, ["train.json", "evaluate.json"], f"FileNotFoundError: Checkpoint '{expected}' not found",
                     "--ckpt_path", bundle_root=str(tmp_path), dataset_dir=template)  # fmt: skip
    assert not (tmp_path / "runs" / "train" / "eval").exists()


# ------------------------------------------------------------------------------------------------ full disk
def _full_disk_after_half(real_atomic_write):
    """``atomic_write`` whose write callback writes half of its bytes, then fails as a full disk does."""

    def fake(path, write, mode="wb"):
        def half_then_enospc(f):
            buf = io.BytesIO() if "b" in mode else io.StringIO()
            write(buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real_atomic_write(path, half_then_enospc, mode)

    return fake


def test_atomic_write_on_full_disk_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save({"w": torch.ones(3)}, str(target))
    old = target.read_bytes()
    with pytest.raises(OSError, match=rf"Cannot write {target}: No space left on device") as err:
        _full_disk_after_half(atomic_write)(str(target), lambda f: torch.save({"w": torch.zeros(1000)}, f))
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == old and os.listdir(tmp_path) == ["checkpoint.pt"]

    def torch_save_half(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", torch_save_half)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_torch_save({"w": torch.zeros(3)}, str(target))
    assert target.read_bytes() == old and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_evaluation_files_on_full_disk_keep_old_files(tmp_path, monkeypatch):
    rows = [{"case": f"c{i}", "class": 1, "dice": 0.5, "hd95": 1.0, "assd": 0.5, "empty_pred": False,
             "empty_ref": False} for i in range(20)]  # fmt: skip
    write_results(rows[:2], str(tmp_path))
    old = {n: (tmp_path / n).read_bytes() for n in ("metrics.csv", "summary.json")}
    monkeypatch.setattr(common.io, "atomic_write", _full_disk_after_half(atomic_write))  # under write_csv / write_json
    with pytest.raises(OSError, match=rf"Cannot write {tmp_path}/metrics.csv: No space left on device"):
        write_results(rows, str(tmp_path))
    assert {n: (tmp_path / n).read_bytes() for n in old} == old
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "summary.json"]


def test_datalist_on_full_disk_keeps_old_file(template, tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_datalist(template, str(out), seed=0)
    old = (out / "datalist.json").read_bytes()
    monkeypatch.setattr(common.io, "atomic_write", _full_disk_after_half(atomic_write))  # under write_json
    with pytest.raises(OSError, match=rf"Cannot write {out}/datalist.json: No space left on device"):
        make_datalist(template, str(out), seed=1)
    assert (out / "datalist.json").read_bytes() == old and os.listdir(out) == ["datalist.json"]


class _FullDisk:
    """Patch nibabel's file writes (``Opener.write``, used by ``nib.save``): the first ``n_ok`` calls (the header)
    go through, the next raises ``OSError(ENOSPC)``."""

    def __init__(self, monkeypatch, n_ok: int = 1):
        import nibabel.openers

        real = nibabel.openers.Opener.write
        self.calls = 0

        def write(opener, data):
            self.calls += 1
            if self.calls > n_ok:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(opener, data)

        monkeypatch.setattr(nibabel.openers.Opener, "write", write)


def _prediction(affine=np.diag([2.0, 2.0, 4.0, 1.0])):
    from monai.data import MetaTensor

    return MetaTensor(torch.ones(1, 16, 16, 8, dtype=torch.uint8), affine=torch.as_tensor(affine))


def test_nifti_writers_on_full_disk(tmp_path, monkeypatch):
    """``AtomicNibabelWriter`` on a full disk (the header written, the voxel data not): the old file is left
    whole and no temporary file remains; the error names the target."""

    def write(path):
        w = AtomicNibabelWriter(output_dtype=np.uint8)
        w.set_data_array(_prediction(), channel_dim=0)
        w.set_metadata({"affine": _prediction().affine, "original_affine": _prediction().affine})
        w.write(str(path))

    atomic = tmp_path / "atomic"
    atomic.mkdir()
    write(atomic / "case_seg.nii.gz")
    old = (atomic / "case_seg.nii.gz").read_bytes()
    assert nib.load(str(atomic / "case_seg.nii.gz")).shape == (16, 16, 8)
    assert oct(os.stat(atomic / "case_seg.nii.gz").st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600

    full = _FullDisk(monkeypatch)
    with pytest.raises(OSError, match=rf"Cannot write {atomic}/case_seg.nii.gz: No space left on device"):
        write(atomic / "case_seg.nii.gz")
    assert full.calls > 1  # the header went through, the data write failed
    assert os.listdir(atomic) == ["case_seg.nii.gz"] and (atomic / "case_seg.nii.gz").read_bytes() == old


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_inference_config_on_full_disk_keeps_old_prediction(template, small_ckpt, tmp_path, monkeypatch):
    """``inference.json`` run in-process: a full disk while writing the mask leaves the previous mask intact
    and no temporary file (with ``AtomicNibabelWriter`` as the ``SaveImaged`` writer)."""
    from monai.bundle import ConfigWorkflow

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(template, "imagesTr", "case_000.nii.gz"), images)
    out = tmp_path / "pred"
    i, _ = _save_step()
    overrides = {"bundle_root": str(tmp_path), "dataset_dir": str(images), "ckpt_path": small_ckpt,
                 "output_dir": str(out), "network_def#features": 4, "block_size": [16, 16, 16]}  # fmt: skip
    if not writer_wired():  # until inference.json names it (see test_inference_config_writes_atomically)
        overrides[f"postprocessing#transforms#{i}#writer"] = "common.inference.AtomicNibabelWriter"

    def run():
        wf = ConfigWorkflow(config_file=os.path.join(CONFIGS, "inference.json"), meta_file=META,
                            workflow_type="infer", logging_file=False, **overrides)  # fmt: skip
        wf.initialize()
        wf.run()
        wf.finalize()

    run()
    pred = out / "case_000_seg.nii.gz"
    old = pred.read_bytes()
    _FullDisk(monkeypatch)
    with pytest.raises(Exception) as err:
        run()
    assert f"Cannot write {pred}: No space left on device" in _chain_text(err.value)
    assert os.listdir(out) == ["case_000_seg.nii.gz"] and pred.read_bytes() == old


def _chain_text(exc: BaseException) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_inference_config_writes_atomically():
    """``inference.json``'s SaveImaged must name ``common.inference.AtomicNibabelWriter`` (MONAI's default
    writer leaves a partial ``*_seg.nii.gz`` on a full disk or a kill, see test_nifti_writers_on_full_disk)."""
    i, step = _save_step()
    assert writer_wired(), (
        f"inference.json postprocessing#transforms#{i} (SaveImaged) needs "
        f'"writer": "common.inference.AtomicNibabelWriter"; it has {step.get("writer")!r}.'
    )
