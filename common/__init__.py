"""Shared code of the transfer-learning segmentation bundles.

The bundles' configs say ``"$import common"`` and then use ``common.<module>.<name>``, so every
submodule is imported here. Each module holds one concept of the paper (Karimi et al.,
"Critical assessment of transfer learning for medical image segmentation with FCNs").
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "networks",
    "transforms",
    "data",
    "synthetic",
    "transfer",
    "handlers",
    "checkpoints",
    "metrics",
    "rsim",
    "inference",
    "evaluation",
    "capture",
    "analysis",
    "fast",
)

for _name in _SUBMODULES:
    try:
        globals()[_name] = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _err:  # a submodule that is not written yet must not hide the others
        if _err.name != f"{__name__}.{_name}":
            raise

del _name
