"""Land and scan a batch: copy (or link) a folder into the landing zone, then probe every file, keep one row per
distinct video and quarantine the rest with reasons.

Landing is crash-safe: every file is written under a hidden temporary name and renamed into place, so a full disk
or Ctrl-C never leaves a truncated file under the real name, and a re-run replaces any copy whose size or content
differs from its source. Links made by ``ingest --link`` are recorded in ``.opensora-links.json`` in the landing
folder; scanning follows only those and links that stay inside the folder, and quarantines any other link.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl

import common.files as atomic

from curation.probe import VIDEO_EXTENSIONS, ProbeError, VideoInfo, content_hash, landing_path, probe_video

# Written by ``land_files(..., link=True)`` in the landing folder: {"links": {"<relative posix path>": "<target>"}}.
LINKS_MANIFEST = ".opensora-links.json"
# Suffix of the hidden temporary names files are written under before the rename (leftovers are swept).
TMP_SUFFIX = ".ingest-tmp"
STALE_TMP_SECONDS = 3600

SIDECAR_EXTENSIONS = {".txt", ".csv", ".json", ".jsonl", ".srt", ".vtt", ".md"}

RAW_VIDEO_SCHEMA = {
    "id": pl.String,
    "path": pl.String,
    "size": pl.Int64,
    "codec": pl.String,
    "fps": pl.Float64,
    "num_frames": pl.Int64,
    "height": pl.Int64,
    "width": pl.Int64,
    "aspect_ratio": pl.Float64,
    "resolution": pl.Int64,
    "duration": pl.Float64,
    "bitrate": pl.Int64,
    # Where every decoder reads the video (curation.sources.decodable_source): the frozen copy under
    # media/sources/ (a path, or an s3:// URL), or for ``ingest --link`` the resolved file referenced in place.
    # Null when the scan froze nothing (library use without ``freeze``): decoders then read ``path``.
    "source": pl.String,
    "linked": pl.Boolean,  # source is referenced in place: its hash (the id) is checked before every decode
}
QUARANTINE_SCHEMA = {"path": pl.String, "stage": pl.String, "reason": pl.String}


@dataclass
class BatchFiles:
    """What a landing folder holds: the files to use, and the links that may not be followed, with the reason."""

    files: list[Path] = field(default_factory=list)  # regular files and allowed links, sorted
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # (link, reason), sorted


def read_link_manifest(batch_dir: Path) -> dict[str, str]:
    """The links ``ingest --link`` made in ``batch_dir``: relative POSIX path -> the file it was made to point at."""
    try:
        data = json.loads((Path(batch_dir) / LINKS_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none, or unreadable: no link leaving the folder is trusted
    links = data.get("links") if isinstance(data, dict) else None
    if not isinstance(links, dict):
        return {}
    return {k: v for k, v in links.items() if isinstance(k, str) and isinstance(v, str)}


def _link_problem(link: Path, root: Path, real_root: str, manifest: dict[str, str]) -> str | None:
    """Why ``link`` may not be followed, or None when it stays inside the folder or was made by ``ingest --link``."""
    target = os.path.realpath(link)
    if not os.path.exists(link):
        return f"broken symbolic link (to {os.readlink(link)})"
    if target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep):
        return None
    recorded = manifest.get(link.relative_to(root).as_posix())
    if recorded is not None and os.path.realpath(recorded) == target:
        return None
    kind = "folder" if os.path.isdir(target) else "file"
    return (f"symbolic link to the {kind} {target}, outside the landing folder "
            f"(only links made by `opensora-dag ingest --link` may leave it)")


def walk_batch(batch_dir: Path) -> BatchFiles:
    """Every non-hidden file under the batch folder, in a stable order, with the links that may not be followed.

    A symbolic link is followed when its target lies inside the folder or when ``ingest --link`` recorded it in
    ``.opensora-links.json`` (and it still points where it was made to); any other link, and a broken one, is
    rejected with the reason. Links to folders are never descended into (a folder inside is listed where it is).
    """
    root = Path(batch_dir)
    real_root = os.path.realpath(root)
    manifest = read_link_manifest(root)
    found = BatchFiles()
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            if folder == root:
                raise
            found.rejected.append((folder, f"folder cannot be listed: {err.strerror or err}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                problem = _link_problem(path, root, real_root, manifest)
                if problem is not None:
                    found.rejected.append((path, problem))
                elif path.is_file():
                    found.files.append(path)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(path)
            elif entry.is_file(follow_symlinks=False):
                found.files.append(path)
    found.files.sort()
    found.rejected.sort()
    return found


def list_batch_files(batch_dir: Path) -> list[Path]:
    """Every regular, non-hidden file under the batch folder that may be read, in a stable order (see walk_batch)."""
    return walk_batch(batch_dir).files


# ---- landing files (``opensora-dag ingest``) -------------------------------------------------------------------


@dataclass
class LandReport:
    copied: list[Path] = field(default_factory=list)
    linked: list[Path] = field(default_factory=list)
    replaced: list[Path] = field(default_factory=list)  # already there, but not the source's bytes (or link)
    kept: list[Path] = field(default_factory=list)  # already there and identical to the source


def same_content(a: Path, b: Path) -> bool:
    """Both files hold the same bytes: equal sizes, then equal hashes."""
    return os.path.getsize(a) == os.path.getsize(b) and content_hash(a) == content_hash(b)


# Landing writes go through common.files under hidden *.ingest-tmp names, which _sweep_stale_temporaries recognises;
# a full disk or Ctrl-C leaves the real name with what it had.
def copy_atomic(source: Path, dest: Path) -> None:
    """``shutil.copy2`` through a temporary name: ``dest`` is either absent, its old content, or a complete copy
    (its bytes on disk before the name points at them)."""
    atomic.copy_atomic(source, dest, suffix=TMP_SUFFIX, fsync=True, copy_stat=True)


def link_atomic(source: Path, dest: Path) -> None:
    with atomic.atomic_file(dest, suffix=TMP_SUFFIX) as tmp:
        tmp.symlink_to(source)


def _write_link_manifest(target: Path, links: dict[str, str]) -> None:
    path = target / LINKS_MANIFEST
    if not links and not path.exists():
        return
    text = json.dumps({"links": dict(sorted(links.items()))}, indent=1, ensure_ascii=False) + "\n"
    atomic.write_text_atomic(path, text, suffix=TMP_SUFFIX)


def _sweep_stale_temporaries(target: Path) -> None:
    """Remove temporaries a killed ingest left behind (hidden, never scanned; only disk space)."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for tmp in target.rglob(f".*{TMP_SUFFIX}"):
        try:
            if tmp.is_file() and tmp.lstat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:
            pass


