"""Where things live: the local home, the data root and the one object-store layer over it.

- :func:`opensora_home`: the local root (``OPENSORA_HOME``, default ``./.opensora``): scratch space, the embedded
  Dagster instance, MLflow's default store, checkpoints, the object cache. Code asks this function, never the
  variable, so the default is written once.
- :func:`data_root`: the shared root of ``landing/``, ``media/`` and ``lake/`` (``OPENSORA_DATA_PATH``, default the
  home): a local folder or ``s3://bucket/prefix``.

:class:`Storage` gives a local and an S3 data root the same few operations, so assets never branch on where the data
lives except to decide whether a local copy is needed:

- ``url(*parts)``: a location under the root (a path for a local root, an ``s3://`` URL otherwise); ``..``, ``.``,
  empty and absolute parts are refused.
- ``exists``, ``list_dir`` (one level: ``(name, size, is_dir)``), ``files`` (recursive: ``(relative name, size)``),
  ``modified`` (newest modification time).
- ``put_file`` / ``put_dir``: publish local files under the root (on local disk a temp name renamed into place;
  on S3 a plain put, a folder's completeness marker last). Callers keep media immutable by checking ``exists`` first.
- ``local_copy(url)``: a local path to read. A local path is returned as it is; an ``s3://`` object or folder is
  downloaded once into ``$OPENSORA_HOME/cache/objects/``, keyed by URL, sizes and ETags (temp name, then rename), so
  a changed object gets a new copy and an unchanged one is never downloaded twice.
- ``remove(url)``: delete a file or a folder under the root.

:func:`local_media_path` does the same for one path from a table (a clip, a kept-frames folder) in any process,
torchrun workers included, reading the environment as the lakehouse does; :func:`local_dataset_version` for a dataset
version folder (``lake/datasets/<version>/``).

S3 goes through s3fs (:func:`s3_filesystem`: the standard ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for
S3-compatible stores). This module imports nothing of ours (see :mod:`common`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from common.files import atomic_dir, copy_atomic, publish, scratch_sibling

S3 = "s3://"
HOME_DEFAULT = ".opensora"


# ---- where things live -----------------------------------------------------------------------------------------
def opensora_home(home: str | os.PathLike | None = None) -> Path:
    """The local root, absolute: ``home`` when given, else ``$OPENSORA_HOME``, else ``./.opensora``."""
    return Path(home or os.environ.get("OPENSORA_HOME", HOME_DEFAULT)).expanduser().resolve()


def data_root(data_path: str | None = None, home: str | os.PathLike | None = None) -> str:
    """The shared data root: ``data_path`` when given, else ``$OPENSORA_DATA_PATH``, else the home. An absolute
    folder path or ``s3://bucket/prefix``; any other URL raises ValueError."""
    data = data_path or os.environ.get("OPENSORA_DATA_PATH") or str(opensora_home(home))
    if is_remote(data):
        return data
    if "://" in data:
        raise ValueError(f"OPENSORA_DATA_PATH must be a local folder or s3://bucket/prefix, got {data!r}")
    return str(Path(data).expanduser().resolve())


