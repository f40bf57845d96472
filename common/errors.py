# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""A failed bundle run ends with its reason.

MONAI's config parser wraps every error of a config expression or component in ``RuntimeError: Failed to
evaluate ConfigExpression: ...`` (chained, often several times), so the last lines of a failed
``python -m monai.bundle run`` show MONAI's wrapper and the reason (e.g. ``DataError: <file>: label values
[3] are outside the declared classes 0..1``) sits in the middle of ~80 lines of traceback.
:func:`install_excepthook` keeps Python's full traceback and then prints the innermost error of the chain
once more, last, under a ``The run stopped:`` line. ``common`` installs it when the process is a
``python -m monai.bundle`` command (also under ``torchrun``), and nowhere else.
"""

from __future__ import annotations

import sys
import traceback
from types import TracebackType

__all__ = ["root_cause", "install_excepthook", "running_monai_bundle_cli"]


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s chain, as Python's traceback follows it: ``__cause__`` (``raise ... from``),
    else ``__context__`` unless the exception suppressed it (``raise ... from None``)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _hook(previous):
    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        previous(exc_type, exc, tb)
        if isinstance(exc, KeyboardInterrupt):
            return
        cause = root_cause(exc)
        if cause is not exc:
            reason = "".join(traceback.format_exception_only(type(cause), cause)).strip()
            print(f"\nThe run stopped: {reason}", file=sys.stderr, flush=True)

    hook.installed_by_common = True  # type: ignore[attr-defined]
    return hook


def install_excepthook() -> None:
    """Print the root cause of an uncaught chained exception after Python's traceback (idempotent)."""
    if not getattr(sys.excepthook, "installed_by_common", False):
        sys.excepthook = _hook(sys.excepthook)


def running_monai_bundle_cli() -> bool:
    """True when this process runs ``python -m monai.bundle`` (its ``__main__`` is ``monai.bundle.__main__``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monai.bundle.__main__"
