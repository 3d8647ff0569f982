"""Files appear under their names only when whole."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ptychonn.files import save_npy_whole, whole_file, write_bytes_whole


def test_the_name_appears_only_when_the_file_is_complete(tmp_path):
    target = tmp_path / "a.bin"
    with whole_file(target) as partial:
        partial.write_bytes(b"half")
        assert not target.exists() and partial.name.startswith(".a.bin.")
    assert target.read_bytes() == b"half" and list(tmp_path.iterdir()) == [target]
    write_bytes_whole(target, b"whole")
    assert target.read_bytes() == b"whole"
    save_npy_whole(tmp_path / "x.npy", np.arange(5.0))  # the name is kept: no second .npy
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(5.0))


def test_an_error_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), whole_file(target) as partial:
        partial.write_bytes(b"new, half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
