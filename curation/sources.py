"""Frozen sources: the bytes a video row describes, kept where nobody edits them.

The landing folder is an inbox: users may overwrite, trim or delete its files at any time. A clip that points into
a source (a frame range of it, or a file cut from it) is only reproducible if that source never changes, so when
``raw_videos`` probes a video its bytes are copied into the lake as immutable media named by their content hash,
``media/sources/<id><ext>`` (``<id>`` is the video id, :func:`curation.probe.content_hash`). The row's ``source``
column names that copy and every decoder reads it through :func:`decodable_source`; ``path`` stays the landing path
(sidecar captions are matched by it, quarantine reports it).

``ingest --link`` asks for the opposite: the files stay where they are and are referenced in place (``linked``).
Those are not copied; their hash is recorded at probe time and checked again before decoding, so an edited file is a
clear :class:`SourceChanged`, never silently different frames.

Freezing hashes and copies in one read pass, writes under a hidden temporary name and publishes it atomically; an
object already there is kept, never overwritten (same name, same bytes). Plain library code: no orchestrator here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.files import publish, scratch_sibling
from curation.errors import InputRejected

SOURCES = ("media", "sources")  # under the data root, beside media/clips and media/frames
CHUNK = 1 << 20
PART_SUFFIX = ".part"  # hidden temporaries end with it; gc skips hidden names


class SourceChanged(InputRejected):
    """A linked source's bytes are no longer the ones that were probed (or the file is gone).

    An input rejection: the clip or video is quarantined with this reason and the batch goes on."""

    def __init__(self, path: str | os.PathLike, expected: str, found: str | None):
        self.path, self.expected, self.found = str(path), expected, found
        if found is None:
            detail = f"linked source {self.path} is gone (expected content hash {expected})"
        else:
            detail = (f"linked source {self.path} changed since it was probed: expected content hash {expected}, "
                      f"found {found}")
        super().__init__(f"{detail}; re-ingest and re-materialize the batch to use the new bytes")


class SourceUnreadable(InputRejected):
    """The landing file could not be read while freezing it (vanished, unreadable): the file's problem, not ours."""


def source_name(video_id: str, suffix: str) -> str:
    """``<id><ext>``: the object name of a frozen source. The suffix is lower-cased so that ``a.MP4`` and ``b.mp4``
    with the same bytes share one object; it is kept at all because some demuxers guess the format from it."""
    suffix = suffix.lower()
    if suffix and (not suffix.startswith(".") or "/" in suffix or len(suffix) > 16):
        suffix = ""  # never let a strange name shape the object's name
    return f"{video_id}{suffix}"


