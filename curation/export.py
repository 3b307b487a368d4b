"""Clip files on demand: a dataset version exported as H.264 clip files plus the reference's ``opensora.csv``.

Curation keeps clips virtual (frame ranges of frozen sources); a file is made only where a file is the product.
``export_dataset`` encodes each clip the way the ``clips`` asset's ``encode_files`` would (same frames, size, rate
and encoder settings, so the same content-named file), one source per pool task, so a source is opened once for all
its clips and decoding starts at the keyframe before its first clip. Files already in ``media/clips/`` (made by an
earlier export or by ``encode_files``) are reused, never re-encoded. ``OUT/clips/`` gets hard links to them where the
file system allows (copies otherwise), and ``OUT/opensora.csv`` lists them with the dataset's columns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from common.files import atomic_file, copy_atomic

from curation.clip_plan import CutConfig, clip_id_for
from curation.cutting import cut_clips
from curation.datasets import CSV_COLUMNS
from curation.kept_frames import KeepFramesSpec
from curation.shots import Scene

EXPORT_COLUMNS = tuple(c for c in CSV_COLUMNS if c not in ("virtual", "linked"))


@dataclass(frozen=True)
class ExportJob:
    """Encoder settings of the export and the local folder the encoded files are written to."""

    clip_dir: str
    short_side: int | None = 720
    crf: int = 18
    preset: str = "veryfast"


def export_config(row: dict[str, Any], job: ExportJob, source_size: tuple[int, int]) -> CutConfig:
    """The cut settings that reproduce the clip ``row`` describes: its rate, and its size (a clip curated with a
    smaller cap than ``job.short_side`` keeps its own size: the file shows what training saw)."""
    own_short, source_short = min(row["width"], row["height"]), min(source_size)
    cap = job.short_side
    if own_short < min(source_short, cap or source_short):
        cap = own_short
    return CutConfig(min_seconds=None, max_seconds=None, target_fps=float(row["fps"]), short_side=cap,
                     crf=job.crf, preset=job.preset)


def file_id(row: dict[str, Any], cfg: CutConfig) -> str:
    """The content name of a clip's file: ``clip_id_for`` with the encoder settings (as ``encode_files`` names it)."""
    return clip_id_for(row["video_id"], int(row["start_frame"]), int(row["end_frame"]), cfg)


def export_source(job: ExportJob, rows: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """Encode the clips of one source (the rows share ``path``); returns (row id, local file, frames) per clip."""
    from curation.sources import decodable_source
    from curation.virtual_clips import frame_index

    first = rows[0]
    source = decodable_source({"source": first["path"], "video_id": first["video_id"], "linked": bool(first.get("linked"))})
    index = frame_index(source)
    by_config: dict[CutConfig, list[dict]] = {}
    for row in rows:
        by_config.setdefault(export_config(row, job, (index.width, index.height)), []).append(row)
    written = []
    for cfg, group in by_config.items():
        scenes = [Scene(r["video_id"], k, int(r["start_frame"]), int(r["end_frame"]), r["start_s"] or 0.0,
                        r["end_s"] or 0.0, float(index.fps)) for k, r in enumerate(group)]
        result = cut_clips(source, first["video_id"], scenes, job.clip_dir, cfg, KeepFramesSpec(enabled=False))
        by_range = {(c.start_frame, c.end_frame): c for c in result.clips}
        for row in group:
            clip = by_range.get((int(row["start_frame"]), int(row["end_frame"])))
            if clip is None:
                raise ValueError(f"clip {row['id']}: frames {row['start_frame']}..{row['end_frame']} of {row['path']} "
                                 "could not be encoded (the source ended early)")
            written.append((row["id"], clip.path, clip.num_frames))
    return written


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link where possible (no bytes copied), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and dst.stat().st_size == src.stat().st_size:
        return  # content-named: a file already exported under this name holds these frames
    copy_atomic(src, dst, suffix=".part", hardlink=True)


@dataclass
class ExportResult:
    csv: Path
    clips: int
    encoded: int  # clips encoded by this export (the rest were reused)
    failed: list[tuple[str, str]]  # (clip id, reason)


def export_dataset(
    rows: pl.DataFrame, out: str | os.PathLike, job: ExportJob, *, storage: Any, workers: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> ExportResult:
    """Export the dataset ``rows`` to ``out`` (see the module doc). ``storage`` is the lake's
    ``common.storage.Storage``: clip files are published to and reused from its ``media/clips/``.

    A clip that cannot be encoded (its source changed or is damaged) is reported in ``failed`` with the reason and
    left out of the CSV; every other clip is exported."""
    from functools import partial

    from common.storage import local_media_path
    from curation.pool import run_pool

    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    records = rows.to_dicts()
    target: dict[str, Path] = {}  # row id -> local file to export
    todo: dict[str, list[dict]] = {}  # source -> rows whose file is not in media yet
    for row in records:
        if not row.get("virtual"):
            target[row["id"]] = local_media_path(row["path"])  # already a clip file
            continue
        todo.setdefault(row["path"], []).append(row)
    # A file already published under its content name is reused: only what is missing is encoded.
    for source, group in list(todo.items()):
        remaining = []
        for row in group:
            known = _published(storage, row, job)
            if known is not None:
                target[row["id"]] = known
            else:
                remaining.append(row)
        todo[source] = remaining
    groups = [g for g in todo.values() if g]
    failed: list[tuple[str, str]] = []
    encoded = 0
    total = len(groups)

    def report(done: int, _total: int, group: list[dict], _outcome) -> None:
        if progress is not None:
            progress(done, total, group[0]["path"])

    for outcome in run_pool(partial(export_source, job), groups, workers=workers, progress=report,
                            preload=("curation.export", "curation.cutting", "av")):
        if not outcome.ok:
            failed.extend((r["id"], outcome.error.detail) for r in outcome.item)
            continue
        for clip_id, local, _frames in outcome.result:
            name = Path(local).name
            if storage.remote and not storage.exists(storage.url("media", "clips", name)):
                storage.put_file(local, "media", "clips", name)
            target[clip_id] = Path(local)
            encoded += 1

    lines = []
    for row in records:
        if row["id"] not in target:
            continue
        source_file = target[row["id"]]
        dst = out / "clips" / source_file.name
        link_or_copy(source_file, dst)
        lines.append({**{c: row.get(c) for c in EXPORT_COLUMNS}, "path": str(dst.resolve())})
    csv = out / "opensora.csv"
    with atomic_file(csv, suffix=".part") as tmp:
        pl.DataFrame(lines, schema={c: _dtype(rows, c) for c in EXPORT_COLUMNS}).write_csv(tmp)
    return ExportResult(csv=csv, clips=len(lines), encoded=encoded, failed=failed)


def _published(storage: Any, row: dict, job: ExportJob) -> Path | None:
    """The local path of the clip's file in ``media/clips/`` when it was made before, else None."""
    from curation.sources import decodable_source
    from curation.virtual_clips import frame_index

    source = decodable_source({"source": row["path"], "video_id": row["video_id"], "linked": bool(row.get("linked"))})
    index = frame_index(source)
    url = storage.url("media", "clips", f"{file_id(row, export_config(row, job, (index.width, index.height)))}.mp4")
    if not storage.exists(url):
        return None
    return storage.local_copy(url) if storage.remote else Path(url)


def _dtype(rows: pl.DataFrame, column: str):
    return rows.schema.get(column, pl.String) if column != "path" else pl.String


__all__ = ["EXPORT_COLUMNS", "ExportJob", "ExportResult", "export_dataset", "export_source", "link_or_copy"]