def s3_filesystem():
    """An s3fs filesystem from the standard AWS variables (path-style for S3-compatible endpoints)."""
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    return s3fs.S3FileSystem(
        key=os.environ.get("AWS_ACCESS_KEY_ID"), secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        token=os.environ.get("AWS_SESSION_TOKEN"), endpoint_url=endpoint,
        client_kwargs={"region_name": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")},
        config_kwargs={"s3": {"addressing_style": "path"}} if endpoint else None,
    )


def is_remote(path_or_url: str | os.PathLike) -> bool:
    return str(path_or_url).startswith(S3)


def rebase(path: str, old_root: str | os.PathLike, new_root: str | os.PathLike) -> str:
    """``path`` moved from under ``old_root`` to under ``new_root`` (unchanged when it is not under ``old_root``)."""
    old, new = str(old_root).rstrip("/"), str(new_root).rstrip("/")
    if path == old:
        return new
    if path.startswith(old + "/"):
        return new + path[len(old):]
    return path


def _join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel if rel else root


def _components(parts: tuple[str, ...]) -> list[str]:
    out = []
    for part in parts:
        text = os.fspath(part)
        if not isinstance(text, str) or text.startswith("/") or "\\" in text or "\0" in text or "://" in text:
            raise ValueError(f"storage path parts are relative names, got {part!r}")
        for component in text.split("/"):
            if component in ("", ".", ".."):
                raise ValueError(f"storage path parts may not contain empty, '.' or '..' components: {part!r}")
            out.append(component)
    return out


class Storage:
    """Files under the data root, local or on S3 (see the module docstring)."""

    def __init__(self, root: str, cache_dir: str | os.PathLike):
        self.root = root.rstrip("/") if is_remote(root) else str(Path(root).expanduser().resolve())
        self.cache_dir = Path(cache_dir)

    @classmethod
    def for_location(cls, location) -> "Storage":
        """The storage of a location (anything with ``data_root`` and ``home``, as ``resources.lakehouse.LakeLocation``),
        its object cache under that home."""
        return cls(location.data_root, Path(location.home) / "cache" / "objects")

    @classmethod
    def from_env(cls) -> "Storage":
        """The storage the environment describes (``OPENSORA_HOME``, ``OPENSORA_DATA_PATH``), as the lakehouse reads it."""
        return cls(data_root(), opensora_home() / "cache" / "objects")

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # ---- locations -------------------------------------------------------------------------------------------
    def url(self, *parts: str) -> str:
        """The location of ``parts`` under the root; refuses ``..``, ``.``, empty and absolute parts."""
        components = _components(parts)
        if self.remote:
            return "/".join([self.root, *components])
        return str(Path(self.root).joinpath(*components))

    def _inside(self, url: str) -> bool:
        return str(url).rstrip("/") == self.root or str(url).startswith(self.root + "/")

    @staticmethod
    def _fs():
        return s3_filesystem()

    @staticmethod
    def _key(url: str) -> str:
        return str(url)[len(S3):].rstrip("/")

    # ---- reading metadata ------------------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        if not is_remote(url):
            return os.path.lexists(url)
        fs = self._fs()
        fs.invalidate_cache()
        return bool(fs.exists(self._key(url)))

    def list_dir(self, url: str) -> list[tuple[str, int, bool]]:
        """``(name, size, is_dir)`` of the entries directly inside ``url``, sorted by name; empty when it is missing."""
        if not is_remote(url):
            try:
                with os.scandir(url) as entries:
                    found = [(e.name, 0 if e.is_dir() else e.stat().st_size, e.is_dir()) for e in entries]
            except (FileNotFoundError, NotADirectoryError):
                return []
            return sorted(found)
        fs = self._fs()
        fs.invalidate_cache()
        key = self._key(url)
        try:
            entries = fs.ls(key, detail=True)
        except FileNotFoundError:
            return []
        found = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["name"].rstrip("/") == key or not name:
                continue  # a "folder marker" object, or the prefix itself
            found[name] = (name, int(entry.get("size") or 0), entry.get("type") == "directory")
        return sorted(found.values())

    def _remote_files(self, url: str) -> list[tuple[str, int, str, float]]:
        """``(relative name, size, etag, mtime)`` of every object under the folder ``url``."""
        fs = self._fs()
        fs.invalidate_cache()
        prefix = self._key(url) + "/"
        try:
            found = fs.find(prefix, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for name, info in found.items():
            if not name.startswith(prefix) or info.get("type") == "directory" or name.endswith("/"):
                continue
            modified = info.get("LastModified")
            out.append((name[len(prefix):], int(info.get("size") or 0), str(info.get("ETag") or ""),
                        modified.timestamp() if hasattr(modified, "timestamp") else 0.0))
        return sorted(out)

    def files(self, url: str) -> list[tuple[str, int]]:
        """``(relative name, size)`` of every file under the folder ``url`` (recursively), sorted; empty when missing."""
        if is_remote(url):
            return [(name, size) for name, size, _etag, _mtime in self._remote_files(url)]
        root = Path(url)
        if not root.is_dir():
            return []
        out = []
        for folder, _dirs, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                try:
                    if path.is_file():
                        out.append((path.relative_to(root).as_posix(), path.stat().st_size))
                except OSError:  # vanished while listing (a copy in progress)
                    continue
        return sorted(out)

    def modified(self, url: str) -> float | None:
        """Modification time (epoch seconds): a local file's or folder's own; on S3 an object's, or the newest of a
        folder's objects. None when missing."""
        if not is_remote(url):
            try:
                return os.stat(url).st_mtime
            except FileNotFoundError:
                return None
        fs = self._fs()
        fs.invalidate_cache()
        try:
            info = fs.info(self._key(url))
        except FileNotFoundError:
            return None
        if info.get("type") != "directory":
            return info["LastModified"].timestamp()
        times = [mtime for _name, _size, _etag, mtime in self._remote_files(url)]
        return max(times) if times else None

    # ---- writing ---------------------------------------------------------------------------------------------
    def put_file(self, local_path: str | os.PathLike, *parts: str) -> str:
        """Publish one local file at ``url(*parts)``; returns that URL (local: temp name + rename, atomic)."""
        target = self.url(*parts)
        if self.remote:
            self._fs().put_file(str(local_path), self._key(target))
            return target
        dst = Path(target)
        dst.parent.mkdir(parents=True, exist_ok=True)
        copy_atomic(local_path, dst, suffix=".part")
        return target

    def put_dir(self, local_dir: str | os.PathLike, *parts: str, last: str | None = None) -> str:
        """Publish a local folder at ``url(*parts)``; returns that URL.

        Local: copied under a temp name and renamed into place (a folder already there is left as it is). S3: one put
        per file, the file named ``last`` (a completeness marker such as a manifest) after all the others."""
        source = Path(local_dir)
        target = self.url(*parts)
        if not self.remote:
            dst = Path(target)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with atomic_dir(dst, exists="keep", suffix=".part") as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
            return target
        files = sorted((p for p in source.rglob("*") if p.is_file()), key=lambda p: (p.relative_to(source).as_posix() == last,
                                                                                     p.relative_to(source).as_posix()))
        fs = self._fs()
        for path in files:
            fs.put_file(str(path), self._key(_join(target, path.relative_to(source).as_posix())))
        return target

    def remove(self, url: str) -> None:
        """Delete a file or a folder (recursively) under the root; anything outside the root is refused."""
        if not self._inside(url) or str(url).rstrip("/") == self.root:
            raise ValueError(f"refusing to remove {url}: not inside the data root {self.root}")
        if not self.remote:
            path = Path(url)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            return
        fs = self._fs()
        fs.invalidate_cache()
        key = self._key(url)
        if self._remote_files(url):
            fs.rm(key + "/", recursive=True)
        elif fs.exists(key):
            fs.rm_file(key)
        fs.invalidate_cache()

    # ---- reading content -------------------------------------------------------------------------------------
    def local_copy(self, url: str | os.PathLike) -> Path:
        """A local path holding ``url``: the path itself when it is local; for ``s3://`` a cached download of the
        object, or of every object under the folder prefix (same base name, so suffixes survive)."""
        if not is_remote(url):
            return Path(url)
        url = str(url).rstrip("/")
        fs = self._fs()
        fs.invalidate_cache()
        key = self._key(url)
        try:
            info = fs.info(key)
        except FileNotFoundError:
            info = {"type": "directory"}
        if info.get("type") == "directory":
            entries = [(name, size, etag) for name, size, etag, _mtime in self._remote_files(url)]
            if not entries:
                raise FileNotFoundError(f"{url} does not exist (no object and no folder of that name)")
        else:
            entries = [("", int(info.get("size") or 0), str(info.get("ETag") or ""))]
        digest = hashlib.sha256(json.dumps([url, entries]).encode()).hexdigest()[:32]
        target = self.cache_dir / digest / url.rsplit("/", 1)[-1]
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with scratch_sibling(target, ".part") as tmp:
            if entries[0][0] == "":
                fs.get_file(key, str(tmp))
            else:
                for name, _size, _etag in entries:
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(f"{key}/{name}", str(tmp / name))
            publish(tmp, target, exists="keep")  # same key, same bytes: a copy another process published first wins
        return target


# ---- one path from a table, in any process ---------------------------------------------------------------------
_MEDIA: dict[str, Path] = {}
_MEDIA_LOCK = threading.Lock()


def local_media_path(path_or_url: str | os.PathLike) -> Path:
    """A local path to read a media file or kept-frames folder named in a table.

    Local paths are returned as they are. ``s3://`` media are immutable, so each is copied into the object cache
    (``$OPENSORA_HOME/cache/objects``) once and remembered for the life of the process: training workers resolve
    each clip with one look-up, not one per sample."""
    text = os.fspath(path_or_url)
    if not is_remote(text):
        return Path(text)
    with _MEDIA_LOCK:
        known = _MEDIA.get(text)
    if known is not None and known.exists():
        return known
    path = Storage.from_env().local_copy(text)
    with _MEDIA_LOCK:
        _MEDIA[text] = path
    return path


# ---- dataset versions ------------------------------------------------------------------------------------------
DATASETS = ("lake", "datasets")  # where dataset versions live under the data root: lake/datasets/<version>/


def local_dataset_version(lakehouse: Any, version: str) -> Path:
    """A local folder holding dataset version ``version`` (``lake/datasets/<version>/``) of ``lakehouse.storage``:
    the folder itself on a local data path, a cached copy from the object store otherwise."""
    storage = lakehouse.storage
    url = storage.url(*DATASETS, version)
    if not storage.remote:
        return Path(url)
    return storage.local_copy(url)
