# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Release packaging (tools/package_bundles.py) and `python -m monai.bundle download` from a local HTTP server.

MONAI's ``download --source github --repo owner/repo/tag`` builds the URL
``https://github.com/<owner>/<repo>/releases/download/<tag>/<name>_v<version>.zip`` with the host fixed
(``monai.bundle.scripts._get_git_release_url``), so it cannot be pointed at 127.0.0.1 from the command line.
The tests therefore serve the zips from a local ``http.server`` under exactly that path layout and
(1) run the real CLI with ``--url`` at the release-layout path, (2) call ``monai.bundle.download(source="github")``
in-process with only the host of ``_get_git_release_url`` redirected to the local server, so the name/version
-> file name rule and the zip layout (one top-level ``<name>/`` folder) are those of the github source.
The downloaded bundle then runs its own ``configs/inference.json`` and a one-epoch training, as a user meets it:
in a Python that cannot import this repository (a virtual environment that sees the installed packages, torch,
monai, nibabel, ignite, ..., but not the editable install of ``common``), from another working directory, so
the only ``common`` it can use is the copy inside the downloaded bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch

from _ecosystem import BUNDLE_NAMES, FIRST_BUNDLE, ROOT, SMALL, bundle_cmd, copy_bundle, run, serve_directory, small_network, tiny_dataset

sys.path.insert(0, os.path.join(ROOT, "tools"))
import package_bundles  # noqa: E402

OWNER, REPO, TAG = "tlseg-test", "bundles", "v0.0-test"
RELEASE_PATH = f"{OWNER}/{REPO}/releases/download/{TAG}"


def _version(bundle_dir: str) -> str:
    with open(os.path.join(bundle_dir, "configs", "metadata.json"), encoding="utf-8") as f:
        return json.load(f)["version"]


def _make_tree(tree) -> str:
    """A bundles folder holding a copy of every bundle, each with a small checkpoint in models/, and in the first
    the clutter a training run leaves (which must not be packed)."""
    for name in BUNDLE_NAMES:
        d = copy_bundle(str(tree / name), name)
        torch.save(small_network(all_foreground=True).state_dict(), os.path.join(d, "models", "model.pt"))
    bdir = str(tree / FIRST_BUNDLE)
    junk_files = ("runs/train/checkpoint_final.pt", "__pycache__/x.cpython-311.pyc", "configs/.train.json.swp", "data/Liver-CT/dataset.json")
    for junk in junk_files:
        path = os.path.join(bdir, junk)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("junk")
    return str(tree)


@pytest.fixture
def bundles_tree(tmp_path):
    """See :func:`_make_tree`."""
    return _make_tree(tmp_path / "bundles")


def test_help():
    proc = run([sys.executable, os.path.join(ROOT, "tools", "package_bundles.py"), "--help"], cwd=ROOT, timeout=60)
    assert "--base_url" in proc.stdout and "--repo" in proc.stdout and "model_info.json" in proc.stdout


def test_zips_are_reproducible_and_indexed(bundles_tree, tmp_path):
    base = f"https://github.com/{RELEASE_PATH}/"
    out1, out2 = tmp_path / "dist1", tmp_path / "dist2"
    assert package_bundles.main(["--bundles_dir", bundles_tree, "--output_dir", str(out1), "--base_url", base]) == 0
    # --repo builds the same URL as monai.bundle download --source github
    assert package_bundles.main(["--bundles_dir", bundles_tree, "--output_dir", str(out2), "--repo", f"{OWNER}/{REPO}/{TAG}"]) == 0

    version = _version(os.path.join(bundles_tree, FIRST_BUNDLE))
    key = f"{FIRST_BUNDLE}_v{version}"
    zip1, zip2 = out1 / f"{key}.zip", out2 / f"{key}.zip"
    assert zip1.read_bytes() == zip2.read_bytes(), "two runs on the same tree gave different zips"
    assert (out1 / "model_info.json").read_bytes() == (out2 / "model_info.json").read_bytes()
    # a third run into the same folder rewrites the same bytes
    package_bundles.main(["--bundles_dir", bundles_tree, "--output_dir", str(out1), "--base_url", base])
    assert zip1.read_bytes() == zip2.read_bytes()

    info = json.loads((out1 / "model_info.json").read_text(encoding="utf-8"))
    assert info[key] == {"checksum": hashlib.sha256(zip1.read_bytes()).hexdigest(), "source": f"{base}{key}.zip"}
    assert sorted(info) == sorted(f"{n}_v{_version(os.path.join(bundles_tree, n))}" for n in BUNDLE_NAMES)

    with zipfile.ZipFile(zip1) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert all(n.startswith(f"{FIRST_BUNDLE}/") for n in names), "not one top-level <name>/ folder"
        rel = {n[len(FIRST_BUNDLE) + 1 :] for n in names}
        assert {"configs/metadata.json", "configs/train.json", "configs/inference.json", "models/model.pt"} <= rel
        leaked = [n for n in rel if n.startswith(("runs", "data", "__pycache__")) or "/." in "/" + n or n.endswith(".pyc")]
        assert not leaked, leaked
        assert "scenario.json" not in rel, "the render source is not part of a released bundle"
        # the shared package travels with the bundle: every module of this checkout's common/, and only .py files
        code = sorted(n[len("common/"):] for n in rel if n.startswith("common/") and n != "common/")
        assert code == sorted(f for f in os.listdir(os.path.join(ROOT, "common")) if f.endswith(".py"))
        meta = json.loads(zf.read(f"{FIRST_BUNDLE}/configs/metadata.json"))
        init = zf.read(f"{FIRST_BUNDLE}/common/__init__.py").decode()
        assert f'__version__ = "{meta["required_packages_version"]["tlseg-common"]}"' in init
        for i in infos:
            assert i.date_time == (1980, 1, 1, 0, 0, 0)
            mode = i.external_attr >> 16
            assert mode in (0o100644, 0o040755), (i.filename, oct(mode))
            assert (mode == 0o040755) == i.filename.endswith("/")


