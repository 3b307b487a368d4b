"""Curated dataset versions: clips joined with their scores and captions, filtered by a spec, frozen on disk.

A version is named by a short hash of what determines its content: the filter spec (canonical JSON), the data
versions of the input tables and the builder's own format number. Building the same thing twice finds the folder
already there and reuses it; anything that changes the content changes the name, so a version folder is never
edited after it appears (it is written under a temporary name and renamed into place).

Each version folder holds::

    data.parquet     the kept clips: Open-Sora columns, provenance columns, and ``batch`` when the clips had one
    opensora.csv     the same rows, Open-Sora columns + provenance columns (what the reference's training reads)
    dropped.parquet  id, path and the reason of every clip left out
    manifest.json    spec, inputs, counts, drop counts per filter, skipped criteria with reasons, created_at

Drop counts are attributed in a fixed order (``DROP_ORDER``): each clip is counted once, at the first check it
fails. A criterion whose column has no value at all (a scorer that ran without its weights writes an all-null
column, or the score table is absent) is skipped and reported rather than applied, since applying it would drop
every clip for a reason that says nothing about the clips.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import duckdb
    import polars as pl

# Bump when the builder's output changes for the same spec and inputs: it is part of the version hash.
BUILDER_VERSION = 1

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
PROVENANCE_COLUMNS = ("id", "video_id", "start_frame", "end_frame", "start_s", "end_s")
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
}
NO_CAPTION = "no caption"
DUPLICATE = "duplicate"


class FilterSpec(BaseModel):
    """Which clips go into a curated dataset. Every bound is inclusive and optional (None: not applied).

    A clip whose value is missing fails a bound that is applied (as ``filter`` in the reference's datautil).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_frames: int | None = Field(None, ge=1, description="keep clips with num_frames >= this")
    max_frames: int | None = Field(None, ge=1, description="keep clips with num_frames <= this")
    min_resolution: int | None = Field(None, ge=1, description="keep clips with height*width >= this (pixels)")
    max_resolution: int | None = Field(None, ge=1, description="keep clips with height*width <= this (pixels)")
    fpsmin: float | None = Field(None, ge=0, description="keep clips with fps >= this")
    fpsmax: float | None = Field(None, ge=0, description="keep clips with fps <= this")
    aesmin: float | None = Field(None, description="keep clips with aesthetic score >= this (reference: 5)")
    flowmin: float | None = Field(None, ge=0, description="keep clips with optical-flow score >= this")
    flowmax: float | None = Field(None, ge=0, description="keep clips with optical-flow score <= this")
    ocrmax: float | None = Field(None, ge=0, description="keep clips with at most this many OCR text boxes")
    matchmin: float | None = Field(None, description="keep clips with CLIP text-frame match (100*cos) >= this")
    dedupe: bool = Field(
        True, description="keep one row per clip id (same content landed in two batches): first batch, then path"
    )
    require_caption: bool = Field(True, description="drop clips without a non-empty caption (training needs text)")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "FilterSpec":
        for lo, hi in (("min_frames", "max_frames"), ("min_resolution", "max_resolution"),
                       ("fpsmin", "fpsmax"), ("flowmin", "flowmax")):  # fmt: skip
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo}={a} is greater than {hi}={b}: no clip could pass")
        return self

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


# Named specs, usable as CLI / launchpad choices.
PRESETS: dict[str, FilterSpec] = {
    "all": FilterSpec(),
    # The reference's curation recipe keeps aes >= 5 (report section 4).
    "reference": FilterSpec(aesmin=5.0),
    # Trainable clips for the bucket sampler: at least 16 frames at 144p or more, some motion, little text.
    "train": FilterSpec(min_frames=16, min_resolution=144 * 256, aesmin=5.0, flowmin=0.5, ocrmax=5),
}


@dataclass(frozen=True)
class Criterion:
    """One spec bound: keep a clip when ``column <op> spec.<name>``."""

    name: str
    column: str
    op: str


