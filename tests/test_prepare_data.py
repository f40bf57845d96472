# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Data preparation (issue 12): each converter on tiny files fabricated in its source format, checked against
the fabricated facts (geometry, slice order, label values, channel); bad inputs; kill + rerun; in-house checker.

Geometry tolerances: NIfTI stores the sform in float32, so a world position of ~100 mm is exact to ~1e-5 mm;
``atol=1e-4`` mm is used for world positions and ``rtol=1e-6`` for spacings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import itk
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from common.data import DataError, check_case, read_decathlon
from common.inhouse import EXAMPLE_CSV, check_inhouse, prepare_inhouse
from common.prepare import TEST_DELAY_ENV, LabelMap, convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "prepare_data.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import prepare_data  # noqa: E402

WORLD_ATOL = 1e-4  # mm, see the module docstring


def _save(path, array: np.ndarray, affine: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _out(tmp_path, name: str) -> tuple[str, dict]:
    out = str(tmp_path / name)
    meta = json.loads(open(os.path.join(out, "dataset.json"), encoding="utf-8").read())
    return out, meta


def _load(out, rel):
    img = nib.load(os.path.join(out, rel))
    return np.asarray(img.dataobj), img.affine, img


def _world(affine: np.ndarray, idx) -> np.ndarray:
    return (np.asarray(affine) @ np.r_[np.asarray(idx, float), 1.0])[:3]


def _voxel(affine: np.ndarray, world: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.rint(np.linalg.solve(affine, np.r_[world, 1.0])[:3]))


def test_label_map_rules():
    m = LabelMap.parse("1:1, 2:1")
    assert m.spec == "1:1,2:1" and [m.target(v) for v in (0, 1, 2, 3)] == [0, 1, 1, 0]
    r = LabelMap.parse("55-70:1,110-135:2")
    assert [r.target(v) for v in (54, 55, 63, 70, 71, 126)] == [0, 1, 1, 1, 0, 2] and r.num_classes == 3
    assert [LabelMap.parse("nonzero:1").target(v) for v in (0, 7, 255)] == [0, 1, 1]
    for bad in ("1=1", "a:1", "1:300", "5-2:1", ""):
        with pytest.raises(ValueError):
            LabelMap.parse(bad)
    with pytest.raises(DataError, match="not integers"):
        LabelMap.parse("1:1").apply(np.array([0.0, 0.5, 1.0]), "lab.nii.gz")


# ------------------------------------------------------------------------------------------------ msd


def _msd_task(root, n_cases=2):
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    aff[:3, 3] = [-9.0, 7.0, 3.0]
    training = []
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        img = np.stack([np.full((12, 10, 8), 10.0 * (c + 1), np.float32) for c in range(4)], axis=-1)
        lab = rng.integers(0, 4, (12, 10, 8)).astype(np.uint8)
        _save(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", img, aff)
        _save(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": n_cases, "training": training,
    }), encoding="utf-8")
    return aff


