# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Suite-wide settings.

Child processes (bundle commands, tools, MONAI Label) print progress bars and other non-ASCII text; on a machine
whose locale is ASCII (``LANG`` unset, as on many CI runners) they would fail to encode it or the parent would fail
to decode it. Every child inherits UTF-8 mode from here, and the tests decode child output as UTF-8 explicitly.
"""

import os

os.environ.setdefault("PYTHONUTF8", "1")
os.environ.setdefault("PYTHONIOENCODING", "utf-8")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks and tensors: one torch thread (more only spin-wait on a shared 2-core machine). Modules ask
    for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
