# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Datasets: the deterministic 70/30 split, n_train subsets, and a clear error for each bad dataset."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data import DataError, make_datalist, read_decathlon, split_cases
from common.synthetic import PhantomSpec, make_dataset, make_scenario
from common.transforms import NormalizeModality


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds") / "liver_ct"
    make_scenario("liver_ct", str(d), 10, seed=3, shape=(16, 16, 12))
    return str(d)


def _ids(cases):
    return [c["case"] for c in cases]


def test_split_is_deterministic_disjoint_and_70_30(dataset):
    cases = read_decathlon(dataset)["training"]
    pool, test = split_cases(cases, seed=5)
    pool2, test2 = split_cases(list(reversed(cases)), seed=5)  # the order of dataset.json does not matter
    assert _ids(pool) == _ids(pool2) and _ids(test) == _ids(test2)
    assert len(pool) == 7 and len(test) == 3
    assert not set(_ids(pool)) & set(_ids(test))
    assert sorted(_ids(pool) + _ids(test)) == sorted(_ids(cases))
    other_pool, _ = split_cases(cases, seed=6)
    assert _ids(other_pool) != _ids(pool)  # another seed, another split (10 choose 3 = 120 splits)


def test_datalist_written_with_subsets(dataset, tmp_path):
    d = make_datalist(dataset, str(tmp_path), n_train=3, n_val=2, seed=1)
    saved = json.loads((tmp_path / "datalist.json").read_text(encoding="utf-8"))
    assert saved["seed"] == 1 and saved["n_train"] == 3
    assert len(saved["training"]) == 3 and len(saved["validation"]) == 2 and len(saved["test"]) == 3
    all_ids = _ids(d["training"]) + _ids(d["validation"]) + _ids(d["test"])
    assert len(set(all_ids)) == len(all_ids)
    # the test split does not depend on n_train: training subsets come from the same 70 %
    d_small = make_datalist(dataset, None, n_train=1, n_val=2, seed=1)
    assert _ids(d_small["test"]) == _ids(d["test"])
    assert set(_ids(d_small["training"])) <= set(_ids(d["training"]))
    assert all(os.path.isabs(c["image"]) for c in d["training"])


def test_n_train_too_large(dataset):
    with pytest.raises(DataError, match=r"n_train=9 but only 5 training cases"):
        make_datalist(dataset, None, n_train=9, n_val=2)


