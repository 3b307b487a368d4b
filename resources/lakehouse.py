"""The lakehouse: every table an asset writes lives in one DuckLake catalog, with its data as Parquet.

Two settings say where things live (resource fields, else environment variables):

- ``catalog`` / ``OPENSORA_CATALOG``: DuckLake's metadata database. ``sqlite:PATH`` (default
  ``sqlite:$OPENSORA_HOME/lake/catalog.sqlite``; several local processes write at once) or ``postgres:CONNINFO``
  (``postgres:dbname=lake host=db port=5432 user=opensora``, password from ``PGPASSWORD``) for a team or a cluster.
- ``data_path`` / ``OPENSORA_DATA_PATH``: the shared root of the lake's Parquet data (``lake/``), ``landing/`` and
  ``media/``. Default ``$OPENSORA_HOME``; ``s3://bucket/prefix`` uses the standard ``AWS_*`` variables
  (``AWS_ENDPOINT_URL`` for S3-compatible stores: ``http://`` means no TLS, path-style addressing).

``home`` / ``OPENSORA_HOME`` stays the local root: scratch space, the embedded Dagster instance, MLflow's default
store, checkpoints.

Writing an asset partition is one DuckLake transaction (delete that batch's rows, insert the new ones, record the
partition in ``lake_partitions``): one snapshot per write, whose id the asset reports as ``lake_snapshot``. Earlier
snapshots stay readable (``query(sql, snapshot=N)``) until ``gc`` expires them. Extensions load only from the
``duckdb-ext-*`` wheels (never downloaded). SQLite catalogs are switched to WAL once, so a long reader never blocks
a writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from dagster import ConfigurableResource
from pydantic import Field

from common.storage import DATASETS, Storage, data_root, opensora_home, s3_filesystem

UNPARTITIONED = "__all__"
PARTITIONS_TABLE = "lake_partitions"
"""Bookkeeping: which (table, batch, part) were written, by which run, with how many rows (zero-row partitions too)."""
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONFLICT_RETRIES = 8
IMPORT_MARKER = ".imported"
"""Written into an old home's ``lake/`` by ``opensora-dag lake import``; without it an old home is refused."""


def sql_string(value: str | os.PathLike) -> str:
    """A SQL string literal (for the few statements DuckDB cannot parameterise: ATTACH, SECRET, SET)."""
    return "'" + str(value).replace("'", "''") + "'"


def ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"table and column names are identifiers, got {name!r}")
    return f'"{name}"'


class LakeError(RuntimeError):
    """The lake cannot be opened as configured (a missing bucket, a catalog made for another data path, ...)."""


class LegacyLakeError(LakeError):
    """The home holds a lake in the previous layout (Parquet folders + catalog.duckdb) that was not imported."""


@dataclass(frozen=True)
class LakeLocation:
    """Where the catalog and the data live, resolved from the resource fields and the environment."""

    home: Path
    catalog: str  # "sqlite:/abs/path" or "postgres:conninfo"
    data_root: str  # "/abs/path" or "s3://bucket/prefix"

    @property
    def remote(self) -> bool:
        return self.data_root.startswith("s3://")

    @property
    def lake_data(self) -> str:
        return self.data_root.rstrip("/") + "/lake/"

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.catalog[len("sqlite:"):]) if self.catalog.startswith("sqlite:") else None


def resolve_location(home: str | None = None, catalog: str | None = None, data_path: str | None = None) -> LakeLocation:
    root = opensora_home(home)
    try:
        data = data_root(data_path, root)
    except ValueError as err:  # a bad OPENSORA_DATA_PATH is one more way the lake cannot be opened as configured
        raise LakeError(str(err)) from None
    cat = catalog or os.environ.get("OPENSORA_CATALOG") or f"sqlite:{root / 'lake' / 'catalog.sqlite'}"
    if cat.startswith("sqlite:"):
        cat = f"sqlite:{Path(cat[len('sqlite:'):]).expanduser().resolve()}"
    elif not cat.startswith("postgres:"):
        raise LakeError(f"OPENSORA_CATALOG must start with sqlite: or postgres:, got {cat.split(':')[0]!r}")
    return LakeLocation(root, cat, data)


