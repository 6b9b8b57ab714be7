"""Durable file writes: the one place that writes a file (or a folder) so a crash leaves the old or
the new version, never a torn one (write a sibling, fsync, rename over).

Not here, on purpose: append-only logs (local_log.py, the launcher's audit log; a line is added,
nothing is replaced) and the noise key, created once with O_EXCL (privacy/ledger_store.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Replace `path` with `data` (bytes, or a function writing to the open file) atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dir_atomic(path: Path, fill: Callable[[Path], None]) -> Path:
    """Replace folder `path` with the one `fill(folder)` writes (e.g. a PEFT save_pretrained).

    A resumed run takes an existing folder for a written one, so a half-written folder must never
    appear under `path`: `fill` writes a sibling, its files are fsynced, and it is renamed into place.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    old = path.with_name(f"{path.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            os.replace(path, old)  # a directory cannot be renamed over a non-empty one
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
