"""Curation assets: thin wrappers that read a batch from the lakehouse, call the library, write the result.

Every per-video (or per-clip) step runs in isolation: a file that breaks a step goes to ``quarantine`` with the
stage and the reason, and the rest of the batch proceeds.
"""

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import polars as pl
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from opensora_dag.partitions import video_batches
from resources.batch_keys import batch_key, landing_folder
from resources.lakehouse import Lakehouse
from resources.model_store import ModelStore

T = TypeVar("T")


def markdown_table(frame: pl.DataFrame, max_rows: int = 20) -> MetadataValue:
    """A small preview of a table for the Dagster UI."""
    if frame.is_empty():
        return MetadataValue.md("_(no rows)_")
    head = frame.head(max_rows)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    for row in head.iter_rows():
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return MetadataValue.md("\n".join(lines))


def run_isolated(
    context: AssetExecutionContext, stage: str, items: list[T], work: Callable[[T], Any], describe: Callable[[T], str]
) -> tuple[list[tuple[T, Any]], list[tuple[T, str]]]:
    """Apply ``work`` to each item with a count/total progress log; returns (item, result) and (item, reason) pairs."""
    done, failed = [], []
    for index, item in enumerate(items, start=1):
        try:
            done.append((item, work(item)))
        except Exception as err:  # one bad file must not fail the batch: it is quarantined with the reason instead
            reason = f"{type(err).__name__}: {err}"
            context.log.warning(f"{stage}: {describe(item)} quarantined: {reason}")
            failed.append((item, reason))
        context.log.info(f"{stage}: {index}/{len(items)} {describe(item)}")
    return done, failed


def quarantine_rows(stage: str, failed: list[tuple[Any, str]], describe: Callable[[Any], str]) -> list[dict]:
    return [{"path": describe(item), "stage": stage, "reason": reason} for item, reason in failed]


def save_batch(context: AssetExecutionContext, lakehouse: Lakehouse, table: str, batch: str, frame: pl.DataFrame,
               stage: str | None = None, quarantined: Iterable[dict] = ()) -> dict:
    """Write a batch's rows of ``table`` and the quarantine records of ``stage`` in ONE lake transaction.

    Returns the metadata every asset reports: ``lake_snapshot``, the snapshot that now holds what it wrote."""
    from curation.ingest import QUARANTINE_SCHEMA
    from resources.lakehouse import PartitionWrite

    writes = [PartitionWrite(table, batch, frame)]
    if stage is not None:
        writes.append(PartitionWrite("quarantine", batch, pl.DataFrame(list(quarantined), schema=QUARANTINE_SCHEMA),
                                     key={"stage": stage}))
    return {"lake_snapshot": lakehouse.write_partitions(writes, run_id=context.run.run_id)}


# ---- raw_videos ----------------------------------------------------------------------------------------------------
@asset(
    partitions_def=video_batches,
    group_name="curation",
    code_version="1",
    kinds={"pyav", "parquet"},
    description="One row per distinct video file of a landing batch (probed with PyAV); bad files go to `quarantine`.",
)
def raw_videos(context: AssetExecutionContext, lakehouse: Lakehouse) -> MaterializeResult:
    from curation.ingest import scan_batch

    batch = batch_key(context.partition_key)  # a key, never a path: refused before any I/O
    scan = scan_batch(landing_folder(lakehouse, batch), progress=context.log.info)
    written = save_batch(context, lakehouse, "raw_videos", batch, scan.videos, "raw_videos",
                         scan.quarantine.iter_rows(named=True))
    for row in scan.quarantine.iter_rows(named=True):
        context.log.warning(f"quarantined {row['path']}: {row['reason']}")
    return MaterializeResult(
        metadata={
            **written,
            "num_videos": len(scan.videos),
            "num_quarantined": len(scan.quarantine),
            "total_duration_s": float(scan.videos["duration"].sum() or 0.0),
            "sidecars": len(scan.sidecars),
            "preview": markdown_table(scan.videos.select("path", "codec", "fps", "num_frames", "height", "width", "duration")),
            "quarantine": markdown_table(scan.quarantine.select("path", "reason")),
        }
    )


