"""Files that a reader never sees half-written: built under a hidden name, then renamed.

A program that watches a folder (a viewer, a test, the next step of a workflow) may
open a file the moment its name appears; so the name appears only when the file is
complete (or, for an HDF5 file in SWMR mode, readable).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np


def partial_name(path: Path) -> Path:
    """The hidden name ``.<name>.<pid>.part`` beside ``path`` (one per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


@contextlib.contextmanager
def whole_file(path: Path):
    """Yield a hidden path to write; rename it to ``path`` when the block ends, remove it on error."""
    path = Path(path)
    partial = partial_name(path)
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_bytes_whole(path: Path, data: bytes) -> None:
    with whole_file(path) as partial:
        partial.write_bytes(data)


def save_npy_whole(path: Path, array: np.ndarray) -> None:
    with whole_file(path) as partial, open(partial, "wb") as f:
        np.save(f, array)
