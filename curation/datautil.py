"""Table tools for Open-Sora data files: ``opensora-dag data info|merge|dedupe|stats|filter``.

The reference ships a pandas script that loads a whole CSV into memory for every operation. Here each operation is
one DuckDB query over the file, streamed from disk and written with ``COPY ... TO`` (Parquet or CSV, chosen by the
output's extension), so a million rows take about a second on two cores and memory stays flat. Polars is used for
the one operation SQL does poorly: an order-preserving "keep the first row per key" (``dedupe``).

The filter flags keep the reference's meaning: bounds are inclusive, and a row whose value is missing fails the
bound (NaN compares false in pandas, NULL is not true in SQL), so ``--aesmin 5`` also drops rows never scored. The
criteria are ``curation.filters``, the same ones (same SQL) the curated dataset applies; ``filter`` reports how many
rows each flag dropped and how many of them had no value (``--dropped FILE`` writes them with the reason).

Every write goes to a temporary file beside the target and is renamed over it, so ``filter in.parquet -o in.parquet``
is safe and a reader never sees half a file. The command line (arguments, printed tables) is ``curation.datautil_cli``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from common.files import atomic_file
from curation.filters import FilterSpec, failure_detail_sql, first_failure_sql, keep_sql, value_sql

if TYPE_CHECKING:
    import duckdb
    import polars as pl

# Columns of the reference's data CSV (report section 3): required path/text/num_frames, the rest optional.
OPENSORA_COLUMNS = (
    "path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "resolution",
    "aes", "flow", "ocr", "match",
)  # fmt: skip
REQUIRED_COLUMNS = ("path", "text", "num_frames")
# Numeric columns ``stats`` describes (when present), plus the caption length computed from ``text``.
STAT_COLUMNS = (
    "num_frames", "height", "width", "aspect_ratio", "fps", "resolution", "text_len",
    "aes", "flow", "ocr", "match",
)  # fmt: skip
# Identifier-like columns that must stay strings even when every value looks like a number (hex ids, "0001").
STRING_COLUMNS = ("id", "video_id", "path", "text")
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
QUANTILES = (0.25, 0.5, 0.75)


class DatautilError(ValueError):
    """Bad input from the user: unknown extension, missing file or a column a flag needs. The CLI exits 2."""


# ---- results -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnInfo:
    name: str
    dtype: str
    non_null: int
    nulls: int
    min: Any = None
    max: Any = None
    mean: float | None = None  # numeric columns only


@dataclass(frozen=True)
class TableInfo:
    """What ``info`` knows about a table without opening any video.

    ``missing_video_info`` counts rows lacking num_frames, height or width (all rows when a column is absent):
    the reference would probe those videos; we only report them.
    """

    path: str
    format: str
    rows: int
    columns: list[ColumnInfo] = field(default_factory=list)
    missing_required: list[str] = field(default_factory=list)
    missing_video_info: int = 0

    def column(self, name: str) -> ColumnInfo:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


@dataclass(frozen=True)
class WriteResult:
    """Rows read and rows written by merge / dedupe / filter."""

    output: str
    rows_in: int
    rows_out: int
    # filter only: rows dropped per flag (first flag failed, in CRITERIA order), and how many of those had no value
    drop_counts: dict[str, int] = field(default_factory=dict)
    missing_counts: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return self.rows_in - self.rows_out


# ---- plumbing ----------------------------------------------------------------------------------------------------
def table_format(path: str | os.PathLike) -> str:
    """``"csv"`` or ``"parquet"`` from the file extension; anything else is a user error."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise DatautilError(f"{path}: unknown extension {suffix!r}; use one of {', '.join(sorted(FORMATS))}")
    return FORMATS[suffix]


def _sql_str(value: str | os.PathLike) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect() -> "duckdb.DuckDBPyConnection":
    import duckdb

    return duckdb.connect(":memory:")


