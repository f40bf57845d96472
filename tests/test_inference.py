# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Inference and evaluation (issue 3): predictions on each input's own grid, the evaluation files, bad input.

The config tests run the bundle as a user would, ``python -m monai.bundle run ...`` in a subprocess from a
temporary working directory, with tiny volumes, small blocks and small or hand-made networks; the rest run the
configs in-process (``monai.bundle.ConfigWorkflow``). Known answers come from "threshold networks": a 1x1x1
convolution whose logits make a known segmentation (intensity bands of the normalised image), so the expected
masks, DSC and HD95 follow from the image data alone (a brute-force surface distance written here, not
``common.metrics``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data import DataError, make_datalist
from common.evaluation import CaseMetricsWriter, case_rows, load_test_cases, spacing_from_affine, write_results
from monai.inferers import SlidingWindowInferer

from common.inference import (
    CPU_STITCH_VOXELS,
    check_checkpoint,
    images_to_segment,
    num_windows,
    prediction_path,
    stitch_device,
)
from common.networks import KarimiFCN
from common.synthetic import make_scenario

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "liver_ct_from_liver_mri")
CONFIGS = os.path.join(BUNDLE, "configs")
META = os.path.join(CONFIGS, "metadata.json")


def run_bundle(configs: list[str], cwd, *args: str) -> subprocess.CompletedProcess:
    files = [os.path.join(CONFIGS, c) if not os.path.isabs(c) else c for c in configs]
    config_file = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--meta_file", META, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # tiny networks: one thread
    return subprocess.run(cmd, cwd=str(cwd), capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600)


def run_in_process(configs: list[str], **overrides) -> None:
    """The configs run as ``python -m monai.bundle run`` runs them, in this process (``ConfigWorkflow``)."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[os.path.join(CONFIGS, c) for c in configs], meta_file=META, workflow_type=None,
                        logging_file=False, **overrides)  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()


def check_ok(proc: subprocess.CompletedProcess) -> None:
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, f"bundle run failed (rc {proc.returncode}):\n{tail}"


def oblique_affine(spacing, degrees=20.0, lps=True, origin=(12.3, -40.1, 7.7), perm=(0, 1, 2)) -> np.ndarray:
    """A rotated (about z), optionally LPS-flipped, optionally axis-permuted affine with the given voxel size."""
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    if lps:
        rot = np.diag([-1.0, -1.0, 1.0]) @ rot
    rot = rot[:, list(perm)]  # array axis i points along world direction rot[:, perm[i]]
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(np.asarray(spacing, dtype=float))
    aff[:3, 3] = origin
    return aff


def save_nifti(path, data, affine) -> str:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return str(path)


def threshold_network_checkpoint(path, thresholds_hu=(0.0,)) -> str:
    """A 1x1x1 convolution ``1 -> len(thresholds_hu) + 1`` classes whose argmax is the intensity band of the CT
    voxel: class c where ``t_c <= HU < t_{c+1}`` (the preprocessing maps the window [-1000, 1000] HU linearly to
    x in [0, 1]). Logits ``l_0 = t_1 - x``, ``l_1 = 0`` (3 classes), ``l_last = x - t_last`` (x = normalised
    threshold): two classes give ``(t - x, x - t)``, i.e. argmax = (x > t)."""
    t = [(h + 1000.0) / 2000.0 for h in thresholds_hu]
    if len(t) == 1:
        w, b = [-1.0, 1.0], [t[0], -t[0]]
    elif len(t) == 2:
        w, b = [-1.0, 0.0, 1.0], [t[0], 0.0, -t[1]]
    else:
        raise ValueError(thresholds_hu)
    net = torch.nn.Conv3d(1, len(w), 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor(w).view(-1, 1, 1, 1, 1))
        net.bias.copy_(torch.tensor(b))
    torch.save(net.state_dict(), str(path))
    return str(path)


def threshold_network_def(n_classes: int) -> dict:
    return {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": n_classes, "kernel_size": 1}


def away_from(image: np.ndarray, thresholds_hu, margin: float = 1.0) -> np.ndarray:
    """``image`` with every voxel within ``margin`` HU of a threshold moved to ``threshold +- margin`` (its side
    kept), so float rounding in the pipeline cannot flip a voxel's class."""
    out = image.astype(np.float64)
    for t in thresholds_hu:
        near = np.abs(out - t) < margin
        out[near] = t + np.where(out[near] >= t, margin, -margin)
    return out.astype(np.float32)