def land_files(source: Path, target: Path, *, link: bool = False) -> LandReport:
    """Copy (or, with ``link``, symlink) every file under ``source`` to the same place under ``target``.

    Each file is written under a temporary name and renamed, so an interrupted run never leaves a truncated file
    under the real name. A file already there is kept when it has the source's bytes (or already links to it) and
    replaced otherwise. Links are recorded in ``target/.opensora-links.json``, which is what lets a scan follow
    them out of the landing folder.
    """
    source, target = Path(source).resolve(), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temporaries(target)
    links = read_link_manifest(target)
    report = LandReport()
    for item in sorted(source.rglob("*")):
        if not item.is_file() or item.name == LINKS_MANIFEST or item.name.endswith(TMP_SUFFIX):
            continue
        rel = item.relative_to(source)
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        key = rel.as_posix()
        existed = dest.exists() or dest.is_symlink()
        if dest.is_symlink() and os.path.realpath(dest) == os.path.realpath(item):
            links[key] = str(item)  # an earlier --link, still pointing at the source
            report.kept.append(dest)
            continue
        if not dest.is_symlink() and dest.is_file() and same_content(dest, item):
            links.pop(key, None)
            report.kept.append(dest)
            continue
        if link:
            link_atomic(item, dest)
            links[key] = str(item)
            (report.replaced if existed else report.linked).append(dest)
        else:
            copy_atomic(item, dest)
            links.pop(key, None)
            (report.replaced if existed else report.copied).append(dest)
    # Forget recorded links that are no longer links (replaced by hand, deleted).
    links = {k: v for k, v in links.items() if (target / k).is_symlink()}
    _write_link_manifest(target, links)
    return report


@dataclass
class BatchScan:
    videos: pl.DataFrame  # RAW_VIDEO_SCHEMA, one row per distinct video
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA
    sidecars: list[Path]