def _extension_dir() -> str:
    import duckdb_ext

    return str(Path(list(duckdb_ext.__path__)[0]) / "extensions")


def _s3_secret_sql() -> str:
    """CREATE SECRET for httpfs from the standard AWS variables (never logged: it holds the key)."""
    from urllib.parse import urlparse

    parts = {
        "TYPE": "s3",
        "KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", ""),
        "SECRET": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        "REGION": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    body = ["TYPE s3"] + [f"{k} {sql_string(v)}" for k, v in parts.items() if k != "TYPE" and v]
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        body += [f"ENDPOINT {sql_string(url.netloc)}", "URL_STYLE 'path'",
                 f"USE_SSL {'false' if url.scheme == 'http' else 'true'}"]
    if os.environ.get("AWS_SESSION_TOKEN"):
        body.append(f"SESSION_TOKEN {sql_string(os.environ['AWS_SESSION_TOKEN'])}")
    return f"CREATE OR REPLACE SECRET opensora_s3 ({', '.join(body)})"


def _check_bucket(location: LakeLocation) -> None:
    bucket = location.data_root[len("s3://"):].split("/", 1)[0]
    try:
        exists = s3_filesystem().exists(bucket)
    except Exception as err:  # credentials, endpoint, network: say which bucket we tried to reach
        raise LakeError(f"cannot reach bucket {bucket!r} of OPENSORA_DATA_PATH {location.data_root}: "
                        f"{type(err).__name__}: {err}") from err
    if not exists:
        raise LakeError(f"bucket {bucket!r} of OPENSORA_DATA_PATH {location.data_root} does not exist: create it "
                        "first (the lake never creates buckets)")


def _is_conflict(err: Exception) -> bool:
    text = str(err).lower()
    return any(word in text for word in ("conflict", "database is locked", "busy", "could not serialize"))


def _attach(con, location: LakeLocation, options: list[str]) -> None:
    """ATTACH the DuckLake catalog; two processes creating one catalog at once are retried (one wins)."""
    import duckdb

    for attempt in range(_CONFLICT_RETRIES):
        try:
            con.execute(f"ATTACH {sql_string('ducklake:' + location.catalog)} AS lake ({', '.join(options)})")
            con.execute("USE lake")
            return
        except duckdb.Error as err:
            text = str(err)
            if "does not match existing data path" in text:
                raise LakeError(f"the catalog was created for another data path than {location.lake_data!r} "
                                f"(OPENSORA_DATA_PATH): {text}") from err
            if not ("already exists" in text or _is_conflict(err)) or attempt == _CONFLICT_RETRIES - 1:
                raise
            with contextlib.suppress(duckdb.Error):
                con.execute("DETACH lake")
        time.sleep(0.1 * 2**attempt)


def open_lake(location: LakeLocation, *, read_only: bool = False, snapshot: int | None = None):
    """A DuckDB connection with the lake attached as ``lake`` and selected (``USE lake``)."""
    import duckdb

    con = duckdb.connect(config={
        "extension_directory": _extension_dir(),
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    })
    try:
        con.execute("LOAD ducklake")
        con.execute("LOAD sqlite" if location.sqlite_path else "LOAD postgres")
        if location.remote:
            _check_bucket(location)
            con.execute("LOAD httpfs")
            con.execute(_s3_secret_sql())
        options = [f"DATA_PATH {sql_string(location.lake_data)}"]
        if read_only:
            options.append("READ_ONLY")
        if snapshot is not None:
            options.append(f"SNAPSHOT_VERSION {int(snapshot)}")
        _attach(con, location, options)
        return con
    except Exception:
        con.close()
        raise


@dataclass(frozen=True)
class PartitionWrite:
    """One partition replacement inside :meth:`Lakehouse.write_partitions`."""

    table: str
    partition: str | None
    frame: pl.DataFrame
    key: Mapping[str, Any] | None = None
    """Replace only the partition's rows with these column values (quarantine: {"stage": ...}); absent columns are
    added to the frame."""


@dataclass(frozen=True)
class ConsistentRead:
    snapshot: int
    frames: dict[str, pl.DataFrame]
    versions: dict[str, str]