# ---- scenes --------------------------------------------------------------------------------------------------------
class ScenesConfig(Config):
    detector: str = Field("adaptive", description="adaptive (reference: AdaptiveDetector(3.0)), content or transnetv2.")
    adaptive_threshold: float = 3.0
    content_threshold: float = Field(27.0, description="ContentDetector threshold (15 finds cuts between similar colours).")
    transnet_threshold: float = 0.5


SCENE_SCHEMA = {"video_id": pl.String, "scene_index": pl.Int64, "start_frame": pl.Int64, "end_frame": pl.Int64,
                "start_s": pl.Float64, "end_s": pl.Float64, "detector": pl.String}


@asset(
    deps=[raw_videos],
    partitions_def=video_batches,
    group_name="curation",
    code_version="1",
    kinds={"pyscenedetect", "parquet"},
    description="One row per shot of every video (frame-exact, end_frame exclusive).",
)
def scenes(context: AssetExecutionContext, config: ScenesConfig, lakehouse: Lakehouse) -> MaterializeResult:
    from curation.shots import SceneDetectConfig, detect_scenes

    batch = batch_key(context.partition_key)  # a key, never a path: refused before any I/O
    videos = lakehouse.read_partition("raw_videos", batch).to_dicts()
    cfg = SceneDetectConfig(detector=config.detector, adaptive_threshold=config.adaptive_threshold,
                            content_threshold=config.content_threshold, transnet_threshold=config.transnet_threshold)
    done, failed = run_isolated(
        context, "scenes", videos, lambda v: detect_scenes(v["path"], video_id=v["id"], config=cfg), lambda v: v["path"]
    )
    quarantined = quarantine_rows("scenes", failed, lambda v: v["path"])
    rows = [
        {"video_id": v["id"], "scene_index": k, "start_frame": s.start_frame, "end_frame": s.end_frame,
         "start_s": s.start_s, "end_s": s.end_s, "detector": config.detector}
        for v, found in done for k, s in enumerate(found)
    ]
    frame = pl.DataFrame(rows, schema=SCENE_SCHEMA)
    written = save_batch(context, lakehouse, "scenes", batch, frame, "scenes", quarantined)
    return MaterializeResult(metadata={
        **written,
        "num_scenes": len(frame), "num_videos": len(done), "num_quarantined": len(quarantined),
        "detector": config.detector, "preview": markdown_table(frame),
    })


# ---- clips ---------------------------------------------------------------------------------------------------------
class ClipsConfig(Config):
    min_seconds: float = Field(2.0, description="Scenes shorter than this are dropped.")
    max_seconds: float = Field(15.0, description="Longer scenes keep their first max_seconds (as the reference).")
    target_fps: float = 30.0
    short_side: int = Field(720, description="Shorter side cap; smaller videos are never upscaled.")
    crf: int = 18
    preset: str = "veryfast"


