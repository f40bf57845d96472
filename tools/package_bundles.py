#!/usr/bin/env python3
# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Package the bundles as release zips and write the ``model_info.json`` index.

For every bundle folder ``bundles/<name>/`` this writes ``<output_dir>/<name>_v<version>.zip`` (the
version is ``configs/metadata.json``'s ``version``) holding one top-level folder ``<name>/``, the
layout ``python -m monai.bundle download`` expects, and ``<output_dir>/model_info.json``, the
model-zoo style index.

A downloaded bundle runs on its own: each zip carries the shared package ``common/`` (the Python code its
configs call) beside ``configs/``, and ``configs/metadata.json`` records its version
(``required_packages_version["tlseg-common"]``, which must equal ``common.__version__``: packaging stops
otherwise). MONAI's ``ConfigWorkflow.run`` puts the bundle folder on ``sys.path`` before the installed
packages, so ``python -m monai.bundle run ... --config_file <bundle>/configs/train.json`` imports that copy
from any working directory (``common.release.check_release`` checks the version at the start of every run).
The index::

    {"<name>_v<version>": {"checksum": "<sha256 of the zip>", "source": "<base_url><name>_v<version>.zip"}}

The zips are reproducible: running the tool twice on the same tree gives byte-identical files (sorted
entries, fixed timestamps 1980-01-01, fixed permissions 0644 / 0755, fixed compression level).
Left out: training outputs and caches (``runs/``, ``data/``, ``predictions/``, ``eval/``, ``mlruns/``,
``__pycache__/``, ``*.pyc``, hidden files) and the bundle's render source ``scenario.json`` (see
``tools/render_bundles.py``); ``models/model.pt`` (and ``models/model.ts``) are packed when they exist.

Attach the zips and ``model_info.json`` to a GitHub release ``<tag>`` and download a bundle with::

    python -m monai.bundle download --name <name> --version <version> --source github --repo <owner>/<repo>/<tag>
    python -m monai.bundle download --name <name> --url <base_url><name>_v<version>.zip --bundle_dir <dir>

Examples::

    python tools/package_bundles.py --output_dir dist --repo myorg/tlseg/v0.1.0
    python tools/package_bundles.py --output_dir dist --base_url https://example.org/bundles/ --names liver_ct_from_liver_mri
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import sys
import zipfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUNDLES_DIR = os.path.join(REPO_ROOT, "bundles")
#: The shared package packed into every bundle zip, as ``<name>/common/``.
COMMON_DIR = os.path.join(REPO_ROOT, "common")
CODE_PACKAGE = "tlseg-common"

#: Folder names never packed (training outputs, data, caches), at any depth.
EXCLUDED_DIRS = frozenset(
    {"runs", "data", "predictions", "eval", "mlruns", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".git"}
)
#: File name patterns never packed.
EXCLUDED_FILES = ("*.pyc", "*.pyo", ".*", "*~", "*.swp", "*.tmp", "mlruns.db", "scenario.json")

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
FILE_MODE = 0o100644  # regular file, rw-r--r--
DIR_MODE = 0o040755  # directory, rwxr-xr-x
COMPRESS_LEVEL = 9


class PackagingError(Exception):
    """A bundle folder that cannot be packaged (the message names it and says what is missing)."""


def bundle_version(bundle_dir: str) -> str:
    """The ``version`` of ``<bundle_dir>/configs/metadata.json``."""
    meta_path = os.path.join(bundle_dir, "configs", "metadata.json")
    if not os.path.isfile(meta_path):
        raise PackagingError(f"{bundle_dir} is not a bundle: {meta_path} is missing.")
    with open(meta_path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as err:
            raise PackagingError(f"{meta_path} is not valid JSON: {err}") from err
    version = meta.get("version")
    if not isinstance(version, str) or not version:
        raise PackagingError(f"{meta_path} has no 'version' string.")
    if version not in meta.get("changelog", {}):
        print(f"warning: {meta_path}: version {version} has no changelog entry", file=sys.stderr)
    return version


def find_bundles(bundles_dir: str) -> list[str]:
    """Names of the folders of ``bundles_dir`` holding a ``configs/metadata.json``, sorted."""
    if not os.path.isdir(bundles_dir):
        raise PackagingError(f"Bundles folder {bundles_dir} does not exist.")
    return sorted(
        d for d in os.listdir(bundles_dir) if os.path.isfile(os.path.join(bundles_dir, d, "configs", "metadata.json"))
    )


def _excluded_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in EXCLUDED_FILES)


