#!/usr/bin/env bash
# Create the separate Python environment in which MONAI Label serves the bundles.
#
# MONAI Label 0.8.5 needs a torchvision that the CPU-only torch 2.13.0 build of the main environment
# lacks, pins numpy < 2 and breaks with pydicom 3, so it gets its own virtual environment OUTSIDE the
# repository (default ~/.cache/tlseg/monailabel-venv; override with TLSEG_MONAILABEL_VENV). The
# project's `common` package is installed into it (editable) so that the server can build the bundles'
# networks. Usage:
#
#     bash tools/setup_monailabel.sh            # create or complete the venv
#     TLSEG_MONAILABEL_PY=~/.cache/tlseg/monailabel-venv/bin/python pytest tests/test_monailabel.py
#
# The torch 2.14.1 wheel is a CUDA build: with its nvidia-* dependencies the venv takes about 8 GB; the
# install took 3-7 minutes here (all wheels local or from PyPI, sam2 built from its sdist).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TLSEG_MONAILABEL_VENV:-$HOME/.cache/tlseg/monailabel-venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install monailabel==0.8.5 monai==1.6.1 torch==2.14.1 torchvision==0.29.1 "pydicom<3" "pynetdicom<3"
# --no-deps: MONAI Label's own requirements already bring every runtime dependency of `common`
# (torch, monai, nibabel, pytorch-ignite, numpy, scipy, itk, matplotlib, tensorboard, pyyaml, tqdm, fire);
# resolving setup.cfg's jsonschema>=4 would break pydicom-seg's jsonschema<4 pin.
"$VENV/bin/python" -m pip install --no-deps -e "$REPO"
"$VENV/bin/python" -c "import monailabel, monai, torch, torchvision, common; print('monailabel', monailabel.__version__, 'monai', monai.__version__, 'torch', torch.__version__)"
echo "MONAI Label environment ready: $VENV/bin/python (export TLSEG_MONAILABEL_PY=$VENV/bin/python)"
