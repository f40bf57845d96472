# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Synthetic stand-ins for the paper's datasets (Table I): checked against the specification (label sets,
channels and their names, nested BraTS regions, tumours inside their organ, separate TSC lesions, groups and
fixed test splits, HU ranges, the low-quality centre's blur, age and the cortical plate), not against the
generator's own output. The first release's arrays are checked against a copy of its algorithm."""

from __future__ import annotations

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.data import make_datalist, read_decathlon, read_sources
from common.synthetic import (
    GROUPED_PRESETS,
    PRESET_DESCRIPTIONS,
    SCENARIO_PRESETS,
    PhantomSpec,
    group_specs,
    make_dataset,
    make_grouped_dataset,
    make_phantom,
    make_scenario,
    preset_spec,
)

CUBE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
#: The label values each dataset holds (Table I; KiTS19, LiTS and MSD label conventions).
LABELS = {
    "liver_mr": {0, 1}, "liver_ct": {0, 1}, "spleen_ct": {0, 1}, "pancreas_ct": {0, 1},
    "cp_newborn": {0, 1}, "cp_younger_fetus": {0, 1}, "cp_older_fetus": {0, 1},
    "lesions_mr": {0, 1}, "lesions_mr_lowq": {0, 1},
    "liver_mr_t1_in": {0, 1}, "liver_mr_t1_out": {0, 1}, "liver_mr_t2spir": {0, 1},
    "kits_ct": {0, 1, 2}, "lits_ct": {0, 1, 2}, "hippocampus_mr": {0, 1, 2}, "prostate_mr": {0, 1, 2},
    "brats_mr": {0, 1, 2, 3},
}  # fmt: skip
CHANNELS = {"prostate_mr": ("T2", "ADC"), "brats_mr": ("FLAIR", "T1w", "t1gd", "T2w")}


def _case(preset: str, seed: int = 0, **overrides) -> tuple[np.ndarray, np.ndarray]:
    return make_phantom(preset_spec(preset, **overrides), np.random.default_rng(seed))


def _read(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _meta(dataset_dir: str) -> dict:
    with open(os.path.join(dataset_dir, "dataset.json"), encoding="utf-8") as f:
        return json.load(f)


def _components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=CUBE)[1])


def test_every_preset_has_its_label_set_channels_and_a_description():
    assert set(LABELS) == set(SCENARIO_PRESETS)  # a new preset needs its expected labels here
    assert set(PRESET_DESCRIPTIONS) == set(SCENARIO_PRESETS) | set(GROUPED_PRESETS)
    for preset, labels in LABELS.items():
        spec = preset_spec(preset)
        for seed in (0, 1):
            img, lab = _case(preset, seed)
            n_ch = len(CHANNELS.get(preset, ("x",)))
            assert img.shape == (tuple(spec.shape) + (n_ch,) if n_ch > 1 else tuple(spec.shape)), preset
            assert img.dtype == np.float32 and lab.dtype == np.uint8 and lab.shape == tuple(spec.shape)
            assert set(np.unique(lab).tolist()) == labels, (preset, seed)
            assert np.isfinite(img).all()
    hippocampus = preset_spec("hippocampus_mr")
    assert hippocampus.shape == (36, 50, 35) and hippocampus.spacing == (1.0, 1.0, 1.0)  # like MSD Task04


def test_intensity_ranges_ct_in_hu_and_mr_positive():
    for preset in SCENARIO_PRESETS:
        spec = preset_spec(preset)
        img, lab = _case(preset, 2)
        corner = img[:4, :4, :4]  # outside the body ellipsoid (radii <= 0.95 of the half extent): air
        if spec.modality == "CT":
            # air is -1000 HU plus zero-mean Gaussian noise of 20 HU: the median of 64 corner voxels is within a
            # few HU (30 HU = 1.5 noise sd for a single voxel); contrast-enhanced organs 60 .. 300 HU (a kidney
            # cortex reaches ~250); nothing at bone HU (>= 400)
            assert abs(float(np.median(corner)) + 1000.0) < 30.0, preset
            organ = img[lab == 1]
            assert 60.0 < float(np.median(organ)) < 300.0, preset
            assert -1200.0 < img.min() and img.max() < 400.0, preset
        else:
            assert img.min() >= 0.0, preset  # magnitude images
            # the body (about a third of the volume) is far above the air, a Rayleigh noise floor of median
            # 1.18 sigma with sigma = 5 % of the tissue (10 % at noise x2): a ratio of ~17 (8.5), asked > 5
            flat = img.reshape(-1, *img.shape[3:])
            air = np.median(corner.reshape(-1, *img.shape[3:]), axis=0)
            assert (np.percentile(flat, 90, axis=0) > 5 * air).all() and (air > 0).all(), preset
    # the tumours are hypodense in their enhanced organ (KiTS, LiTS): at least 40 HU darker (the generator's
    # gap is 70 HU, the texture and noise medians add a few HU)
    for preset in ("kits_ct", "lits_ct"):
        img, lab = _case(preset, 3)
        assert float(np.median(img[lab == 1]) - np.median(img[lab == 2])) > 40.0, preset
    assert float(np.median(_case("kits_ct", 3)[0][_case("kits_ct", 3)[1] == 1])) > 130.0  # enhanced kidney


def _cnr(img: np.ndarray, mask: np.ndarray, air: np.ndarray, ct: bool) -> float:
    """|median(structure) - median(its 2-voxel surroundings)| / noise sd; the noise sd from the air: CT a
    Gaussian (its std), MR a Rayleigh magnitude, whose mean square is 2 sigma^2."""
    sigma = float(img[air].std()) if ct else float(np.sqrt(np.mean(img[air].astype(np.float64) ** 2) / 2))
    body = img > -500.0 if ct else img > 4.0 * sigma
    ring = ndimage.binary_dilation(mask, iterations=2) & ~mask & body
    return abs(float(np.median(img[mask]) - np.median(img[ring]))) / sigma


def test_structures_stand_out_of_the_noise_but_are_not_noise_free():
    """Learnable in a few hundred iterations: each labelled class differs from its surroundings by >= 2 noise
    standard deviations in at least one channel, voxel by voxel (a 3^3 neighbourhood averages the noise down
    5x more); not trivial: the noise is there (CT >= 10 HU). The low-quality centre is hard on purpose (the
    paper's centre 5 had the lowest accuracy): its small blurred lesions keep >= 1 noise sd."""
    for preset, labels in LABELS.items():
        img, lab = _case(preset, 4)
        ct = preset_spec(preset).modality == "CT"
        chans = [img] if img.ndim == 3 else [img[..., c] for c in range(img.shape[-1])]
        air = np.zeros(lab.shape, dtype=bool)
        air[:3, :3, :], air[-3:, -3:, :] = True, True  # corners: outside the body
        for value in sorted(labels - {0}):
            best = max(_cnr(ch, lab == value, air, ct) for ch in chans)
            assert best >= (1.0 if preset == "lesions_mr_lowq" else 2.0), (preset, value, best)
        if ct:
            assert float(img[air].std()) > 10.0


def test_kits_and_lits_tumours_lie_inside_their_organ():
    for preset in ("kits_ct", "lits_ct"):
        for seed in range(3):
            _, lab = _case(preset, seed)
            tumour = lab == 2
            assert tumour.any()
            comps, n = ndimage.label(tumour, structure=CUBE)
            for i in range(1, n + 1):  # each tumour touches its organ
                assert (lab[ndimage.binary_dilation(comps == i, CUBE)] == 1).any(), (preset, seed, i)
            # embedded, not attached outside: most of the voxels around the tumours are organ (the centres are
            # drawn at least a voxel inside the organ and the tumours clipped to it)
            shell = ndimage.binary_dilation(tumour, CUBE) & ~tumour
            assert (lab[shell] == 1).mean() > 0.5, (preset, seed)
    _, lab = _case("kits_ct", 0)
    kidneys = ndimage.label(lab > 0, structure=CUBE)
    assert kidneys[1] == 2  # left and right
    xs = [np.argwhere(kidneys[0] == i)[:, 0].mean() for i in (1, 2)]
    assert min(xs) < lab.shape[0] / 2 < max(xs)


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> str:
    return make_scenario("brats_mr", str(tmp_path_factory.mktemp("brats")), 2, seed=5)


def test_brats_four_channel_4d_nifti_with_msd_names_and_nested_regions(brats):
    meta = _meta(brats)
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}  # MSD Task01's names
    assert meta["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert meta["tensorImageSize"] == "4D"
    for entry in read_decathlon(brats)["training"]:
        img_nii = nib.load(entry["image"])
        img, lab = np.asarray(img_nii.dataobj), _read(entry["label"])
        assert img.shape == (64, 64, 48, 4) and lab.shape == (64, 64, 48)
        assert img_nii.header.get_zooms()[:3] == (2.0, 2.0, 2.0)
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3}
        # nested: enhancing inside the non-enhancing core inside the edema: each region's 26-neighbourhood
        # stays within the next larger one (BraTS: ET within TC within WT)
        et, tc, wt = lab == 3, lab >= 2, lab >= 1
        assert (ndimage.binary_dilation(et, CUBE) <= tc).all()
        assert (ndimage.binary_dilation(tc, CUBE) <= wt).all()
        assert _components(wt) == 1  # one tumour
        # the same anatomy in four contrasts: relative to the normal brain (far from the tumour), the edema is
        # bright in FLAIR and T2w and dark in T1w, and the enhancing tumour is brightest in t1gd
        brain = (img[..., 1] > 0.3 * np.median(img[..., 1][img[..., 1] > np.percentile(img[..., 1], 50)]))
        normal = brain & ~ndimage.binary_dilation(wt, iterations=3)
        rel = [{v: float(np.median(img[..., c][lab == v]) / np.median(img[..., c][normal])) for v in (1, 2, 3)}
               for c in range(4)]  # fmt: skip
        flair, t1w, t1gd, t2w = rel
        assert flair[1] > 1.3 and t2w[1] > 1.3 and t1w[1] < 0.9
        assert t1gd[3] > 1.5 and t1gd[3] > max(r[3] for r in (flair, t1w, t2w))
        assert t1gd[2] < t1gd[1]  # the non-enhancing core stays dark after contrast
    # the data layer reads a channel by its dataset.json name
    dl = make_datalist({"dir": brats, "channel": "t1gd"}, n_val=0, n_test=0, num_classes=4)
    assert dl["sources"][0]["channel"] == 2 and len(dl["training"]) == 2