def _source(con: "duckdb.DuckDBPyConnection", path: str | os.PathLike) -> str:
    """A DuckDB table expression reading ``path``; CSV id/path/text columns are forced to strings."""
    fmt = table_format(path)
    if not Path(path).is_file():
        raise DatautilError(f"{path}: no such file")
    if fmt == "parquet":
        return f"read_parquet({_sql_str(path)})"
    sniffed = f"read_csv({_sql_str(path)}, header = true)"
    present = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {sniffed}").fetchall()]
    forced = [c for c in STRING_COLUMNS if c in present]
    if not forced:
        return sniffed
    types = "{" + ", ".join(f"{_sql_str(c)}: 'VARCHAR'" for c in forced) + "}"
    return f"read_csv({_sql_str(path)}, header = true, types = {types})"


def _schema(con: "duckdb.DuckDBPyConnection", source: str) -> dict[str, str]:
    return {row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}


def _is_numeric(dtype: str) -> bool:
    base = dtype.upper().split("(")[0]
    return base in {
        "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
        "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL", "REAL",
    }  # fmt: skip


def _require(schema: dict[str, str], columns: Sequence[str], why: str, path: str | os.PathLike) -> None:
    missing = [c for c in columns if c not in schema]
    if missing:
        raise DatautilError(f"{path}: {why} needs column(s) {missing}; the table has {list(schema)}")


def _copy(con: "duckdb.DuckDBPyConnection", select: str, output: str | os.PathLike) -> int:
    """Write ``select`` to ``output`` (format by extension) atomically; returns the number of rows written."""
    fmt = table_format(output)
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    options = "FORMAT PARQUET" if fmt == "parquet" else "FORMAT CSV, HEADER"
    with atomic_file(target) as tmp:
        (rows,) = con.execute(f"COPY ({select}) TO {_sql_str(tmp)} ({options})").fetchone()
    return int(rows)


def _count(con: "duckdb.DuckDBPyConnection", source: str) -> int:
    return int(con.execute(f"SELECT count(*) FROM {source}").fetchone()[0])


# ---- operations --------------------------------------------------------------------------------------------------
def info(input: str | os.PathLike) -> TableInfo:
    """Row count, schema and per-column non-null count / min / max (/ mean for numbers), in one scan."""
    con = _connect()
    try:
        source = _source(con, input)
        schema = _schema(con, source)
        aggs = ["count(*)"]
        for name, dtype in schema.items():
            col = _ident(name)
            aggs += [f"count({col})", f"min({col})", f"max({col})"]
            aggs.append(f"avg({col})" if _is_numeric(dtype) else "NULL")
        video_cols = [c for c in ("num_frames", "height", "width") if c in schema]
        if len(video_cols) == 3:
            aggs.append("count(*) FILTER (WHERE num_frames IS NULL OR height IS NULL OR width IS NULL)")
        row = con.execute(f"SELECT {', '.join(aggs)} FROM {source}").fetchone()
    finally:
        con.close()
    rows = int(row[0])
    columns = []
    for i, (name, dtype) in enumerate(schema.items()):
        non_null, lo, hi, mean = row[1 + 4 * i : 5 + 4 * i]
        columns.append(ColumnInfo(name, dtype, int(non_null), rows - int(non_null), lo, hi, mean))
    missing_video = int(row[-1]) if len(video_cols) == 3 else rows
    return TableInfo(
        path=str(input),
        format=table_format(input),
        rows=rows,
        columns=columns,
        missing_required=[c for c in REQUIRED_COLUMNS if c not in schema],
        missing_video_info=missing_video,
    )