def bundle_files(bundle_dir: str) -> tuple[list[str], list[str]]:
    """``(directories, files)`` of a bundle to pack, as sorted '/'-separated paths relative to ``bundle_dir``.

    Symbolic links are followed for files (their content is packed) but not for folders.
    """
    dirs: list[str] = []
    files: list[str] = []
    for root, subdirs, names in os.walk(bundle_dir):
        subdirs[:] = sorted(
            d for d in subdirs if d not in EXCLUDED_DIRS and not d.startswith(".") and not os.path.islink(os.path.join(root, d))
        )
        rel_root = os.path.relpath(root, bundle_dir)
        rel_root = "" if rel_root == "." else rel_root.replace(os.sep, "/")
        if rel_root:
            dirs.append(rel_root)
        for n in names:
            if not _excluded_file(n) and os.path.isfile(os.path.join(root, n)):
                files.append(f"{rel_root}/{n}" if rel_root else n)
    return sorted(dirs), sorted(files)


def _zip_info(arcname: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE_TIME)
    info.create_system = 3  # Unix, so that external_attr holds the mode
    info.external_attr = (mode & 0xFFFF) << 16
    if mode & 0o040000:
        info.external_attr |= 0x10  # MS-DOS directory flag
        info.compress_type = zipfile.ZIP_STORED
    else:
        info.compress_type = zipfile.ZIP_DEFLATED
    return info


def common_version(common_dir: str = COMMON_DIR) -> str:
    """``__version__`` of the package in ``common_dir`` (read from its ``__init__.py``, not imported)."""
    import re

    path = os.path.join(common_dir, "__init__.py")
    with open(path, encoding="utf-8") as f:
        m = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if not m:
        raise PackagingError(f"{path} has no __version__.")
    return m.group(1)


def write_bundle_zip(bundle_dir: str, zip_path: str, name: str | None = None, common_dir: str | None = COMMON_DIR) -> list[str]:
    """Write ``zip_path`` with ``bundle_dir``'s files under the top-level folder ``name`` (default: the
    folder's name), and the package ``common_dir`` as ``<name>/common/`` (None: no code). Returns the archive
    names written (files only)."""
    name = name or os.path.basename(os.path.normpath(bundle_dir))
    dirs, files = bundle_files(bundle_dir)
    entries = [(f"{name}/", None)] + [(f"{name}/{d}/", None) for d in dirs] + [(f"{name}/{f}", os.path.join(bundle_dir, *f.split("/"))) for f in files]
    if common_dir:
        cdirs, cfiles = bundle_files(common_dir)
        if "common" in dirs or any(f.startswith("common/") for f in files):
            raise PackagingError(f"{bundle_dir} has its own common/ folder; the shared package is packed there.")
        entries += [(f"{name}/common/", None)] + [(f"{name}/common/{d}/", None) for d in cdirs]
        entries += [(f"{name}/common/{f}", os.path.join(common_dir, *f.split("/"))) for f in cfiles if f.endswith(".py")]
    entries.sort(key=lambda e: e[0])
    tmp = zip_path + ".part"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL) as zf:
        for arcname, rel in entries:
            if rel is None:
                zf.writestr(_zip_info(arcname, DIR_MODE), b"")
            else:
                with open(rel, "rb") as f:
                    data = f.read()
                zf.writestr(_zip_info(arcname, FILE_MODE), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL)
    os.replace(tmp, zip_path)
    return [a for a, rel in entries if rel is not None]