def test_prostate_two_channels_low_in_the_body_and_one_channel_option(tmp_path):
    d = make_scenario("prostate_mr", str(tmp_path / "p2"), 1, seed=0)
    meta = read_decathlon(d)
    assert meta["modality"] == {"0": "T2", "1": "ADC"}  # MSD Task05's names and label set
    assert meta["labels"] == {"0": "background", "1": "PZ", "2": "TZ"}
    img, lab = _read(meta["training"][0]["image"]), _read(meta["training"][0]["label"])
    assert img.shape == (64, 64, 20, 2) and lab.shape == (64, 64, 20)
    assert not np.allclose(img[..., 0] / img[..., 0].mean(), img[..., 1] / img[..., 1].mean(), rtol=0.1)
    z = np.argwhere(lab > 0)[:, 2].mean()
    assert z < 0.45 * lab.shape[2]  # low in the body (the volume is centred on the body, +-4 % jitter)
    assert 0.002 < (lab > 0).mean() < 0.05  # small
    d1 = make_scenario("prostate_mr", str(tmp_path / "p1"), 1, seed=0, channels=1)
    meta1 = read_decathlon(d1)
    assert meta1["modality"] == {"0": "T2"} and _read(meta1["training"][0]["image"]).shape == (64, 64, 20)
    assert (ndimage.binary_dilation(lab == 2) <= (lab > 0)).all()  # the transition zone is wrapped by the PZ
    _, one = _case("prostate_mr", 0, subregions=False)
    assert set(np.unique(one).tolist()) == {0, 1} and np.array_equal(one > 0, lab > 0)


