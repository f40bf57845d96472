# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Pooled sources, per-dataset label maps and channels, centres/groups, and the split sizes
(common.data.make_datalist, common.transforms.SelectChanneld / MapLabelsd, evaluation's reference).

Every check is against facts of the fabricated data: which cases a dataset has, their groups, the label values
written, the constant value of each image channel.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data import DataError, make_datalist, read_decathlon
from common.evaluation import original_reference
from common.transforms import MapLabelsd, SelectChanneld


def write_dataset(root, n, labels=(0, 1), channels=1, groups=None, splits=None, modality=None, shape=(8, 8, 8)):
    """``n`` cases; case k's label holds the values ``labels`` (a cube of each non-zero value), channel c of a
    multi-channel image is the constant ``10 * (c + 1)``; ``groups`` / ``splits``: per-case entry fields."""
    os.makedirs(os.path.join(root, "imagesTr"))
    os.makedirs(os.path.join(root, "labelsTr"))
    entries = []
    for k in range(n):
        if channels == 1:
            img = np.random.default_rng(k).normal(size=shape).astype(np.float32)
        else:
            img = np.stack([np.full(shape, 10.0 * (c + 1), np.float32) for c in range(channels)], axis=-1)
        lab = np.zeros(shape, np.uint8)
        for i, v in enumerate(v for v in labels if v):
            lab[i * 2 : i * 2 + 2, 1:3, 1:3] = v
        name = f"c{k:02d}"
        nib.save(nib.Nifti1Image(img, np.eye(4)), os.path.join(root, "imagesTr", f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), os.path.join(root, "labelsTr", f"{name}.nii.gz"))
        e = {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
        if groups:
            e["group"] = groups[k]
        if splits and splits[k]:
            e["split"] = splits[k]
        entries.append(e)
    meta = {"name": os.path.basename(root), "modality": modality or {"0": "CT"}, "labels": {"0": "background", "1": "x"},
            "training": entries}  # fmt: skip
    with open(os.path.join(root, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return root


def ids(cases):
    return sorted(c["case"] for c in cases)


def test_a_pool_splits_each_dataset_as_it_would_alone(tmp_path):
    a = write_dataset(str(tmp_path / "A"), 7)
    b = write_dataset(str(tmp_path / "B"), 10)
    alone_a, alone_b = make_datalist(a, seed=3, check=False), make_datalist(b, seed=3, check=False)
    pool = make_datalist([a, b], seed=3, check=False)
    assert ids(pool["test"]) == sorted([f"A/{c}" for c in ids(alone_a["test"])] + [f"B/{c}" for c in ids(alone_b["test"])])
    assert len(pool["test"]) == 2 + 3  # round(0.3 * 7) = 2, round(0.3 * 10) = 3
    assert {c["source"] for c in pool["training"]} == {"A", "B"}
    assert [s["n_test"] for s in pool["strata"]] == [2, 3]
    # a small training set takes from both datasets in turn
    small = make_datalist([a, b], seed=3, n_val=2, n_train=2, check=False)
    assert sorted(c["source"] for c in small["training"]) == ["A", "B"]
    assert sorted(c["source"] for c in small["validation"]) == ["A", "B"]


def test_label_map_applied_per_source_and_unexpected_values_are_refused(tmp_path):
    a = write_dataset(str(tmp_path / "kidney"), 4, labels=(0, 1, 2))  # kidney 1 + tumour 2
    b = write_dataset(str(tmp_path / "liver"), 4, labels=(0, 1))
    spec = [{"dir": a, "label_map": {"0": 0, "1": 1, "2": 1}}, b]
    d = make_datalist(spec, n_val=1, num_classes=2)  # checked: the mapped values are within the classes
    case = next(c for c in d["training"] + d["validation"] + d["test"] if c.get("source") == "kidney")
    raw = np.asarray(nib.load(case["label"]).dataobj)
    out = MapLabelsd("label")({"label": torch.as_tensor(raw), "label_map": case["label_map"]})
    assert "label_map" not in out
    assert torch.equal(out["label"], torch.as_tensor((raw > 0).astype(raw.dtype)))
    # the same map without 2: the file's value 2 is an error naming the file and the value
    with pytest.raises(DataError, match=r"kidney/labelsTr/c0\d.nii.gz: label values \[2\] are not in the label map"):
        make_datalist([{"dir": a, "label_map": {"0": 0, "1": 1}}, b], n_val=1)
    # without any map the value 2 is outside the 2 classes
    with pytest.raises(DataError, match=r"label values \[2\] are outside the declared classes 0..1"):
        make_datalist(a, n_val=1)


def test_channel_picked_by_name_and_the_original_reference_is_mapped(tmp_path):
    brats = write_dataset(str(tmp_path / "brats"), 3, labels=(0, 1, 2, 3), channels=4,
                          modality={"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"})  # fmt: skip
    d = make_datalist({"dir": brats, "channel": "T2w", "label_map": {"0": 0, "1": 1, "2": 1, "3": 1}}, n_val=1)
    case = d["training"][0]
    assert case["channel"] == 3
    img = torch.as_tensor(np.moveaxis(np.asarray(nib.load(case["image"]).dataobj), -1, 0))  # channel first
    out = SelectChanneld("image")({"image": img, "channel": case["channel"]})
    assert out["image"].shape == (1, 8, 8, 8) and torch.all(out["image"] == 40.0) and "channel" not in out
    with pytest.raises(DataError, match="no channel named 'DWI'"):
        make_datalist({"dir": brats, "channel": "DWI"})

    from monai.transforms import LoadImage

    label = LoadImage(image_only=True, ensure_channel_first=True)(case["label"])
    mapped = MapLabelsd("label")({"label": label, "label_map": case["label_map"]})["label"]
    ref = original_reference(mapped)  # evaluation re-reads the file: the same map must apply
    raw = np.asarray(nib.load(case["label"]).dataobj)
    assert set(np.unique(raw)) == {0, 1, 2, 3}
    assert torch.equal(torch.as_tensor(ref)[0], torch.as_tensor((raw > 0).astype(np.float32)).to(torch.as_tensor(ref).dtype))


def test_groups_split_per_group_honour_fixed_test_cases_and_select(tmp_path):
    groups = ["center1"] * 6 + ["center5"] * 5
    splits = ["test", None, None, None, None, None, None, None, None, None, "test"]
    tsc = write_dataset(str(tmp_path / "TSC"), 11, groups=groups, splits=splits)
    meta = read_decathlon(tsc)
    assert [c["group"] for c in meta["training"]] == groups
    d = make_datalist(tsc, n_test=2, check=False)
    by_group = {g: [c for c in d["test"] if c["group"] == g] for g in ("center1", "center5")}
    assert [len(v) for v in by_group.values()] == [2, 2]  # n_test per centre, the fixed test cases among them
    assert "c00" in ids(by_group["center1"]) and "c10" in ids(by_group["center5"])
    only5 = make_datalist(tsc, groups="center5", n_test=2, check=False)
    assert {c["group"] for c in only5["training"] + only5["validation"] + only5["test"]} == {"center5"}
    assert ids(only5["test"]) == ids(by_group["center5"])  # the same test scans whatever the training groups
    with pytest.raises(DataError, match=r"groups \['center9'\] are not in the data"):
        make_datalist(tsc, groups=["center9"], check=False)


def test_the_papers_training_set_sizes_are_reachable(tmp_path):
    sliver = write_dataset(str(tmp_path / "Liver-CT"), 20)
    with pytest.raises(DataError, match="n_train=15 but only 11 training cases"):
        make_datalist(sliver, n_train=15, check=False)
    d = make_datalist(sliver, n_train=15, n_val=1, test_fraction=0.2, check=False)
    assert (len(d["training"]), len(d["validation"]), len(d["test"])) == (15, 1, 4)
    d = make_datalist(sliver, n_train=15, n_val=1, n_test=4, check=False)
    assert (len(d["training"]), len(d["test"])) == (15, 4)