def test_version_mismatch_between_metadata_and_common_is_refused(bundles_tree, tmp_path, capsys):
    meta_path = os.path.join(bundles_tree, FIRST_BUNDLE, "configs", "metadata.json")
    meta = json.loads(open(meta_path, encoding="utf-8").read())
    meta["required_packages_version"]["tlseg-common"] = "0.0.0-other"
    open(meta_path, "w", encoding="utf-8").write(json.dumps(meta))
    assert package_bundles.main(["--bundles_dir", bundles_tree, "--output_dir", str(tmp_path), "--base_url", "http://x/"]) == 2
    err = capsys.readouterr().err
    assert "0.0.0-other" in err and "render the bundles again" in err


def test_unknown_bundle_and_missing_url_are_errors(bundles_tree, tmp_path, capsys):
    args = ["--bundles_dir", bundles_tree, "--output_dir", str(tmp_path)]
    assert package_bundles.main([*args, "--base_url", "http://x/", "--names", "nope"]) == 2
    assert "No bundle ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        package_bundles.main(args)  # --base_url or --repo required
    assert package_bundles.main([*args, "--repo", "only/two"]) == 2


@pytest.mark.slow
def test_download_from_release_layout_then_run_inference(bundles_tree, tmp_path, monkeypatch):
    serve_root = tmp_path / "www"
    release_dir = serve_root / RELEASE_PATH
    version = _version(os.path.join(bundles_tree, FIRST_BUNDLE))
    key = f"{FIRST_BUNDLE}_v{version}"
    images = tiny_dataset(str(tmp_path / "ds"), 1)

    with serve_directory(str(serve_root)) as (base_url, requested):
        release_url = f"{base_url}/{RELEASE_PATH}/"
        package_bundles.main(["--bundles_dir", bundles_tree, "--output_dir", str(release_dir), "--base_url", release_url])
        info = json.loads((release_dir / "model_info.json").read_text(encoding="utf-8"))[key]
        assert info["source"] == f"{release_url}{key}.zip"

        # (1) the real CLI, --url at the release-layout path
        dl1 = tmp_path / "dl_url"
        cmd = bundle_cmd("download", "--name", FIRST_BUNDLE, "--url", info["source"], "--bundle_dir", str(dl1))
        run(cmd, cwd=str(tmp_path), timeout=300)
        assert hashlib.sha256((dl1 / f"{FIRST_BUNDLE}.zip").read_bytes()).hexdigest() == info["checksum"]

        # (2) the github source: only the host of the URL it builds is redirected to the local server
        import monai.bundle.scripts as scripts

        github_url = scripts._get_git_release_url
        built = []

        def local_release_url(repo_owner, repo_name, tag_name, filename):
            built.append(github_url(repo_owner, repo_name, tag_name, filename))
            return f"{base_url}/{repo_owner}/{repo_name}/releases/download/{tag_name}/{filename}"

        monkeypatch.setattr(scripts, "_get_git_release_url", local_release_url)
        dl2 = tmp_path / "dl_github"
        scripts.download(
            name=FIRST_BUNDLE, version=version, source="github", repo=f"{OWNER}/{REPO}/{TAG}", bundle_dir=str(dl2), progress=False
        )
        assert built == [f"https://github.com/{RELEASE_PATH}/{key}.zip"]
        assert hashlib.sha256((dl2 / f"{key}.zip").read_bytes()).hexdigest() == info["checksum"]
    assert requested.count(f"/{RELEASE_PATH}/{key}.zip") == 2

    for dl in (dl1, dl2):
        bdir = dl / FIRST_BUNDLE
        assert (bdir / "configs" / "inference.json").is_file() and (bdir / "models" / "model.pt").is_file()
        assert not (bdir / "runs").exists() and not (bdir / "__pycache__").exists()

    # run the downloaded bundle's inference (its own configs/inference.json and models/model.pt) in a Python that
    # cannot import this repository, from another working directory
    python = isolated_python(tmp_path / "venv")
    bdir = dl1 / FIRST_BUNDLE
    out = tmp_path / "pred"
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run(
        [python, "-m", "monai.bundle", "run", "inference", "--config_file", str(bdir / "configs" / "inference.json"),
         "--bundle_root", str(bdir), "--dataset_dir", os.path.join(images, "imagesTr"), "--output_dir", str(out), *SMALL],
        cwd=str(work), timeout=600,
    )  # fmt: skip
    assert f"Using tlseg-common {_code_version(bdir)} from {bdir / 'common'}" in proc.stdout + proc.stderr
    src = nib.load(os.path.join(images, "imagesTr", "case_000.nii.gz"))
    pred = nib.load(str(out / "case_000_seg.nii.gz"))
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
    seg = np.asarray(pred.dataobj)
    # the packaged checkpoint makes every voxel foreground: proof that it (not random weights) was used
    assert (seg == 1).mean() > 0.99, np.unique(seg, return_counts=True)