def test_hippocampus_small_paired_elongated():
    for seed in range(2):
        _, lab = _case("hippocampus_mr", seed)
        comps, n = ndimage.label(lab > 0, structure=CUBE)
        assert n == 2  # left and right
        xs = sorted(np.argwhere(comps == i)[:, 0].mean() for i in (1, 2))
        assert xs[0] < lab.shape[0] / 2 < xs[1]
        for i in (1, 2):
            pts = np.argwhere(comps == i).astype(float)  # 1 mm voxels
            extent = pts.max(0) - pts.min(0) + 1
            # elongated along y (anterior-posterior): the curve and the thicker head widen x and z, so ask 1.5x
            assert extent[1] > 1.5 * max(extent[0], extent[2]), extent
        assert 0.005 < (lab > 0).mean() < 0.1
        ys = {v: np.argwhere(lab == v)[:, 1].mean() for v in (1, 2)}
        assert ys[1] > ys[2]  # MSD Task04: 1 anterior (+y), 2 posterior
    _, one = _case("hippocampus_mr", 0, subregions=False)
    assert set(np.unique(one).tolist()) == {0, 1} and np.array_equal(one > 0, _case("hippocampus_mr", 0)[1] > 0)


def test_tsc_lesions_are_several_separate_components():
    for preset in ("lesions_mr", "lesions_mr_lowq"):
        rng = np.random.default_rng(7)
        for _ in range(4):
            assert _components(make_phantom(preset_spec(preset), rng)[1]) >= 2, preset
    seen: set[int] = set()
    for group, spec in group_specs("tsc_centers", shape=(48, 48, 24)).items():
        rng = np.random.default_rng(11)
        counts = [_components(make_phantom(spec, rng)[1]) for _ in range(4)]
        assert min(counts) >= 2, (group, counts)
        seen.update(counts)
    assert len(seen) > 2  # the lesion count varies between cases (3 .. 8 drawn)


