"""Which clips a dataset version keeps, and why each other clip was left out.

The clips table is joined with its score and caption tables (one row per clip), then every clip is attributed to
the first check it fails, in the fixed order ``DROP_ORDER``: "no caption", the criteria of ``curation.filters``
(the same SQL as ``opensora-dag data filter``), "duplicate". A clip without a value fails an active criterion, with
the reason the value is missing. The result is left in the temporary table ``CHECKED`` of the connection
(``drop_reason`` NULL: kept), where ``curation.datasets`` writes the version from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from pydantic import BaseModel

from curation.filters import (
    CRITERIA,
    FilterSpec,
    failure_detail_sql,
    first_failure_sql,
    ident,
    resolution_sql,
    sql_str,
)

if TYPE_CHECKING:
    import duckdb

CLIPS_TABLE = "clips"
# Score / caption table -> the one column the builder takes from it.
SIDE_TABLES = {
    "aesthetic_scores": "aes",
    "motion_scores": "flow",
    "ocr_scores": "ocr",
    "match_scores": "match",
    "captions": "text",
}
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

# Temporary tables of the connection: the joined clips, then the same rows with their drop reason and detail.
JOINED = "__ds_joined"
CHECKED = "__ds_checked"


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


@dataclass(frozen=True)
class Selection:
    """What ``select_rows`` found: clip count, rows kept, drops per checked key (DROP_ORDER), every criterion."""

    num_clips: int
    kept: int
    drop_counts: dict[str, int]
    criteria: list[CriterionReport]


# ---- reading the tables ------------------------------------------------------------------------------------------
def open_tables(
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
        name: {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {ident(name)}").fetchall()}
        for name in available
    }
    return con, schemas, owned


def drop_selection_tables(con: "duckdb.DuckDBPyConnection") -> None:
    for name in (CHECKED, JOINED):
        con.execute(f"DROP TABLE IF EXISTS {name}")


def _check_clips_table(schemas: dict[str, dict[str, str]]) -> None:
    if CLIPS_TABLE not in schemas:
        raise ValueError("no clips table: materialize the clips asset first")
    missing = [c for c in CLIP_REQUIRED if c not in schemas[CLIPS_TABLE]]
    if missing:
        raise ValueError(f"clips table lacks column(s) {missing}; it has {list(schemas[CLIPS_TABLE])}")


# ---- joining -----------------------------------------------------------------------------------------------------
def _clip_columns_sql(clip_cols: dict[str, str]) -> list[str]:
    """The clip columns of the joined row: required ones, optional ones (NULL when absent), resolution, ratio."""
    select = [
        "CAST(c.id AS VARCHAR) AS id",
        "CAST(c.path AS VARCHAR) AS path",
        "CAST(c.num_frames AS BIGINT) AS num_frames",
        "CAST(c.height AS BIGINT) AS height",
        "CAST(c.width AS BIGINT) AS width",
    ]
    for name, sql_type in CLIP_OPTIONAL.items():
        value = f"c.{ident(name)}" if name in clip_cols else "NULL"
        select.append(f"CAST({value} AS {sql_type}) AS {name}")
    ratio = "CAST(c.height AS DOUBLE) / nullif(CAST(c.width AS DOUBLE), 0)"
    select.append(f"{resolution_sql(clip_cols, prefix='c.')} AS resolution")  # the filter's own definition
    select.append(f"coalesce(CAST(c.aspect_ratio AS DOUBLE), {ratio}) AS aspect_ratio" if "aspect_ratio" in clip_cols
                  else f"{ratio} AS aspect_ratio")  # fmt: skip
    return select


def _side_table_sql(alias: str, table: str, column: str, cols: dict[str, str]) -> tuple[str | None, list[str]]:
    """A side table reduced to one row per id (a CTE named ``alias``, None when the table or column is absent) and
    the joined row's two columns from it: the value and ``<column>_reason``."""
    why = ident(f"{column}_reason")
    if "id" not in cols or column not in cols:
        return None, [f"CAST(NULL AS {'VARCHAR' if column == 'text' else 'DOUBLE'}) AS {ident(column)}",
                      f"CAST(NULL AS VARCHAR) AS {why}"]  # fmt: skip
    if column == "text":
        has_value = "text IS NOT NULL AND trim(CAST(text AS VARCHAR)) <> ''"
        reduce = f"min(CAST(text AS VARCHAR)) FILTER (WHERE {has_value})"
    else:
        has_value = f"{ident(column)} IS NOT NULL"
        reduce = f"max(CAST({ident(column)} AS DOUBLE))"
    reason = f"min(CAST(reason AS VARCHAR)) FILTER (WHERE NOT ({has_value}))" if "reason" in cols else "CAST(NULL AS VARCHAR)"
    cte = (f"{alias} AS (SELECT CAST(id AS VARCHAR) AS id, {reduce} AS {ident(column)}, {reason} AS {why} "
           f"FROM {ident(table)} GROUP BY CAST(id AS VARCHAR))")  # fmt: skip
    # A clip the table has no row for has no reason from it; say so rather than leave it blank.
    no_row = sql_str(f"no {table} row for the clip")
    return cte, [f"{alias}.{ident(column)} AS {ident(column)}",
                 f"CASE WHEN {alias}.id IS NULL THEN {no_row} ELSE {alias}.{why} END AS {why}"]  # fmt: skip