def _surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Mask voxels with a 6-neighbour outside the mask (the array border counts as outside), in mm."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(m, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask.astype(bool) & ~inner) * np.asarray(spacing, dtype=np.float64)


def brute_force_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """HD95 ("max" convention) by brute force: all pairwise distances between the two surfaces, the 95th
    percentile (numpy's linear interpolation) of each direction's nearest distances, the larger of the two."""
    a, b = _surface_points(pred, spacing), _surface_points(ref, spacing)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95)))


def dice_of(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = pred.astype(bool), ref.astype(bool)
    return 2.0 * np.count_nonzero(pred & ref) / (np.count_nonzero(pred) + np.count_nonzero(ref))


# ---------------------------------------------------------------------------------------- inference.json
def test_inference_grid_equals_input_grid_oblique_anisotropic(tmp_path):
    """Random-weight paper FCN (small): the written segmentation has the input's shape and affine."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    aff = oblique_affine((0.9, 1.3, 2.5))
    src = save_nifti(images / "oblique_case.nii.gz", rng.uniform(-800, 800, (20, 17, 11)).astype(np.float32), aff)
    ckpt = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(KarimiFCN(features=4).state_dict(), ckpt)
    out = tmp_path / "pred"
    proc = run_bundle(
        ["inference.json"], tmp_path,
        "--bundle_root", str(tmp_path), "--dataset_dir", str(images), "--ckpt_path", str(ckpt),
        "--output_dir", str(out), "--network_def#features", "4", "--block_size", "[16,16,16]",
    )  # fmt: skip
    check_ok(proc)
    pred_file = prediction_path(src, str(out))
    assert os.path.basename(pred_file) == "oblique_case_seg.nii.gz"
    assert sorted(os.listdir(out)) == ["oblique_case_seg.nii.gz"]
    got, ref = nib.load(pred_file), nib.load(src)
    assert got.shape == ref.shape == (20, 17, 11)
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)  # the NIfTI header keeps float32 (~3e-6 here)
    values = np.unique(np.asarray(got.dataobj))
    assert set(values.tolist()) <= {0, 1}
    assert got.get_data_dtype() == np.uint8


def test_inference_inverts_preprocessing_exactly(tmp_path):
    """A network with a known output (threshold of the normalized intensity): the written mask equals the
    threshold of the ORIGINAL image voxel by voxel, for a rotated LPS image and an axis-permuted one, each
    resampled 2x along one axis by the preprocessing (the original voxel centres are resampled grid nodes)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    cases = {
        "rotated_lps": ((14, 12, 9), oblique_affine((1.0, 1.0, 2.0))),
        "permuted": ((7, 13, 10), oblique_affine((2.0, 1.0, 1.0), degrees=-15.0, lps=True, perm=(2, 0, 1))),
    }
    expected = {}
    for name, (shape, aff) in cases.items():
        data = np.where(rng.random(shape) > 0.5, 500.0, -500.0).astype(np.float32)
        save_nifti(images / f"{name}.nii.gz", data, aff)
        expected[name] = (data > 0).astype(np.uint8)
    ckpt = threshold_network_checkpoint(tmp_path / "threshold.pt")
    out = tmp_path / "pred"
    run_in_process(
        ["inference.json"], bundle_root=str(tmp_path), dataset_dir=str(images), ckpt_path=ckpt, output_dir=str(out),
        network_def=threshold_network_def(2), pixdim=[1.0, 1.0, 1.0], block_size=[16, 16, 16],
    )  # fmt: skip
    for name, (shape, aff) in cases.items():
        got = nib.load(str(out / f"{name}_seg.nii.gz"))
        assert got.shape == shape
        np.testing.assert_allclose(got.affine, aff, atol=1e-4)  # the NIfTI header keeps float32 (~3e-6 here)
        mask = np.asarray(got.dataobj)
        assert 0.3 < expected[name].mean() < 0.7
        np.testing.assert_array_equal(mask, expected[name], err_msg=f"{name}: not inverted to the original grid")


def test_missing_checkpoint_names_the_path(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    save_nifti(images / "a.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(Exception) as err:
        run_in_process(["inference.json"], bundle_root=str(tmp_path), dataset_dir=str(images))
    cause = err.value
    while cause.__cause__ or cause.__context__:  # MONAI wraps it in RuntimeErrors
        cause = cause.__cause__ or cause.__context__
    expected = os.path.join(str(tmp_path), "models", "model.pt")
    assert isinstance(cause, FileNotFoundError) and expected in str(cause) and "--ckpt_path" in str(cause), cause
    assert not (tmp_path / "predictions").exists()


def test_inference_config_properties():
    """MONAI's inference-workflow properties (those MONAI Label and model-zoo CI read) are all present."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=os.path.join(CONFIGS, "inference.json"), meta_file=META, workflow_type="infer")
    wf.initialize()
    assert wf.check_properties() == []
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "device"):
        assert key in wf.parser
    for key in ("ckpt_path", "output_dir", "dataset_dir", "handlers", "evaluator", "dataset"):
        assert key in wf.parser
    assert wf.parser["handlers"][0]["_target_"] == "CheckpointLoader"
    assert wf.parser["handlers"][0]["load_dict"] == {"model": "@network"}
    assert wf.parser.get_parsed_content("sw_overlap") == 0.25


# ---------------------------------------------------------------------------------------- evaluate.json
def test_evaluate_writes_csv_and_summary(tmp_path):
    """``evaluate.json`` as a user runs it, with a user datalist and a threshold network (foreground where
    HU > 75): each test case's DSC and HD95 equal those of ``image > 75 HU`` against the label, computed here
    from the files. The preprocessing resamples z from 3 to 1.5 mm (image and label alike), so the prediction
    must be inverted to the original grid and the reference re-read from its file."""
    threshold = 75.0
    ds = make_scenario("liver_ct", str(tmp_path / "ds"), 5, seed=3, shape=(24, 24, 16), spacing=(2.0, 2.0, 3.0))
    split = make_datalist(ds, None, seed=7)  # a split other than the default seed: --datalist must be used
    expected = {}
    for case in split["test"]:
        img = nib.load(case["image"])
        data = away_from(np.asarray(img.dataobj), [threshold])
        nib.save(nib.Nifti1Image(data, img.affine, img.header), case["image"])
        ref = np.asarray(nib.load(case["label"]).dataobj)
        pred = data > threshold
        assert 0 < pred.sum() and 0 < ref.sum()
        expected[case["case"]] = (dice_of(pred, ref), brute_force_hd95(pred, ref, (2.0, 2.0, 3.0)))
    datalist = tmp_path / "my_datalist.json"
    datalist.write_text(json.dumps(split), encoding="utf-8")
    ckpt = threshold_network_checkpoint(tmp_path / "threshold.pt", [threshold])
    override = tmp_path / "threshold_net.json"
    override.write_text(json.dumps({"network_def": threshold_network_def(2), "pixdim": [2.0, 2.0, 1.5]}), encoding="utf-8")
    proc = run_bundle(
        ["train.json", "evaluate.json", str(override)], tmp_path,
        "--bundle_root", str(tmp_path), "--dataset_dir", ds, "--datalist", str(datalist), "--ckpt_path", ckpt,
        "--block_size", "[16,16,16]",
    )  # fmt: skip
    check_ok(proc)
    eval_dir = tmp_path / "runs" / "train" / "eval"
    assert sorted(os.listdir(eval_dir)) == ["metrics.csv", "summary.json"]  # no temporary file left
    with open(eval_dir / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "class", "dice", "hd95", "assd", "empty_pred", "empty_ref"]
    test_ids = [c["case"] for c in split["test"]]
    assert len(rows) == len(test_ids) == 2
    assert sorted(r["case"] for r in rows) == sorted(test_ids)
    for r in rows:
        dsc, hd = expected[r["case"]]
        assert 0.3 < dsc < 1.0  # a real, imperfect segmentation: the check is not about an edge case
        # DSC: one division of the same integer counts; HD95: the same float64 distances (a few ulps each) and the
        # same linear interpolation of the percentile
        assert float(r["dice"]) == pytest.approx(dsc, rel=1e-12)
        assert float(r["hd95"]) == pytest.approx(hd, rel=1e-9)
        assert float(r["assd"]) > 0.0 and r["empty_pred"] == r["empty_ref"] == "False"
    summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    for key in ("n_cases", "n_empty_pred", "n_empty_ref", "dice", "hd95", "assd", "conventions", "checkpoint"):
        assert key in summary, key
    assert summary["n_cases"] == 2 and summary["checkpoint"] == ckpt
    assert summary["hd95_convention"] == "max"
    assert summary["conventions"]["units"]["hd95"] == "mm"
    assert summary["lesion_task"] is False
    assert summary["dice"]["mean"] == pytest.approx(np.mean([v[0] for v in expected.values()]), rel=1e-12)
    assert summary["hd95"]["mean"] == pytest.approx(np.mean([v[1] for v in expected.values()]), rel=1e-9)
    assert summary["dice"]["std"] == pytest.approx(np.std([v[0] for v in expected.values()]), rel=1e-9, abs=1e-15)


def test_evaluate_multi_class_per_class_summary(tmp_path):
    """Three classes (``--num_classes 3``), one hand-made case: two bright boxes in the image (150 and 600 HU on
    -800 HU), the label's boxes each shifted by one voxel, and a threshold network with bands at -300 and 375 HU
    (class 1 between, class 2 above). Per class, by hand: class 1, 8x8x6 boxes shifted 1 voxel along x:
    DSC = 2 * 7 / 16 = 0.875; class 2, 4x8x6 boxes shifted 1 voxel along z: DSC = 2 * 5 / 12 = 5/6. The summary
    holds them under ``per_class`` (HD95 from the brute-force surfaces). In-process (``ConfigWorkflow``)."""
    from monai.bundle import ConfigWorkflow

    spacing = (1.5, 1.5, 2.0)
    aff = np.diag([*spacing, 1.0])
    rng = np.random.default_rng(0)
    image = np.full((20, 18, 12), -800.0) + rng.normal(0.0, 20.0, (20, 18, 12))
    label = np.zeros((20, 18, 12), np.uint8)
    image[3:11, 3:11, 2:8] += 950.0  # ~150 HU
    label[4:12, 3:11, 2:8] = 1
    image[13:17, 5:13, 3:9] += 1400.0  # ~600 HU
    label[13:17, 5:13, 4:10] = 2
    image = away_from(image, [-300.0, 375.0])
    pred = np.digitize(image, [-300.0, 375.0])  # the expected prediction, from the data
    assert np.array_equal(np.unique(pred), [0, 1, 2])
    (tmp_path / "img").mkdir()
    case = {"image": save_nifti(tmp_path / "img" / "mc.nii.gz", image, aff),
            "label": save_nifti(tmp_path / "img" / "mc_label.nii.gz", label, aff), "case": "mc"}  # fmt: skip
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "validation": [], "test": [case]}), encoding="utf-8")
    ckpt = threshold_network_checkpoint(tmp_path / "three.pt", [-300.0, 375.0])
    wf = ConfigWorkflow(
        config_file=[os.path.join(CONFIGS, "train.json"), os.path.join(CONFIGS, "evaluate.json")], meta_file=META,
        workflow_type=None, logging_file=False, bundle_root=str(tmp_path), datalist=str(datalist), ckpt_path=ckpt,
        num_classes=3, network_def=threshold_network_def(3), pixdim=list(spacing), block_size=[16, 16, 16],
        device="$torch.device('cpu')",
    )  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    eval_dir = tmp_path / "runs" / "train" / "eval"
    summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["classes"] == [1, 2] and summary["n_cases"] == 1
    by_hand = {1: 0.875, 2: 5 / 6}
    for c in (1, 2):
        per = summary["per_class"][str(c)]
        assert dice_of(pred == c, label == c) == pytest.approx(by_hand[c], rel=1e-12)  # the construction
        assert per["dice"]["mean"] == pytest.approx(by_hand[c], rel=1e-12)
        hd = brute_force_hd95(pred == c, label == c, spacing)
        assert 0 < hd <= (spacing[0] if c == 1 else spacing[2])  # every distance <= the shift (a translation)
        assert per["hd95"]["mean"] == pytest.approx(hd, rel=1e-9)
        assert per["n_cases"] == 1 and per["n_empty_pred"] == 0
    with open(eval_dir / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["class"]) for r in rows] == [("mc", "1"), ("mc", "2")]


def test_test_cases_sources(tmp_path):
    ds = make_scenario("liver_ct", str(tmp_path / "ds"), 4, shape=(16, 16, 8))
    rebuilt = load_test_cases("", str(tmp_path / "no_run" / "datalist.json"), ds, seed=0)
    assert [c["case"] for c in rebuilt] == [c["case"] for c in make_datalist(ds, None, seed=0)["test"]]
    run_dir = tmp_path / "run"
    written = make_datalist(ds, str(run_dir), seed=2)
    from_run = load_test_cases("", str(run_dir / "datalist.json"), ds, seed=0)
    assert [c["case"] for c in from_run] == [c["case"] for c in written["test"]]
    with pytest.raises(DataError, match="missing.json"):
        load_test_cases(str(tmp_path / "missing.json"), "", ds)


# ---------------------------------------------------------------------------------------- metrics writing
def test_write_results_lesion_and_empty_cases(tmp_path):
    ref = np.zeros((12, 12, 6), np.uint8)
    ref[2:4, 2:4, 2:4] = 1
    ref[8:10, 8:10, 2:4] = 1
    pred = np.zeros_like(ref)
    pred[2:4, 2:5, 2:4] = 1  # hits lesion 1, misses lesion 2
    pred[6, 0, 0] = 1  # a false positive
    rows = case_rows("c1", pred, ref, (1.0, 1.0, 2.0), lesion_task=True, hd95_convention="pooled")
    rows += case_rows("c2", np.zeros_like(ref), ref, (1.0, 1.0, 2.0), lesion_task=True, hd95_convention="pooled")
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["fn"]) == (1, 1, 1)
    assert rows[1]["empty_pred"] and math.isinf(rows[1]["hd95"])
    summary = write_results(rows, str(tmp_path), True, hd95_convention="pooled", info={"checkpoint": "x.pt"})
    assert summary["n_cases"] == 2 and summary["n_empty_pred"] == 1
    with open(tmp_path / "metrics.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    cols = ["case", "class", "dice", "hd95", "assd", "tp", "fp", "fn", "f1", "empty_pred", "empty_ref"]
    assert list(table[0]) == cols
    assert table[1]["hd95"] == "inf"
    data = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))  # strict JSON: no Infinity
    assert data["hd95"]["mean"] == "inf" and data["hd95"]["n_inf"] == 1
    assert data["hd95_convention"] == "pooled" and "pooled" in data["conventions"]["hd95"]
    assert data["lesion_totals"] == {"tp": 1, "fp": 1, "fn": 3, "f1_pooled": pytest.approx(2 / 6)}
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "summary.json"]


def test_case_metrics_writer_refuses_a_prediction_off_the_original_grid():
    from monai.data import MetaTensor

    label = MetaTensor(torch.zeros(1, 6, 6, 4), affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))
    pred = MetaTensor(torch.zeros(1, 6, 6, 8), affine=torch.eye(4))
    writer = CaseMetricsWriter("unused")
    with pytest.raises(ValueError, match="original grid"):
        writer.evaluate_item({"case": "c"}, {"pred": pred, "label": label})
    same_grid = MetaTensor(torch.zeros(1, 6, 6, 4), affine=label.affine)
    ok = writer.evaluate_item({"case": "c"}, {"pred": same_grid, "label": label})
    assert ok[0]["case"] == "c" and ok[0]["dice"] == 1.0


def test_spacing_from_oblique_affine():
    np.testing.assert_allclose(spacing_from_affine(oblique_affine((0.9, 1.3, 2.5), perm=(2, 0, 1))), (0.9, 1.3, 2.5))


# ---------------------------------------------------------------------------------------- pieces and bad input
def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "vnet_like.pt"
    torch.save(torch.nn.Conv3d(1, 2, 3).state_dict(), path)
    with pytest.raises(ValueError, match="vnet_like.pt.*another architecture"):
        check_checkpoint(str(path), KarimiFCN(features=4))
    torch.save(KarimiFCN(features=2).state_dict(), path)
    with pytest.raises(ValueError, match="vnet_like.pt.*differ in shape"):
        check_checkpoint(str(path), KarimiFCN(features=4))
    torch.save({"model": KarimiFCN(features=4).state_dict(), "epoch": torch.tensor(3)}, path)
    assert check_checkpoint(str(path), KarimiFCN(features=4)) == str(path)  # a run's checkpoint_final.pt
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        check_checkpoint(str(tmp_path / "nothere.pt"), KarimiFCN(features=4))


def test_input_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty holds no images: expected .nii or .nii.gz files"):
        images_to_segment(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        images_to_segment(str(tmp_path / "nowhere"))
    assert images_to_segment(str(tmp_path / "empty"), strict=False) == []
    ds = make_scenario("liver_ct", str(tmp_path / "ds"), 2, shape=(16, 16, 8))
    assert len(images_to_segment(ds)) == 2  # a Decathlon folder: its images via dataset.json


def test_window_count_and_stitching_rule():
    # the paper's configuration on a 256 x 256 x 200 volume
    assert num_windows((256, 256, 200), 96, 0.25) == 4 * 4 * 3
    assert num_windows((256, 256, 200), 96, 0.75) == 8 * 8 * 6
    calls = []

    def net(x):
        calls.append(x.shape[0])
        return torch.cat([x, -x], 1)

    # the bundles' inferer, MONAI's SlidingWindowInferer with constant blending: overlapping windows of a pointwise
    # network all hold the same value at a voxel, so their average is that value (up to float32 rounding of the
    # sum and the division: a few ulps) and the stitched output is the network applied to the whole image
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.75, sw_batch_size=1, mode="constant")
    image = torch.rand(1, 1, 20, 9, 5)
    out = inferer(image, net)
    assert out.shape == (1, 2, 20, 9, 5)
    torch.testing.assert_close(out, torch.cat([image, -image], 1), rtol=1e-6, atol=0)
    assert sum(calls) == num_windows((20, 9, 5), 8, 0.75)
    assert stitch_device((512, 512, 257), "cuda:0") == torch.device("cpu")
    assert stitch_device((256, 256, 200), "cuda:0") == torch.device("cuda:0")
    assert 512 * 512 * 256 == CPU_STITCH_VOXELS


def test_config_inferer_refuses_overlap_of_one():
    """The bundles' ``inferer`` (``sw_overlap``) is MONAI's sliding window, which refuses an overlap >= 1 (no step)
    when it runs."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "inference.json"))
    parser["sw_overlap"] = 1.0
    parser["block_size"] = [8, 8, 8]
    parser["device"] = "$torch.device('cpu')"
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, SlidingWindowInferer)
    with pytest.raises(ValueError, match="overlap must be >= 0 and < 1"):
        inferer(torch.rand(1, 1, 10, 10, 10), lambda x: torch.cat([x, -x], 1))
