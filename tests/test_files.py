"""Files appear under their names only when whole."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn.files import (
    check_folder, check_writable, load_npy, load_npz, partial_name, remove_stale_partials, save_npy_whole,
    unused_stem, whole_file, write_bytes_whole,
)

LOG = logging.getLogger("test")


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


def test_partial_files_of_dead_processes_on_this_host_are_removed(tmp_path, dead_pid):
    dead = partial_name(tmp_path / "scan_0001.h5", dead_pid)
    other_host = partial_name(tmp_path / "scan_0004.h5", dead_pid)
    keep = [
        partial_name(tmp_path / "scan_0002.h5"),  # this process, still writing
        partial_name(tmp_path / "scan_0003.h5", os.getppid()),  # another live process
        other_host.with_name(other_host.name.replace(f".{dead_pid}.part", f"-elsewhere.{dead_pid}.part")),
        tmp_path / "scan_0005.h5",
        tmp_path / dead.name[1:],  # not hidden: not ours
    ]
    for path in [dead, *keep]:
        path.write_bytes(b"x")
    assert remove_stale_partials(tmp_path, LOG) == [dead]
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_partials(tmp_path / "missing", LOG) == []


def test_whole_file_names_its_partial_after_this_host_and_process(tmp_path):
    with whole_file(tmp_path / "a.bin") as partial:
        assert partial == partial_name(tmp_path / "a.bin") and f".{os.getpid()}.part" in partial.name
        partial.write_bytes(b"x")
        assert remove_stale_partials(tmp_path, LOG) == [] and partial.exists()


def test_data_files_are_not_replaced(tmp_path):
    old = tmp_path / "scan0001.h5"
    old.write_bytes(b"old")
    assert unused_stem(tmp_path / "scan0001", (".h5",)) == tmp_path / "scan0001-2"
    assert unused_stem(tmp_path / "scan0002", (".h5",)) == tmp_path / "scan0002"
    (tmp_path / "img-2_weight.npy").write_bytes(b"")  # either of a pair makes the name taken
    (tmp_path / "img.npy").write_bytes(b"")
    assert unused_stem(tmp_path / "img", (".npy", "_weight.npy")) == tmp_path / "img-3"
    with pytest.raises(FileExistsError):  # taken meanwhile: refused, not replaced
        with whole_file(old, replace=False) as partial:
            partial.write_bytes(b"new")
    assert old.read_bytes() == b"old" and not partial_name(old).exists()
    with whole_file(tmp_path / "scan0002.h5", replace=False) as partial:
        partial.write_bytes(b"new")
    assert (tmp_path / "scan0002.h5").read_bytes() == b"new" and not partial.exists()


def test_without_hard_links_a_file_still_takes_a_free_name_and_never_replaces(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # what SMB or exFAT answer

    monkeypatch.setattr(os, "link", no_links)
    with whole_file(tmp_path / "scan0001.h5", replace=False) as partial:
        partial.write_bytes(b"new")
    assert (tmp_path / "scan0001.h5").read_bytes() == b"new" and not partial.exists()
    with pytest.raises(FileExistsError):
        with whole_file(tmp_path / "scan0001.h5", replace=False) as partial:
            partial.write_bytes(b"newer")
    assert (tmp_path / "scan0001.h5").read_bytes() == b"new" and not partial.exists()


def test_numpy_files_that_hold_no_arrays_are_refused_naming_the_file(tmp_path):
    """An empty or cut-short file (a copy still running), an .npz under a .npy name and the other way
    round, pickled objects: a ValueError naming the file (before: EOFError, AttributeError or TypeError
    tracebacks from the commands that read them)."""
    np.save(tmp_path / "a.npy", np.arange(6).reshape(2, 3))
    np.savez(tmp_path / "z.npz", a=np.arange(3), b=np.ones(2))
    np.testing.assert_array_equal(load_npy(tmp_path / "a.npy", mmap_mode="r"), np.arange(6).reshape(2, 3))
    names, arrays = load_npz(tmp_path / "z.npz", ("b", "c"))
    assert names == ("a", "b") and list(arrays) == ["b"]
    assert list(load_npz(tmp_path / "z.npz")[1]) == ["a", "b"]
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-8])
    (tmp_path / "cut.npz").write_bytes((tmp_path / "z.npz").read_bytes()[:100])
    (tmp_path / "zip.npy").write_bytes((tmp_path / "z.npz").read_bytes())
    (tmp_path / "arr.npz").write_bytes((tmp_path / "a.npy").read_bytes())
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("1 2 3\n")
    for name, mmap, why in (("empty.npy", None, r"not a numpy array file \(the file is empty\)"),
                            ("empty.npy", "r", r"not a numpy array file \(the file is empty\)"),
                            ("text.npy", None, r"not a numpy array file \(neither a .npy array nor an .npz archive\)"),
                            ("cut.npy", None, "not a numpy array file"), ("cut.npy", "r", "not a numpy array file"),
                            ("zip.npy", None, "an .npz archive, not a .npy array"),
                            ("obj.npy", None, "not a numpy array file")):
        with pytest.raises(ValueError, match=f"^{tmp_path / name}: {why}"):
            load_npy(tmp_path / name, mmap_mode=mmap)
    for name, why in (("empty.npz", r"not an .npz archive of numpy arrays \(the file is empty\)"),
                      ("cut.npz", "not an .npz archive"),
                      ("arr.npz", "a .npy array, not an .npz archive")):
        with pytest.raises(ValueError, match=f"^{tmp_path / name}: {why}"):
            load_npz(tmp_path / name)


def test_a_folder_where_nothing_can_be_made_is_not_called_writable(tmp_path):
    """Before: the permission bits alone decided, and they pass root everywhere: as root
    check_writable accepted /proc/x.json and a train run failed at its end, after hours."""
    for path in ("/proc/x.json", "/proc/new/folder/x.json"):
        with pytest.raises(PermissionError, match="^/proc is not writable"):
            check_writable([path])
    check_writable([tmp_path / "a" / "b.json", tmp_path / "c.npy"])
    check_folder(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        check_writable([tmp_path / "f" / "x.json"])
    with pytest.raises(IsADirectoryError):
        check_writable([tmp_path])


def _in_another_pid_namespace_works() -> bool:
    try:
        return shutil.which("unshare") is not None and subprocess.run(
            ["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _in_another_pid_namespace_works(), reason="needs unshare --pid (root)")
def test_a_writer_in_another_container_of_this_host_is_not_taken_for_a_dead_one(tmp_path, dead_pid):
    """Containers with host networking carry the host's name, but their pids are their own: a
    container's writer whose pid is unused here is alive. Before: the partial names told only
    the host, and a writer starting here removed the other container's growing file."""
    code = ("import sys; from pathlib import Path; from edge_ptychonn.files import partial_name; "
            "print(partial_name(Path(sys.argv[1]), int(sys.argv[2])))")
    name = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", code, str(tmp_path / "scan.h5"),
                           str(dead_pid)], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    theirs, ours = Path(name), partial_name(tmp_path / "scan2.h5", dead_pid)
    assert theirs.parent == tmp_path and theirs != partial_name(tmp_path / "scan.h5", dead_pid)
    theirs.write_bytes(b"growing")
    ours.write_bytes(b"left by a dead writer of this container")
    assert remove_stale_partials(tmp_path, LOG) == [ours] and theirs.exists()