def _sharpness(img: np.ndarray, lab: np.ndarray) -> float:
    """Mean intensity step across the lesion boundary (inner minus outer one-voxel shell) over the lesion's
    contrast to its surroundings (2..4 voxels away): a signed directional derivative, so zero-mean noise
    averages out, and the contrast normalisation removes gain and contrast. A sharp edge gives about 1; a
    Gaussian blur of sigma 1 voxel leaves ~0.4 (Phi(0.5) - Phi(-0.5) for a plane) or less on small lesions."""
    les = lab > 0
    inner = les & ~ndimage.binary_erosion(les)
    outer = ndimage.binary_dilation(les) & ~les
    far = ndimage.binary_dilation(les, iterations=4) & ~ndimage.binary_dilation(les, iterations=2)
    return float((img[inner].mean() - img[outer].mean()) / (img[les].mean() - img[far].mean()))


def test_low_quality_centre_is_blurrier_for_the_same_anatomy():
    for seed in (0, 1):
        good, lab = _case("lesions_mr", seed)
        low, lab_low = _case("lesions_mr_lowq", seed)
        assert np.array_equal(lab, lab_low)  # quality draws nothing random: the same anatomy
        assert _sharpness(low, lab) < 0.75 * _sharpness(good, lab), seed
    specs = group_specs("tsc_centers", shape=(48, 48, 24))
    s = {g: _sharpness(*make_phantom(spec, np.random.default_rng(3))) for g, spec in specs.items()}
    assert s["center5"] < 0.75 * min(s[g] for g in ("center1", "center2", "center3", "center4")), s


