"""Files that a reader never sees half-written: built under a hidden name, then renamed.

A program that watches a folder (a viewer, a test, the next step of a workflow) may
open a file the moment its name appears; so the name appears only when the file is
complete (or, for an HDF5 file in SWMR mode, readable). A process killed while
writing leaves its hidden file behind; :func:`remove_stale_partials` removes those
of this host's processes that are gone (the writers call it on their folder).

Reading numpy files that a user names (:func:`load_npy`, :func:`load_npz`): an empty or
cut-short file (a copy still running), an ``.npz`` under a ``.npy`` name or the other way
round, or pickled objects give a ``ValueError`` that names the file, never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import zipfile
import zlib
from pathlib import Path

import numpy as np


def _host_tag() -> str:
    """This host's name, and the process-id namespace that its pids belong to when that is
    known (``<host>~<namespace>``): containers with the host's name (host networking) share
    it, and a pid of one is no pid of another, so another container's writer is never taken
    for a dead one of this host."""
    host = socket.gethostname() or "localhost"
    try:
        namespace = re.fullmatch(r"pid:\[(\d+)\]", os.readlink("/proc/self/ns/pid"))
    except OSError:
        namespace = None
    return f"{host}~{namespace.group(1)}" if namespace else host


_HOST = _host_tag()
NAME_MAX = 255  # bytes in a file name (ext4, xfs, btrfs, NFS, ...)


def partial_name(path: Path, pid: int | None = None) -> Path:
    """The hidden name ``.<name>.<host>.<pid>.part`` beside ``path`` (one per process;
    ``<host>``: :func:`_host_tag`; ``pid``: this process's unless given). Where that would
    pass :data:`NAME_MAX` bytes (a long ``<name>`` that itself fits), ``<name>`` is cut and
    ends in ``~`` and a digest of the whole name, so that the file can still be made."""
    tail = f".{_HOST}.{os.getpid() if pid is None else pid}.part"
    name = path.name
    room = NAME_MAX - 1 - len(os.fsencode(tail))
    if len(os.fsencode(name)) > room:
        digest = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        while len(os.fsencode(name + digest)) > room:
            name = name[:-1]
        name += digest
    return path.with_name(f".{name}{tail}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(directory: Path, log: logging.Logger) -> list[Path]:
    """Remove the hidden files in ``directory`` that processes of this host left when they
    died mid-write, with a line on ``log`` for each; returns what was removed. Files of
    live processes, and of other hosts (a folder on shared storage) or other containers of
    this host (other pid namespaces), are left alone."""
    pattern = re.compile(rf"^\..+\.{re.escape(_HOST)}\.(\d+)\.part$")
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _process_exists(int(m.group(1))):
            try:
                entry.unlink()
            except OSError:
                continue
            log.info("removed %s, left half-written by process %s, which is gone", entry, m.group(1))
            removed.append(entry)
    return removed


def unused_stem(stem: Path, endings: tuple[str, ...]) -> Path:
    """``stem``, or where a file ``stem + ending`` already exists for any of ``endings``
    (an earlier run's), the first ``<stem>-2``, ``<stem>-3``, ... for which none does:
    data files are never replaced."""
    stem = Path(stem)
    candidate, n = stem, 1
    # lexists: a name held by a dangling symbolic link is taken too (no file can be made under it)
    while any(os.path.lexists(f"{candidate}{ending}") for ending in endings):
        n += 1
        candidate = stem.with_name(f"{stem.name}-{n}")
    return candidate


def _sync(path: Path) -> None:
    """Write ``path``'s data (a file) or names (a folder) through to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def whole_file(path: Path, replace: bool = True):
    """Yield a hidden path to write; rename it to ``path`` when the block ends, remove it on
    error. ``replace`` False: an existing ``path`` is never replaced (``FileExistsError``;
    pick the name with :func:`unused_stem`). The data reach the disk before the name
    appears (a power cut leaves no empty or cut-short file under ``path``), and the name
    after the rename."""
    path = Path(path)
    partial = partial_name(path)
    try:
        yield partial
        _sync(partial)
        if replace:
            os.replace(partial, path)
        else:
            _rename_no_replace(partial, path)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno and not exc.filename:  # a write's error names no file: this one
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder: the data are safe anyway
        _sync(path.parent)


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists. A hard link fails on
    an existing name where a rename would replace it; on a filesystem without hard links
    (SMB, exFAT, some FUSE mounts) a check then a rename (a tiny window for a writer of
    the same name in another process: the writers' names differ by consumer)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links here
        if os.path.lexists(dst):
            raise FileExistsError(f"{dst} exists") from None
        os.rename(src, dst)
        return
    os.unlink(src)


def write_bytes_whole(path: Path, data: bytes) -> None:
    with whole_file(path) as partial:
        partial.write_bytes(data)


class _WriteOnly:
    """A file seen only through ``write()``."""

    def __init__(self, f):
        self.write = f.write


def write_npy(f, array) -> None:
    """``np.save(f, array)`` (no pickles), whose failure says why: numpy writes to a real file with
    ``ndarray.tofile``, whose error on a full disk is "N requested and M written", without the
    reason; through ``write()`` it is the system's (``[Errno 28] No space left on device``)."""
    np.lib.format.write_array(_WriteOnly(f), np.asanyarray(array), allow_pickle=False)


def save_npy_whole(path: Path, array: np.ndarray, replace: bool = True) -> None:
    with whole_file(path, replace) as partial, open(partial, "wb") as f:
        write_npy(f, array)


_NUMPY_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


def _why_unreadable(path, exc: BaseException) -> str:
    """Why numpy could not read ``path``, in words (numpy calls any file without its
    signature "pickled (object) data")."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return str(exc)
    if not head:
        return "the file is empty"
    if not head.startswith((b"\x93NUMPY", b"PK")):
        return "neither a .npy array nor an .npz archive"
    return str(exc)


def load_npy(path, *, mmap_mode: str | None = None) -> np.ndarray:
    """The array of the ``.npy`` file ``path`` (memory-mapped with ``mmap_mode``); ``ValueError``
    naming the file when it holds none: empty or cut short, an ``.npz`` archive, pickled objects,
    not numpy at all, a folder."""
    try:
        value = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except _NUMPY_READ_ERRORS as exc:
        raise ValueError(f"{path}: not a numpy array file ({_why_unreadable(path, exc)})") from None
    if not isinstance(value, np.ndarray):  # np.load opens an .npz archive whatever its name
        value.close()
        raise ValueError(f"{path}: an .npz archive, not a .npy array")
    return value


def load_npz(path, keys=None) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
    """``(names, arrays)`` of the ``.npz`` archive ``path``: the names of all its arrays, and
    those of ``keys`` that it has (all, when ``keys`` is None) read; ``ValueError`` naming the
    file when it is not such an archive (empty or cut short, a ``.npy`` array, pickled objects)."""
    try:
        z = np.load(path, allow_pickle=False)
    except _NUMPY_READ_ERRORS as exc:
        raise ValueError(f"{path}: not an .npz archive of numpy arrays ({_why_unreadable(path, exc)})") from None
    if isinstance(z, np.ndarray):
        raise ValueError(f"{path}: a .npy array, not an .npz archive")
    with z:
        try:
            return tuple(z.files), {k: z[k] for k in z.files if keys is None or k in keys}
        except _NUMPY_READ_ERRORS as exc:
            raise ValueError(f"{path}: cannot read its arrays ({exc})") from None


def check_writable(paths) -> None:
    """``OSError`` when a file of ``paths`` (what a command will write) cannot be: it is a folder,
    or a file stands where its folder would be, or that folder is not writable; so that a command
    fails before its work, not after it. Leaves nothing (see :func:`check_folder`)."""
    for path in map(Path, paths):
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder")
        check_folder(path.parent)


def check_folder(folder) -> None:
    """``OSError`` when the folder ``folder`` (made if missing, then written in) cannot be: a
    file stands there or where a folder above it would be made, or the nearest existing folder
    is not writable: one empty hidden file (a :func:`partial_name`) is made there and removed,
    since permission bits alone pass root everywhere (``/proc``). Leaves nothing."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        if folder.is_symlink():  # a dangling link: no folder can be made under its name
            raise NotADirectoryError(f"{folder} is a symbolic link to {os.readlink(folder)}, which does not exist "
                                     "(or is a loop of links)")
        folder = folder.parent  # the folders missing are made when the files are written
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{folder} is not writable")
    # the permission bits say yes to root everywhere, and know nothing of /proc, /sys, some
    # network and FUSE mounts or security modules: one empty hidden file, made and removed, does
    probe = partial_name(folder / f"write-check-{secrets.token_hex(4)}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise PermissionError(f"{folder} is not writable: no file can be made there ({exc.strerror or exc})") from None
    with contextlib.suppress(OSError):
        os.unlink(probe)