# The fixed order drops are attributed in (after "no caption", before "duplicate").
CRITERIA = (
    Criterion("min_frames", "num_frames", ">="),
    Criterion("max_frames", "num_frames", "<="),
    Criterion("min_resolution", "resolution", ">="),
    Criterion("max_resolution", "resolution", "<="),
    Criterion("fpsmin", "fps", ">="),
    Criterion("fpsmax", "fps", "<="),
    Criterion("aesmin", "aes", ">="),
    Criterion("flowmin", "flow", ">="),
    Criterion("flowmax", "flow", "<="),
    Criterion("ocrmax", "ocr", "<="),
    Criterion("matchmin", "match", ">="),
)
DROP_ORDER = (NO_CAPTION, *(c.name for c in CRITERIA), DUPLICATE)


class SkippedCriterion(BaseModel):
    criterion: str
    column: str
    reason: str


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
    which makes the choice deterministic.
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
    hw = "CAST(c.height AS BIGINT) * CAST(c.width AS BIGINT)"
    ratio = "CAST(c.height AS DOUBLE) / nullif(CAST(c.width AS DOUBLE), 0)"
    select.append(f"coalesce(CAST(c.resolution AS BIGINT), {hw}) AS resolution" if "resolution" in clip_cols
                  else f"{hw} AS resolution")  # fmt: skip
    select.append(f"coalesce(CAST(c.aspect_ratio AS DOUBLE), {ratio}) AS aspect_ratio" if "aspect_ratio" in clip_cols
                  else f"{ratio} AS aspect_ratio")  # fmt: skip

    ctes, joins = [], []
    for i, (table, column) in enumerate(SIDE_TABLES.items()):
        alias = f"s{i}"
        cols = schemas.get(table, {})
        if "id" not in cols or column not in cols:
            select.append(f"CAST(NULL AS {'VARCHAR' if column == 'text' else 'DOUBLE'}) AS {_ident(column)}")
            continue
        if column == "text":
            reduce = "min(CAST(text AS VARCHAR)) FILTER (WHERE text IS NOT NULL AND trim(CAST(text AS VARCHAR)) <> '')"
        else:
            reduce = f"max(CAST({_ident(column)} AS DOUBLE))"
        ctes.append(
            f"{alias} AS (SELECT CAST(id AS VARCHAR) AS id, {reduce} AS {_ident(column)} "
            f"FROM {_ident(table)} GROUP BY CAST(id AS VARCHAR))"
        )
        joins.append(f"LEFT JOIN {alias} ON {alias}.id = CAST(c.id AS VARCHAR)")
        select.append(f"{alias}.{_ident(column)} AS {_ident(column)}")
    with_clause = ("WITH " + ", ".join(ctes) + " ") if ctes else ""
    return f"{with_clause}SELECT {', '.join(select)} FROM {_ident(CLIPS_TABLE)} c {' '.join(joins)}"


