"""Lake maintenance: giving space back (gc), giving up dataset versions (retire), importing the previous layout.

Nothing here runs inside a materialization: media are immutable and snapshots accumulate until a person (or a
schedule they set up) runs ``opensora-dag lake gc``. gc never expires a snapshot that a live dataset version pins,
never touches media that any remaining snapshot or live version references, and leaves media younger than its cutoff
alone (a running materialization may be writing them before it commits).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl

from common.files import atomic_dir, copy_atomic
from resources.lakehouse import IMPORT_MARKER, PARTITIONS_TABLE, UNPARTITIONED, Lakehouse, shared_connection

DATASET_VERSIONS = "dataset_versions"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``0s``, ``2w``."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use a number and one of s, m, h, d, w: 7d, 12h, 0s)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


# ---- gc -----------------------------------------------------------------------------------------------------------
# Folders under media/ that gc sweeps, and the table columns that keep their entries alive. Sources follow the
# clips' rule: frozen copies (media/sources/<id><ext>) stay while a raw_videos row of any retained or pinned
# snapshot names them; linked sources lie outside media/ and are never touched.
MEDIA_KINDS = ("clips", "frames", "sources")
MEDIA_COLUMNS = {"clips": ("path", "frames_dir"), "raw_videos": ("source",)}

@dataclass
class GcReport:
    dry_run: bool
    expired_snapshots: list[int] = field(default_factory=list)
    pinned_snapshots: list[int] = field(default_factory=list)
    removed_media: list[str] = field(default_factory=list)
    kept_media: int = 0

    def summary(self) -> str:
        verb = "would expire" if self.dry_run else "expired"
        gone = "would remove" if self.dry_run else "removed"
        return (f"{verb} {len(self.expired_snapshots)} snapshot(s) {self.expired_snapshots[:20]}; "
                f"kept pinned {self.pinned_snapshots}; {gone} {len(self.removed_media)} media item(s); "
                f"{self.kept_media} referenced media item(s) kept")


def live_dataset_versions(lake: Lakehouse) -> pl.DataFrame:
    versions = lake.read_table(DATASET_VERSIONS)
    if not len(versions):
        return versions
    return versions.filter(~pl.col("retired").fill_null(False))


def gc(lake: Lakehouse, older_than: timedelta, dry_run: bool = False) -> GcReport:
    cutoff = datetime.now(timezone.utc) - older_than
    live = live_dataset_versions(lake)
    pinned = sorted({int(s) for s in live["lake_snapshot"].drop_nulls().to_list()}) if len(live) else []
    snapshots = lake.snapshots()
    current = int(snapshots["snapshot_id"].max())
    expire = [
        int(row["snapshot_id"]) for row in snapshots.iter_rows(named=True)
        if row["time"] < cutoff and row["snapshot_id"] not in pinned and row["snapshot_id"] != current
    ]
    report = GcReport(dry_run, expire, pinned)
    if expire and not dry_run:
        with lake.connect() as con:
            ids = ", ".join(str(i) for i in expire)
            con.execute(f"CALL ducklake_expire_snapshots('lake', versions => [{ids}])")
            con.execute("CALL ducklake_cleanup_old_files('lake', cleanup_all => true)")

    referenced = _referenced_media(lake, snapshots, [s for s in snapshots["snapshot_id"].to_list() if s not in expire], live)
    storage = lake.storage  # media/ on local disk or on an object store: the same rules
    for kind in MEDIA_KINDS:
        for name, _size, _is_dir in storage.list_dir(storage.url("media", kind)):
            if name.startswith("."):
                continue
            item = storage.url("media", kind, name)
            modified = storage.modified(item)
            if item in referenced or modified is None or modified > cutoff.timestamp():
                report.kept_media += 1
                continue
            report.removed_media.append(item)
            if not dry_run:
                storage.remove(item)
    return report


def _table_states(table: str, snapshots: pl.DataFrame, remaining: list[int]) -> list[int]:
    """Remaining snapshots at which to read ``table`` so that every state of it a remaining snapshot sees is read.

    A snapshot sees the table as its last write at or before it left it; that write may itself be expired (its rows
    live on in the later snapshots). ``snapshots`` is the listing from before any expiry, so those writes are still
    known. A snapshot that does not say what it wrote counts as a write of every table (read once more, never less).
    """
    keep = set(remaining)
    last_write, first_seen = None, {}
    for snapshot, tables in sorted(zip(snapshots["snapshot_id"].to_list(), snapshots["table"].to_list())):
        if not tables or table in tables.split(","):
            last_write = snapshot
        if snapshot in keep:
            first_seen.setdefault(last_write, snapshot)
    return sorted(first_seen.values())


def _referenced_media(lake: Lakehouse, snapshots: pl.DataFrame, remaining: list[int], live: pl.DataFrame) -> set[str]:
    """Media named at any remaining snapshot (clip files and kept-frame folders by ``clips``, frozen sources by
    ``raw_videos``) or by a live dataset version's rows."""
    paths: set[str] = set()
    for table, columns in MEDIA_COLUMNS.items():
        for snapshot in _table_states(table, snapshots, remaining):
            frame = lake.read_table(table, snapshot=snapshot)
            for column in columns:
                if column in frame.columns:
                    paths.update(frame[column].drop_nulls().to_list())
    storage = lake.storage
    for path in live["path"].to_list() if len(live) else []:
        try:
            data = storage.local_copy(f"{str(path).rstrip('/')}/data.parquet")
        except FileNotFoundError:
            continue
        if data.is_file():
            names = pl.read_parquet_schema(data)
            columns = [c for c in ("path", "frames_dir", "source") if c in names]  # source: clips read from it
            frame = pl.read_parquet(data, columns=columns)
            for column in columns:
                paths.update(frame[column].drop_nulls().cast(pl.String).to_list())
    return paths


