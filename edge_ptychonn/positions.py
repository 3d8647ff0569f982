"""Scan positions written as a text table: the one reader, for the live stitcher's
``positionsFile`` and ``finetune --positions``.

A table is rows of numbers separated by commas or white space, whatever the file's
suffix; lines starting with ``#`` and empty lines are skipped. Two columns are ``y x``,
three ``uniqueId y x``. A first row of names says which column is which, in any order
and case: one column named ``y``, one ``x``, and a third column (any name, e.g.
``uniqueId``) holds the uniqueIds. What it returns is always ``y x`` or ``uniqueId y x``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_text_table(path: str | Path) -> np.ndarray:
    """The table in ``path`` as float64 rows of ``y x`` (N, 2) or ``uniqueId y x`` (N, 3).

    ``ValueError`` naming the file for one that cannot be read as text, holds no row of
    numbers, holds other text, rows of different lengths, or a row of names that does
    not name ``y`` and ``x``. Whether the rows fit the frames is the caller's to check."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as a text table ({exc})") from None
    lines = [(k + 1, line.replace(",", " ").split(), line.strip()) for k, line in enumerate(text.splitlines())
             if line.strip() and not line.lstrip().startswith("#")]
    names = lines[0][1] if lines and not all(_is_number(t) for t in lines[0][1]) else None
    rows = lines[1:] if names is not None else lines
    if not rows:
        raise ValueError(f"{path}: holds no positions (no rows of numbers)")
    width = len(rows[0][1])
    for number, fields, line in rows:
        if len(fields) != width or not all(_is_number(t) for t in fields):
            raise ValueError(f"{path}: line {number} is not a row of {width} numbers like the first: {line[:80]!r}")
    table = np.array([[float(t) for t in fields] for _, fields, _ in rows], dtype=np.float64)
    if names is None:
        return table
    lowered = [n.lower() for n in names]
    if len(names) != width or lowered.count("y") != 1 or lowered.count("x") != 1 or width not in (2, 3):
        raise ValueError(f"{path}: a first row of column names must name the columns y and x (and a third one, "
                         f"the uniqueId), one name per column; got {lines[0][2][:80]!r}")
    order = [k for k, n in enumerate(lowered) if n not in ("y", "x")] + [lowered.index("y"), lowered.index("x")]
    return table[:, order]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