def test_age_grows_the_cortical_plate():
    def plate(preset: str) -> tuple[float, float]:
        rng = np.random.default_rng(21)
        vols, radii = [], []
        for _ in range(3):
            _, lab = make_phantom(preset_spec(preset, shape=(48, 48, 32), spacing=(2.0, 2.0, 3.0)), rng)
            pts = np.argwhere(lab > 0) * np.array([2.0, 2.0, 3.0])
            vols.append(len(pts) * 12.0)  # mm^3
            radii.append(np.linalg.norm(pts - pts.mean(0), axis=1).mean())  # mm
        return float(np.mean(vols)), float(np.mean(radii))

    young, older, newborn = plate("cp_younger_fetus"), plate("cp_older_fetus"), plate("cp_newborn")
    assert young[0] < older[0] < newborn[0]  # volume of the plate
    assert young[1] < older[1] < newborn[1]  # its mean distance from its centre (brain size)
    assert preset_spec("cp_younger_fetus").age < preset_spec("cp_older_fetus").age < preset_spec("cp_newborn").age


def test_liver_mr_contrasts_differ():
    """The three CHAOS-like contrasts of the same anatomy: T1 in-phase liver brighter than the tissue, out-of-phase
    less so with a dark boundary line, T2 SPIR liver darker. Ratios are local (bands 2..5 voxels inside and
    outside the liver's surface), so the smooth bias field (sigma >= 8 voxels) cancels."""
    ratios, rims = {}, {}
    for preset in ("liver_mr_t1_in", "liver_mr_t1_out", "liver_mr_t2spir"):
        img, lab = _case(preset, 6)
        liver = lab == 1
        body = img > 0.3 * np.median(img[img > np.percentile(img, 50)])
        inner = ndimage.binary_erosion(liver, iterations=2) & ~ndimage.binary_erosion(liver, iterations=5)
        outer = ndimage.binary_dilation(liver, iterations=5) & ~ndimage.binary_dilation(liver, iterations=2) & body
        boundary = ndimage.binary_dilation(liver) & ~ndimage.binary_erosion(liver) & body
        ratios[preset] = float(np.median(img[inner]) / np.median(img[outer]))
        rims[preset] = float(np.median(img[boundary]) / min(np.median(img[inner]), np.median(img[outer])))
    assert ratios["liver_mr_t1_in"] > ratios["liver_mr_t1_out"] > 1.1  # T1: liver brighter
    assert ratios["liver_mr_t2spir"] < 0.8  # T2 SPIR: liver darker than the (fat-suppressed) tissue
    assert rims["liver_mr_t1_out"] < 0.8 < rims["liver_mr_t1_in"]  # the out-of-phase "India ink" line
    assert np.array_equal(_case("liver_mr_t1_in", 6)[1], _case("liver_mr_t2spir", 6)[1])  # the same anatomy


@pytest.fixture(scope="module")
def tsc(tmp_path_factory) -> str:
    return make_scenario("tsc_centers", str(tmp_path_factory.mktemp("tsc")), 3, seed=1, test_per_group=1,
                         shape=(32, 32, 16))  # fmt: skip


