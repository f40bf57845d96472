# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Suite-wide settings.

Child processes (bundle commands, tools, MONAI Label) print progress bars and other non-ASCII text; on a machine
whose locale is ASCII (``LANG`` unset, as on many CI runners) they would fail to encode it or the parent would fail
to decode it. Every child inherits UTF-8 mode from here, and the tests decode child output as UTF-8 explicitly.
"""

import os

os.environ.setdefault("PYTHONUTF8", "1")
os.environ.setdefault("PYTHONIOENCODING", "utf-8")