class Lakehouse(ConfigurableResource):
    """Reads and writes asset tables in the DuckLake catalog (Polars in, Polars out)."""

    home: str | None = Field(None, description="Local root; unset = $OPENSORA_HOME (read when used) or ./.opensora.")
    catalog: str | None = Field(None, description="DuckLake catalog (sqlite:PATH or postgres:CONNINFO); unset = "
                                                  "$OPENSORA_CATALOG or sqlite:<home>/lake/catalog.sqlite.")
    data_path: str | None = Field(None, description="Shared data root (folder or s3://bucket/prefix); unset = "
                                                    "$OPENSORA_DATA_PATH or <home>.")

    # ---- where things live -----------------------------------------------------------------------------------
    @property
    def location(self) -> LakeLocation:
        return resolve_location(self.home, self.catalog, self.data_path)

    @property
    def root(self) -> Path:
        return self.location.home

    @property
    def storage(self) -> Storage:
        """The data root's files (``landing/``, ``media/``, ``lake/datasets/``), local or on S3."""
        return Storage.for_location(self.location)

    def _local_data(self, what: str) -> Path:
        loc = self.location
        if loc.remote:
            raise LakeError(f"{what} on {loc.data_root} is reached through the object store (lakehouse.storage), "
                            "not as a local folder; this code path needs a local OPENSORA_DATA_PATH")
        return Path(loc.data_root)

    @property
    def landing_dir(self) -> Path:
        """Local data path only; use ``storage.url("landing", ...)`` for code that also runs on S3."""
        return self._local_data("landing/") / "landing"

    @property
    def lake_dir(self) -> Path:
        """Local data path only; use ``storage`` / ``datasets_root`` for code that also runs on S3."""
        return self._local_data("lake/") / "lake"

    @property
    def media_dir(self) -> Path:
        """Local data path only; use ``storage.url("media", ...)`` for code that also runs on S3."""
        return self._local_data("media/") / "media"

    @property
    def datasets_root(self) -> str:
        """Where dataset versions live (``lake/datasets/``): a folder path, or an ``s3://`` URL."""
        return self.storage.url(*DATASETS)

    @property
    def mlruns_dir(self) -> Path:
        return self.root / "mlruns"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def batch_dir(self, batch: str) -> Path:
        """``landing/<batch>/`` for a batch whose folder is named by its key (the demo, tests); a key is checked
        before it becomes a path. Assets find a batch's folder through ``resources.batch_keys.landing_folder``."""
        from resources.batch_keys import validate_batch_key

        return self.landing_dir / validate_batch_key(batch)

    def ensure_layout(self) -> None:
        loc = self.location
        folders = [self.mlruns_dir, self.checkpoints_dir]
        if not loc.remote:
            folders += [self.landing_dir, self.lake_dir, self.media_dir]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)

    # ---- connections -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False, snapshot: int | None = None) -> Iterator[Any]:
        """A cursor on the lake (``USE lake``), from a connection cached per process and location."""
        loc = self.location
        if read_only or snapshot is not None:
            con = open_lake(loc, read_only=True, snapshot=snapshot)
            try:
                yield con
            finally:
                con.close()
            return
        shared = shared_connection(loc)
        cursor = shared.cursor()
        try:
            cursor.execute("USE lake")
            yield cursor
        finally:
            cursor.close()

    # ---- writing ---------------------------------------------------------------------------------------------
    def write_partition(
        self,
        table: str,
        partition: str | None,
        frame: pl.DataFrame,
        key: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> int:
        """Replace one partition of ``table`` in one transaction; returns the lake snapshot it created."""
        return self.write_partitions([PartitionWrite(table, partition, frame, key)], run_id=run_id)

    def write_partitions(self, writes: list["PartitionWrite"], run_id: str | None = None) -> int:
        """Replace several partitions in ONE transaction (an asset's rows and its quarantine records together);
        returns the snapshot. Partitioned rows get a ``batch`` column; a write's ``key`` narrows what it replaces
        to the rows with those column values (one quarantine part per stage, one evaluation row per checkpoint)."""
        steps = []
        for w in writes:
            ident(w.table)
            frame, where, params = w.frame, [], []
            if w.partition is not None:
                frame = frame.with_columns(pl.lit(w.partition, dtype=pl.String).alias("batch"))
                where.append('"batch" = ?')
                params.append(w.partition)
            for column, value in sorted((w.key or {}).items()):
                if column not in frame.columns:
                    frame = frame.with_columns(pl.lit(value).alias(column))
                where.append(f"{ident(column)} = ?")
                params.append(value)
            part = json.dumps(dict(w.key), sort_keys=True, default=str) if w.key else None
            info = {"table": w.table, "batch": w.partition, "part": part, "rows": len(frame)}
            steps.append((w.table, _storable(frame), " AND ".join(where) or "TRUE", params, info))
        return self._commit(steps, run_id)

    def append(self, table: str, frame: pl.DataFrame, run_id: str | None = None) -> int:
        """Add rows to ``table`` without replacing any (two appenders never lose each other's rows)."""
        return self._commit([(table, _storable(frame), None, [], {"table": table, "rows": len(frame)})], run_id)

    def delete_partition(self, table: str, partition: str | None, run_id: str | None = None) -> int:
        return self.write_partition(table, partition, pl.DataFrame(), run_id=run_id)

    def _commit(self, steps: list[tuple], run_id: str | None) -> int:
        tables = sorted({step[0] for step in steps})
        batches = sorted({str(step[4].get("batch")) for step in steps if step[4].get("batch")})
        extra = {"table": ",".join(tables), "batch": ",".join(batches) or None, "run_id": run_id,
                 "rows": {step[0] + (f"/{step[4]['part']}" if step[4].get("part") else ""): step[4]["rows"]
                          for step in steps}}
        for attempt in range(_CONFLICT_RETRIES):
            with self.connect() as con:
                try:
                    con.execute("BEGIN")
                    for k, (table, frame, delete_where, params, info) in enumerate(steps):
                        self._apply(con, f"incoming_{k}", table, frame, delete_where, params, {**info, "run_id": run_id})
                    con.execute("CALL lake.set_commit_message('opensora-dag', ?, extra_info => ?)",
                                [f"write {extra['table']} {extra['batch'] or UNPARTITIONED}", json.dumps(extra)])
                    con.execute("COMMIT")
                    return int(con.execute("SELECT id FROM ducklake_last_committed_snapshot('lake')").fetchone()[0])
                except Exception as err:
                    with contextlib.suppress(Exception):
                        con.execute("ROLLBACK")
                    if not _is_conflict(err) or attempt == _CONFLICT_RETRIES - 1:
                        raise
            time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _apply(self, con, view: str, table: str, frame: pl.DataFrame, delete_where, params, info) -> None:
        name = ident(table)
        con.register(view, frame)
        try:
            if len(frame.columns):
                con.execute(f"CREATE TABLE IF NOT EXISTS {name} AS SELECT * FROM {view} LIMIT 0")
                self._add_missing_columns(con, table, view, frame)
            if delete_where is not None and _table_exists(con, table):
                con.execute(f"DELETE FROM {name} WHERE {delete_where}", params)
            if len(frame):
                con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM {view}")
            if delete_where is not None:
                self._record_partition(con, info)
        finally:
            con.unregister(view)

    @staticmethod
    def _add_missing_columns(con, table: str, view: str, frame: pl.DataFrame) -> None:
        have = {r[0] for r in con.execute(f"DESCRIBE {ident(table)}").fetchall()}
        types = {r[0]: r[1] for r in con.execute(f"DESCRIBE {view}").fetchall()}
        for column in frame.columns:
            if column not in have:
                sql_type = types.get(column, "VARCHAR")
                con.execute(f"ALTER TABLE {ident(table)} ADD COLUMN {ident(column)} {sql_type}")

    @staticmethod
    def _record_partition(con, info: dict) -> None:
        con.execute(f"CREATE TABLE IF NOT EXISTS {PARTITIONS_TABLE} (table_name VARCHAR, batch VARCHAR, part VARCHAR, "
                    "num_rows BIGINT, run_id VARCHAR, written_at TIMESTAMP WITH TIME ZONE)")
        con.execute(f"DELETE FROM {PARTITIONS_TABLE} WHERE table_name = ? AND batch = ? AND part = ?",
                    [info["table"], info["batch"] or UNPARTITIONED, info["part"] or ""])
        con.execute(f"INSERT INTO {PARTITIONS_TABLE} VALUES (?, ?, ?, ?, ?, now())",
                    [info["table"], info["batch"] or UNPARTITIONED, info["part"] or "", info["rows"], info["run_id"]])

    # ---- reading ---------------------------------------------------------------------------------------------
    def tables(self) -> list[str]:
        with self.connect() as con:
            rows = con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'lake'").fetchall()
        return sorted(r[0] for r in rows if r[0] != PARTITIONS_TABLE)

    def partitions(self, table: str) -> list[str]:
        with self.connect() as con:
            if not _table_exists(con, PARTITIONS_TABLE):
                return []
            rows = con.execute(f"SELECT DISTINCT batch FROM {PARTITIONS_TABLE} WHERE table_name = ?", [table]).fetchall()
        return sorted(r[0] for r in rows)

    def has_partition(self, table: str, partition: str | None) -> bool:
        return (partition or UNPARTITIONED) in self.partitions(table)

    def read_partition(self, table: str, partition: str | None, snapshot: int | None = None) -> pl.DataFrame:
        if not self.has_partition(table, partition):
            raise FileNotFoundError(f"no data for table {table!r} partition {partition or UNPARTITIONED!r}; "
                                    "materialize the upstream asset first")
        where = ' WHERE "batch" = ?' if partition is not None else ""
        with self.connect(snapshot=snapshot) as con:
            return con.execute(f"SELECT * FROM {ident(table)}{where}", [partition] if partition else []).pl()

    def read_table(self, table: str, partitions: list[str] | None = None, snapshot: int | None = None) -> pl.DataFrame:
        """All (or the given) partitions of ``table``; an empty frame if it has none."""
        with self.connect(snapshot=snapshot) as con:
            if not _table_exists(con, table):
                return pl.DataFrame()
            if partitions is None:
                return con.execute(f"SELECT * FROM {ident(table)}").pl()
            return con.execute(f'SELECT * FROM {ident(table)} WHERE "batch" IN (SELECT unnest(?))', [partitions]).pl()

    def read_at_one_snapshot(self, tables: list[str]) -> "ConsistentRead":
        """Every table as of ONE snapshot, with a content version per table derived from that same snapshot's
        partition records (never read at one moment and hashed at another)."""
        import hashlib

        snapshot = self.current_snapshot()
        records = self.read_table(PARTITIONS_TABLE, snapshot=snapshot)
        frames, versions = {}, {}
        for table in tables:
            frames[table] = self.read_table(table, snapshot=snapshot)
            mine = records.filter(pl.col("table_name") == table).sort("batch", "part") if len(records) else records
            digest = hashlib.blake2b(digest_size=8)
            for row in mine.select("batch", "part", "num_rows", "written_at").iter_rows() if len(mine) else []:
                digest.update(repr(row).encode())
            versions[table] = digest.hexdigest()
        return ConsistentRead(snapshot, frames, versions)

    def current_snapshot(self) -> int:
        with self.connect() as con:
            return int(con.execute("SELECT id FROM ducklake_current_snapshot('lake')").fetchone()[0])

    def snapshots(self) -> pl.DataFrame:
        """``snapshot_id, time, table, batch, run_id`` of every write still in the catalog."""
        with self.connect() as con:
            frame = con.execute(
                "SELECT snapshot_id, snapshot_time AS time, commit_extra_info FROM ducklake_snapshots('lake') "
                "ORDER BY snapshot_id").pl()
        info = [json.loads(x) if x else {} for x in frame["commit_extra_info"].to_list()]
        return frame.drop("commit_extra_info").with_columns(
            pl.Series("table", [i.get("table") for i in info], dtype=pl.String),
            pl.Series("batch", [i.get("batch") for i in info], dtype=pl.String),
            pl.Series("run_id", [i.get("run_id") for i in info], dtype=pl.String),
        )

    def query(self, sql: str, snapshot: int | None = None) -> pl.DataFrame:
        """One read-only SELECT against the lake (see :func:`run_readonly_query`)."""
        return run_readonly_query(self.location, sql, snapshot=snapshot)

    # ---- views -----------------------------------------------------------------------------------------------
    def refresh_catalog(self, extra_views: dict[str, str] | None = None) -> list[str]:
        """Create or replace named views (name -> SELECT) in the catalog; returns every view name.

        Tables need no views any more: they are DuckLake tables, queried by their asset names."""
        with self.connect() as con:
            for name, select in (extra_views or {}).items():
                for attempt in range(_CONFLICT_RETRIES):
                    try:
                        con.execute(f"CREATE OR REPLACE VIEW {ident(name)} AS {select}")
                        break
                    except Exception as err:
                        if not _is_conflict(err) or attempt == _CONFLICT_RETRIES - 1:
                            raise
                        time.sleep(0.05 * 2**attempt)
            rows = con.execute("SELECT view_name FROM duckdb_views() WHERE database_name = 'lake'").fetchall()
        return sorted(r[0] for r in rows)


def _table_exists(con, table: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = 'lake' AND table_name = ?",
                            [table]).fetchone()[0])


