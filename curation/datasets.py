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

Which clips are kept is ``curation.dataset_selection``. Drop counts are attributed in a fixed order (its
``DROP_ORDER``): each clip is counted once, at the first check it fails. The criteria and their meaning are
``curation.filters`` (the same SQL as ``opensora-dag data filter``): a clip without a value fails an active
criterion, e.g. every clip fails ``aesmin`` when the aesthetic scorer ran without weights (its detail says why the
value is missing). A criterion is inactive only when the spec says so (``FilterSpec.skip``); each skip is reported
with the reason, and the asset shows it as a failed check.
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
from curation.dataset_selection import (
    CHECKED,
    CriterionReport,
    Selection,
    drop_selection_tables,
    open_tables,
    select_rows,
)

from curation.filters import FilterSpec, ident, sql_str

if TYPE_CHECKING:
    import duckdb
    import polars as pl

# Bump when the builder's output changes for the same spec and inputs: it is part of the version hash.
# 2: an all-null criterion column is no longer skipped on its own (only FilterSpec.skip skips); dropped.parquet
#    has a detail column; the manifest reports every criterion.
# 3: virtual and linked columns (virtual clips are frame ranges of their source).
BUILDER_VERSION = 3

OPENSORA_CSV_COLUMNS = (
    "path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "resolution",
    "aes", "flow", "ocr", "match",
)  # fmt: skip
PROVENANCE_COLUMNS = ("id", "video_id", "start_frame", "end_frame", "start_s", "end_s", "virtual", "linked")
CSV_COLUMNS = OPENSORA_CSV_COLUMNS + PROVENANCE_COLUMNS


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

    con, schemas, owned = open_tables(con_or_tables)
    try:
        # 1. Select the rows: join, attribute each dropped clip to its first failing check, dedupe.
        selection = select_rows(con, schemas, spec)

        # 2. Write the version under a temporary name, then rename it into place.
        root.mkdir(parents=True, exist_ok=True)
        with scratch_sibling(final) as tmp:
            tmp.mkdir()
            _write_rows(con, tmp)
            manifest = _manifest(version, spec, input_versions, selection, lake_snapshot)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if not publish(tmp, final, exists="keep"):
                # Another build of the same version won the race; its content is the same by construction.
                if not (final / "manifest.json").is_file():
                    raise FileExistsError(f"{final} exists but holds no manifest.json (not a dataset version)")
                return load_version(root, version).model_copy(update={"reused": True})
    finally:
        drop_selection_tables(con)
        if owned:
            con.close()
    return load_version(root, version)


def _write_rows(con: "duckdb.DuckDBPyConnection", folder: Path) -> None:
    """data.parquet and opensora.csv (the kept rows, in clip order) and dropped.parquet (the rest, with why)."""
    order = "ORDER BY video_id NULLS LAST, start_frame NULLS LAST, path, id"
    csv_cols = ", ".join(ident(c) for c in CSV_COLUMNS)
    kept_rows = f"SELECT {csv_cols}, batch FROM {CHECKED} WHERE drop_reason IS NULL {order}"
    con.execute(f"COPY ({kept_rows}) TO {sql_str(str(folder / 'data.parquet'))} (FORMAT PARQUET)")
    con.execute(
        f"COPY (SELECT {csv_cols} FROM {CHECKED} WHERE drop_reason IS NULL {order}) "
        f"TO {sql_str(str(folder / 'opensora.csv'))} (FORMAT CSV, HEADER)"
    )
    con.execute(
        f"COPY (SELECT id, path, batch, drop_reason AS reason, drop_detail AS detail FROM {CHECKED} "
        "WHERE drop_reason IS NOT NULL "
        f"ORDER BY path, id) TO {sql_str(str(folder / 'dropped.parquet'))} (FORMAT PARQUET)"
    )


def _manifest(version: str, spec: FilterSpec, input_versions: Mapping[str, str], selection: Selection,
              lake_snapshot: int | None) -> dict[str, Any]:
    """manifest.json of a version: what it was built from, what it kept and dropped, every criterion's state."""
    n, kept = selection.num_clips, selection.kept
    skipped = [SkippedCriterion(criterion=r.criterion, column=r.column, reason=r.reason or "")
               for r in selection.criteria if r.status == "skipped"]  # fmt: skip
    return {
        "version": version,
        "builder": BUILDER_VERSION,
        "spec": spec.model_dump(mode="json"),
        "inputs": dict(sorted((str(k), str(v)) for k, v in input_versions.items())),
        "counts": {"clips": n, "kept": kept, "dropped": n - kept},
        "drop_counts": selection.drop_counts,
        "applied": {c.name: f"{c.column} {c.op} {getattr(spec, c.name)}" for c, _ in spec.active()},
        "skipped": [s.model_dump() for s in skipped],
        "criteria": [r.model_dump() for r in selection.criteria],
        "columns": list(CSV_COLUMNS),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lake_snapshot": lake_snapshot,
    }


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