def test_grouped_dataset_groups_fixed_test_cases_and_the_data_layer(tsc):
    meta = read_decathlon(tsc)
    cases = meta["training"]
    groups = [f"center{i}" for i in range(1, 6)]
    assert len(cases) == 15 and sorted({c["group"] for c in cases}) == groups
    assert len({c["case"] for c in cases}) == 15  # unique ids across the dataset
    for g in groups:
        mine = [c for c in cases if c["group"] == g]
        assert len(mine) == 3 and sum(c["split"] == "test" for c in mine) == 1
        assert all(os.path.basename(c["image"]).startswith(g) for c in mine)
    dl = make_datalist(tsc, groups=["center5"], n_val=0, num_classes=2)
    assert {c["group"] for c in dl["training"] + dl["test"]} == {"center5"}
    assert len(dl["test"]) == 1 and dl["test"][0]["split"] == "test" and len(dl["training"]) == 2
    dl4 = make_datalist(tsc, groups=groups[:4], n_val=0, num_classes=2)
    assert len(dl4["test"]) == 4 and len(dl4["training"]) == 8
    assert all(c["split"] == "test" for c in dl4["test"]) and "center5" not in {c["group"] for c in dl4["training"]}


def test_grouped_dataset_from_presets_and_cp_fetus(tmp_path):
    d = make_grouped_dataset(str(tmp_path / "g"), {"center1": ("lesions_mr", 2), "center5": ("lesions_mr_lowq", 3)},
                             seed=0, test_per_group=1, shape=(24, 24, 12))  # fmt: skip
    entries = _meta(d)["training"]
    assert [(e["group"], e["split"]) for e in entries] == [
        ("center1", "test"), ("center1", "train"), ("center5", "test"), ("center5", "train"), ("center5", "train")]
    # a group's cases do not depend on the other groups: center1 alone gives the same arrays
    alone = make_grouped_dataset(str(tmp_path / "a"), {"center1": ("lesions_mr", 2)}, seed=0, shape=(24, 24, 12))
    for name in ("center1_000", "center1_001"):
        for sub in ("imagesTr", "labelsTr"):
            f = os.path.join(sub, name + ".nii.gz")
            assert np.array_equal(_read(os.path.join(d, f)), _read(os.path.join(alone, f)))
    assert "split" not in _meta(alone)["training"][0]  # no test_per_group
    cp = make_scenario("cp_fetus", str(tmp_path / "cp"), 2, seed=0, shape=(24, 24, 16))
    meta = read_decathlon(cp)
    assert sorted({c["group"] for c in meta["training"]}) == ["older", "younger"]
    spec = _meta(cp)["synthetic"]["groups"]
    assert spec["younger"]["age"] < spec["older"]["age"]
    with pytest.raises(ValueError, match="agree"):  # one dataset, one modality
        make_grouped_dataset(str(tmp_path / "bad"), {"a": ("lesions_mr", 1), "b": ("liver_ct", 1)})
    with pytest.raises(ValueError, match="test_per_group"):
        make_grouped_dataset(str(tmp_path / "bad2"), {"a": ("lesions_mr", 2)}, test_per_group=2)


def test_same_seed_same_arrays_other_seed_other_arrays(tmp_path):
    for preset in ("kits_ct", "brats_mr", "hippocampus_mr", "prostate_mr", "lits_ct"):
        a, la = _case(preset, 9)
        b, lb = _case(preset, 9)
        c, lc = _case(preset, 10)
        assert np.array_equal(a, b) and np.array_equal(la, lb), preset
        assert not np.array_equal(a, c) and not np.array_equal(la, lc), preset
    d1 = make_scenario("kits_ct", str(tmp_path / "k1"), 1, seed=3, shape=(32, 32, 16))
    d2 = make_scenario("kits_ct", str(tmp_path / "k2"), 1, seed=3, shape=(32, 32, 16))
    for sub in ("imagesTr", "labelsTr"):
        f = os.path.join(sub, "case_000.nii.gz")
        assert np.array_equal(_read(os.path.join(d1, f)), _read(os.path.join(d2, f)))