def copy_hashing(src: str | os.PathLike, dst: str | os.PathLike) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` while hashing it (one read of ``src``); returns (content hash, size).

    ``dst`` is flushed to disk before returning. A failure to read ``src`` is :class:`SourceUnreadable` (an input
    rejection); a failure to write ``dst`` (full disk, read-only media) propagates as the ``OSError`` it is."""
    from curation.probe import content_hasher

    digest, size = content_hasher(), 0
    try:
        fin = open(src, "rb")
    except OSError as err:
        raise SourceUnreadable(f"cannot read {src} to freeze it: {err.strerror or err}") from err
    with fin, open(dst, "wb") as fout:
        while True:
            try:
                chunk = fin.read(CHUNK)
            except OSError as err:
                raise SourceUnreadable(f"cannot read {src} to freeze it: {err.strerror or err}") from err
            if not chunk:
                break
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())  # the bytes are on disk before a name points at them
    return digest.hexdigest(), size


def freeze_file(path: str | os.PathLike, folder: str | os.PathLike, video_id: str | None = None) -> Path:
    """Freeze ``path`` into the local ``folder`` as ``<id><ext>``; returns the frozen file.

    With ``video_id`` (the hash the probe recorded) an object already of that name is reused without reading
    ``path`` at all, and a copy whose bytes hash to something else raises :class:`SourceChanged` (the landing file was
    edited between probing and freezing: the row would describe other bytes). Without it the name comes from the
    copy's own hash. The copy is written as a hidden temporary, made read-only and published atomically."""
    path, folder = Path(path), Path(folder)
    if video_id is not None:
        existing = folder / source_name(video_id, path.suffix)
        if existing.is_file():
            return existing  # immutable: same name, same bytes; never rewritten (its mtime stays)
    folder.mkdir(parents=True, exist_ok=True)
    with scratch_sibling(folder / "source", PART_SUFFIX) as tmp:  # the final name is known once the copy is hashed
        digest, _size = copy_hashing(path, tmp)
        if video_id is not None and digest != video_id:
            raise SourceChanged(path, video_id, digest)
        os.chmod(tmp, 0o444)  # a frozen source is not edited in place by accident either
        dest = folder / source_name(digest, path.suffix)
        publish(tmp, dest, exists="keep")  # an existing name is kept, never replaced (content-named: same bytes)
    return dest


class SourceStore:
    """Freezes probed videos into ``media/sources/`` of one data root (a :class:`common.storage.Storage`).

    Call it as ``store(path, video_id) -> source`` (the ``freeze`` callable of :func:`curation.ingest.scan_batch`):
    on a local data root the source is the frozen file's path; on S3 the file is frozen into local ``scratch`` space
    (hashed while copied, so what is uploaded is what was hashed), uploaded once through the storage layer, and the
    source is its ``s3://`` URL. An object already there is kept, never uploaded over."""

    def __init__(self, storage: Any, scratch: str | os.PathLike | None = None):
        self.storage = storage
        self.scratch = Path(scratch) if scratch is not None else None

    def url(self, video_id: str, suffix: str) -> str:
        return self.storage.url(*SOURCES, source_name(video_id, suffix))

    def __call__(self, path: str | os.PathLike, video_id: str) -> str:
        return self.freeze(path, video_id)

    def freeze(self, path: str | os.PathLike, video_id: str) -> str:
        path = Path(path)
        if not self.storage.remote:
            return str(freeze_file(path, self.storage.url(*SOURCES), video_id))
        url = self.url(video_id, path.suffix)
        if self.storage.exists(url):
            return url
        if self.scratch is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="sources-", dir=self.scratch))
        try:
            staged = freeze_file(path, staging, video_id)
            self.storage.put_file(staged, *SOURCES, staged.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return url


# ---- reading a source back --------------------------------------------------------------------------------------
_HASHES: dict[tuple, str] = {}
_HASHES_LOCK = threading.Lock()


def _stat_key(real: str) -> tuple:
    st = os.stat(real)
    # ctime too: an edit that restores the old mtime (rsync -t, touch -d) still moves ctime.
    return (real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def current_hash(path: str | os.PathLike) -> str:
    """The content hash of the file ``path`` resolves to, cached per process by (real path, size, mtime, inode,
    ctime): a linked source is hashed once per process however many clips decode it, and again once it changes."""
    from curation.probe import content_hash

    real = os.path.realpath(path)
    key = _stat_key(real)
    with _HASHES_LOCK:
        known = _HASHES.get(key)
    if known is not None:
        return known
    digest = content_hash(Path(real))
    if _stat_key(real) == key:  # not cached when the file moved under us: the digest may mix two versions
        with _HASHES_LOCK:
            _HASHES[key] = digest
    return digest


def verify_linked(path: str | os.PathLike, expected: str) -> Path:
    """The real path of a linked source whose bytes still hash to ``expected``; :class:`SourceChanged` otherwise."""
    real = os.path.realpath(path)
    try:
        found = current_hash(real)
    except FileNotFoundError:
        raise SourceChanged(path, expected, None) from None
    if found != expected:
        raise SourceChanged(path, expected, found)
    return Path(real)


def decodable_source(row: Mapping[str, Any]) -> Path:
    """A local path to decode the video of a ``raw_videos`` row (any mapping with its fields).

    - ``source`` names the frozen copy (a path, or an ``s3://`` URL fetched once into the object cache through
      :func:`common.storage.local_media_path`);
    - a ``linked`` source (``ingest --link``) is re-hashed (cached while the file is unchanged) and must still match
      the row's ``id`` (or ``video_id``), else :class:`SourceChanged` names the file and both hashes;
    - rows written before sources were frozen have no ``source``: their landing ``path`` is used, as it was then.
    """
    from common.storage import local_media_path

    source = row.get("source") or row.get("path")
    if not source:
        raise ValueError(f"row names neither a source nor a path: {dict(row)!r}")
    if row.get("linked") and row.get("source"):
        expected = row.get("id") or row.get("video_id")
        if not expected:
            raise ValueError(f"linked source {source} has no recorded content hash (id) to check it against")
        return verify_linked(source, expected)
    return local_media_path(source)


__all__ = ["SOURCES", "SourceChanged", "SourceStore", "SourceUnreadable", "copy_hashing", "current_hash",
           "decodable_source", "freeze_file", "source_name", "verify_linked"]
