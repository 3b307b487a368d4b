"""Atomic writes: a reader sees a file or folder whole, or not at all.

Every write goes to a hidden temporary sibling of the target (``.<name>.<pid>.<random><suffix>``, same folder and so
same file system) and is renamed into place only when complete; on any error, Ctrl-C included, the temporary is
removed and the target keeps what it had. Temporaries are hidden because every scan, gc and sweep in the project skips
names that start with ``.``; the ``suffix`` lets a sweep recognise its own leftovers (``curation.ingest`` removes old
``*.ingest-tmp``, ``training.runs.clean_stale`` old ``.lease.json.*.tmp``).

- :func:`temporary_sibling`: just the name; :func:`scratch_sibling`: that name, removed on exit whatever it holds.
- :func:`publish`: rename a complete temporary to the target, replacing what is there or keeping it.
- :func:`atomic_file` / :func:`atomic_dir`: ``with`` blocks that yield the temporary and publish it on success.
- :func:`write_text_atomic`, :func:`write_bytes_atomic`, :func:`copy_atomic`: the one-liners built on them.
- :func:`fsync_path`, :func:`fsync_tree`: for writes that must survive a power cut, not just a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

Exists = Literal["replace", "keep"]

# Errors of os.link on file systems without hard links (FAT, some network mounts, overlay corner cases).
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


def temporary_sibling(target: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A fresh hidden name beside ``target``; nothing is created. The target's name is cut to 100 characters so the
    temporary stays within NAME_MAX (255) however long the target's name is."""
    target = Path(target)
    return target.with_name(f".{target.name[:100]}.{os.getpid()}.{uuid.uuid4().hex[:12]}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_sibling(target: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a :func:`temporary_sibling` of ``target``; whatever is left under it on exit (a file, a link, a folder)
    is removed, so only a published temporary (renamed away) survives the block."""
    tmp = temporary_sibling(target, suffix)
    try:
        yield tmp
    finally:
        _remove(tmp)


def publish(tmp: str | os.PathLike, target: str | os.PathLike, exists: Exists = "replace") -> bool:
    """Give the complete temporary ``tmp`` (a file or a folder) the name ``target``; True when ours is now there.

    ``replace``: what is at ``target`` goes. A file is replaced in one ``os.replace``; a folder cannot be renamed over
    a folder, so the old one is moved aside to a hidden name, ours renamed in, and the old one deleted.

    ``keep``: what is at ``target`` stays (another writer was first; content-named targets hold the same bytes), and
    False is returned: ``tmp`` is left for the caller's :func:`scratch_sibling` to remove. A file is published with a
    hard link, which is atomic and refuses an existing name ("create if absent"); without hard links, a rename after
    an existence check. A folder is renamed, which fails when one is already there.
    """
    tmp, target = Path(tmp), Path(target)
    if exists == "replace":
        if not tmp.is_dir() or not os.path.lexists(target):
            os.replace(tmp, target)
            return True
        old = temporary_sibling(target, ".old")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return True
    if exists != "keep":
        raise ValueError(f"exists must be 'replace' or 'keep', got {exists!r}")
    if tmp.is_dir():
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.lexists(target):
                raise
            return False
        return True
    try:
        os.link(tmp, target)
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(target):
            return False
        os.replace(tmp, target)
    return True


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, *, suffix: str = ".tmp", fsync: bool = False) -> Iterator[Path]:
    """``with atomic_file(path) as tmp:`` write ``tmp`` (a file or a symlink); on a clean exit it replaces ``path``.

    ``fsync``: the bytes are flushed to disk before the name points at them (the folder itself is not synced)."""
    with scratch_sibling(target, suffix) as tmp:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, exists: Exists = "replace", suffix: str = ".tmp") -> Iterator[Path]:
    """``with atomic_dir(path) as tmp:`` fill the new, empty folder ``tmp``; on a clean exit it becomes ``path``.

    ``exists`` says what happens to a folder already at ``path`` (see :func:`publish`): ``replace`` swaps it out,
    ``keep`` keeps it and discards ours (another writer of the same content won the race)."""
    with scratch_sibling(target, suffix) as tmp:
        tmp.mkdir()
        yield tmp
        publish(tmp, target, exists)


def write_text_atomic(target: str | os.PathLike, text: str, *, encoding: str = "utf-8", suffix: str = ".tmp",
                      fsync: bool = False) -> None:
    with atomic_file(target, suffix=suffix, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_bytes_atomic(target: str | os.PathLike, data: bytes, *, suffix: str = ".tmp", fsync: bool = False) -> None:
    with atomic_file(target, suffix=suffix, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike, *, suffix: str = ".tmp", hardlink: bool = False,
                fsync: bool = False, copy_stat: bool = False) -> None:
    """Put a copy of ``src`` at ``dst``, replacing it: ``dst`` is its old content or a complete copy, never half.

    ``hardlink``: link instead of copying where the file system allows (no bytes copied; falls back to a copy).
    ``fsync``: the bytes are on disk before the name points at them. ``copy_stat``: keep ``src``'s times and mode,
    as ``shutil.copy2`` does."""
    with atomic_file(dst, suffix=suffix, fsync=fsync) as tmp:
        if hardlink:
            with contextlib.suppress(OSError):
                os.link(src, tmp)
        if not os.path.lexists(tmp):  # no hard link asked for, or none possible here
            shutil.copyfile(src, tmp)
            if copy_stat:
                shutil.copystat(src, tmp)


def _fsync_file(path: Path) -> None:
    """fsync a file just written; unlike :func:`fsync_path` a failure raises (the write is not durable)."""
    if path.is_symlink():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """fsync one file, or one folder (which makes the renames inside it durable), as far as the file system allows:
    a path that cannot be opened or synced is passed over."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders: nothing more to do there
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (and ``root``)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder, directory=True)