# -- the first release's algorithm (common/synthetic.py before the new datasets), as the reference of the
# promise that existing presets keep producing the same arrays for the same seed --
def _first_release(spec: PhantomSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    organs = {"liver": ((-0.25, 0.1, 0.05), (0.55, 0.6, 0.7)), "spleen": ((0.45, 0.25, 0.1), (0.26, 0.3, 0.4)),
              "pancreas": ((0.1, -0.15, 0.0), (0.45, 0.15, 0.22)), "cortex": ((0.0, 0.0, 0.0), (0.7, 0.75, 0.7)),
              "lesions": ((0.0, 0.0, 0.0), (0.6, 0.6, 0.6))}  # fmt: skip

    def smooth(shape, sigma):
        f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
        return (f - f.mean()) / (f.std() + 1e-8)

    shape = np.asarray(spec.shape)
    spacing = np.asarray(spec.spacing, dtype=np.float32)
    extent = shape * spacing
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(shape, spacing, extent)], indexing="ij")
    body_r = extent / 2 * np.array([0.88, 0.78, 0.95]) * rng.uniform(0.92, 1.0, 3)
    centre_jitter = rng.uniform(-0.04, 0.04, 3) * extent
    rel = [(g - c) / r for g, c, r in zip(grids, centre_jitter, body_r)]
    body = (rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) <= 1.0
    o_centre, o_radii = organs[spec.organ]
    size = 0.7 + 0.3 * float(np.clip(spec.age, 0.0, 1.5))
    radii = np.asarray(o_radii) * size * rng.uniform(0.85, 1.15, 3)
    centre = np.asarray(o_centre) + rng.uniform(-0.05, 0.05, 3)
    warp = smooth(spec.shape, max(2.0, min(spec.shape) / 8))
    d = np.sqrt(sum(((r - c) / rr) ** 2 for r, c, rr in zip(rel, centre, radii)))
    if spec.organ == "cortex":
        folding = 0.08 + 0.12 * float(np.clip(spec.age, 0.0, 1.5))
        fold = smooth(spec.shape, max(1.5, min(spec.shape) / 14))
        thickness = 0.16 - 0.04 * float(np.clip(spec.age, 0.0, 1.0))
        organ = (np.abs(d - (1.0 + folding * fold) + thickness / 2) <= thickness / 2) & body
    else:
        organ = ((d + 0.12 * warp) <= 1.0) & body
    lesion = np.zeros(spec.shape, dtype=bool)
    n_lesions = spec.lesions if spec.organ != "lesions" else max(spec.lesions, 3)
    inside = np.argwhere(body & (organ if spec.organ != "lesions" else body))
    for _ in range(n_lesions if len(inside) else 0):
        c = inside[rng.integers(len(inside))] * spacing
        r_mm = rng.uniform(1.5, 3.5) * float(spacing.min())
        g = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
        lesion |= ((g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - c[2]) ** 2) <= r_mm**2
    lesion &= body
    texture = smooth(spec.shape, 1.0)
    if spec.modality == "CT":
        img = np.full(spec.shape, -1000.0, dtype=np.float32)
        img[body] = 40.0 + 12.0 * texture[body]
        img[organ] = spec.organ_hu + 10.0 * texture[organ]
        img[lesion] = spec.organ_hu - 70.0 + 8.0 * texture[lesion]
        noise_sd = 20.0 * spec.noise
    else:
        img = np.zeros(spec.shape, dtype=np.float32)
        img[body] = 1.0 + 0.08 * texture[body]
        img[organ] = 1.7 + 0.1 * texture[organ]
        img[lesion] = 2.6 + 0.1 * texture[lesion]
        img *= np.exp(0.25 * smooth(spec.shape, max(4.0, min(spec.shape) / 4))) * rng.uniform(200.0, 900.0)
        noise_sd = 0.05 * float(np.median(img[body])) * spec.noise
    if spec.downsample > 1.0:
        low = ndimage.zoom(img, 1.0 / spec.downsample, order=1)
        img = ndimage.zoom(low, shape / np.asarray(low.shape), order=1)[: shape[0], : shape[1], : shape[2]]
    if spec.blur > 0:
        img = ndimage.gaussian_filter(img, spec.blur)
    if spec.modality == "CT":
        img = img + rng.normal(0.0, noise_sd, spec.shape).astype(np.float32)
    else:
        re = img + rng.normal(0.0, noise_sd, spec.shape)
        img = np.sqrt(re**2 + rng.normal(0.0, noise_sd, spec.shape) ** 2).astype(np.float32)
    return img.astype(np.float32), (lesion if spec.organ == "lesions" else organ).astype(np.uint8)


