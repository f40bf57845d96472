# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Which ``common`` a bundle runs with.

A bundle's configs call this package (``"$import common"``, ``"_target_": "common.networks.KarimiFCN"``). A
released bundle carries the version it was made with in ``configs/metadata.json``
(``required_packages_version["tlseg-common"]``), and its release zip carries that very package beside
``configs/`` (``tools/package_bundles.py``). MONAI's ``ConfigWorkflow.run`` puts the bundle folder on
``sys.path`` (before the installed packages) before the first config item is evaluated (the configs have
no ``initialize`` step for that reason), so the copy inside the bundle is the one imported, from any
working directory. :func:`check_release`, the first step of every workflow's ``run``, makes that choice
deliberate: a run whose imported ``common`` has another version than the bundle's stops with a message
that says which one was imported and from where.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["PACKAGE_NAME", "check_release"]

logger = logging.getLogger(__name__)

#: The distribution name of this package (``setup.cfg``) as ``metadata.json`` names it.
PACKAGE_NAME = "tlseg-common"


def check_release(meta: Mapping[str, Any] | None) -> str:
    """Check that the imported ``common`` is the version the bundle names in its ``metadata.json`` (``meta``,
    the config's ``@_meta_``); returns the path of the imported package.

    Raises:
        RuntimeError: the versions differ (the message names both and the imported package's folder).
    """
    import common

    path = os.path.dirname(os.path.abspath(common.__file__))
    expected = ((meta or {}).get("required_packages_version") or {}).get(PACKAGE_NAME)
    if expected and str(expected) != common.__version__:
        raise RuntimeError(
            f"This bundle was released with {PACKAGE_NAME} {expected}, but Python imported {PACKAGE_NAME} "
            f"{common.__version__} from {path}. Run the bundle from its own folder's copy (a downloaded bundle "
            f"carries common/ beside configs/; do not start it from a folder that holds another common/), or "
            f"install {PACKAGE_NAME}=={expected}."
        )
    logger.info("Using %s %s from %s.", PACKAGE_NAME, common.__version__, path)
    return path