def linked_target(path: Path, batch_dir: Path, manifest: dict[str, str]) -> str | None:
    """The resolved file a link made by ``ingest --link`` points at (it is used in place), else None."""
    if not path.is_symlink():
        return None
    try:
        recorded = manifest.get(path.relative_to(batch_dir).as_posix())
    except ValueError:
        return None
    target = os.path.realpath(path)
    return target if recorded is not None and os.path.realpath(recorded) == target else None


def probe_reason(err: BaseException) -> str:
    """The quarantine reason of a file ``probe_video`` failed on."""
    return str(err) if isinstance(err, ProbeError) else f"probe failed: {type(err).__name__}: {err}"


def probe_each(paths: list[Path]) -> list[VideoInfo | str]:
    """``probe_video`` of each path in this process: its ``VideoInfo`` or the quarantine reason."""
    results: list[VideoInfo | str] = []
    for path in paths:
        try:
            results.append(probe_video(path))
        except Exception as err:  # ProbeError carries its reason; anything else still concerns this file only
            results.append(probe_reason(err))
    return results


def scan_batch(batch_dir: Path, progress: Callable[[str], None] | None = None,
               freeze: Callable[[Path, str], str] | None = None,
               probe: Callable[[list[Path]], list[VideoInfo | str]] | None = None) -> BatchScan:
    """Probe the files of one landing folder.

    Sidecars (captions, notes) are listed, not probed. Files with a video extension that do not decode (for any
    reason: every exception while probing one file is that file's quarantine reason), files of unknown types and
    links that leave the folder (see :func:`walk_batch`) go to quarantine with the reason, recorded where they
    lie in the folder; byte-identical copies keep the first path (in sorted order) and the others are quarantined
    as duplicates, so nothing is lost silently.

    ``freeze(path, video_id) -> source`` (a :class:`curation.sources.SourceStore`) makes each distinct video's bytes
    immutable media; its result is the row's ``source``. A file that changed between probing and freezing is
    quarantined (an input rejection); a failure to write the copy (full disk) fails the scan. Files linked by
    ``ingest --link`` are never copied: their ``source`` is the link's resolved target and ``linked`` is true.
    Without ``freeze`` other files get no ``source`` (decoders read ``path``).

    ``probe(paths)`` returns each file's ``VideoInfo`` or quarantine reason, in order: the ``raw_videos`` asset
    probes in worker processes, so a file that crashes the demuxer costs only itself; default :func:`probe_each`.
    """
    from curation.errors import InputRejected

    batch_dir = Path(batch_dir)
    if not batch_dir.is_dir():
        raise FileNotFoundError(f"landing folder {batch_dir} does not exist")
    listing = walk_batch(batch_dir)
    manifest = read_link_manifest(batch_dir)
    files = listing.files
    sidecars = [p for p in files if p.suffix.lower() in SIDECAR_EXTENSIONS]
    candidates = [p for p in files if p not in sidecars]

    rows: dict[str, dict] = {}
    quarantined: list[dict] = [{"path": landing_path(p), "stage": "raw_videos", "reason": reason} for p, reason in listing.rejected]
    videos_found = [p for p in candidates if p.suffix.lower() in VIDEO_EXTENSIONS]
    probed = dict(zip(videos_found, probe(videos_found) if probe is not None else probe_each(videos_found), strict=True))
    for done, path in enumerate(candidates, start=1):  # sorted order: the first copy of a video wins
        info = probed.get(path, f"unsupported file type {path.suffix or '(none)'!r}")
        if progress:
            progress(f"probed {done}/{len(candidates)}: {path.name}")
        if isinstance(info, str):
            quarantined.append({"path": landing_path(path), "stage": "raw_videos", "reason": info})
        elif info.id in rows:
            first = rows[info.id]["path"]
            quarantined.append({"path": info.path, "stage": "raw_videos", "reason": f"byte-identical duplicate of {first}"})
        else:
            target = linked_target(path, batch_dir, manifest)
            try:
                source = target if target is not None else (freeze(path, info.id) if freeze else None)
            except InputRejected as err:  # edited or removed while we were reading it
                quarantined.append({"path": info.path, "stage": "raw_videos", "reason": str(err)})
            else:
                rows[info.id] = {**info.to_row(), "source": source, "linked": target is not None}

    videos = pl.DataFrame(list(rows.values()), schema=RAW_VIDEO_SCHEMA)
    quarantine = pl.DataFrame(quarantined, schema=QUARANTINE_SCHEMA)
    return BatchScan(videos=videos, quarantine=quarantine, sidecars=sidecars)