def joined_sql(schemas: dict[str, dict[str, str]]) -> str:
    """One row per clip: clip columns, then each side table's column (NULL when the table or column is absent).

    Side tables are first reduced to one row per id, so a clip scored in two batches does not multiply:
    scores of the same id agree (ids are content hashes), and the caption kept is the smallest non-empty one,
    which makes the choice deterministic. ``<column>_reason`` carries a side table's ``reason`` for a missing value
    (e.g. "CLIP checkpoint path is not set"), so a clip dropped for lacking it says why.
    """
    select = _clip_columns_sql(schemas[CLIPS_TABLE])
    ctes, joins = [], []
    for i, (table, column) in enumerate(SIDE_TABLES.items()):
        alias = f"s{i}"
        cte, columns = _side_table_sql(alias, table, column, schemas.get(table, {}))
        select += columns
        if cte is not None:
            ctes.append(cte)
            joins.append(f"LEFT JOIN {alias} ON {alias}.id = CAST(c.id AS VARCHAR)")
    with_clause = ("WITH " + ", ".join(ctes) + " ") if ctes else ""
    return f"{with_clause}SELECT {', '.join(select)} FROM {ident(CLIPS_TABLE)} c {' '.join(joins)}"


# ---- attributing drops -------------------------------------------------------------------------------------------
def _mark_first_failures(con: "duckdb.DuckDBPyConnection", spec: FilterSpec) -> None:
    """``CHECKED``: the joined rows with the first check each fails (``drop_reason``, NULL: kept so far), why
    (``drop_detail``) and whether the failing value was missing (``__ds_missing``)."""
    applied = spec.active()
    values = {c.name: ident(c.column) for c, _ in applied}  # JOINED has every criterion's column
    leading = [f"WHEN text IS NULL OR trim(text) = '' THEN {sql_str(NO_CAPTION)}"] if spec.require_caption else []
    reason = first_failure_sql(applied, values, leading)
    null_reasons = {c.name: ident(c.column + "_reason") for c, _ in applied if c.column in SIDE_TABLES.values()}
    detail = failure_detail_sql(applied, values, "drop_reason", null_reasons)
    detail = (f"CASE WHEN drop_reason = {sql_str(NO_CAPTION)} THEN {sql_str(NO_CAPTION)} || "
              f"coalesce(': ' || text_reason, '') ELSE {detail} END")  # fmt: skip
    missing = "CASE drop_reason " + " ".join(
        f"WHEN {sql_str(c.name)} THEN {values[c.name]} IS NULL" for c, _ in applied) + " ELSE false END"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {CHECKED} AS SELECT *, {reason} AS drop_reason FROM {JOINED}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE {CHECKED} AS SELECT *, {detail} AS drop_detail, "
                f"{missing if applied else 'false'} AS __ds_missing FROM {CHECKED}")