def retire(lake: Lakehouse, version: str) -> int:
    versions = lake.read_table(DATASET_VERSIONS)
    row = versions.filter(pl.col("version") == version) if len(versions) else versions
    if not len(row):
        raise ValueError(f"no dataset version {version!r} in the lake")
    return lake.write_partition(DATASET_VERSIONS, None, row.with_columns(pl.lit(True).alias("retired")),
                                key={"version": version})


# ---- import of the previous layout -----------------------------------------------------------------------------
@dataclass
class ImportReport:
    partitions: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    media: int = 0
    versions: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"imported {len(self.partitions)} partition(s), {self.media} media item(s), "
                f"{len(self.versions)} dataset version(s); {len(self.skipped)} already present")


def import_legacy(lake: Lakehouse, old_home: Path) -> ImportReport:
    """Copy a lake written by the previous layout (``lake/<table>/<partition>.parquet``, ``lake/datasets/<v>/``,
    ``media/clips/<batch>/``) into the catalog. Copies, never moves; a second run changes nothing."""
    old_home = old_home.expanduser().resolve()
    old_lake = old_home / "lake"
    if not (old_home / "catalog.duckdb").exists() and not old_lake.is_dir():
        raise FileNotFoundError(f"{old_home} holds no lake in the previous layout (no catalog.duckdb, no lake/)")
    shared_connection(lake.location, check_legacy=False)  # the home being imported may be this one
    lake.ensure_layout()
    report = ImportReport()
    present = lake.read_table(PARTITIONS_TABLE)
    done = {(r["table_name"], r["batch"], r["part"]) for r in present.iter_rows(named=True)} if len(present) else set()
    moved: dict[str, str] = {}

    for table_dir in sorted(p for p in old_lake.iterdir() if p.is_dir() and p.name not in ("datasets", "main")):
        for file in sorted(table_dir.glob("*.parquet")):
            if file.name.startswith("."):
                continue
            partition, _, part = file.stem.partition("__")
            batch = None if partition == UNPARTITIONED or file.stem == UNPARTITIONED else partition
            label = f"{table_dir.name}/{file.stem}"
            key = {"stage": part} if part else None
            frame = pl.read_parquet(file)
            if table_dir.name == "clips":
                frame, copied = _copy_clip_media(lake, frame, moved)
                report.media += copied
            if (table_dir.name, batch or UNPARTITIONED, json.dumps(key) if key else "") in done:
                report.skipped.append(label)
                continue
            frame = frame.drop("batch", strict=False)
            lake.write_partition(table_dir.name, batch, frame, key=key, run_id="import")
            report.partitions.append(label)

    for folder in sorted((old_lake / "datasets").iterdir()) if (old_lake / "datasets").is_dir() else []:
        if folder.name.startswith(".") or not (folder / "manifest.json").is_file():
            continue
        if _import_version(lake, folder, moved):
            report.versions.append(folder.name)
    (old_lake / IMPORT_MARKER).write_text(json.dumps({"into": lake.location.catalog.split(" password")[0]}))
    return report


def _copy_clip_media(lake: Lakehouse, clips: pl.DataFrame, moved: dict[str, str]) -> tuple[pl.DataFrame, int]:
    """Clip files and kept frames into the flat, content-named media folders (copied; existing names reused)."""
    copied = 0
    paths, frames = [], []
    for row in clips.iter_rows(named=True):
        clip_id = row["id"]
        new_clip = lake.media_dir / "clips" / f"{clip_id}.mp4"
        if row.get("path") and Path(row["path"]).is_file() and not new_clip.exists():
            new_clip.parent.mkdir(parents=True, exist_ok=True)
            copy_atomic(Path(row["path"]), new_clip)
            copied += 1
        moved[str(row.get("path"))] = str(new_clip)
        paths.append(str(new_clip))
        new_frames = lake.media_dir / "frames" / clip_id
        old_frames = row.get("frames_dir")
        if old_frames and Path(old_frames).is_dir() and not new_frames.exists():
            new_frames.parent.mkdir(parents=True, exist_ok=True)
            with atomic_dir(new_frames, exists="keep") as tmp:
                shutil.copytree(old_frames, tmp, dirs_exist_ok=True)
            copied += 1
        frames.append(str(new_frames) if old_frames else None)
    out = clips.with_columns(pl.Series("path", paths, dtype=pl.String))
    if "frames_dir" in clips.columns:
        out = out.with_columns(pl.Series("frames_dir", frames, dtype=pl.String))
    return out, copied


def _import_version(lake: Lakehouse, folder: Path, moved: dict[str, str]) -> bool:
    target = lake.lake_dir / "datasets" / folder.name
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, exists="keep") as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        for name in ("data.parquet",):
            data = pl.read_parquet(tmp / name)
            if "path" in data.columns:
                data = data.with_columns(pl.col("path").replace(moved))
                data.write_parquet(tmp / name)
        csv = tmp / "opensora.csv"
        if csv.is_file():
            table = pl.read_csv(csv)
            if "path" in table.columns:
                table.with_columns(pl.col("path").replace(moved)).write_csv(csv)
    manifest = json.loads((target / "manifest.json").read_text())
    row = pl.DataFrame([{"version": folder.name, "lake_snapshot": lake.current_snapshot(), "path": str(target),
                         "num_rows": manifest["counts"]["kept"], "created_at": manifest["created_at"],
                         "retired": False}], schema_overrides={"lake_snapshot": pl.Int64})
    lake.write_partition(DATASET_VERSIONS, None, row, key={"version": folder.name}, run_id="import")
    return True