@asset(
    deps=[scenes],
    partitions_def=video_batches,
    group_name="curation",
    code_version="1",
    kinds={"ffmpeg", "parquet"},
    description="Scenes cut to H.264 clips under media/clips/ (immutable, named by content), with the frames each "
    "scorer needs kept aside.",
)
def clips(context: AssetExecutionContext, config: ClipsConfig, lakehouse: Lakehouse) -> MaterializeResult:
    from curation.cutting import CutConfig, cut_clips
    from curation.shots import Scene

    batch = batch_key(context.partition_key)  # a key, never a path: refused before any I/O
    videos = lakehouse.read_partition("raw_videos", batch)
    scene_rows = lakehouse.read_partition("scenes", batch)
    cfg = CutConfig(min_seconds=config.min_seconds, max_seconds=config.max_seconds, target_fps=config.target_fps,
                    short_side=config.short_side, crf=config.crf, preset=config.preset)
    # Immutable media named by content (source hash, frame range, encode settings): never overwritten or deleted
    # by a materialization, so a dataset version built earlier keeps decoding; `opensora-dag lake gc` reclaims.
    clip_dir = lakehouse.media_dir / "clips"
    frames_dir = lakehouse.media_dir / "frames"

    def cut(video: dict):
        own = scene_rows.filter(pl.col("video_id") == video["id"]).sort("scene_index")
        found = [Scene(video_id=video["id"], index=r["scene_index"], start_frame=r["start_frame"], end_frame=r["end_frame"],
                       start_s=r["start_s"], end_s=r["end_s"], fps=video["fps"]) for r in own.iter_rows(named=True)]
        return cut_clips(video["path"], video["id"], found, clip_dir, cfg, frames_root=frames_dir)

    with_scenes = [v for v in videos.to_dicts() if v["id"] in set(scene_rows["video_id"].to_list())]
    done, failed = run_isolated(context, "clips", with_scenes, cut, lambda v: v["path"])
    quarantined = quarantine_rows("clips", failed, lambda v: v["path"])
    rows = [c.to_row() for _, result in done for c in result.clips]
    dropped = [{"video_id": v["id"], "start_frame": d.start_frame, "end_frame": d.end_frame, "reason": d.reason}
               for v, result in done for d in result.dropped]
    frame = pl.DataFrame(rows) if rows else pl.DataFrame(schema={"id": pl.String, "path": pl.String, "num_frames": pl.Int64})
    written = save_batch(context, lakehouse, "clips", batch, frame, "clips", quarantined)
    seconds = float(frame["num_frames"].sum() / config.target_fps) if len(frame) else 0.0
    return MaterializeResult(metadata={
        **written,
        "num_clips": len(frame), "clip_seconds": seconds, "scenes_dropped": len(dropped),
        "num_quarantined": len(quarantined), "clip_dir": MetadataValue.path(str(clip_dir)),
        "dropped_scenes": markdown_table(pl.DataFrame(dropped) if dropped else pl.DataFrame()),
        "preview": markdown_table(frame.select([c for c in ("id", "num_frames", "height", "width", "start_s", "end_s") if c in frame.columns])),
    })


# ---- captions ------------------------------------------------------------------------------------------------------
@asset(
    deps=[clips],
    partitions_def=video_batches,
    group_name="curation",
    code_version="1",
    kinds={"transformers", "parquet"},
    description="One caption per clip (`text`): sidecar captions shipped with the videos, else a local VLM; never made up.",
)
def captions(context: AssetExecutionContext, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    from curation.captions import caption_clips, caption_counts, caption_table
    from curation.cutting import load_kept_frames

    batch = batch_key(context.partition_key)  # a key, never a path: refused before any I/O
    clip_rows = lakehouse.read_partition("clips", batch)
    videos = lakehouse.read_partition("raw_videos", batch).select(pl.col("id").alias("video_id"), pl.col("path").alias("video_path"))
    rows = clip_rows.join(videos, on="video_id", how="left").to_dicts() if len(clip_rows) else []
    captioner = None
    if model_store.captioner:
        from models.scorers.captioner import VLMCaptioner

        captioner = VLMCaptioner(model_store.captioner, batch_size=model_store.captioner_batch_size, device=model_store.device)
    result = caption_clips(rows, landing_folder(lakehouse, batch), captioner=captioner,
                           frames_loader=lambda r: load_kept_frames(r["frames_dir"], "caption"), progress=context.log.info)
    frame = caption_table(result)
    written = save_batch(context, lakehouse, "captions", batch, frame)
    counts = caption_counts(result)
    if not model_store.captioner:
        context.log.info("no captioner model configured: clips without sidecar captions stay uncaptioned")
    return MaterializeResult(metadata={**written, **counts, "captioner": model_store.captioner or "none",
                                       "preview": markdown_table(frame.select("id", "text", "source", "reason"))})


CURATION_ASSETS = [raw_videos, scenes, clips, captions]
