"""The lakehouse: one data root holding landing folders, Parquet tables, the DuckDB catalog and media files.

Layout under ``home`` (``OPENSORA_HOME``, default ``./.opensora``)::

    landing/<batch>/          raw videos dropped by users (one folder = one ``video_batches`` partition)
    lake/<table>/<partition>.parquet   one file per asset partition (``__all__`` for unpartitioned assets)
    lake/datasets/<version>/  immutable dataset versions
    catalog.duckdb            DuckDB views over the lake, one per table
    media/                    clip files, previews
    mlruns/                   MLflow store (sqlite ``mlflow.db`` + artifacts)
    checkpoints/              training checkpoints

Every partition is written to a temporary name beside its target and renamed over it, so a reader sees the old
file or the new one, never half of either; two runs writing different partitions touch different files, so they
can never lose or mix each other's rows. The catalog holds only views (no data), so refreshing it is cheap and a
failed refresh loses nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Iterator

import polars as pl
from dagster import ConfigurableResource
from pydantic import Field

UNPARTITIONED = "__all__"
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def default_home() -> str:
    return os.environ.get("OPENSORA_HOME", ".opensora")


def sanitize_partition_key(name: str) -> str:
    """A Dagster-safe partition key from a folder name (keys may not contain ``| , [ ]`` or ``...``)."""
    key = _KEY_SAFE.sub("_", name.strip()).strip("._-")
    key = re.sub(r"\.{2,}", ".", key)
    if not key:
        raise ValueError(f"cannot make a partition key from {name!r}")
    return key[:120]


class CatalogBusy(RuntimeError):
    """Another process holds ``catalog.duckdb`` open for writing."""


class Lakehouse(ConfigurableResource):
    """Reads and writes asset partitions as Parquet (Polars in, Polars out) and keeps the DuckDB catalog."""

    home: str | None = Field(None, description="Data root; unset = $OPENSORA_HOME (read when used) or ./.opensora.")

    # ---- folders -----------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.home or default_home()).expanduser().resolve()

    @property
    def landing_dir(self) -> Path:
        return self.root / "landing"

    @property
    def lake_dir(self) -> Path:
        return self.root / "lake"

    @property
    def media_dir(self) -> Path:
        return self.root / "media"

    @property
    def mlruns_dir(self) -> Path:
        return self.root / "mlruns"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def batch_dir(self, batch: str) -> Path:
        return self.landing_dir / batch

    def media_path(self, *parts: str) -> Path:
        path = self.media_dir.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def ensure_layout(self) -> None:
        for folder in (self.landing_dir, self.lake_dir, self.media_dir, self.mlruns_dir, self.checkpoints_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # ---- tables --------------------------------------------------------------------------------------------
    def table_dir(self, table: str) -> Path:
        if not _IDENT.match(table):
            raise ValueError(f"table names are identifiers, got {table!r}")
        return self.lake_dir / table

    def partition_path(self, table: str, partition: str | None, part: str | None = None) -> Path:
        """``part`` splits one partition between writers (the quarantine table has one part per stage)."""
        stem = partition or UNPARTITIONED
        return self.table_dir(table) / (f"{stem}__{part}.parquet" if part else f"{stem}.parquet")

    def write_partition(self, table: str, partition: str | None, frame: pl.DataFrame, part: str | None = None) -> Path:
        """Replace one partition of ``table`` atomically; partitioned rows get a ``batch`` column."""
        if partition is not None:
            frame = frame.with_columns(pl.lit(partition, dtype=pl.String).alias("batch"))
        target = self.partition_path(table, partition, part)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            frame.write_parquet(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def has_partition(self, table: str, partition: str | None) -> bool:
        return self.partition_path(table, partition).is_file()

    def read_partition(self, table: str, partition: str | None) -> pl.DataFrame:
        path = self.partition_path(table, partition)
        if not path.is_file():
            raise FileNotFoundError(
                f"no data for table {table!r} partition {partition or UNPARTITIONED!r} "
                f"(expected {path}); materialize the upstream asset first"
            )
        return pl.read_parquet(path)

    def partitions(self, table: str) -> list[str]:
        folder = self.table_dir(table)
        return sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []

    def read_table(self, table: str, partitions: list[str] | None = None) -> pl.DataFrame:
        """All (or the given) partitions of ``table`` concatenated; an empty frame if there are none."""
        keys = self.partitions(table) if partitions is None else partitions
        paths = [self.partition_path(table, k) for k in keys if self.partition_path(table, k).is_file()]
        if not paths:
            return pl.DataFrame()
        return pl.concat([pl.read_parquet(p) for p in paths], how="diagonal_relaxed")

    def delete_partition(self, table: str, partition: str | None) -> None:
        self.partition_path(table, partition).unlink(missing_ok=True)

    def tables(self) -> list[str]:
        if not self.lake_dir.is_dir():
            return []
        return sorted(p.name for p in self.lake_dir.iterdir() if p.is_dir() and any(p.glob("*.parquet")))

    # ---- catalog -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _catalog_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".catalog.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _connect(self, read_only: bool, timeout_s: float = 30.0):
        import duckdb

        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.catalog_path), read_only=read_only)
            except duckdb.IOException as err:  # another process holds the file lock
                if time.monotonic() > deadline:
                    raise CatalogBusy(f"{self.catalog_path} is locked by another process: {err}") from err
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def refresh_catalog(self, extra_views: dict[str, str] | None = None) -> list[str]:
        """(Re)create one view per lake table, plus named views (name -> SELECT); returns the view names.

        Named views (e.g. ``curated_dataset`` over the newest dataset version) are remembered in
        ``lake/_views.json`` so that every later refresh keeps them.
        """
        views = {
            table: f"SELECT * FROM read_parquet('{self.table_dir(table)}/*.parquet', union_by_name = true)"
            for table in self.tables()
        }
        with self._catalog_lock():
            registry = self.lake_dir / "_views.json"
            named = json.loads(registry.read_text()) if registry.is_file() else {}
            if extra_views:
                named.update(extra_views)
                self.lake_dir.mkdir(parents=True, exist_ok=True)
                tmp = registry.with_name(f".{registry.name}.{uuid.uuid4().hex}.tmp")
                tmp.write_text(json.dumps(named, indent=2, sort_keys=True))
                os.replace(tmp, registry)
            views.update(named)
            con = self._connect(read_only=False)
            try:
                existing = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
                for name in existing - set(views):
                    con.execute(f'DROP VIEW IF EXISTS "{name}"')
                for name, select in views.items():
                    con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {select}')
            finally:
                con.close()
        return sorted(views)

    def query(self, sql: str) -> pl.DataFrame:
        """Run a read-only query against the catalog."""
        if not self.catalog_path.exists():
            raise FileNotFoundError(f"no catalog at {self.catalog_path}: materialize an asset first")
        con = self._connect(read_only=True)
        try:
            return con.sql(sql).pl()
        finally:
            con.close()