def merge(inputs: Sequence[str | os.PathLike], output: str | os.PathLike) -> WriteResult:
    """Concatenate tables by column name, in input order; a column missing from one input is NULL there."""
    if not inputs:
        raise DatautilError("merge needs at least one input")
    formats = {table_format(p) for p in inputs}
    con = _connect()
    try:
        if formats == {"parquet"}:
            for p in inputs:
                if not Path(p).is_file():
                    raise DatautilError(f"{p}: no such file")
            paths = "[" + ", ".join(_sql_str(p) for p in inputs) + "]"
            select = f"SELECT * FROM read_parquet({paths}, union_by_name = true)"
        else:
            # CSVs are sniffed one by one (each has its own dialect and types), then unioned by name.
            select = " UNION ALL BY NAME ".join(f"SELECT * FROM {_source(con, p)}" for p in inputs)
        rows = _copy(con, select, output)
    finally:
        con.close()
    return WriteResult(str(output), rows, rows)


def dedupe(input: str | os.PathLike, output: str | os.PathLike, subset: Sequence[str] = ("path",)) -> WriteResult:
    """Keep the first row of each ``subset`` key (by path, by id or by text), in the input's order.

    Rows whose key is missing count as one key, as in pandas ``drop_duplicates``.
    """
    import polars as pl

    subset = list(subset)
    if not subset:
        raise DatautilError("dedupe needs at least one key column")
    con = _connect()
    try:
        source = _source(con, input)
        schema = _schema(con, source)
        _require(schema, subset, "dedupe", input)
        if table_format(input) == "parquet":
            frame = pl.read_parquet(input)
        else:
            # CSVs go through DuckDB's sniffer, as in every other op, so types agree across ops.
            frame = con.sql(f"SELECT * FROM {source}").pl()
    finally:
        con.close()
    # Polars keeps the first row per key in order in one hash pass; SQL would need a window and a sort.
    kept = frame.unique(subset=subset, keep="first", maintain_order=True)
    write_frame(kept, output)
    return WriteResult(str(output), frame.height, kept.height)


def write_frame(frame: "pl.DataFrame", output: str | os.PathLike) -> None:
    """Write a Polars frame to ``output`` (format by extension) atomically."""
    fmt = table_format(output)
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        if fmt == "parquet":
            frame.write_parquet(tmp)
        else:
            frame.write_csv(tmp)


def stats(input: str | os.PathLike) -> "pl.DataFrame":
    """count / mean / std / min / 25% / 50% / 75% / max of each Open-Sora numeric column present.

    ``text_len`` is the caption length in characters, computed from ``text`` when the table has no ``text_len``
    column (the reference's ``text_len`` counts T5 tokens; characters need no tokenizer).
    """
    import polars as pl

    con = _connect()
    try:
        source = _source(con, input)
        schema = _schema(con, source)
        exprs: dict[str, str] = {}
        for name in STAT_COLUMNS:
            if name in schema and _is_numeric(schema[name]):
                exprs[name] = f"CAST({_ident(name)} AS DOUBLE)"
            elif name == "text_len" and "text" in schema:
                exprs[name] = "CAST(length(text) AS DOUBLE)"
        if not exprs:
            raise DatautilError(f"{input}: none of the Open-Sora numeric columns {list(STAT_COLUMNS)} is present")
        qs = "[" + ", ".join(str(q) for q in QUANTILES) + "]"
        aggs = []
        for expr in exprs.values():
            aggs += [
                f"count({expr})", f"avg({expr})", f"stddev_samp({expr})", f"min({expr})",
                f"quantile_cont({expr}, {qs})", f"max({expr})",
            ]  # fmt: skip
        row = con.execute(f"SELECT {', '.join(aggs)} FROM {source}").fetchone()
    finally:
        con.close()
    records = []
    for i, name in enumerate(exprs):
        count, mean, std, lo, quantiles, hi = row[6 * i : 6 * i + 6]
        quantiles = quantiles or [None] * len(QUANTILES)
        records.append(
            {"column": name, "count": int(count), "mean": mean, "std": std, "min": lo}
            | {f"{int(q * 100)}%": v for q, v in zip(QUANTILES, quantiles)}
            | {"max": hi}
        )
    return pl.DataFrame(records, schema_overrides={k: pl.Float64 for k in ("mean", "std", "min", "max")})