@pytest.mark.parametrize("replace", [True, False])
def test_the_data_reach_the_disk_before_the_name_appears(tmp_path, monkeypatch, replace):
    """The partial was renamed without an fsync: after a power cut the name could stand for an
    empty or cut-short file (the rename reached the disk, the data not yet)."""
    events = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))[1])
    monkeypatch.setattr(os, "link", lambda a, b: (events.append(("rename", str(b))), real_link(a, b))[1])
    target = tmp_path / "a.npy"
    save_npy_whole(target, np.arange(3.0), replace=replace)
    assert events == [("fsync", str(partial_name(target))), ("rename", str(target)), ("fsync", str(tmp_path))]


def test_a_long_name_that_fits_gets_a_partial_that_fits(tmp_path, dead_pid):
    """A name of 225 bytes fits (255 at most), but its partial (``.<name>.<host>.<pid>.part``)
    did not: every such file failed with "File name too long"."""
    for n in (200, 225, 255 - len("_weight.npy"), 250):
        target = tmp_path / ("é" * (n // 2 - 3) + "x" * (n % 2) + ".npy")
        assert len(os.fsencode(target.name)) <= 255
        partial = partial_name(target)
        assert len(os.fsencode(partial.name)) <= 255 and partial.name.startswith(".")
        assert partial != partial_name(target.with_name(target.name[:-5] + "y.npy")), "names that differ late differ"
        save_npy_whole(target, np.arange(n, dtype=float), replace=False)
        np.testing.assert_array_equal(np.load(target), np.arange(n, dtype=float))
    dead = partial_name(tmp_path / ("z" * 240 + ".h5"), dead_pid)  # a long partial of a dead process
    dead.write_bytes(b"x")
    assert remove_stale_partials(tmp_path, LOG) == [dead]


def test_a_dangling_link_is_no_folder_to_write_in(tmp_path):
    """Before: passed as writable (the check climbed to the folder above), and the first write
    failed with a bare "[Errno 17] File exists" (a writer's output folder, a launch's log_dir,
    finetune --out after its training)."""
    link = tmp_path / "scans"
    link.symlink_to(tmp_path / "gone")
    for folder in (link, link / "run5"):
        with pytest.raises(NotADirectoryError, match=rf"{link} is a symbolic link to {tmp_path / 'gone'}, which "
                                                     "does not exist"):
            check_folder(folder)
    with pytest.raises(NotADirectoryError, match="symbolic link"):
        check_writable([link / "out.json"])


def test_a_name_held_by_a_dangling_link_is_taken(tmp_path):
    """Before: the name of a dangling link was "free", no file could be made under it, and every
    new try got that name again: the HDF5 writer lost every frame of the scan, the stitcher its image."""
    (tmp_path / "scan0001.h5").symlink_to(tmp_path / "gone.h5")
    stem = unused_stem(tmp_path / "scan0001", (".h5",))
    assert stem == tmp_path / "scan0001-2"
    with whole_file(Path(f"{stem}.h5"), replace=False) as partial:
        partial.write_bytes(b"data")
    assert (tmp_path / "scan0001-2.h5").read_bytes() == b"data" and (tmp_path / "scan0001.h5").is_symlink()


def test_a_full_disk_is_said_with_the_file_and_the_reason(tmp_path, monkeypatch):
    """Before: "6553600 requested and 1048512 written" (numpy's tofile), naming neither the file
    nor the reason. /dev/full answers every write with ENOSPC."""
    import errno

    import edge_ptychonn.files as files

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr(files, "open", lambda path, mode: open("/dev/full", mode), raising=False)
    target = tmp_path / "image.npy"
    with pytest.raises(OSError) as info:
        save_npy_whole(target, np.zeros((64, 64), np.float32))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target), info.value
    assert "No space left on device" in str(info.value) and str(target) in str(info.value)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_npy_whole(target, np.arange(6.0).reshape(2, 3))  # what it writes is np.save's file
    assert np.array_equal(load_npy(target), np.arange(6.0).reshape(2, 3))