def _skipped(
    con: "duckdb.DuckDBPyConnection", spec: FilterSpec, schemas: dict[str, dict[str, str]], n: int
) -> list[SkippedCriterion]:
    """Criteria set in ``spec`` whose column has no value in any clip: skipped, with why."""
    active = [c for c in CRITERIA if getattr(spec, c.name) is not None]
    if not active or n == 0:
        return []
    columns = sorted({c.column for c in active})
    counts = con.execute(f"SELECT {', '.join(f'count({_ident(c)})' for c in columns)} FROM __ds_joined").fetchone()
    non_null = dict(zip(columns, counts))
    table_of = {col: table for table, col in SIDE_TABLES.items()}
    skipped = []
    for criterion in active:
        if non_null[criterion.column] > 0:
            continue
        table = table_of.get(criterion.column, CLIPS_TABLE)
        derived = table == CLIPS_TABLE and criterion.column in ("resolution", "aspect_ratio")  # computed from H, W
        needed = [criterion.column] if table == CLIPS_TABLE else ["id", criterion.column]
        if table not in schemas:
            reason = f"table {table} was not provided (or has no rows)"
        elif not derived and any(c not in schemas[table] for c in needed):
            reason = f"table {table} lacks column(s) {[c for c in needed if c not in schemas[table]]}"
        else:
            reason = f"{table}.{criterion.column} is null for all {n} clips (scorer weights missing?)"
        skipped.append(SkippedCriterion(criterion=criterion.name, column=criterion.column, reason=reason))
    return skipped


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

        # 3. Decide which criteria apply; an all-null column means the scorer never ran: skip, report.
        skipped = _skipped(con, spec, schemas, n)
        skipped_names = {s.criterion for s in skipped}
        applied = [c for c in CRITERIA if getattr(spec, c.name) is not None and c.name not in skipped_names]

        # 4. Attribute each clip to its first failing check (NULL reason: kept so far), then dedupe the survivors.
        cases = []
        if spec.require_caption:
            cases.append(f"WHEN text IS NULL OR trim(text) = '' THEN {_sql_str(NO_CAPTION)}")
        for c in applied:
            # NOT coalesce(..., false): a missing value fails the bound, as in the reference.
            value = float(getattr(spec, c.name))
            cases.append(f"WHEN NOT coalesce({_ident(c.column)} {c.op} {value!r}, false) THEN {_sql_str(c.name)}")
        reason = f"CASE {' '.join(cases)} ELSE NULL END" if cases else "CAST(NULL AS VARCHAR)"
        con.execute(f"CREATE OR REPLACE TEMP TABLE __ds_checked AS SELECT *, {reason} AS drop_reason FROM __ds_joined")
        if spec.dedupe:
            con.execute(
                f"""
                CREATE OR REPLACE TEMP TABLE __ds_checked AS
                SELECT * EXCLUDE (rank_in_id, drop_reason),
                       CASE WHEN drop_reason IS NULL AND rank_in_id > 1 THEN {_sql_str(DUPLICATE)} ELSE drop_reason END
                       AS drop_reason
                FROM (
                    SELECT *,
                           row_number() OVER (PARTITION BY id, drop_reason IS NULL
                                              ORDER BY batch NULLS LAST, path, start_frame NULLS LAST) AS rank_in_id
                    FROM __ds_checked
                )
                """
            )
        checked_keys = {c.name for c in applied}
        checked_keys |= ({NO_CAPTION} if spec.require_caption else set()) | ({DUPLICATE} if spec.dedupe else set())
        found = dict(
            con.execute("SELECT drop_reason, count(*) FROM __ds_checked WHERE drop_reason IS NOT NULL GROUP BY 1").fetchall()
        )
        drop_counts = {key: int(found.get(key, 0)) for key in DROP_ORDER if key in checked_keys}
        (kept,) = con.execute("SELECT count(*) FROM __ds_checked WHERE drop_reason IS NULL").fetchone()

        # 5. Write the version under a temporary name, then rename it into place.
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{version}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            order = "ORDER BY video_id NULLS LAST, start_frame NULLS LAST, path, id"
            csv_cols = ", ".join(_ident(c) for c in CSV_COLUMNS)
            kept_rows = f"SELECT {csv_cols}, batch FROM __ds_checked WHERE drop_reason IS NULL {order}"
            con.execute(f"COPY ({kept_rows}) TO {_sql_str(tmp / 'data.parquet')} (FORMAT PARQUET)")
            con.execute(
                f"COPY (SELECT {csv_cols} FROM __ds_checked WHERE drop_reason IS NULL {order}) "
                f"TO {_sql_str(tmp / 'opensora.csv')} (FORMAT CSV, HEADER)"
            )
            con.execute(
                "COPY (SELECT id, path, batch, drop_reason AS reason FROM __ds_checked WHERE drop_reason IS NOT NULL "
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
                "applied": {c.name: f"{c.column} {c.op} {getattr(spec, c.name)}" for c in applied},
                "skipped": [s.model_dump() for s in skipped],
                "columns": list(CSV_COLUMNS),
                "created_at": created_at,
                "lake_snapshot": lake_snapshot,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                # Another build of the same version won the race; its content is the same by construction.
                if not (final / "manifest.json").is_file():
                    raise
                return load_version(root, version).model_copy(update={"reused": True})
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
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