def _storable(frame: pl.DataFrame) -> pl.DataFrame:
    """All-null columns have no type; store them as strings so the table gets a real column."""
    return frame.with_columns([pl.col(c).cast(pl.String) for c, t in frame.schema.items() if t == pl.Null])


# ---- one cached connection per process and location -------------------------------------------------------------
_SHARED: dict[LakeLocation, Any] = {}
_SHARED_LOCK = threading.Lock()


def shared_connection(loc: LakeLocation, check_legacy: bool = True):
    """This process's connection to the lake at ``loc`` (created on first use; cursors are taken from it)."""
    with _SHARED_LOCK:
        con = _SHARED.get(loc)
        if con is None:
            if check_legacy:
                _check_legacy(loc)
            _prepare_sqlite(loc)
            con = open_lake(loc)
            _SHARED[loc] = con
        return con


def _check_legacy(loc: LakeLocation) -> None:
    if (loc.home / "catalog.duckdb").exists() and not (loc.home / "lake" / IMPORT_MARKER).exists():
        raise LegacyLakeError(f"{loc.home} holds a lake in the previous layout (catalog.duckdb + Parquet folders); "
                              f"copy it into the DuckLake catalog with: opensora-dag lake import {loc.home}")


def _prepare_sqlite(loc: LakeLocation) -> None:
    """Create a local SQLite catalog once, in WAL mode (readers then never block writers)."""
    path = loc.sqlite_path
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if not loc.remote:
        Path(loc.lake_data).mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".catalog.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.exists():
                open_lake(loc).close()  # DuckLake creates its tables (rollback-journal mode)
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---- read-only queries ------------------------------------------------------------------------------------------
class QueryRefused(ValueError):
    """A query that is not a single read-only SELECT, or that reaches outside the lake."""


