"""Asset checks on curation outputs: clip bounds, paths, decodability, score ranges."""

from dataclasses import dataclass

import polars as pl
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from assets.curation import ClipsConfig, clips
from assets.scoring import aesthetic_scores, match_scores, motion_scores, ocr_scores
from resources.batch_keys import batch_key
from resources.lakehouse import Lakehouse
from common.storage import local_media_path

# Clip durations are checked against the bounds the clips materialization was configured with (ClipsConfig,
# 2..15 s by default), with one frame of slack at the clip's frame rate for rounding at the bounds.
BOUND_KEYS = ("min_seconds", "max_seconds")

# Plausible ranges of each score (LAION aesthetic 0..10; flow in pixels at 320x576; CLIP 100*cos in -100..100).
SCORE_RANGES = {"aes": (0.0, 10.0), "flow": (0.0, 576.0), "ocr": (0, 10_000), "match": (-100.0, 100.0)}


def _clips(context: AssetCheckExecutionContext, lakehouse: Lakehouse) -> pl.DataFrame:
    return lakehouse.read_partition("clips", batch_key(context.partition_key))


@dataclass(frozen=True)
class ClipBounds:
    min_seconds: float
    max_seconds: float
    source: str  # where the bounds were read from, for the check's metadata


def clip_bounds(context: AssetCheckExecutionContext) -> ClipBounds:
    """The duration bounds the latest materialization of this clips partition was cut with.

    Read from that materialization's metadata when it records ``min_seconds``/``max_seconds``, else from the run
    config of the run that wrote it (``ops.clips.config``), else ``ClipsConfig``'s defaults (a run without config).
    """
    from dagster import AssetRecordsFilter

    defaults = ClipsConfig()
    filters = AssetRecordsFilter(asset_key=clips.key, asset_partitions=[context.partition_key] if context.has_partition_key else None)
    records = context.instance.fetch_materializations(filters, limit=1).records
    if not records:
        return ClipBounds(defaults.min_seconds, defaults.max_seconds, "ClipsConfig defaults (no clips materialization found)")
    record = records[0]
    metadata = record.asset_materialization.metadata if record.asset_materialization else {}
    if all(k in metadata for k in BOUND_KEYS):
        values = [float(metadata[k].value) for k in BOUND_KEYS]
        return ClipBounds(*values, f"metadata of the clips materialization in run {record.run_id}")
    run = context.instance.get_run_by_id(record.run_id)
    op_config = ((run.run_config or {}).get("ops", {}).get(clips.op.name, {}) or {}).get("config", {}) if run else {}
    config = ClipsConfig(**{k: v for k, v in (op_config or {}).items() if k in ClipsConfig.model_fields})
    source = f"run config of run {record.run_id}" if op_config else f"ClipsConfig defaults (run {record.run_id} set none)"
    return ClipBounds(config.min_seconds, config.max_seconds, source)


@asset_check(asset=clips, blocking=True, description="Every clip has a path, a file that decodes, and a duration within the "
             "bounds its materialization was configured with (ClipsConfig min_seconds..max_seconds, 2..15 s by default).")
def clips_are_valid(context: AssetCheckExecutionContext, lakehouse: Lakehouse) -> AssetCheckResult:
    return validate_clips(_clips(context, lakehouse), clip_bounds(context))


def validate_clips(frame: pl.DataFrame, bounds: ClipBounds) -> AssetCheckResult:
    """The clips_are_valid result for a clips partition cut with ``bounds``."""
    from curation.probe import ProbeError, probe_video
    from curation.virtual_clips import range_problems

    low, high = bounds.min_seconds, bounds.max_seconds
    problems: list[str] = []
    if len(frame) and frame["path"].null_count():
        problems.append(f"{frame['path'].null_count()} clips have no path")
    rows = frame.drop_nulls("path").to_dicts()
    virtual = range_problems([r for r in rows if r.get("virtual")])  # one pass per source, not one per clip
    for row in rows:
        seconds = row["num_frames"] / row["fps"]
        slack = 1 / row["fps"]  # one frame: rounding at the bounds
        if not low - slack <= seconds <= high + slack:
            problems.append(f"{row['id']}: {seconds:.2f} s is outside {low:g}..{high:g} s")
        if row.get("virtual"):
            if row["id"] in virtual:
                problems.append(f"{row['id']}: {virtual[row['id']]}")
            continue
        try:
            info = probe_video(local_media_path(row["path"]))
        except (ProbeError, FileNotFoundError) as err:
            problems.append(f"{row['id']}: {err}")
            continue
        if info.num_frames != row["num_frames"]:
            problems.append(f"{row['id']}: file has {info.num_frames} frames, table says {row['num_frames']}")
    return AssetCheckResult(passed=not problems, metadata={
        "num_clips": len(frame), "bounds_s": f"{low:g}..{high:g}", "bounds_from": bounds.source,
        "problems": "\n".join(problems[:50]) or "none",
    })


def _range_check(context: AssetCheckExecutionContext, lakehouse: Lakehouse, table: str, column: str) -> AssetCheckResult:
    frame = lakehouse.read_partition(table, batch_key(context.partition_key))
    low, high = SCORE_RANGES[column]
    values = frame[column].drop_nulls()
    bad = frame.filter(pl.col(column).is_not_null() & ~pl.col(column).is_between(low, high))
    unexplained = frame.filter(pl.col(column).is_null() & pl.col("reason").is_null())
    passed = bad.is_empty() and unexplained.is_empty()
    # A value outside its range or a null nobody explained is a scorer bug, not bad input: an error that blocks the
    # run (it used to be a warning, so a broken scorer still gave a green run).
    return AssetCheckResult(
        passed=passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "scored": len(values), "null_with_reason": frame[column].null_count() - len(unexplained),
            "out_of_range": len(bad), "null_without_reason": len(unexplained), "range": f"[{low}, {high}]",
        },
    )


def score_range_check(score_asset, column: str, description: str):
    """The blocking check ``<table>_in_range`` of a score asset: ``description``, and every null carries a reason."""
    table = score_asset.key.path[-1]

    @asset_check(asset=score_asset, name=f"{table}_in_range", blocking=True,
                 description=f"{description}; every null carries a reason.")
    def check(context: AssetCheckExecutionContext, lakehouse: Lakehouse) -> AssetCheckResult:
        return _range_check(context, lakehouse, table, column)

    return check


SCORE_RANGE_CHECKS = [
    score_range_check(aesthetic_scores, "aes", "aes in [0, 10]"),
    score_range_check(motion_scores, "flow", "flow >= 0 (pixels at 320x576)"),
    score_range_check(ocr_scores, "ocr", "ocr is a non-negative box count"),
    score_range_check(match_scores, "match", "match in [-100, 100]"),
]
CURATION_CHECKS = [clips_are_valid, *SCORE_RANGE_CHECKS]