FIRST_RELEASE = ["liver_mr", "liver_ct", "spleen_ct", "pancreas_ct", "cp_newborn", "cp_younger_fetus", "lesions_mr",
                 "lesions_mr_lowq"]  # fmt: skip


def test_first_release_presets_keep_their_arrays_and_dataset_json(tmp_path):
    for preset in FIRST_RELEASE:
        for overrides in ({}, {"shape": (24, 24, 12), "spacing": (2.0, 2.0, 4.0), "lesions": 2}):
            spec = PhantomSpec(**{**SCENARIO_PRESETS[preset], **overrides})
            new, ref = np.random.default_rng(4), np.random.default_rng(4)
            for _ in range(2):  # the second case checks that the random stream is consumed the same way
                a, la = make_phantom(spec, new)
                b, lb = _first_release(spec, ref)
                assert np.array_equal(a, b) and np.array_equal(la, lb), (preset, overrides)
    d = make_dataset(str(tmp_path / "old"), 1, PhantomSpec(shape=(16, 16, 8)), seed=0)
    meta = _meta(d)
    assert sorted(meta["synthetic"]) == sorted(["seed", "modality", "organ", "shape", "spacing", "age", "lesions",
                                                "blur", "downsample", "noise", "organ_hu", "extra"])  # fmt: skip
    assert meta["modality"] == {"0": "CT"} and meta["labels"] == {"0": "background", "1": "liver"}


def test_speed_of_a_64x64x32_case():
    for preset in ("liver_ct", "kits_ct", "lesions_mr", "cp_newborn"):
        spec = preset_spec(preset, shape=(64, 64, 32))
        rng = np.random.default_rng(0)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            make_phantom(spec, rng)
            times.append(time.perf_counter() - t)
        assert min(times) < 1.0, (preset, times)  # ~0.1 s unloaded; a 10x margin for shared CPUs


def test_cli_lists_and_writes_every_kind(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "make_synthetic.py")
    spec = importlib.util.spec_from_file_location("make_synthetic", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    listed = {line.split()[0]: line for line in lines}
    assert set(listed) == set(SCENARIO_PRESETS) | set(GROUPED_PRESETS)
    assert all(len(line.split()) > 2 for line in lines)  # name + a description
    out = tmp_path / "tsc"
    assert cli.main(["--preset", "tsc_centers", "--out", str(out), "--n", "2", "--test_per_group", "1",
                     "--shape", "24", "24", "12", "--seed", "3"]) == 0  # fmt: skip
    entries = read_decathlon(str(out))["training"]
    assert len(entries) == 10 and sum(e["split"] == "test" for e in entries) == 5
    out2 = tmp_path / "custom"
    assert cli.main(["--group", "c1=lesions_mr:2", "--group", "c5=lesions_mr_lowq:1", "--out", str(out2),
                     "--shape", "24", "24", "12"]) == 0  # fmt: skip
    assert [e["group"] for e in read_decathlon(str(out2))["training"]] == ["c1", "c1", "c5"]
    assert cli.main(["--preset", "prostate_mr", "--out", str(tmp_path / "p"), "--n", "1", "--channels", "1",
                     "--no-subregions"]) == 0  # fmt: skip
    meta = read_sources(str(tmp_path / "p"))[0]["meta"]
    assert meta["modality"] == {"0": "T2"} and meta["labels"] == {"0": "background", "1": "prostate"}
    with pytest.raises(SystemExit):
        cli.main(["--preset", "liver_ct", "--out", str(tmp_path / "x"), "--test_per_group", "1"])