def filter(  # noqa: A001 - the reference's operation name; called as datautil.filter
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fmin: float | None = None,
    fmax: float | None = None,
    hwmin: float | None = None,
    hwmax: float | None = None,
    aesmin: float | None = None,
    flowmin: float | None = None,
    matchmin: float | None = None,
    flowmax: float | None = None,
    ocrmax: float | None = None,
    fpsmin: float | None = None,
    fpsmax: float | None = None,
    dropped: str | os.PathLike | None = None,
) -> WriteResult:
    """Keep rows meeting every given bound (inclusive); a missing value fails its bound, as in the reference.

    The bounds are those of ``curation.filters`` (the curated dataset's filter, same meaning). The result counts the
    rows dropped per flag (each row once, at the first flag it fails) and how many of those lacked the value;
    ``dropped``: also write the dropped rows there with ``drop_reason`` (the flag) and ``drop_detail``.
    """
    flags = {
        "fmin": fmin, "fmax": fmax, "hwmin": hwmin, "hwmax": hwmax, "aesmin": aesmin, "flowmin": flowmin,
        "matchmin": matchmin, "flowmax": flowmax, "ocrmax": ocrmax, "fpsmin": fpsmin, "fpsmax": fpsmax,
    }  # fmt: skip
    try:
        spec = FilterSpec.from_flags(**flags)
    except ValueError as err:  # pydantic's ValidationError is a ValueError: contradictory or negative bounds
        raise DatautilError(f"bad filter bounds: {err}") from None
    active = spec.active()
    con = _connect()
    try:
        source = _source(con, input)
        schema = _schema(con, source)
        values = {}
        for criterion, _ in active:
            value = value_sql(criterion, schema)
            if value is None:
                if criterion.column == "resolution":
                    _require(schema, ("height", "width"), f"--{criterion.flag} (without a 'resolution' column)", input)
                _require(schema, (criterion.column,), f"--{criterion.flag}", input)
            values[criterion.name] = value
        # 1. One scan: rows in, and rows dropped per criterion (first failed) and without a value. The counting
        #    CASE yields the criterion's position (cheaper than its name on a million rows); same order, same logic.
        reason = first_failure_sql(active, values)
        position = first_failure_sql(active, values, as_position=True)
        aggs = ["count(*)"]
        for k, (criterion, _) in enumerate(active):
            aggs.append(f"count(*) FILTER (WHERE __reason = {k})")
            aggs.append(f"count(*) FILTER (WHERE __reason = {k} AND {values[criterion.name]} IS NULL)")
        counts = con.execute(f"SELECT {', '.join(aggs)} FROM (SELECT *, {position} AS __reason FROM {source})").fetchone()
        rows_in = int(counts[0])
        drop_counts = {c.flag: int(counts[1 + 2 * i]) for i, (c, _) in enumerate(active)}
        missing_counts = {c.flag: int(counts[2 + 2 * i]) for i, (c, _) in enumerate(active)}
        # 2. The kept rows (NULL {op} x is NULL, which WHERE treats as false: a missing value fails its bound).
        rows_out = _copy(con, f"SELECT * FROM {source} WHERE {keep_sql(active, values)}", output)
        if dropped is not None:
            detail = failure_detail_sql(active, values, "__reason")
            flag_of = "CASE __reason " + " ".join(f"WHEN {_sql_str(c.name)} THEN {_sql_str(c.flag)}" for c, _ in active) + " END"
            _copy(con, f"SELECT * EXCLUDE (__reason), {flag_of} AS drop_reason, {detail} AS drop_detail "
                       f"FROM (SELECT *, {reason} AS __reason FROM {source}) WHERE __reason IS NOT NULL", dropped)
    finally:
        con.close()
    return WriteResult(str(output), rows_in, rows_out, drop_counts, missing_counts)
