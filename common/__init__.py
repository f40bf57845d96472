# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Shared code of the transfer-learning segmentation bundles (a small MONAI extension).

The bundles' configs say ``"$import common"`` and then use ``common.<module>.<name>``; submodules are
imported when first used (PEP 562), so a config that only needs the network does not import matplotlib
or scipy. One concept per module:

==================  ===================================================================================
``networks``        the paper's FCN (Fig. 1) and V-Net, with the section protocol (encoder, decoder,
                    head, probe layers)
``losses``          the paper's soft Dice kept inside the logit range float32 represents
``transfer``        the transfer modes: which parameters train, at which learning rate, from which source
``transforms``      transforms MONAI lacks (modality normalisation, a MONAI Label-safe ``Spacingd``, noise
                    on the device)
``data``            datasets in the Decathlon layout: checks, seeded 70/30 splits, datalists
``datasets``        MONAI ``CacheDataset``, optionally cached on the GPU
``execution``       mixed precision, memory format, compilation, batch preparation
``handlers``        learning-rate decay of the paper, weight snapshots, log level
``health``          a run that diverged or collapsed stops and records why
``checkpoints``     weight reading and checking, resumable training checkpoints
``io``              atomic file output, CSV / JSON / text writers
``runs``            run folders: the run record, snapshot history, convergence epoch
``inference``       sliding-window inference helpers, input listing, atomic NIfTI writer
``evaluation``      per-case metrics of a checkpoint on its test split
``metrics``         DSC, HD95, ASSD (mm), lesion-count F1
``rsim``            RSIM (PWCCA), SVCCA, linear CKA
``capture``         activation capture for the analyses
``analysis``        the paper's representation analyses
``figures``         their PNG figures
``synthetic``       synthetic phantoms standing in for every dataset
``standins``        a bundle's synthetic stand-ins and the overrides that point it at them
``prepare``         converters of the public datasets to the Decathlon layout
``inhouse``         the checked layout of in-house data
``study``           the study runner: every run of a scenario, resumable, locally or on SLURM
``report``          a study's tables, curves, analyses and findings
``release``         which ``common`` a bundle runs with
``errors``          a failed bundle run ends with its reason
==================  ===================================================================================
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import install_excepthook, running_monai_bundle_cli

__version__ = "0.1.0"

_SUBMODULES = (
    "networks",
    "losses",
    "transfer",
    "transforms",
    "data",
    "datasets",
    "execution",
    "handlers",
    "health",
    "checkpoints",
    "io",
    "runs",
    "inference",
    "evaluation",
    "metrics",
    "rsim",
    "capture",
    "analysis",
    "figures",
    "synthetic",
    "standins",
    "prepare",
    "inhouse",
    "study",
    "report",
    "release",
    "errors",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))


if running_monai_bundle_cli():
    install_excepthook()