def run_readonly_query(loc: LakeLocation, sql: str, snapshot: int | None = None) -> pl.DataFrame:
    """Run one SELECT with the lake attached read-only and external access limited to the lake's data.

    DuckDB's own parser decides what the statement is (COPY, ATTACH, INSTALL, SET, PRAGMA, ... are refused), and
    ``enable_external_access = false`` with ``allowed_directories`` = the lake's data path stops table functions
    from reading any other file; ``lock_configuration`` keeps the query from undoing either."""
    import duckdb

    con = open_lake(loc, read_only=True, snapshot=snapshot)
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as err:
            raise QueryRefused(f"cannot parse the query: {err}") from err
        if len(statements) != 1:
            raise QueryRefused(f"give exactly one statement (got {len(statements)})")
        if statements[0].type != duckdb.StatementType.SELECT:
            words = statements[0].query.split()
            kind = words[0].upper() if words else statements[0].type.name
            raise QueryRefused(f"only a SELECT is allowed here, not {kind}: the lake is read-only through this command")
        allowed = [loc.lake_data] if loc.remote else [loc.lake_data, str(Path(loc.data_root) / "lake" / "datasets")]
        con.execute(f"SET allowed_directories = [{', '.join(sql_string(a) for a in allowed)}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            return con.execute(sql).pl()
        except duckdb.PermissionException as err:
            raise QueryRefused(f"the query reaches outside the lake: {err}") from err
    finally:
        con.close()