def test_msd_channel_and_label_map(tmp_path):
    src = tmp_path / "Task01_BrainTumour"
    aff = _msd_task(src)
    out = str(tmp_path / "BRATS")
    convert("msd", str(src), out, channel="t1gd", label_map="1:1,3:1", organ="tumour core")
    _, meta = _out(tmp_path, "BRATS")
    assert meta["modality"] == {"0": "MR"} and meta["channel"] == "t1gd" and meta["numTraining"] == 2
    assert meta["labels"] == {"0": "background", "1": "tumour core"}
    for i, entry in enumerate(meta["training"]):
        img, a, hdr = _load(out, entry["image"])
        lab, _, lhdr = _load(out, entry["label"])
        assert hdr.get_data_dtype() == np.float32 and lhdr.get_data_dtype() == np.uint8
        assert img.shape == (12, 10, 8) and np.all(img == 30.0)  # channel 2 of 10/20/30/40
        src_lab = np.asarray(nib.load(src / "labelsTr" / f"BRATS_{i:03d}.nii.gz").dataobj)
        np.testing.assert_array_equal(lab, np.isin(src_lab, [1, 3]).astype(np.uint8))
        np.testing.assert_allclose(a, aff, atol=WORLD_ATOL)  # already RAS: the grid is kept
        prov = entry["provenance"]
        assert prov["channel"] == "t1gd" and prov["label_map"] == "1:1,3:1"
        assert prov["original_spacing"] == [1.5, 1.5, 2.0] and prov["sources"]["image"].endswith(f"BRATS_{i:03d}.nii.gz")
    cases = read_decathlon(out)["training"]  # the bundles' reader accepts it
    assert check_case(cases[0], num_classes=2)["labels"] == [0, 1]
    with pytest.raises(DataError, match=r"no channel named 'DWI'.*0=FLAIR, 1=T1w, 2=t1gd, 3=T2w"):
        convert("msd", str(src), str(tmp_path / "x"), channel="DWI")
    with pytest.raises(DataError, match="4 channels .*--channel"):
        convert("msd", str(src), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------------------------------------ kits19

# KiTS19's convention: array axis 0 is the slice axis; the affine's 3x3 part is a signed permutation
KITS_AFFINE = np.array([[0.0, 0.0, -0.8, 12.0], [0.0, -0.8, 0.0, -30.0], [-3.0, 0.0, 0.0, 50.0], [0, 0, 0, 1.0]])
MARK = (2, 3, 4)


def _kits_case(root, name="case_00000", seg=True, seg_affine=None):
    img = np.arange(8 * 12 * 10, dtype=np.float32).reshape(8, 12, 10) % 97
    img[MARK] = 500.0
    lab = np.zeros((8, 12, 10), np.uint8)
    lab[1:6, 2:9, 2:8] = 1
    lab[MARK] = 2
    _save(root / name / "imaging.nii.gz", img, KITS_AFFINE)
    if seg:
        _save(root / name / "segmentation.nii.gz", lab, KITS_AFFINE if seg_affine is None else seg_affine)
    return lab


def test_kits19_affine_convention_and_resampling(tmp_path):
    src = tmp_path / "kits19" / "data"
    lab_src = _kits_case(src)
    convert("kits19", str(src), str(tmp_path / "KiTS"))
    out, meta = _out(tmp_path, "KiTS")
    img, aff, hdr = _load(out, meta["training"][0]["image"])
    lab, laff, _ = _load(out, meta["training"][0]["label"])
    assert nib.aff2axcodes(aff) == ("R", "A", "S") and img.shape == (10, 12, 8)
    np.testing.assert_allclose(hdr.header.get_zooms()[:3], (0.8, 0.8, 3.0), rtol=1e-6)
    (idx,) = np.argwhere(img == 500.0)  # the marked voxel keeps its world position
    np.testing.assert_allclose(_world(aff, idx), _world(KITS_AFFINE, MARK), atol=WORLD_ATOL)
    assert lab[tuple(idx)] == 1 and lab.sum() == (lab_src > 0).sum() and set(np.unique(lab)) == {0, 1}
    np.testing.assert_array_equal(aff, laff)
    assert meta["training"][0]["provenance"]["original_axcodes"] == "IPL"
    assert meta["labels"] == {"0": "background", "1": "kidney"} and meta["name"] == "KiTS"

    convert("kits19", str(src), str(tmp_path / "KiTS2mm"), spacing=2.0)
    out2, meta2 = _out(tmp_path, "KiTS2mm")
    img2, aff2, hdr2 = _load(out2, meta2["training"][0]["image"])
    lab2, laff2, lhdr2 = _load(out2, meta2["training"][0]["label"])
    np.testing.assert_allclose(hdr2.header.get_zooms()[:3], (2.0, 2.0, 2.0), rtol=1e-6)
    np.testing.assert_allclose(lhdr2.header.get_zooms()[:3], (2.0, 2.0, 2.0), rtol=1e-6)
    assert lhdr2.get_data_dtype() == np.uint8 and set(np.unique(lab2)) == {0, 1} and lab2.shape == img2.shape
    np.testing.assert_allclose(aff2, laff2, atol=WORLD_ATOL)
    # the kidney block stays where it was: its centre of mass moves by less than one output voxel
    c_src = _world(KITS_AFFINE, np.argwhere(lab_src > 0).mean(0))
    c_out = _world(aff2, np.argwhere(lab2 > 0).mean(0))
    assert np.linalg.norm(c_out - c_src) < 2.0
    # the field of view is kept within one output voxel: source RAS shape (10, 12, 8) at (0.8, 0.8, 3.0) mm
    span_src = (np.array([10, 12, 8]) - 1) * np.array([0.8, 0.8, 3.0])
    assert np.all(np.abs((np.array(img2.shape) - 1) * 2.0 - span_src) <= 2.0), img2.shape


# ------------------------------------------------------------------------------------------------ lits


def test_lits_labels(tmp_path):
    src = tmp_path / "LiTS"
    aff = np.diag([-0.7, -0.7, 1.5, 1.0])  # LPS-stored CT: x and y flipped
    labs = {}
    for n, batch in ((0, "Training Batch 1"), (12, "Training Batch 2")):
        lab = np.zeros((12, 10, 8), np.float32)  # LiTS stores labels as floats
        lab[2:9, 2:8, 1:7] = 1
        lab[4:6, 4:6, 3:5] = 2
        _save(src / batch / f"volume-{n}.nii", np.full((12, 10, 8), -50, np.int16), aff)
        _save(src / batch / f"segmentation-{n}.nii", lab, aff)
        labs[n] = lab
    convert("lits", str(src), str(tmp_path / "out"))
    out, meta = _out(tmp_path, "out")
    assert [e["case"] for e in meta["training"]] == ["lits_000", "lits_012"]
    lab, laff, _ = _load(out, "./labelsTr/lits_012.nii.gz")
    assert set(np.unique(lab)) == {0, 1} and lab.sum() == (labs[12] > 0).sum()
    np.testing.assert_array_equal(lab, np.flip(labs[12] > 0, axis=(0, 1)))  # RAS: x and y flipped
    img, _, hdr = _load(out, "./imagesTr/lits_000.nii.gz")
    assert hdr.get_data_dtype() == np.float32 and np.all(img == -50.0)
    assert meta["training"][0]["provenance"]["source_values"] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ sliver07


def test_sliver07_itk_lps_to_ras(tmp_path):
    src = tmp_path / "sliver07"
    src.mkdir()
    arr = np.zeros((8, 10, 12), np.int16)  # ITK arrays are (z, y, x)
    arr[3, 4, 5] = 1000  # ITK index (x=5, y=4, z=3)
    seg = np.zeros((8, 10, 12), np.uint8)
    seg[2:6, 3:7, 4:9] = 255
    spacing, origin = (0.7, 0.8, 2.5), (-100.5, 50.25, 30.0)
    for name, a in (("liver-orig001.mhd", arr), ("liver-seg001.mhd", seg)):
        im = itk.image_from_array(a)
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        itk.imwrite(im, str(src / name))
    assert (src / "liver-orig001.raw").exists() or (src / "liver-orig001.zraw").exists()
    convert("sliver07", str(src), str(tmp_path / "out"))
    out, meta = _out(tmp_path, "out")
    img, aff, hdr = _load(out, "./imagesTr/sliver07_001.nii.gz")
    lab, _, _ = _load(out, "./labelsTr/sliver07_001.nii.gz")
    np.testing.assert_allclose(hdr.header.get_zooms()[:3], spacing, rtol=1e-6)
    lps = np.array(origin) + np.array([5, 4, 3]) * np.array(spacing)
    (idx,) = np.argwhere(img == 1000.0)
    np.testing.assert_allclose(_world(aff, idx), lps * [-1, -1, 1], atol=WORLD_ATOL)  # LPS -> RAS
    np.testing.assert_allclose(_world(aff, (0, 0, 0))[2], origin[2], atol=WORLD_ATOL)
    assert set(np.unique(lab)) == {0, 1} and lab.sum() == (seg > 0).sum()
    assert meta["name"] == "Liver-CT" and meta["modality"] == {"0": "CT"}


# ------------------------------------------------------------------------------------------------ chaos

N_SLICES = 11
ZS = [15.0, 0.0, 27.0, 6.0, 30.0, 3.0, 21.0, 9.0, 24.0, 12.0, 18.0]  # file k lies at z = ZS[k] (LPS, mm)
INST = [7, 2, 11, 5, 1, 9, 3, 10, 4, 8, 6]  # file k's InstanceNumber
ORIGIN_XY, SPACING_XY = (-10.5, 20.25), (0.75, 0.9)  # (x, y) LPS origin; spacing of columns, rows


def _write_dicom_series(folder, inst, per_file_uid=False):
    os.makedirs(folder, exist_ok=True)
    for k in range(N_SLICES):
        a = np.full((10, 12), 100 + k, dtype=np.int16)  # rows x columns
        im = itk.image_from_array(a)
        im.SetSpacing(SPACING_XY)
        d = im.GetMetaDataDictionary()
        tags = {
            "0008|0060": "MR", "0020|000d": "1.2.826.0.1.1", "0020|0052": "1.2.826.0.1.3",
            "0020|000e": f"1.2.826.0.1.2.{k if per_file_uid else 0}", "0020|0013": str(inst[k]),
            "0020|0032": f"{ORIGIN_XY[0]}\\{ORIGIN_XY[1]}\\{ZS[k]}", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{SPACING_XY[1]}\\{SPACING_XY[0]}", "0018|0050": "3.0",
        }
        for t, v in tags.items():
            d[t] = v
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        w = itk.ImageFileWriter[type(im)].New(Input=im, FileName=os.path.join(folder, f"IMG-{k + 1:04d}.dcm"), ImageIO=io)
        w.Update()


def _square(rank):  # the liver square of the PNG with this rank: distinct per PNG
    return (rank * 3) % 8, rank  # (row, column) of its top-left pixel


def _write_pngs(folder):
    os.makedirs(folder, exist_ok=True)
    for r in range(N_SLICES):
        m = np.zeros((10, 12), np.uint8)
        row, col = _square(r)
        m[row:row + 2, col:col + 2] = 63  # liver
        m[9, 11] = 126  # right kidney: background after the map
        Image.fromarray(m).save(os.path.join(folder, f"mask_{r + 1}.png"))  # natural order: mask_2 < mask_10


def _check_chaos_case(out, rel_img, rel_lab, inst):
    img, aff, hdr = _load(out, rel_img)
    lab, laff, _ = _load(out, rel_lab)
    np.testing.assert_allclose(hdr.header.get_zooms()[:3], (*SPACING_XY, 3.0), rtol=1e-6)
    rank = np.argsort(np.argsort(inst))  # rank of each file's InstanceNumber = index of its PNG
    for k in range(N_SLICES):
        row, col = _square(rank[k])
        for dr in (0, 1):
            for dc in (0, 1):
                lps = np.array([ORIGIN_XY[0] + (col + dc) * SPACING_XY[0], ORIGIN_XY[1] + (row + dr) * SPACING_XY[1], ZS[k]])
                v = _voxel(aff, lps * [-1, -1, 1])
                assert lab[v] == 1, (k, v)
                assert img[v] == 100 + k  # the image slice of file k lies at the same place
    assert lab.sum() == 4 * N_SLICES and set(np.unique(lab)) == {0, 1}
    np.testing.assert_array_equal(aff, laff)


def test_chaos_dicom_png_slice_order(tmp_path):
    src = tmp_path / "CHAOS" / "MR"
    p = src / "1"
    _write_dicom_series(p / "T2SPIR" / "DICOM_anon", INST)
    _write_pngs(p / "T2SPIR" / "Ground")
    inst_in = [2 * i for i in INST]  # T1-DUAL in/out phases interleave their InstanceNumbers
    _write_dicom_series(p / "T1DUAL" / "DICOM_anon" / "InPhase", inst_in, per_file_uid=True)
    _write_dicom_series(p / "T1DUAL" / "DICOM_anon" / "OutPhase", [i - 1 for i in inst_in])
    _write_pngs(p / "T1DUAL" / "Ground")
    convert("chaos", str(src), str(tmp_path / "spir"), sequence="t2spir")
    out, meta = _out(tmp_path, "spir")
    assert meta["name"] == "Liver-MRI-SPIR" and meta["labels"]["1"] == "liver" and meta["modality"] == {"0": "MR"}
    _check_chaos_case(out, "./imagesTr/chaos_1.nii.gz", "./labelsTr/chaos_1.nii.gz", INST)
    # every file its own SeriesInstanceUID (anonymised exports): ordered by position all the same
    convert("chaos", str(src), str(tmp_path / "in"), sequence="t1_in")
    _check_chaos_case(str(tmp_path / "in"), "./imagesTr/chaos_1.nii.gz", "./labelsTr/chaos_1.nii.gz", inst_in)
    convert("chaos", str(src), str(tmp_path / "outph"), sequence="t1_out")
    _check_chaos_case(str(tmp_path / "outph"), "./imagesTr/chaos_1.nii.gz", "./labelsTr/chaos_1.nii.gz", inst_in)
    os.remove(p / "T2SPIR" / "Ground" / "mask_4.png")
    with pytest.raises(DataError, match=r"Ground: 10 PNG masks for a DICOM series of 11 slices"):
        convert("chaos", str(src), str(tmp_path / "bad"), sequence="t2spir")


# ------------------------------------------------------------------------------------------------ dhcp


def test_dhcp_cortical_plate(tmp_path):
    anat = tmp_path / "dhcp" / "sub-CC00001" / "ses-1001" / "anat"
    rng = np.random.default_rng(1)
    dseg = rng.integers(0, 10, (12, 10, 8)).astype(np.int16)
    aff = np.diag([0.5, 0.5, 0.5, 1.0])
    _save(anat / "sub-CC00001_ses-1001_T2w.nii.gz", rng.random((12, 10, 8)).astype(np.float32), aff)
    _save(anat / "sub-CC00001_ses-1001_desc-drawem9_dseg.nii.gz", dseg, aff)
    convert("dhcp", str(tmp_path / "dhcp"), str(tmp_path / "cp"))
    out, meta = _out(tmp_path, "cp")
    lab, _, _ = _load(out, "./labelsTr/sub-CC00001_ses-1001.nii.gz")
    np.testing.assert_array_equal(lab, (dseg == 2).astype(np.uint8))
    assert meta["labels"] == {"0": "background", "1": "cortical plate"} and meta["name"] == "CP-newborn"


# ------------------------------------------------------------------------------------------------ bad inputs


def _bad_lits(root):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    good = np.zeros((12, 10, 8), np.uint8)
    good[3:8, 3:7, 2:6] = 1
    _save(root / "volume-0.nii", np.zeros((12, 10, 8), np.float32), aff)
    _save(root / "segmentation-0.nii", good, aff)
    (root / "volume-1.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))  # corrupt
    _save(root / "segmentation-1.nii", good, aff)
    _save(root / "volume-2.nii", np.zeros((12, 10, 8), np.float32), aff)  # no segmentation-2
    _save(root / "volume-3.nii", np.zeros((12, 10, 8), np.float32), aff)
    _save(root / "segmentation-3.nii", np.zeros((12, 10, 7), np.uint8), aff)  # another grid


def test_bad_inputs_stop_or_skip(tmp_path, capsys):
    src = tmp_path / "LiTS"
    _bad_lits(src)
    out = str(tmp_path / "out")
    rc = prepare_data.main(["lits", "--source", str(src), "--output", out])
    err = capsys.readouterr().err
    assert rc == 2 and f"{src / 'volume-1.nii.gz'}: cannot be read as NIfTI" in err
    assert not os.path.exists(out)
    kits = tmp_path / "kits"
    _kits_case(kits, "case_00000", seg=False)
    with pytest.raises(DataError, match=r"case_00000/segmentation\.nii\.gz: label not found"):
        convert("kits19", str(kits), str(tmp_path / "k"))
    shifted = KITS_AFFINE.copy()
    shifted[:3, 3] += 5.0
    _kits_case(tmp_path / "kits2", "case_00001", seg_affine=shifted)  # image and segmentation disagree
    with pytest.raises(DataError, match=r"case_00001/segmentation\.nii\.gz: label affine differs"):
        convert("kits19", str(tmp_path / "kits2"), str(tmp_path / "k"))

    rc = prepare_data.main(["lits", "--source", str(src), "--output", out, "--skip_bad"])
    captured = capsys.readouterr()
    assert rc == 0
    meta = json.loads(open(os.path.join(out, "dataset.json"), encoding="utf-8").read())
    assert [e["case"] for e in meta["training"]] == ["lits_000"] and meta["numTraining"] == 1
    skipped = {s["case"]: s["problem"] for s in meta["skipped"]}
    assert set(skipped) == {"lits_001", "lits_002", "lits_003"}
    assert "volume-1.nii.gz: cannot be read" in skipped["lits_001"]
    assert "segmentation-2.nii: label not found" in skipped["lits_002"]
    assert "segmentation-3.nii: label shape (12, 10, 7) differs" in skipped["lits_003"]
    assert "Skipped 3 bad case(s)" in captured.out and "segmentation-2.nii" in captured.out.split("Skipped")[-1]


def test_every_subcommand_has_help(capsys):
    for sub in ("msd", "kits19", "lits", "sliver07", "chaos", "dhcp", "inhouse"):
        with pytest.raises(SystemExit) as ex:
            prepare_data.build_parser().parse_args([sub, "--help"])
        assert ex.value.code == 0 and "--source" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ kill + rerun


def test_kill_then_rerun_resumes(tmp_path):
    src = tmp_path / "LiTS"
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    for n in range(6):
        lab = np.zeros((12, 10, 8), np.uint8)
        lab[2 + n % 3:9, 2:8, 1:7] = 1
        _save(src / f"volume-{n}.nii", np.full((12, 10, 8), float(n), np.float32), aff)
        _save(src / f"segmentation-{n}.nii", lab, aff)
    out = str(tmp_path / "out")
    convert("lits", str(src), out)  # a previous complete dataset
    before = open(os.path.join(out, "dataset.json"), encoding="utf-8").read()
    cmd = [sys.executable, TOOL, "lits", "--source", str(src), "--output", out, "--label_map", "1:1"]
    env = dict(os.environ, **{TEST_DELAY_ENV: "2"})
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    records = os.path.join(out + ".partial", ".prepare", "cases")

    def recorded():  # complete case records (not the hidden temporary file of one being written)
        names = os.listdir(records) if os.path.isdir(records) else []
        return sorted(n for n in names if n.endswith(".json") and not n.startswith("."))

    deadline = time.time() + 120
    while time.time() < deadline and not recorded():
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = recorded()
    assert 1 <= len(done) < 6
    assert open(os.path.join(out, "dataset.json"), encoding="utf-8").read() == before  # the previous dataset is untouched
    staged = {c[:-5]: os.stat(os.path.join(out + ".partial", "imagesTr", c[:-5] + ".nii.gz")).st_mtime_ns for c in done}
    assert prepare_data.main(cmd[2:]) == 0  # the same command again
    meta = json.loads(open(os.path.join(out, "dataset.json"), encoding="utf-8").read())
    assert meta["numTraining"] == 6 and meta["prepared_by"]["job"]["label_map"] == "1:1"
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".previous")
    assert not os.path.exists(os.path.join(out, ".prepare"))
    for case, mtime in staged.items():  # kept, not redone
        assert os.stat(os.path.join(out, "imagesTr", case + ".nii.gz")).st_mtime_ns == mtime
    assert sorted(os.listdir(os.path.join(out, "imagesTr"))) == [f"lits_{n:03d}.nii.gz" for n in range(6)]
    # a third run with the same settings has nothing to do; a folder it did not write is never replaced
    assert prepare_data.main(cmd[2:]) == 0
    foreign = tmp_path / "mine"
    (foreign / "notes").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a dataset written by"):
        convert("lits", str(src), str(foreign))


def test_kill_between_the_final_renames(tmp_path, monkeypatch, capsys):
    """Killed after the old dataset was renamed away but before the new one was renamed in: nothing at
    ``<output>``; the rerun puts the old one back, then moves the complete staging folder in, converting nothing."""
    src = tmp_path / "LiTS"
    for n in range(2):
        _save(src / f"volume-{n}.nii", np.zeros((12, 10, 8), np.float32), np.eye(4))
        _save(src / f"segmentation-{n}.nii", np.ones((12, 10, 8), np.uint8), np.eye(4))
    out = str(tmp_path / "out")
    convert("lits", str(src), out)
    real_rename = os.rename

    def killed(a, b):
        if str(a).endswith(".partial"):
            raise KeyboardInterrupt("killed")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        convert("lits", str(src), out, name="second")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not os.path.exists(out) and os.path.isfile(out + ".previous/dataset.json")
    capsys.readouterr()
    convert("lits", str(src), out, name="second")
    log = capsys.readouterr().out
    assert "Restored the previous dataset" in log and log.count("already converted by an earlier run") == 2
    assert json.loads(open(os.path.join(out, "dataset.json"), encoding="utf-8").read())["name"] == "second"
    assert not os.path.exists(out + ".previous") and not os.path.exists(out + ".partial")


# ------------------------------------------------------------------------------------------------ in-house


def _case_files(root, name, shape=(12, 10, 8), label_value=1, nan=False, label_shape=None):
    aff = np.diag([0.8, 0.8, 0.8, 1.0])
    img = np.ones(shape, np.float32)
    if nan:
        img[0, 0, 0] = np.nan
    lab = np.zeros(label_shape or shape, np.uint8)
    lab[3:6, 3:6, 3:6] = label_value
    _save(root / "images" / f"{name}_t2.nii.gz", img, aff)
    _save(root / "labels" / f"{name}_cp.nii.gz", lab, aff)


def test_inhouse_documented_example_is_accepted(tmp_path, capsys):
    with open(os.path.join(ROOT, "docs", "prepare_data.md"), encoding="utf-8") as f:
        assert EXAMPLE_CSV.strip() in f.read()
    import common.inhouse

    assert all(line in common.inhouse.__doc__ for line in EXAMPLE_CSV.strip().splitlines())
    root = tmp_path / "fetal"
    for i in range(1, 5):
        _case_files(root, f"fetus{i:02d}")
    (root / "cases.csv").write_text(EXAMPLE_CSV, encoding="utf-8")
    out = str(tmp_path / "CP")
    assert prepare_data.main(["inhouse", "--source", str(root / "cases.csv"), "--output", out, "--task", "cp"]) == 0
    meta = read_decathlon(out)
    # read_decathlon takes an entry's own "case" (the list's case column) as its id, else the image file's name
    assert [c["case"] for c in meta["training"]] == [f"fetus{i:02d}" for i in range(1, 5)]
    saved = json.loads(open(os.path.join(out, "dataset.json"), encoding="utf-8").read())
    assert [e["group"] for e in saved["training"]] == ["younger", "younger", "older", "older"]
    assert saved["groups"] == {"younger": 2, "older": 2} and saved["labels"]["1"] == "cortical plate"
    assert saved["training"][0]["image"] == str(root / "images" / "fetus01_t2.nii.gz")  # in place
    rows = [dict(zip(("image", "label", "group", "case"), r.split(","))) for r in EXAMPLE_CSV.split()[1:]]
    (root / "cases.json").write_text(json.dumps(rows), encoding="utf-8")  # the JSON form of the same list
    cases, _, groups = check_inhouse(str(root / "cases.json"), "cp")
    assert [c["case"] for c in cases] == ["fetus01", "fetus02", "fetus03", "fetus04"] and groups == ["younger", "older"]
    out2 = str(tmp_path / "CPcopy")
    prepare_inhouse(str(root / "cases.csv"), out2, "cp", copy=True)
    copied = json.loads(open(os.path.join(out2, "dataset.json"), encoding="utf-8").read())
    assert copied["training"][2]["image"] == "./imagesTr/fetus03.nii.gz"
    assert os.path.getsize(os.path.join(out2, "imagesTr", "fetus03.nii.gz")) == os.path.getsize(root / "images" / "fetus03_t2.nii.gz")


def test_inhouse_reports_every_bad_case(tmp_path):
    root = tmp_path / "tsc"
    rows = ["image,label,group"]
    kinds = {"ok1": {}, "ok2": {}, "grid": {"label_shape": (12, 10, 7)}, "range": {"label_value": 2},
             "nan": {"nan": True}, "group": {}}
    groups = {"ok1": "center1", "ok2": "center2", "grid": "center3", "range": "center3", "nan": "center4",
              "group": "centre9"}
    for name, kw in kinds.items():
        _case_files(root, name, **kw)
        rows.append(f"images/{name}_t2.nii.gz,labels/{name}_cp.nii.gz,{groups[name]}")
    rows.append("images/missing_t2.nii.gz,labels/missing_cp.nii.gz,center1")
    (root / "cases.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as ex:
        check_inhouse(str(root / "cases.csv"), "tsc")
    msg = str(ex.value)
    problems = {
        "case grid_t2": "label shape (12, 10, 7) differs",
        "case range_t2": "outside the declared classes 0..1",
        "case nan_t2": "NaN or inf",
        "case group_t2": "unknown group 'centre9'",
        "case missing_t2": "file not found",
        "group center5": "no case belongs to it",
    }
    lines = msg.splitlines()
    for who, problem in problems.items():
        assert any(who in line and problem in line for line in lines), (who, msg)
    assert "ok1" not in msg and "ok2" not in msg and "6 problem(s) in 7" in msg
    # --groups narrows the required groups; --labels widens the classes
    keep = rows[:1] + [r for r in rows if "ok1" in r or "ok2" in r or "range" in r]
    (root / "sub.csv").write_text("\n".join(keep) + "\n", encoding="utf-8")
    cases, labels, req = check_inhouse(str(root / "sub.csv"), "tsc", labels="0:background,1:lesion,2:tuber",
                                       groups=["center1", "center2", "center3"])
    assert len(cases) == 3 and labels["2"] == "tuber" and req == ["center1", "center2", "center3"]
