"""Asset checks on curation outputs: clip bounds, paths, decodability, score ranges."""

import polars as pl
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from assets.curation import clips
from assets.scoring import aesthetic_scores, match_scores, motion_scores, ocr_scores
from resources.batch_keys import batch_key
from resources.lakehouse import Lakehouse

# Clips are cut to 2..15 s; allow one frame of slack at 30 fps for rounding at the bounds.
MIN_SECONDS, MAX_SECONDS, SLACK_S = 2.0, 15.0, 1 / 30

# Plausible ranges of each score (LAION aesthetic 0..10; flow in pixels at 320x576; CLIP 100*cos in -100..100).
SCORE_RANGES = {"aes": (0.0, 10.0), "flow": (0.0, 576.0), "ocr": (0, 10_000), "match": (-100.0, 100.0)}


def _clips(context: AssetCheckExecutionContext, lakehouse: Lakehouse) -> pl.DataFrame:
    return lakehouse.read_partition("clips", batch_key(context.partition_key))


@asset_check(asset=clips, blocking=True, description="Every clip has a path, a file that decodes, and a duration within 2..15 s.")
def clips_are_valid(context: AssetCheckExecutionContext, lakehouse: Lakehouse) -> AssetCheckResult:
    from curation.probe import ProbeError, probe_video

    frame = _clips(context, lakehouse)
    problems: list[str] = []
    if len(frame) and frame["path"].null_count():
        problems.append(f"{frame['path'].null_count()} clips have no path")
    for row in frame.drop_nulls("path").iter_rows(named=True):
        seconds = row["num_frames"] / row["fps"]
        if not MIN_SECONDS - SLACK_S <= seconds <= MAX_SECONDS + SLACK_S:
            problems.append(f"{row['id']}: {seconds:.2f} s is outside {MIN_SECONDS}..{MAX_SECONDS} s")
        try:
            info = probe_video(row["path"])
        except (ProbeError, FileNotFoundError) as err:
            problems.append(f"{row['id']}: {err}")
            continue
        if info.num_frames != row["num_frames"]:
            problems.append(f"{row['id']}: file has {info.num_frames} frames, table says {row['num_frames']}")
    return AssetCheckResult(passed=not problems, metadata={"num_clips": len(frame), "problems": "\n".join(problems[:50]) or "none"})


def _range_check(context: AssetCheckExecutionContext, lakehouse: Lakehouse, table: str, column: str) -> AssetCheckResult:
    frame = lakehouse.read_partition(table, batch_key(context.partition_key))
    low, high = SCORE_RANGES[column]
    values = frame[column].drop_nulls()
    bad = frame.filter(pl.col(column).is_not_null() & ~pl.col(column).is_between(low, high))
    unexplained = frame.filter(pl.col(column).is_null() & pl.col("reason").is_null())
    passed = bad.is_empty() and unexplained.is_empty()
    return AssetCheckResult(
        passed=passed,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "scored": len(values), "null_with_reason": frame[column].null_count() - len(unexplained),
            "out_of_range": len(bad), "null_without_reason": len(unexplained), "range": f"[{low}, {high}]",
        },
    )


@asset_check(asset=aesthetic_scores, description="aes in [0, 10]; every null carries a reason.")
def aesthetic_scores_in_range(context: AssetCheckExecutionContext, lakehouse: Lakehouse) -> AssetCheckResult:
    return _range_check(context, lakehouse, "aesthetic_scores", "aes")


@asset_check(asset=motion_scores, description="flow >= 0 (pixels at 320x576); every null carries a reason.")
def motion_scores_in_range(context: AssetCheckExecutionContext, lakehouse: Lakehouse) -> AssetCheckResult:
    return _range_check(context, lakehouse, "motion_scores", "flow")


@asset_check(asset=ocr_scores, description="ocr is a non-negative box count; every null carries a reason.")
def ocr_scores_in_range(context: AssetCheckExecutionContext, lakehouse: Lakehouse) -> AssetCheckResult:
    return _range_check(context, lakehouse, "ocr_scores", "ocr")


@asset_check(asset=match_scores, description="match in [-100, 100]; every null carries a reason.")
def match_scores_in_range(context: AssetCheckExecutionContext, lakehouse: Lakehouse) -> AssetCheckResult:
    return _range_check(context, lakehouse, "match_scores", "match")


CURATION_CHECKS = [clips_are_valid, aesthetic_scores_in_range, motion_scores_in_range, ocr_scores_in_range, match_scores_in_range]