def _mark_duplicates(con: "duckdb.DuckDBPyConnection") -> None:
    """Of the survivors sharing a clip id, keep the first (batch, then path, then start frame); the rest are
    duplicates."""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {CHECKED} AS
        SELECT * EXCLUDE (rank_in_id, drop_reason, drop_detail),
               CASE WHEN drop_reason IS NULL AND rank_in_id > 1 THEN {sql_str(DUPLICATE)} ELSE drop_reason END
               AS drop_reason,
               CASE WHEN drop_reason IS NULL AND rank_in_id > 1 THEN {sql_str(DUPLICATE_DETAIL)} ELSE drop_detail END
               AS drop_detail
        FROM (
            SELECT *,
                   row_number() OVER (PARTITION BY id, drop_reason IS NULL
                                      ORDER BY batch NULLS LAST, path, start_frame NULLS LAST) AS rank_in_id
            FROM {CHECKED}
        )
        """
    )


def _drop_counts(con: "duckdb.DuckDBPyConnection", spec: FilterSpec) -> dict[str, int]:
    """Clips dropped per check the spec made, in DROP_ORDER (a check that dropped nothing counts 0)."""
    checked_keys = {c.name for c, _ in spec.active()}
    checked_keys |= ({NO_CAPTION} if spec.require_caption else set()) | ({DUPLICATE} if spec.dedupe else set())
    found = dict(
        con.execute(f"SELECT drop_reason, count(*) FROM {CHECKED} WHERE drop_reason IS NOT NULL GROUP BY 1").fetchall()
    )
    return {key: int(found.get(key, 0)) for key in DROP_ORDER if key in checked_keys}


# ---- reporting criteria ------------------------------------------------------------------------------------------
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
        aggs.append(f"count({ident(column)})")
        aggs.append(f"min({ident(column + '_reason')})" if column in table_of else "NULL")  # deterministic
    row = con.execute(f"SELECT {', '.join(aggs)} FROM {JOINED}").fetchone() if aggs else ()
    with_value = {col: int(row[2 * i]) for i, col in enumerate(columns)}
    why_null = {col: row[2 * i + 1] for i, col in enumerate(columns)}
    drops = {
        name: (int(total), int(without))
        for name, total, without in con.execute(
            f"SELECT drop_reason, count(*), count(*) FILTER (WHERE __ds_missing) FROM {CHECKED} "
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


# ---- the whole selection -----------------------------------------------------------------------------------------
def select_rows(con: "duckdb.DuckDBPyConnection", schemas: dict[str, dict[str, str]], spec: FilterSpec) -> Selection:
    """Check, join and attribute every clip of the tables ``open_tables`` found; the rows are left in ``CHECKED``.

    Only the spec decides which criteria apply (set, and not in its skip list), never the data: a criterion whose
    column is empty drops every clip, and its report says why.
    """
    # 1. Check the clips table.
    _check_clips_table(schemas)

    # 2. Join clips with scores and captions, one row per clip.
    con.execute(f"CREATE OR REPLACE TEMP TABLE {JOINED} AS {joined_sql(schemas)}")
    (n,) = con.execute(f"SELECT count(*) FROM {JOINED}").fetchone()

    # 3. Attribute each clip to its first failing check, then dedupe the survivors.
    _mark_first_failures(con, spec)
    if spec.dedupe:
        _mark_duplicates(con)

    # 4. Count what was dropped where, and report every criterion.
    (kept,) = con.execute(f"SELECT count(*) FROM {CHECKED} WHERE drop_reason IS NULL").fetchone()
    return Selection(num_clips=int(n), kept=int(kept), drop_counts=_drop_counts(con, spec),
                     criteria=_criteria_report(con, spec, schemas, n))  # fmt: skip


__all__ = [
    "CHECKED", "CLIPS_TABLE", "CLIP_OPTIONAL", "CLIP_REQUIRED", "CriterionReport", "DROP_ORDER", "DUPLICATE",
    "NO_CAPTION", "SIDE_TABLES", "Selection", "drop_selection_tables", "joined_sql", "open_tables", "select_rows",
]  # fmt: skip
