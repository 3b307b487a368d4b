"""Batch keys: the ``video_batches`` partition keys, and the mapping from landing folders to them.

A key is a name, never a path. Every key that enters the system (the command line, the landing sensor, a
partition added in the Dagster UI) is checked by :func:`validate_batch_key` before anything is read, written or
deleted for it: letters, digits and ``_ . -`` only, no leading dot, no ``..``, at most 120 characters.

Landing folders may be named anything ("Été 2024 clips"), so a folder is not its key: :func:`register_landing_folder`
maps each folder name to a key and stores the mapping in the ``landing_batches`` table (columns ``key, folder,
registered_at``, one partition per key), and assets find a batch's files with :func:`landing_folder`.

Plain library code: no Dagster import here, so the CLI, the sensor, the assets and the tests share it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MAX_KEY_LENGTH = 120
LANDING_TABLE = "landing_batches"

_ALLOWED = re.compile(r"[A-Za-z0-9_.\-]+")
_NOT_ALLOWED_RUN = re.compile(r"[^A-Za-z0-9_.\-]+")
_DOTS = re.compile(r"\.{2,}")
_HASH_CHARS = 8


class InvalidBatchKey(ValueError):
    """A partition key (or a folder name) that cannot be used as a ``video_batches`` key."""


def validate_batch_key(key: str) -> str:
    """Return ``key`` unchanged if it is a valid batch key; raise :class:`InvalidBatchKey` naming the rule otherwise."""
    if not isinstance(key, str):
        raise InvalidBatchKey(f"invalid batch key {key!r}: a batch key must be a string, got {type(key).__name__}")
    rule = None
    if not key:
        rule = "a batch key must not be empty"
    elif len(key) > MAX_KEY_LENGTH:
        rule = f"a batch key has at most {MAX_KEY_LENGTH} characters (this one has {len(key)})"
    elif not _ALLOWED.fullmatch(key):
        bad = sorted({c for c in key if not _ALLOWED.fullmatch(c)})
        rule = f"a batch key may contain only letters A-Z a-z, digits, '_', '.' and '-' (found {''.join(bad)!r})"
    elif key.startswith("."):
        rule = "a batch key must not start with '.'"
    elif ".." in key:
        rule = "a batch key must not contain '..'"
    if rule is not None:
        raise InvalidBatchKey(f"invalid batch key {key!r}: {rule}; batch keys are names, never paths")
    return key


def is_valid_batch_key(key: str) -> bool:
    try:
        validate_batch_key(key)
    except InvalidBatchKey:
        return False
    return True


def batch_key(key: str) -> str:
    """The validated partition key of an asset run (pass ``context.partition_key``); raises InvalidBatchKey."""
    return validate_batch_key(key)


def _check_folder_name(folder_name: str) -> None:
    """A landing folder name must be one path component of real text."""
    if not isinstance(folder_name, str) or not folder_name.strip():
        raise InvalidBatchKey(f"cannot map landing folder {folder_name!r} to a batch key: empty name")
    if folder_name in (".", "..") or "/" in folder_name or "\\" in folder_name or "\0" in folder_name:
        raise InvalidBatchKey(f"cannot map landing folder {folder_name!r} to a batch key: not a single folder name")
    try:
        folder_name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidBatchKey(
            f"cannot map landing folder {folder_name!r} to a batch key: its name is not valid UTF-8 text; rename the folder"
        ) from None


def _slug(folder_name: str) -> str:
    """ASCII letters, digits and ``_ . -`` from a folder name (accents folded, anything else becomes ``_``)."""
    decomposed = unicodedata.normalize("NFKD", folder_name)
    folded = "".join(c for c in decomposed if not unicodedata.combining(c))
    slug = _NOT_ALLOWED_RUN.sub("_", folded)
    slug = _DOTS.sub(".", slug)
    return slug.strip("._-")


def _folder_hash(folder_name: str) -> str:
    return hashlib.sha256(folder_name.encode("utf-8")).hexdigest()[:_HASH_CHARS]


def key_for_folder(folder_name: str, taken: Mapping[str, str]) -> str:
    """The batch key of a landing folder, given ``taken`` (existing key -> folder name).

    A folder that already has a key keeps it. A folder whose name is a valid, free key uses its name. Any other
    folder gets an ASCII slug of its name plus ``-`` and 8 hex characters of a hash of the exact name, so
    "été 2024" and "ete 2024" get different keys and the same folder always gets the same key.
    Raises :class:`InvalidBatchKey` when no free key can be made.
    """
    _check_folder_name(folder_name)
    own = sorted(k for k, folder in taken.items() if folder == folder_name and is_valid_batch_key(k))
    if own:
        return own[0]
    if is_valid_batch_key(folder_name) and folder_name not in taken:
        return folder_name
    suffix = f"-{_folder_hash(folder_name)}"
    slug = (_slug(folder_name) or "batch")[: MAX_KEY_LENGTH - len(suffix)].rstrip(".")
    key = f"{slug}{suffix}"
    try:
        validate_batch_key(key)
    except InvalidBatchKey as err:  # cannot happen with the rules above; kept as the last line of defence
        raise InvalidBatchKey(f"cannot map landing folder {folder_name!r} to a batch key: {err}") from None
    if key in taken:
        raise InvalidBatchKey(
            f"cannot map landing folder {folder_name!r} to a batch key: {key!r} already belongs to folder "
            f"{taken[key]!r}; rename one of the folders"
        )
    return key


# ---- the landing mapping, stored in the lakehouse ----------------------------------------------------------------
def read_landing_map(lakehouse: Any) -> dict[str, str]:
    """Every registered landing folder: key -> folder name (empty when nothing is registered)."""
    frame = lakehouse.read_table(LANDING_TABLE)
    if frame is None or frame.is_empty() or not {"key", "folder"} <= set(frame.columns):
        return {}
    if "registered_at" in frame.columns:
        frame = frame.sort("registered_at", nulls_last=False)
    return {str(k): str(f) for k, f in frame.select("key", "folder").iter_rows() if k is not None and f is not None}


def register_landing_folder(lakehouse: Any, folder_name: str) -> str:
    """Map a landing folder (a name directly under ``landing/``, local or on S3) to its batch key, stored; returns the key.

    Idempotent: a folder already registered returns its key without writing. Each key is its own partition of
    ``landing_batches``, so registrations of different folders never touch the same file.
    """
    import polars as pl

    taken = read_landing_map(lakehouse)
    key = key_for_folder(folder_name, taken)
    if taken.get(key) == folder_name:
        return key
    frame = pl.DataFrame(
        {"key": [key], "folder": [folder_name], "registered_at": [datetime.now(timezone.utc)]},
        schema={"key": pl.String, "folder": pl.String, "registered_at": pl.Datetime("us", "UTC")},
    )
    lakehouse.write_partition(LANDING_TABLE, key, frame)
    return key


def _landing_name(lakehouse: Any, key: str, folder_exists) -> str:
    """The landing folder name of batch ``key`` (through the mapping; see :func:`landing_folder`)."""
    validate_batch_key(key)
    mapping = read_landing_map(lakehouse)
    if key in mapping:
        name = mapping[key]
    else:
        owners = sorted(k for k, folder in mapping.items() if folder == key)
        if owners:
            raise FileNotFoundError(
                f"batch {key!r} has no landing folder: folder {key!r} is registered as batch {owners[0]!r}"
            )
        found, where = folder_exists(key)
        if not found:
            raise FileNotFoundError(f"batch {key!r} has no landing folder (expected {where})")
        name = key
    try:
        _check_folder_name(name)
    except InvalidBatchKey as err:
        raise InvalidBatchKey(f"batch {key!r} maps to an unusable landing folder: {err}") from None
    return name


def landing_folder_url(lakehouse: Any, key: str) -> str:
    """Where batch ``key``'s landing folder lives: the resolved local folder (as :func:`landing_folder`), or its
    ``s3://`` URL when the data path is on S3. Paths recorded for the batch's videos are under it."""
    storage = lakehouse.storage
    if not storage.remote:
        return str(landing_folder(lakehouse, key))

    def exists(name: str) -> tuple[bool, str]:
        url = storage.url("landing", name)
        return bool(storage.files(url)), url

    return storage.url("landing", _landing_name(lakehouse, key, exists))


def landing_folder(lakehouse: Any, key: str) -> Path:
    """The landing folder of batch ``key`` as a local folder: found through the mapping, always a direct child of
    ``landing/``. With the data path on S3 it is a cached local copy of ``landing/<folder>/`` (see
    :meth:`common.storage.Storage.local_copy`); locally it is the folder itself.

    A key with no mapping falls back to ``landing/<key>`` only when that folder exists and is not registered
    under another key. Raises :class:`InvalidBatchKey` for a bad key or a mapping that leads outside the landing
    folder, and :class:`FileNotFoundError` when the batch has no landing folder.
    """
    storage = lakehouse.storage
    if storage.remote:
        return storage.local_copy(landing_folder_url(lakehouse, key))
    validate_batch_key(key)
    landing = Path(lakehouse.landing_dir).resolve()
    name = _landing_name(lakehouse, key, lambda k: ((landing / k).is_dir(), landing / k))
    resolved = (landing / name).resolve()
    if resolved.parent != landing:
        raise InvalidBatchKey(
            f"batch {key!r} maps to {landing / name}, which resolves to {resolved}: not a folder directly inside "
            f"{landing}; refusing to use it"
        )
    return resolved