def sha256sum(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def release_base_url(repo: str) -> str:
    """``owner/repo/tag`` -> ``https://github.com/owner/repo/releases/download/tag/`` (the URL that
    ``monai.bundle download --source github --repo owner/repo/tag`` builds)."""
    parts = repo.strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise PackagingError(f"--repo must be 'owner/repo/tag', got {repo!r}.")
    owner, name, tag = parts
    return f"https://github.com/{owner}/{name}/releases/download/{tag}/"


def package_bundles(
    bundles_dir: str = DEFAULT_BUNDLES_DIR,
    output_dir: str = "dist",
    base_url: str = "",
    names: list[str] | None = None,
    merge_index: bool = True,
) -> dict[str, dict[str, str]]:
    """Package the bundles ``names`` (default: all) of ``bundles_dir`` into ``output_dir``.

    Returns the entries written to ``<output_dir>/model_info.json`` for these bundles. With ``merge_index``
    the entries of an existing ``model_info.json`` for other bundles or versions are kept.
    """
    if not base_url:
        raise PackagingError("A base URL is needed for model_info.json: pass --base_url or --repo owner/repo/tag.")
    if not base_url.endswith("/"):
        base_url += "/"
    available = find_bundles(bundles_dir)
    names = list(names) if names else available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise PackagingError(f"No bundle {unknown} in {bundles_dir}; available: {available}.")
    if not names:
        raise PackagingError(f"No bundle (a folder with configs/metadata.json) in {bundles_dir}.")
    os.makedirs(output_dir, exist_ok=True)
    index_path = os.path.join(output_dir, "model_info.json")
    index: dict[str, dict[str, str]] = {}
    if merge_index and os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    written: dict[str, dict[str, str]] = {}
    code_version = common_version()
    for name in names:
        bdir = os.path.join(bundles_dir, name)
        version = bundle_version(bdir)
        with open(os.path.join(bdir, "configs", "metadata.json"), encoding="utf-8") as f:
            wanted = json.load(f).get("required_packages_version", {}).get(CODE_PACKAGE)
        if wanted != code_version:
            raise PackagingError(
                f"{bdir}/configs/metadata.json names {CODE_PACKAGE} {wanted}, the common/ to pack is {code_version}: "
                "render the bundles again (python tools/render_bundles.py)."
            )
        key = f"{name}_v{version}"
        zip_path = os.path.join(output_dir, f"{key}.zip")
        members = write_bundle_zip(bdir, zip_path, name)
        entry = {"checksum": sha256sum(zip_path), "source": f"{base_url}{key}.zip"}
        written[key] = entry
        has_model = f"{name}/models/model.pt" in members
        print(f"{zip_path}: {len(members)} files, sha256 {entry['checksum']}" + ("" if has_model else " (no models/model.pt)"))
    index.update(written)
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(index.items())), f, indent=4, sort_keys=True)
        f.write("\n")
    print(f"{index_path}: {len(index)} entries")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Write <name>_v<version>.zip for each bundle (one top-level <name>/ folder, reproducible bytes) "
        "and a model_info.json index (sha256 and download URL of each zip), ready to attach to a release.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Download afterwards with: python -m monai.bundle download --name <name> --version <version> "
        "--source github --repo <owner>/<repo>/<tag>   (or --url <base_url><name>_v<version>.zip)",
    )
    p.add_argument("--bundles_dir", default=DEFAULT_BUNDLES_DIR, help="folder holding the bundles (default: %(default)s)")
    p.add_argument("--output_dir", default="dist", help="where the zips and model_info.json go (default: %(default)s)")
    url = p.add_mutually_exclusive_group(required=True)
    url.add_argument(
        "--base_url",
        help="URL prefix of the release assets, e.g. https://github.com/<owner>/<repo>/releases/download/<tag>/",
    )
    url.add_argument("--repo", help="owner/repo/tag of a GitHub release: builds the base URL as monai.bundle download does")
    p.add_argument("--names", nargs="+", help="bundles to package (default: every bundle in --bundles_dir)")
    p.add_argument(
        "--no_merge", action="store_true", help="rewrite model_info.json with these bundles only (default: keep other entries)"
    )
    args = p.parse_args(argv)
    try:
        base = args.base_url if args.base_url else release_base_url(args.repo)
        package_bundles(args.bundles_dir, args.output_dir, base, args.names, merge_index=not args.no_merge)
    except PackagingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