def _code_version(bundle_dir) -> str:
    with open(os.path.join(bundle_dir, "configs", "metadata.json"), encoding="utf-8") as f:
        return json.load(f)["required_packages_version"]["tlseg-common"]


def isolated_python(venv_dir) -> str:
    """A virtual environment whose Python sees this Python's installed packages but not the editable install of
    this repository: its site-packages holds a ``.pth`` line naming the main site-packages folder, and a folder
    added that way has its own ``.pth`` files (the editable finder among them) left unprocessed. Checked: that
    Python cannot ``import common``, and can import torch, monai, nibabel and ignite."""
    import site
    import subprocess

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv_dir)], check=True)
    python = os.path.join(str(venv_dir), "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, encoding="utf-8", errors="replace", check=True).stdout.strip()  # fmt: skip
    with open(os.path.join(purelib, "_main_site_packages.pth"), "w", encoding="utf-8") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    probe = subprocess.run([python, "-I", "-c", "import common"], capture_output=True, encoding="utf-8", errors="replace", cwd=str(venv_dir))
    assert probe.returncode != 0 and "No module named 'common'" in probe.stderr, "the isolated Python imports common"
    run([python, "-I", "-c", "import torch, monai, nibabel, ignite"], cwd=str(venv_dir), timeout=120)
    return python


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """Every bundle packaged once, served on 127.0.0.1 and fetched with ``monai.bundle download --url`` by a Python
    that cannot import this repository; returns ``(that python, the download folder, the bundles tree)``."""
    root = tmp_path_factory.mktemp("downloaded")
    tree = _make_tree(root / "bundles")
    python = isolated_python(root / "venv")
    with serve_directory(str(root / "www")) as (base_url, _):
        package_bundles.main(["--bundles_dir", tree, "--output_dir", str(root / "www"), "--base_url", f"{base_url}/"])
        for name in BUNDLE_NAMES:
            version = _version(os.path.join(tree, name))
            run([python, "-m", "monai.bundle", "download", "--name", name, "--url", f"{base_url}/{name}_v{version}.zip",
                 "--bundle_dir", str(root / "dl")], cwd=str(root), timeout=300)  # fmt: skip
    return python, root / "dl", tree


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLE_NAMES)
def test_downloaded_bundle_trains_one_epoch_without_this_repository(name, downloaded, tmp_path):
    """Every bundle, downloaded (see ``downloaded``): ``run training`` for one epoch from the downloaded folder on
    the bundle's own synthetic stand-ins, in a Python that cannot import this repository, from another folder."""
    from common.standins import read_recipe, stand_in_overrides

    python, dl, tree = downloaded
    data = stand_in_overrides(read_recipe(os.path.join(tree, name)), "train.json", str(tmp_path / "data"),
                              shape=(24, 24, 16), spacing=(2.0, 2.0, 3.0))  # fmt: skip
    data_args = [x for k, v in data.items() for x in (f"--{k}", v if isinstance(v, str) else repr(v))]
    bdir = dl / name
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run(
        [python, "-m", "monai.bundle", "run", "training", "--config_file", str(bdir / "configs" / "train.json"),
         "--bundle_root", str(work), *data_args, "--max_epochs", "1", "--iterations_per_epoch", "2", "--pixdim", "[2.0,2.0,2.0]",
         *SMALL],
        cwd=str(work), timeout=900,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert f"Using tlseg-common {_code_version(bdir)} from {bdir / 'common'}" in log
    (out,) = (work / "runs").iterdir()  # runs/train, or runs/train_<groups> where the scenario trains on groups
    info = json.loads((out / "run_info.json").read_text(encoding="utf-8"))
    assert info["common_path"] == str(bdir / "common")
    state = torch.load(out / "checkpoint_final.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 2 and (out / "model.pt").is_file()
