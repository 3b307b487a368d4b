"""Curated dataset versions: clips joined with their scores and captions, filtered by a spec, frozen on disk.

A version is named by a short hash of what determines its content: the filter spec (canonical JSON), the data
versions of the input tables and the builder's own format number. Building the same thing twice finds the folder
already there and reuses it; anything that changes the content changes the name, so a version folder is never
edited after it appears (it is written under a temporary name and renamed into place).

Each version folder holds::

    data.parquet     the kept clips: Open-Sora columns, provenance columns, and ``batch`` when the clips had one
    opensora.csv     the same rows, Open-Sora columns + provenance columns (what the reference's training reads)
    dropped.parquet  id, path, batch, the reason (the check that dropped it) and its detail, of every clip left out
    manifest.json    spec, inputs, counts, drop counts per filter, every criterion's state, skipped criteria, created_at

Drop counts are attributed in a fixed order (``DROP_ORDER``): each clip is counted once, at the first check it
fails. The criteria and their meaning are ``curation.filters`` (the same SQL as ``opensora-dag data filter``): a
clip without a value fails an active criterion, e.g. every clip fails ``aesmin`` when the aesthetic scorer ran
without weights (its detail says why the value is missing). A criterion is inactive only when the spec says so
(``FilterSpec.skip``); each skip is reported with the reason, and the asset shows it as a failed check.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pydantic import BaseModel

from common.files import publish, scratch_sibling
from common.storage import DATASETS

# FilterSpec, PRESETS, Criterion and CRITERIA lived here before the filter became one module; still importable.
from curation.filters import (  # noqa: F401
    CRITERIA,
    PRESETS,
    Criterion,
    FilterSpec,
    failure_detail_sql,
    first_failure_sql,
    resolution_sql,
)

if TYPE_CHECKING:
    import duckdb
    import polars as pl

# Bump when the builder's output changes for the same spec and inputs: it is part of the version hash.
# 2: an all-null criterion column is no longer skipped on its own (only FilterSpec.skip skips); dropped.parquet
#    has a detail column; the manifest reports every criterion.
# 3: virtual and linked columns (virtual clips are frame ranges of their source).
BUILDER_VERSION = 3

CLIPS_TABLE = "clips"
# Score / caption table -> the one column the builder takes from it.
SIDE_TABLES = {
    "aesthetic_scores": "aes",
    "motion_scores": "flow",
    "ocr_scores": "ocr",
    "match_scores": "match",
    "captions": "text",
}
OPENSORA_CSV_COLUMNS = (
    "path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "resolution",
    "aes", "flow", "ocr", "match",
)  # fmt: skip
PROVENANCE_COLUMNS = ("id", "video_id", "start_frame", "end_frame", "start_s", "end_s", "virtual", "linked")
CSV_COLUMNS = OPENSORA_CSV_COLUMNS + PROVENANCE_COLUMNS
CLIP_REQUIRED = ("id", "path", "num_frames", "height", "width")
# Optional clip columns and the SQL type they get (NULL when the clips table lacks them).
CLIP_OPTIONAL = {
    "video_id": "VARCHAR",
    "start_frame": "BIGINT",
    "end_frame": "BIGINT",
    "start_s": "DOUBLE",
    "end_s": "DOUBLE",
    "fps": "DOUBLE",
    "batch": "VARCHAR",
    "virtual": "BOOLEAN",  # a frame range of the source at ``path`` (curation.virtual_clips), not a clip file
    "linked": "BOOLEAN",  # that source is referenced in place: its hash (video_id) is checked on read
}
NO_CAPTION = "no caption"
DUPLICATE = "duplicate"
DUPLICATE_DETAIL = "another copy of the same clip id is kept (first batch, then path)"


# The fixed order drops are attributed in: "no caption", the criteria (curation.filters.CRITERIA), "duplicate".
DROP_ORDER = (NO_CAPTION, *(c.name for c in CRITERIA), DUPLICATE)


class SkippedCriterion(BaseModel):
    criterion: str
    column: str
    reason: str


class CriterionReport(BaseModel):
    """What one criterion of the spec did to a version: unset, skipped (by the spec) or applied."""

    criterion: str
    flag: str  # its CLI flag
    column: str
    status: str  # "unset" | "skipped" | "applied"
    bound: str | None = None  # "aes >= 5.0" when set
    with_value: int = 0  # clips that have a value in the criterion's column
    dropped: int = 0  # clips dropped at this criterion (first check they failed)
    dropped_without_value: int = 0  # ... of which had no value
    reason: str | None = None  # skipped: why; applied: set when no clip has a value (every clip fails it)


class DatasetVersion(BaseModel):
    """A built (or reused) version folder and what its manifest says."""

    version: str
    path: Path
    spec: FilterSpec
    inputs: dict[str, str]
    num_clips: int  # rows of the clips table given to the builder
    num_rows: int  # rows kept
    drop_counts: dict[str, int]  # DROP_ORDER keys that were checked, in that order
    skipped: list[SkippedCriterion]
    created_at: str
    criteria: list[CriterionReport] = []  # every criterion, in CRITERIA order (empty for builder-1 manifests)
    lake_snapshot: int | None = None  # the lake snapshot every input table was read from
    reused: bool = False

    @property
    def data_path(self) -> Path:
        return self.path / "data.parquet"

    @property
    def csv_path(self) -> Path:
        return self.path / "opensora.csv"

    @property
    def dropped_path(self) -> Path:
        return self.path / "dropped.parquet"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"


# ---- version naming ----------------------------------------------------------------------------------------------
def dataset_version(spec: FilterSpec, input_versions: Mapping[str, str]) -> str:
    """12 hex digits naming the content: builder format, canonical spec and sorted input data versions."""
    payload = json.dumps(
        {
            "builder": BUILDER_VERSION,
            "spec": json.loads(spec.canonical_json()),
            "inputs": sorted((str(k), str(v)) for k, v in input_versions.items()),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def load_version(out_root: str | os.PathLike, version: str) -> DatasetVersion:
    folder = Path(out_root) / version
    manifest = json.loads((folder / "manifest.json").read_text())
    return DatasetVersion(
        version=manifest["version"],
        path=folder,
        spec=FilterSpec(**manifest["spec"]),
        inputs=manifest["inputs"],
        num_clips=manifest["counts"]["clips"],
        num_rows=manifest["counts"]["kept"],
        drop_counts=manifest["drop_counts"],
        skipped=[SkippedCriterion(**s) for s in manifest["skipped"]],
        created_at=manifest["created_at"],
        criteria=[CriterionReport(**c) for c in manifest.get("criteria", [])],
        lake_snapshot=manifest.get("lake_snapshot"),
    )


def latest_version(out_root: str | os.PathLike) -> DatasetVersion | None:
    """The most recently created complete version under ``out_root`` (temporary folders ignored), or None."""
    root = Path(out_root)
    if not root.is_dir():
        return None
    versions = [
        load_version(root, p.name)
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file()
    ]
    if not versions:
        return None
    return max(versions, key=lambda v: (v.created_at, v.version))


def latest_published_version(storage: Any) -> DatasetVersion | None:
    """The newest complete version under ``lake/datasets/`` of a data root (a ``common.storage.Storage``), read from
    the local folder, or from cached copies when the root is on an object store; None when there is none."""
    root = storage.url(*DATASETS)
    if not storage.remote:
        return latest_version(root)
    best = None
    for name, _size, is_dir in storage.list_dir(root):
        if not is_dir or name.startswith("."):
            continue
        try:
            manifest = json.loads(storage.local_copy(storage.url(*DATASETS, name, "manifest.json")).read_text())
        except FileNotFoundError:
            continue  # still being published
        if best is None or (manifest.get("created_at"), name) > best:
            best = (manifest.get("created_at"), name)
    if best is None:
        return None
    folder = storage.local_copy(storage.url(*DATASETS, best[1]))
    return load_version(folder.parent, folder.name)


# ---- building ----------------------------------------------------------------------------------------------------
def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_str(value: str | os.PathLike) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _open_tables(
    con_or_tables: "duckdb.DuckDBPyConnection | Mapping[str, Any]",
) -> tuple["duckdb.DuckDBPyConnection", dict[str, dict[str, str]], bool]:
    """A connection and, for each known table it can read, that table's {column: type}; plus whether we own it.

    Frames with no columns (the Lakehouse's answer for a table with no partitions) count as absent.
    """
    import duckdb

    names = (CLIPS_TABLE, *SIDE_TABLES)
    if isinstance(con_or_tables, duckdb.DuckDBPyConnection):
        con, owned = con_or_tables, False
        present = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        available = [n for n in names if n in present]
    else:
        con, owned = duckdb.connect(":memory:"), True
        available = []
        for name in names:
            frame = con_or_tables.get(name)
            if frame is not None and len(frame.columns) > 0:
                con.register(name, frame)
                available.append(name)
    schemas = {
        name: {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {_ident(name)}").fetchall()}
        for name in available
    }
    return con, schemas, owned


def _joined_sql(schemas: dict[str, dict[str, str]]) -> str:
    """One row per clip: clip columns, then each side table's column (NULL when the table or column is absent).

    Side tables are first reduced to one row per id, so a clip scored in two batches does not multiply:
    scores of the same id agree (ids are content hashes), and the caption kept is the smallest non-empty one,
    which makes the choice deterministic. ``<column>_reason`` carries a side table's ``reason`` for a missing value
    (e.g. "CLIP checkpoint path is not set"), so a clip dropped for lacking it says why.
    """
    clip_cols = schemas[CLIPS_TABLE]
    select = [
        "CAST(c.id AS VARCHAR) AS id",
        "CAST(c.path AS VARCHAR) AS path",
        "CAST(c.num_frames AS BIGINT) AS num_frames",
        "CAST(c.height AS BIGINT) AS height",
        "CAST(c.width AS BIGINT) AS width",
    ]
    for name, sql_type in CLIP_OPTIONAL.items():
        value = f"c.{_ident(name)}" if name in clip_cols else "NULL"
        select.append(f"CAST({value} AS {sql_type}) AS {name}")
    ratio = "CAST(c.height AS DOUBLE) / nullif(CAST(c.width AS DOUBLE), 0)"
    select.append(f"{resolution_sql(clip_cols, prefix='c.')} AS resolution")  # the filter's own definition
    select.append(f"coalesce(CAST(c.aspect_ratio AS DOUBLE), {ratio}) AS aspect_ratio" if "aspect_ratio" in clip_cols
                  else f"{ratio} AS aspect_ratio")  # fmt: skip

    ctes, joins = [], []
    for i, (table, column) in enumerate(SIDE_TABLES.items()):
        alias = f"s{i}"
        cols = schemas.get(table, {})
        why = _ident(f"{column}_reason")
        if "id" not in cols or column not in cols:
            select.append(f"CAST(NULL AS {'VARCHAR' if column == 'text' else 'DOUBLE'}) AS {_ident(column)}")
            select.append(f"CAST(NULL AS VARCHAR) AS {why}")
            continue
        if column == "text":
            has_value = "text IS NOT NULL AND trim(CAST(text AS VARCHAR)) <> ''"
            reduce = f"min(CAST(text AS VARCHAR)) FILTER (WHERE {has_value})"
        else:
            has_value = f"{_ident(column)} IS NOT NULL"
            reduce = f"max(CAST({_ident(column)} AS DOUBLE))"
        reason = f"min(CAST(reason AS VARCHAR)) FILTER (WHERE NOT ({has_value}))" if "reason" in cols else "CAST(NULL AS VARCHAR)"
        ctes.append(
            f"{alias} AS (SELECT CAST(id AS VARCHAR) AS id, {reduce} AS {_ident(column)}, {reason} AS {why} "
            f"FROM {_ident(table)} GROUP BY CAST(id AS VARCHAR))"
        )
        joins.append(f"LEFT JOIN {alias} ON {alias}.id = CAST(c.id AS VARCHAR)")
        select.append(f"{alias}.{_ident(column)} AS {_ident(column)}")
        # A clip the table has no row for has no reason from it; say so rather than leave it blank.
        select.append(f"CASE WHEN {alias}.id IS NULL THEN {_sql_str(f'no {table} row for the clip')} ELSE {alias}.{why} END AS {why}")
    with_clause = ("WITH " + ", ".join(ctes) + " ") if ctes else ""
    return f"{with_clause}SELECT {', '.join(select)} FROM {_ident(CLIPS_TABLE)} c {' '.join(joins)}"


def _column_state(table: str, column: str, schemas: dict[str, dict[str, str]], n: int, with_value: int,
                  why_null: str | None) -> str:
    """What the joined table holds for a criterion's column, in words (for skip and all-null reasons)."""
    if table not in schemas:
        return f"table {table} was not provided (or has no rows)"
    derived = table == CLIPS_TABLE and column == "resolution"  # computed from height and width
    needed = [column] if table == CLIPS_TABLE else ["id", column]
    lacking = [c for c in needed if c not in schemas[table]]
    if lacking and not derived:
        return f"table {table} lacks column(s) {lacking}"
    if with_value == 0:
        return f"{table}.{column} is null for all {n} clips" + (f": {why_null}" if why_null else "")
    return f"{table}.{column} has a value for {with_value} of {n} clips"


def _criteria_report(
    con: "duckdb.DuckDBPyConnection", spec: FilterSpec, schemas: dict[str, dict[str, str]], n: int
) -> list[CriterionReport]:
    """Every criterion's state: unset, skipped by the spec (with why) or applied (with its drops)."""
    table_of = {col: table for table, col in SIDE_TABLES.items()}
    set_criteria = [c for c in CRITERIA if getattr(spec, c.name) is not None]
    columns = sorted({c.column for c in set_criteria})
    aggs = []
    for column in columns:
        aggs.append(f"count({_ident(column)})")
        aggs.append(f"min({_ident(column + '_reason')})" if column in table_of else "NULL")  # deterministic
    row = con.execute(f"SELECT {', '.join(aggs)} FROM __ds_joined").fetchone() if aggs else ()
    with_value = {col: int(row[2 * i]) for i, col in enumerate(columns)}
    why_null = {col: row[2 * i + 1] for i, col in enumerate(columns)}
    drops = {
        name: (int(total), int(without))
        for name, total, without in con.execute(
            "SELECT drop_reason, count(*), count(*) FILTER (WHERE __ds_missing) FROM __ds_checked "
            "WHERE drop_reason IS NOT NULL GROUP BY 1"
        ).fetchall()
    }
    reports = []
    for c in CRITERIA:
        report = CriterionReport(criterion=c.name, flag=c.flag, column=c.column, status="unset")
        if getattr(spec, c.name) is not None:
            table = table_of.get(c.column, CLIPS_TABLE)
            state = _column_state(table, c.column, schemas, n, with_value[c.column], why_null[c.column])
            dropped, without = drops.get(c.name, (0, 0))
            update: dict[str, Any] = {"bound": f"{c.column} {c.op} {spec.bound(c)!r}", "with_value": with_value[c.column]}
            if c.name in spec.skip:
                update |= {"status": "skipped", "reason": f"skipped by the spec (skip={list(spec.skip)}); {state}"}
            else:
                update |= {"status": "applied", "dropped": dropped, "dropped_without_value": without}
                if n and with_value[c.column] == 0:
                    update["reason"] = (f"{state}: every clip fails {c.name}; provide what fills {c.column} "
                                        f"or list {c.name} in the spec's skip")  # fmt: skip
            report = report.model_copy(update=update)
        reports.append(report)
    return reports


def build_dataset(
    con_or_tables: "duckdb.DuckDBPyConnection | Mapping[str, pl.DataFrame | None]",
    spec: FilterSpec,
    input_versions: Mapping[str, str],
    out_root: str | os.PathLike,
    lake_snapshot: int | None = None,
) -> DatasetVersion:
    """Build (or reuse) the dataset version for ``spec`` over the given tables; see the module docstring.

    ``con_or_tables``: a DuckDB connection holding tables/views named ``clips``, ``aesthetic_scores``,
    ``motion_scores``, ``ocr_scores``, ``captions``, ``match_scores`` (e.g. the lakehouse catalog), or a dict of
    those names to Polars frames (missing names and column-less frames are treated as absent tables).
    ``input_versions``: table name -> data version of what was read; it names the version with the spec.
    ``lake_snapshot``: the snapshot the tables were read from, recorded in the manifest (the version pins it).
    """
    version = dataset_version(spec, input_versions)
    root = Path(out_root)
    final = root / version
    if (final / "manifest.json").is_file():
        return load_version(root, version).model_copy(update={"reused": True})

    con, schemas, owned = _open_tables(con_or_tables)
    try:
        # 1. Check the clips table.
        if CLIPS_TABLE not in schemas:
            raise ValueError("no clips table: materialize the clips asset first")
        missing = [c for c in CLIP_REQUIRED if c not in schemas[CLIPS_TABLE]]
        if missing:
            raise ValueError(f"clips table lacks column(s) {missing}; it has {list(schemas[CLIPS_TABLE])}")

        # 2. Join clips with scores and captions, one row per clip.
        con.execute(f"CREATE OR REPLACE TEMP TABLE __ds_joined AS {_joined_sql(schemas)}")
        (n,) = con.execute("SELECT count(*) FROM __ds_joined").fetchone()

        # 3. The criteria the spec applies (set, and not in its skip list): only the spec decides, never the data.
        applied = spec.active()
        values = {c.name: _ident(c.column) for c, _ in applied}  # __ds_joined has every criterion's column

        # 4. Attribute each clip to its first failing check (NULL reason: kept so far), then dedupe the survivors.
        #    A missing value fails an active criterion (curation.filters), with the reason it is missing.
        leading = [f"WHEN text IS NULL OR trim(text) = '' THEN {_sql_str(NO_CAPTION)}"] if spec.require_caption else []
        reason = first_failure_sql(applied, values, leading)
        null_reasons = {c.name: _ident(c.column + "_reason") for c, _ in applied if c.column in SIDE_TABLES.values()}
        detail = failure_detail_sql(applied, values, "drop_reason", null_reasons)
        detail = (f"CASE WHEN drop_reason = {_sql_str(NO_CAPTION)} THEN {_sql_str(NO_CAPTION)} || "
                  f"coalesce(': ' || text_reason, '') ELSE {detail} END")  # fmt: skip
        missing = "CASE drop_reason " + " ".join(
            f"WHEN {_sql_str(c.name)} THEN {values[c.name]} IS NULL" for c, _ in applied) + " ELSE false END"
        con.execute(f"CREATE OR REPLACE TEMP TABLE __ds_checked AS SELECT *, {reason} AS drop_reason FROM __ds_joined")
        con.execute(f"CREATE OR REPLACE TEMP TABLE __ds_checked AS SELECT *, {detail} AS drop_detail, "
                    f"{missing if applied else 'false'} AS __ds_missing FROM __ds_checked")
        if spec.dedupe:
            con.execute(
                f"""
                CREATE OR REPLACE TEMP TABLE __ds_checked AS
                SELECT * EXCLUDE (rank_in_id, drop_reason, drop_detail),
                       CASE WHEN drop_reason IS NULL AND rank_in_id > 1 THEN {_sql_str(DUPLICATE)} ELSE drop_reason END
                       AS drop_reason,
                       CASE WHEN drop_reason IS NULL AND rank_in_id > 1 THEN {_sql_str(DUPLICATE_DETAIL)} ELSE drop_detail END
                       AS drop_detail
                FROM (
                    SELECT *,
                           row_number() OVER (PARTITION BY id, drop_reason IS NULL
                                              ORDER BY batch NULLS LAST, path, start_frame NULLS LAST) AS rank_in_id
                    FROM __ds_checked
                )
                """
            )
        criteria = _criteria_report(con, spec, schemas, n)
        skipped = [SkippedCriterion(criterion=r.criterion, column=r.column, reason=r.reason or "")
                   for r in criteria if r.status == "skipped"]  # fmt: skip
        checked_keys = {c.name for c, _ in applied}
        checked_keys |= ({NO_CAPTION} if spec.require_caption else set()) | ({DUPLICATE} if spec.dedupe else set())
        found = dict(
            con.execute("SELECT drop_reason, count(*) FROM __ds_checked WHERE drop_reason IS NOT NULL GROUP BY 1").fetchall()
        )
        drop_counts = {key: int(found.get(key, 0)) for key in DROP_ORDER if key in checked_keys}
        (kept,) = con.execute("SELECT count(*) FROM __ds_checked WHERE drop_reason IS NULL").fetchone()

        # 5. Write the version under a temporary name, then rename it into place.
        root.mkdir(parents=True, exist_ok=True)
        with scratch_sibling(final) as tmp:
            tmp.mkdir()
            order = "ORDER BY video_id NULLS LAST, start_frame NULLS LAST, path, id"
            csv_cols = ", ".join(_ident(c) for c in CSV_COLUMNS)
            kept_rows = f"SELECT {csv_cols}, batch FROM __ds_checked WHERE drop_reason IS NULL {order}"
            con.execute(f"COPY ({kept_rows}) TO {_sql_str(tmp / 'data.parquet')} (FORMAT PARQUET)")
            con.execute(
                f"COPY (SELECT {csv_cols} FROM __ds_checked WHERE drop_reason IS NULL {order}) "
                f"TO {_sql_str(tmp / 'opensora.csv')} (FORMAT CSV, HEADER)"
            )
            con.execute(
                "COPY (SELECT id, path, batch, drop_reason AS reason, drop_detail AS detail FROM __ds_checked "
                "WHERE drop_reason IS NOT NULL "
                f"ORDER BY path, id) TO {_sql_str(tmp / 'dropped.parquet')} (FORMAT PARQUET)"
            )
            created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            manifest = {
                "version": version,
                "builder": BUILDER_VERSION,
                "spec": spec.model_dump(mode="json"),
                "inputs": dict(sorted((str(k), str(v)) for k, v in input_versions.items())),
                "counts": {"clips": int(n), "kept": int(kept), "dropped": int(n - kept)},
                "drop_counts": drop_counts,
                "applied": {c.name: f"{c.column} {c.op} {getattr(spec, c.name)}" for c, _ in applied},
                "skipped": [s.model_dump() for s in skipped],
                "criteria": [r.model_dump() for r in criteria],
                "columns": list(CSV_COLUMNS),
                "created_at": created_at,
                "lake_snapshot": lake_snapshot,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if not publish(tmp, final, exists="keep"):
                # Another build of the same version won the race; its content is the same by construction.
                if not (final / "manifest.json").is_file():
                    raise FileExistsError(f"{final} exists but holds no manifest.json (not a dataset version)")
                return load_version(root, version).model_copy(update={"reused": True})
    finally:
        for name in ("__ds_checked", "__ds_joined"):
            con.execute(f"DROP TABLE IF EXISTS {name}")
        if owned:
            con.close()
    return load_version(root, version)


# ---- UI helpers --------------------------------------------------------------------------------------------------
def histograms(df: "pl.DataFrame", columns: Sequence[str], bins: int = 20) -> dict[str, dict[str, Any]]:
    """Per numeric column: bin edges and counts over its non-null values, for asset metadata and plots.

    Columns that are absent or have no values are left out (an all-null score column has nothing to show).
    """
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    for name in columns:
        if name not in df.columns or not df[name].dtype.is_numeric():
            continue
        values = df[name].drop_nulls().drop_nans() if df[name].dtype.is_float() else df[name].drop_nulls()
        if values.len() == 0:
            continue
        counts, edges = np.histogram(values.to_numpy().astype(np.float64), bins=bins)
        out[name] = {
            "edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts],
            "count": int(values.len()),
            "nulls": int(df[name].null_count()),
            "min": float(values.min()),
            "max": float(values.max()),
            "mean": float(values.mean()),
        }
    return out