def _copy_dataset(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_dataset_json(tmp_path):
    with pytest.raises(DataError, match="dataset.json not found"):
        make_datalist(str(tmp_path), None)
    with pytest.raises(DataError, match="does not exist"):
        make_datalist(str(tmp_path / "nope"), None)


def test_missing_image_file(dataset, tmp_path):
    d = _copy_dataset(dataset, tmp_path / "ds")
    os.remove(os.path.join(d, "imagesTr", "case_004.nii.gz"))
    with pytest.raises(DataError, match=r"do not exist, e.g. .*case_004\.nii\.gz"):
        make_datalist(d, None)


def _rewrite_label(d: str, name: str, fn) -> str:
    path = os.path.join(d, "labelsTr", name)
    img = nib.load(path)
    new = fn(img)
    nib.save(new, path)
    return path


def test_label_shape_mismatch(dataset, tmp_path):
    d = _copy_dataset(dataset, tmp_path / "ds")
    path = _rewrite_label(d, "case_002.nii.gz", lambda im: nib.Nifti1Image(np.asarray(im.dataobj)[:, :, :10], im.affine))
    with pytest.raises(DataError, match=r"case_002\.nii\.gz: label shape \(16, 16, 10\) differs from image shape \(16, 16, 12\)"):
        make_datalist(d, None)
    assert os.path.exists(path)


def test_label_affine_mismatch(dataset, tmp_path):
    d = _copy_dataset(dataset, tmp_path / "ds")

    def shift(im):
        aff = im.affine.copy()
        aff[0, 3] += 5.0
        return nib.Nifti1Image(np.asarray(im.dataobj), aff)

    _rewrite_label(d, "case_007.nii.gz", shift)
    with pytest.raises(DataError, match=r"case_007\.nii\.gz: label affine differs"):
        make_datalist(d, None)


def test_label_values_outside_classes(dataset, tmp_path):
    d = _copy_dataset(dataset, tmp_path / "ds")

    def three(im):
        a = np.asarray(im.dataobj).copy()
        a[0, 0, 0] = 3
        return nib.Nifti1Image(a, im.affine)

    _rewrite_label(d, "case_001.nii.gz", three)
    with pytest.raises(DataError, match=r"case_001\.nii\.gz: label values \[3\] are outside the declared classes 0\.\.1"):
        make_datalist(d, None, num_classes=2)
    make_datalist(d, None, num_classes=4)  # fine with 4 classes


def test_nan_image(dataset, tmp_path):
    d = _copy_dataset(dataset, tmp_path / "ds")
    path = os.path.join(d, "imagesTr", "case_005.nii.gz")
    im = nib.load(path)
    a = np.asarray(im.dataobj).astype(np.float32)
    a[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(a, im.affine), path)
    with pytest.raises(DataError, match=r"case_005\.nii\.gz: 1 voxels are NaN or inf"):
        make_datalist(d, None)


def test_normalisation_by_modality():
    # CT: the window [-1000, 1000] HU -> [0, 1], clipped (exact in float32 for these values)
    ct = torch.tensor([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    assert torch.equal(torch.as_tensor(NormalizeModality("CT")(ct)), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    # MR: divided by the population standard deviation (not centred): [100, 300, 500, 700] has mean 400 and
    # variance (300^2 + 100^2 + 100^2 + 300^2) / 4 = 50000, std 100 sqrt(5), so the result is [1, 3, 5, 7] / sqrt(5)
    mr = torch.tensor([1.0, 3.0, 5.0, 7.0]) * 100
    out = torch.as_tensor(NormalizeModality("mri")(mr))
    expected = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64) / 5**0.5
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)  # float32: a few ulps
    assert out.double().std(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    assert isinstance(NormalizeModality("MR")(mr.numpy()), np.ndarray)  # numpy in, numpy out
    with pytest.raises(ValueError, match="constant"):
        NormalizeModality("MR")(torch.ones(5))
    with pytest.raises(ValueError, match="modality"):
        NormalizeModality("PET")


def test_ct_window_is_a_setting():
    """``ct_window`` (the bundles' id): (low, high) HU -> [0, 1], clipped; the abdominal window W400 L40 puts the
    level 40 HU at 0.5 and the 70 HU liver contrast at 70 / 400 of the range; bad windows are refused."""
    from common.transforms import ABDOMEN_CT_WINDOW, NormalizeModalityd

    ct = torch.tensor([-1000.0, -160.0, 40.0, 110.0, 240.0, 1000.0])
    out = torch.as_tensor(NormalizeModality("CT", ct_window=ABDOMEN_CT_WINDOW)(ct))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.5, 0.675, 1.0, 1.0]), rtol=1e-6, atol=1e-7)
    # the dictionary transform passes it on, also to a pooled case that names its own modality
    d = NormalizeModalityd("image", "MR", ct_window=(-160, 240))({"image": ct.clone(), "modality": "CT"})
    torch.testing.assert_close(torch.as_tensor(d["image"]), out, rtol=1e-6, atol=1e-7)
    assert "modality" not in d
    for bad in ((240, -160), (0, 0), (0, float("nan")), (1,), "wide", "01"):
        with pytest.raises(ValueError, match="ct_window"):
            NormalizeModality("CT", ct_window=bad)


def test_synthetic_dataset_layout_and_domain_shift(tmp_path):
    ct = make_dataset(str(tmp_path / "ct"), 2, PhantomSpec(modality="CT", shape=(24, 24, 12), spacing=(1.5, 1.5, 3.0)), seed=0)
    mr = make_dataset(str(tmp_path / "mr"), 2, PhantomSpec(modality="MR", shape=(24, 24, 12), spacing=(1.5, 1.5, 3.0)), seed=0)
    for d, modality in ((ct, "CT"), (mr, "MR")):
        meta = read_decathlon(d)
        assert meta["modality"] == {"0": modality}
        img = nib.load(meta["training"][0]["image"])
        lab = np.asarray(nib.load(meta["training"][0]["label"]).dataobj)
        assert img.shape == (24, 24, 12) and img.header.get_zooms()[:3] == (1.5, 1.5, 3.0)
        assert set(np.unique(lab)) == {0, 1} and 0.01 < lab.mean() < 0.5
    a = np.asarray(nib.load(read_decathlon(ct)["training"][0]["image"]).dataobj)
    assert a.min() < -900  # air in HU
    b = np.asarray(nib.load(read_decathlon(mr)["training"][0]["image"]).dataobj)
    assert b.min() >= 0  # magnitude MR
    # seeded: the same seed gives the same case
    again = make_dataset(str(tmp_path / "ct2"), 1, PhantomSpec(modality="CT", shape=(24, 24, 12), spacing=(1.5, 1.5, 3.0)), seed=0)
    assert np.array_equal(a, np.asarray(nib.load(read_decathlon(again)["training"][0]["image"]).dataobj))
