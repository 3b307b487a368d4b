"""Scan a landing batch: probe every file, keep one row per distinct video, quarantine the rest with reasons."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from curation.probe import VIDEO_EXTENSIONS, ProbeError, probe_video

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
}
QUARANTINE_SCHEMA = {"path": pl.String, "stage": pl.String, "reason": pl.String}


@dataclass
class BatchScan:
    videos: pl.DataFrame  # RAW_VIDEO_SCHEMA, one row per distinct video
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA
    sidecars: list[Path]


def list_batch_files(batch_dir: Path) -> list[Path]:
    """Every regular, non-hidden file under the batch folder, in a stable order."""
    return sorted(
        p for p in Path(batch_dir).rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(batch_dir).parts)
    )


def scan_batch(batch_dir: Path, progress: Callable[[str], None] | None = None) -> BatchScan:
    """Probe the files of one landing folder.

    Sidecars (captions, notes) are listed, not probed. Files with a video extension that do not decode, and
    files of unknown types, go to quarantine with the reason; byte-identical copies keep the first path (in
    sorted order) and the others are quarantined as duplicates, so nothing is lost silently.
    """
    batch_dir = Path(batch_dir)
    if not batch_dir.is_dir():
        raise FileNotFoundError(f"landing folder {batch_dir} does not exist")
    files = list_batch_files(batch_dir)
    sidecars = [p for p in files if p.suffix.lower() in SIDECAR_EXTENSIONS]
    candidates = [p for p in files if p not in sidecars]

    rows: dict[str, dict] = {}
    quarantined: list[dict] = []
    for done, path in enumerate(candidates, start=1):
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            quarantined.append({"path": str(path.resolve()), "stage": "raw_videos", "reason": f"unsupported file type {path.suffix or '(none)'!r}"})
        else:
            try:
                info = probe_video(path)
            except ProbeError as err:
                quarantined.append({"path": str(path.resolve()), "stage": "raw_videos", "reason": str(err)})
            else:
                if info.id in rows:
                    first = rows[info.id]["path"]
                    quarantined.append({"path": info.path, "stage": "raw_videos", "reason": f"byte-identical duplicate of {first}"})
                else:
                    rows[info.id] = info.to_row()
        if progress:
            progress(f"probed {done}/{len(candidates)}: {path.name}")

    videos = pl.DataFrame(list(rows.values()), schema=RAW_VIDEO_SCHEMA)
    quarantine = pl.DataFrame(quarantined, schema=QUARANTINE_SCHEMA)
    return BatchScan(videos=videos, quarantine=quarantine, sidecars=sidecars)
