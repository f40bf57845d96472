# Copyright (c) the tlseg authors. Licensed under the Apache License, Version 2.0.
"""Atomic file output: every file the package writes goes through :func:`atomic_path`.

A write goes to a hidden temporary file in the target's folder (``.<name>.<random>.tmp``), is flushed to
disk (``fsync``), given the usual permissions (``0o666 & ~umask``, not ``mkstemp``'s 0600) and renamed
over the target (``os.replace`` is atomic on POSIX). A kill or a full disk at any moment therefore leaves
either the old file or the new one, never a truncated one, and a reader (an inference process, MONAI
Label's infer endpoint, a fine-tuning run) never meets half a file. Left-over temporaries of a killed
write are hidden files ending in ``.tmp`` (see :func:`remove_stale_temporaries`).

The text writers (:func:`write_json`, :func:`write_csv`, :func:`write_text`) are the one place that
formats the package's CSV / JSON outputs: JSON has no infinity, so :func:`json_safe` writes non-finite
numbers as the strings ``"inf"`` / ``"-inf"`` / ``"nan"``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import numpy as np

__all__ = [
    "TMP_SUFFIX",
    "atomic_path",
    "atomic_write",
    "atomic_torch_save",
    "json_safe",
    "write_json",
    "write_csv",
    "write_text",
    "remove_stale_temporaries",
    "utf8_console",
]

logger = logging.getLogger(__name__)

#: Suffix of the temporary files of :func:`atomic_path`.
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = TMP_SUFFIX) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder; when the block succeeds the file is fsynced, given the
    usual permissions and renamed over ``path``. On any error the temporary file is removed, ``path`` is
    untouched, and an ``OSError`` names ``path``.

    ``suffix`` ends the temporary name (e.g. ``".tmp.nii.gz"`` so that a writer choosing the format by the
    extension writes the right one).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=folder)
        os.close(fd)
    except OSError as err:
        raise OSError(err.errno, f"Cannot write {path}: {err.strerror}") from err
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"Cannot write {path}: {err.strerror or err}") from err
        raise


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` atomically (see :func:`atomic_path`): ``write(f)`` fills the temporary file opened
    with ``mode`` (``"wb"`` or ``"w"``; text is UTF-8 whatever the machine's locale)."""
    with atomic_path(path) as tmp:
        text = "b" not in mode
        with open(tmp, mode, newline="" if text else None, encoding="utf-8" if text else None) as f:
            write(f)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def json_safe(x: Any) -> Any:
    """``x`` with numpy scalars made plain and non-finite floats written as ``"inf"``, ``"-inf"`` or ``"nan"``."""
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    return x


def write_json(path: str, obj: Any, indent: int = 2) -> str:
    """Write ``obj`` as JSON (through :func:`json_safe`) atomically; returns ``path``."""
    atomic_write(path, lambda f: (json.dump(json_safe(obj), f, indent=indent, allow_nan=False), f.write("\n")), mode="w")
    return path


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> str:
    """Write ``rows`` as CSV atomically; ``fields`` (default: the first row's keys) are the columns, ``None``
    values are empty cells and floats keep every digit (``repr``). Returns ``path``."""
    fields = list(fields or (rows[0].keys() if rows else []))

    def cell(v: Any) -> Any:
        if v is None:
            return ""
        return repr(float(v)) if isinstance(v, (float, np.floating)) else v

    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: cell(v) for k, v in r.items()})

    atomic_write(path, write, mode="w")
    logger.info("Wrote %s (%d rows).", path, len(rows))
    return path


def write_text(path: str, text: str) -> str:
    """Write ``text`` atomically; returns ``path``."""
    atomic_write(path, lambda f: f.write(text), mode="w")
    logger.info("Wrote %s.", path)
    return path


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files (hidden, ending in ``.tmp`` or ``.tmp.<ext>``) that a process killed in the
    middle of an atomic write left in ``folder`` and its sub-folders. They are never read; this only tidies
    up. Returns their paths relative to ``folder``."""
    removed = []
    if os.path.isdir(folder):
        for root, _, names in os.walk(folder):
            for name in names:
                if name.startswith(".") and (name.endswith(TMP_SUFFIX) or f"{TMP_SUFFIX}." in name):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(root, name))
                        removed.append(os.path.relpath(os.path.join(root, name), folder))
    if removed:
        logger.info("Removed %d temporary file(s) of an interrupted write: %s", len(removed), removed)
    return removed


def utf8_console() -> None:
    """Let ``print`` write any text: where the locale's encoding is not UTF-8 (``LANG`` unset, as on many CI runners
    and containers, gives ASCII), stdout and stderr are switched to UTF-8, so a report line holding ``±`` or a
    path with an accent does not stop a tool with ``UnicodeEncodeError``. Called by the command-line tools."""
    import codecs
    import sys

    for stream in (sys.stdout, sys.stderr):
        enc = getattr(stream, "encoding", None) or ""
        try:
            utf8 = codecs.lookup(enc).name == "utf-8"
        except LookupError:
            utf8 = False
        if not utf8 and hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
