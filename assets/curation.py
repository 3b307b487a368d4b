"""Curation assets: thin wrappers that read a batch from the lakehouse, call the library, write the result.

Every per-video (or per-clip) step runs in isolation (``run_isolated``): a file whose input is rejected goes to
``quarantine`` with the stage and the reason, and the rest of the batch proceeds; an exception from our own code or
a scorer (a component error) is quarantined the same way while rare, and fails the stage with a summary when it
hits more than ``max_component_error_share`` of the items (``curation.errors`` tells the two apart).
"""

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import polars as pl
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue
from pydantic import Field

from assets.partitions import batch_asset
from curation.shots import DetectorName, SceneDetectConfig  # numpy only: the code location still loads without PyAV or torch
from curation.video_writer import X264Preset
from resources.batch_keys import batch_key, landing_folder, landing_folder_url
from resources.lakehouse import Lakehouse
from resources.model_store import ModelStore
from common.storage import local_media_path, rebase

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


COMPONENT_ERROR = "component error"
"""Prefix of the quarantine reason of an item that broke our code (not its input): see ``curation.errors``."""
ERROR_SHARE_ENV = "OPENSORA_MAX_COMPONENT_ERROR_SHARE"
DEFAULT_ERROR_SHARE = 0.2


class IsolationConfig(Config):
    """Run config shared by the per-item stages: how many component errors a stage tolerates."""

    max_component_error_share: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Fail the stage when more than this share of its items raise component errors (not input "
        f"rejections). Default: ${ERROR_SHARE_ENV}, else {DEFAULT_ERROR_SHARE}.",
    )


def component_error_share(configured: float | None = None) -> float:
    """The share of a stage's items that may raise component errors before the stage fails: ``configured`` (a
    Config field), else ``$OPENSORA_MAX_COMPONENT_ERROR_SHARE``, else 0.2."""
    import os

    if configured is not None:
        share, source = configured, "config"
    else:
        raw = os.environ.get(ERROR_SHARE_ENV, "").strip()
        if not raw:
            return DEFAULT_ERROR_SHARE
        try:
            share, source = float(raw), ERROR_SHARE_ENV
        except ValueError:
            raise ValueError(f"{ERROR_SHARE_ENV}={raw!r} is not a number in [0, 1]") from None
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"max component error share from {source} must be in [0, 1], got {share}")
    return share


def _summarize(reasons: list[str], limit: int = 8) -> str:
    """``3 x ValueError: boom; 1 x KeyError: 'x'``: distinct reasons, most frequent first."""
    from collections import Counter

    counts = Counter(r[:300] for r in reasons).most_common()
    text = "; ".join(f"{n} x {reason}" for reason, n in counts[:limit])
    return text + (f"; ... {len(counts) - limit} more distinct reasons" if len(counts) > limit else "")


WORKERS_ENV = "OPENSORA_CURATION_WORKERS"


class PoolConfig(IsolationConfig):
    """Run config of the per-video stages: worker processes and the limits that cost a hostile video only itself."""

    workers: int | None = Field(
        None, ge=1,
        description=f"Worker processes for the per-video work. Default: ${WORKERS_ENV}, else one per core. 1 runs "
        "everything in the run's own process (for debugging: plain tracebacks, no limits enforced).",
    )
    video_time_limit_s: float | None = Field(
        3600.0, gt=0, description="A video whose work runs longer is killed and quarantined (None: no limit).")
    video_memory_limit_mb: float | None = Field(
        None, gt=0, description="A worker whose memory (RSS) exceeds this while on one video is killed and the video "
        "quarantined. Default: the machine's memory divided among the workers.")

    def pool_options(self, num_items: int) -> dict:
        """``curation.pool.run_pool`` keyword arguments for a stage of ``num_items`` videos."""
        import os

        from curation.pool import usable_cpus

        workers = self.workers
        if workers is None and os.environ.get(WORKERS_ENV, "").strip():
            raw = os.environ[WORKERS_ENV].strip()
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"{WORKERS_ENV}={raw!r} is not a whole number of worker processes (1 or more)")
            workers = int(raw)
        workers = workers or usable_cpus()
        memory = self.video_memory_limit_mb
        if memory is None:
            import psutil

            memory = psutil.virtual_memory().total / 2**20 / max(1, min(workers, num_items))
        return {"workers": workers, "time_limit_s": self.video_time_limit_s, "memory_limit_mb": memory}


PROGRESS_EVERY_S = 2.0


def progress_log(context: AssetExecutionContext, stage: str, describe: Callable[[Any], str]) -> Callable[..., None]:
    """A pool ``progress`` callback that logs ``stage: done/total item``: the first item, the last, and at most one
    line every PROGRESS_EVERY_S in between. Each line is an event in the run's event log, and one per video cost
    about 2 s of a 100-video batch on a small machine."""
    import time

    last = [float("-inf")]

    def progress(done: int, total: int, item: Any, _outcome=None) -> None:
        now = time.monotonic()
        if done in (1, total) or now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            context.log.info(f"{stage}: {done}/{total} {describe(item)}")

    return progress


def run_isolated(
    context: AssetExecutionContext, stage: str, items: list[T], work: Callable[[T], Any], describe: Callable[[T], str],
    max_error_share: float | None = None, pool: PoolConfig | None = None, cost: Callable[[T], float] | None = None,
) -> tuple[list[tuple[T, Any]], list[tuple[T, str]]]:
    """Apply ``work`` to each item with a done/total progress log (``progress_log``); returns (item, result) and
    (item, reason) pairs.

    ``pool``: run the items in ``curation.pool`` worker processes (``work`` must then be picklable: a module-level
    function or a ``functools.partial`` of one); a worker that crashes, is killed or exceeds a limit costs only its
    item, quarantined as an input rejection with the signal, exit code or limit. Without it, in this process.

    An item whose input is rejected (``curation.errors.is_input_rejection``: ``InputRejected``, a PyAV decode
    error, an ``OSError`` reading it, a lost worker) is quarantined with the reason; any number of them never fails
    the stage. Any other exception is a component error: the item is quarantined with ``"component error: ..."`` and
    logged with its traceback, and when component errors exceed ``max_error_share`` of the items (default
    :func:`component_error_share`) the stage fails with a summary of the reasons instead of writing anything.
    Component errors below the limit are reported as asset metadata (``num_component_errors``, ``component_errors``).
    """
    from dagster import Failure

    from curation.batch_tasks import PRELOAD
    from curation.errors import is_input_rejection
    from curation.pool import run_pool

    share = component_error_share(max_error_share)
    options = pool.pool_options(len(items)) if pool is not None else {"workers": 1}
    if options["workers"] > 1:
        context.log.info(f"{stage}: {len(items)} items on up to {options['workers']} worker processes")

    done, failed, component = [], [], []
    progress = progress_log(context, stage, describe)
    for outcome in run_pool(work, items, progress=progress, preload=PRELOAD, cost=cost, **options):
        item, err = outcome.item, outcome.error
        if err is None:
            done.append((item, outcome.result))
        elif is_input_rejection(err):  # bad input is quarantined; a broken component counts against the budget
            context.log.warning(f"{stage}: {describe(item)} quarantined (input rejected): {err.detail}")
            failed.append((item, err.detail))
        else:
            context.log.error(f"{stage}: {describe(item)}: {COMPONENT_ERROR}: {err.detail}\n{err.traceback}")
            component.append(err.detail)
            failed.append((item, f"{COMPONENT_ERROR}: {err.detail}"))
    if not component:
        return done, failed
    summary = _summarize(component)
    counts = {"num_component_errors": len(component), "num_input_rejections": len(failed) - len(component),
              "max_component_error_share": share}
    if len(component) > share * len(items):
        raise Failure(
            description=f"{stage}: {len(component)} of {len(items)} items ({len(component) / len(items):.0%}) raised "
            f"component errors, more than the allowed {share:.0%} (max_component_error_share / {ERROR_SHARE_ENV}); "
            f"nothing was written. Reasons: {summary}",
            metadata={**counts, "component_errors": MetadataValue.md(summary)},
        )
    context.log.warning(f"{stage}: {len(component)} of {len(items)} items quarantined with component errors "
                        f"(allowed up to {share:.0%}): {summary}")
    context.add_asset_metadata({**counts, "component_errors": MetadataValue.md(summary)})
    return done, failed


def decode_cost(video: dict) -> float:
    """Pixels to decode: what a video's per-video work costs, roughly (its ``raw_videos`` row)."""
    return float(video.get("num_frames") or 0) * float(video.get("resolution") or 0)


def quarantine_rows(stage: str, failed: list[tuple[Any, str]], describe: Callable[[Any], str]) -> list[dict]:
    """Quarantine records (path, stage, reason) of the items ``run_isolated`` could not process."""
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
# code version 2: rows carry `source` (frozen copy under media/sources/, or a linked file) and `linked`.
@batch_asset(code_version="2", kinds={"pyav", "parquet"})
def raw_videos(context: AssetExecutionContext, config: PoolConfig, lakehouse: Lakehouse) -> MaterializeResult:
    """One row per distinct video file of a landing batch (probed with PyAV); bad files go to `quarantine`."""
    from curation.batch_tasks import PRELOAD
    from curation.ingest import scan_batch
    from curation.pool import run_pool
    from curation.probe import probe_video
    from curation.sources import SourceStore

    def probe(paths: list) -> list:
        """Probe in worker processes: a file that crashes the demuxer or hangs costs only itself."""
        outcomes = run_pool(probe_video, paths, preload=PRELOAD, **config.pool_options(len(paths)),
                            progress=progress_log(context, "raw_videos: probed", str))
        return [o.result if o.ok else (o.error.message if o.error.type_name == "ProbeError" else f"probe failed: {o.error.detail}")
                for o in outcomes]

    batch = batch_key(context.partition_key)  # a key, never a path: refused before any I/O
    folder = landing_folder(lakehouse, batch)  # on S3: a cached local copy of landing/<folder>/
    # The landing folder is an inbox users may edit: each probed video's bytes become immutable media named by
    # their hash (media/sources/), and the row's `source` names that copy for every decoder downstream.
    freeze = SourceStore(lakehouse.storage, scratch=lakehouse.root / "scratch")
    scan = scan_batch(folder, freeze=freeze, probe=probe)  # the pool logs probing progress as done/total
    if lakehouse.storage.remote:  # record where the files live for every machine: their s3:// URLs
        scan = published_scan(scan, folder, landing_folder_url(lakehouse, batch))
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
            "num_linked": int(scan.videos["linked"].sum() or 0),
            "preview": markdown_table(scan.videos.select("path", "codec", "fps", "num_frames", "height", "width", "duration")),
            "quarantine": markdown_table(scan.quarantine.select("path", "reason")),
        }
    )


# ---- scenes --------------------------------------------------------------------------------------------------------
class ScenesConfig(PoolConfig):
    detector: DetectorName = Field("adaptive", description="adaptive (reference: AdaptiveDetector(3.0)), content or transnetv2.")
    adaptive_threshold: float = 3.0
    content_threshold: float = Field(27.0, description="ContentDetector threshold (15 finds cuts between similar colours).")
    transnet_threshold: float = 0.5
    keep_clip_frames: bool = Field(
        True, description="With the adaptive detector on a local data path: while detecting, also keep the scorer "
        "frames of the clips the clips asset makes with its default settings, so it decodes nothing. Clips cut with "
        "other settings keep their own frames in the clips asset, as they do without this.")


SCENE_SCHEMA = {"video_id": pl.String, "scene_index": pl.Int64, "start_frame": pl.Int64, "end_frame": pl.Int64,
                "start_s": pl.Float64, "end_s": pl.Float64, "detector": pl.String}


@batch_asset(deps=[raw_videos], kinds={"pyscenedetect", "parquet"})
def scenes(context: AssetExecutionContext, config: ScenesConfig, lakehouse: Lakehouse) -> MaterializeResult:
    """One row per shot of every video (frame-exact, end_frame exclusive)."""
    from curation.batch_tasks import detect_video
    from curation.shot_frames import KeepInPass

    batch = batch_key(context.partition_key)  # a key, never a path: refused before any I/O
    videos = lakehouse.read_partition("raw_videos", batch).to_dicts()
    cfg = SceneDetectConfig(detector=config.detector, adaptive_threshold=config.adaptive_threshold,
                            content_threshold=config.content_threshold, transnet_threshold=config.transnet_threshold)
    # Kept frames are immutable media named by clip id, where the clips asset looks for them (on S3 it keeps them).
    keep = None
    if config.keep_clip_frames and not lakehouse.storage.remote:
        keep = KeepInPass(frames_root=str(lakehouse.media_dir / "frames"))
    done, failed = run_isolated(context, "scenes", videos, partial(detect_video, cfg, keep), lambda v: v["path"],
                                config.max_component_error_share, pool=config, cost=decode_cost)
    quarantined = quarantine_rows("scenes", failed, lambda v: v["path"])
    rows = [
        {"video_id": v["id"], "scene_index": k, "start_frame": s.start_frame, "end_frame": s.end_frame,
         "start_s": s.start_s, "end_s": s.end_s, "detector": config.detector}
        for v, found in done for k, s in enumerate(found.scenes)
    ]
    for v, found in done:
        for reason in found.left_to_clips:
            context.log.info(f"scenes: {v['path']}: {reason}")
    frame = pl.DataFrame(rows, schema=SCENE_SCHEMA)
    written = save_batch(context, lakehouse, "scenes", batch, frame, "scenes", quarantined)
    return MaterializeResult(metadata={
        **written,
        "num_scenes": len(frame), "num_videos": len(done), "num_quarantined": len(quarantined),
        "clips_with_frames_kept": sum(found.clips_kept for _, found in done),
        "detector": config.detector, "preview": markdown_table(frame),
    })


# ---- clips ---------------------------------------------------------------------------------------------------------
class ClipsConfig(PoolConfig):
    min_seconds: float = Field(2.0, description="Scenes shorter than this are dropped.")
    max_seconds: float = Field(15.0, description="Longer scenes keep their first max_seconds (as the reference).")
    target_fps: float = 30.0
    short_side: int = Field(720, description="Shorter side cap; smaller videos are never upscaled.")
    encode_files: bool = Field(
        False, description="Also encode every clip to an H.264 file under media/clips/ now. Off: clips are virtual "
        "(frame-exact ranges of their frozen source, decoded on demand); `opensora-dag data export` makes files.")
    crf: int = Field(18, description="libx264 quality of clip files (encode_files, data export).")
    preset: X264Preset = Field("veryfast", description="libx264 preset of clip files (encode_files, data export).")


@batch_asset(deps=[scenes], code_version="2", kinds={"pyav", "parquet"})
def clips(context: AssetExecutionContext, config: ClipsConfig, lakehouse: Lakehouse) -> MaterializeResult:
    """One row per clip: a frame-exact range of its frozen source (virtual, the default) or an H.264 file under
    media/clips/ (`encode_files`), with the frames each scorer needs kept under media/frames/."""
    from curation.batch_tasks import ClipJob, clip_video
    from curation.clip_plan import CutConfig
    from curation.shots import Scene

    batch = batch_key(context.partition_key)  # a key, never a path: refused before any I/O
    videos = lakehouse.read_partition("raw_videos", batch)
    scene_rows = lakehouse.read_partition("scenes", batch)
    cfg = CutConfig(min_seconds=config.min_seconds, max_seconds=config.max_seconds, target_fps=config.target_fps,
                    short_side=config.short_side, crf=config.crf, preset=config.preset)
    # Immutable media named by content (source hash, frame range, rate and size): never overwritten or deleted by
    # a materialization, so a dataset version built earlier keeps decoding; `opensora-dag lake gc` reclaims.
    # On S3 the workers write into local scratch space and the results are published to media/ (an object already
    # there is kept).
    storage = lakehouse.storage
    scratch = None
    if storage.remote:
        import tempfile
        from pathlib import Path

        (lakehouse.root / "scratch").mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="clips-", dir=lakehouse.root / "scratch"))
        clip_dir, frames_dir = scratch / "clips", scratch / "frames"
    else:
        clip_dir, frames_dir = lakehouse.media_dir / "clips", lakehouse.media_dir / "frames"
    job = ClipJob(frames_dir=str(frames_dir), clip_dir=str(clip_dir) if config.encode_files else None, cut=cfg)

    def scenes_of(video: dict) -> list:
        own = scene_rows.filter(pl.col("video_id") == video["id"]).sort("scene_index")
        return [Scene(video_id=video["id"], index=r["scene_index"], start_frame=r["start_frame"], end_frame=r["end_frame"],
                      start_s=r["start_s"], end_s=r["end_s"], fps=video["fps"]) for r in own.iter_rows(named=True)]

    detected = set(scene_rows["video_id"].to_list())
    items = [(v, scenes_of(v)) for v in videos.to_dicts() if v["id"] in detected]
    try:
        done, failed = run_isolated(context, "clips", items, partial(clip_video, job), lambda item: item[0]["path"],
                                    config.max_component_error_share, pool=config,
                                    cost=lambda item: decode_cost(item[0]))
        if scratch is not None:
            done = [(item, publish_clips(storage, result)) for item, result in done]
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    quarantined = quarantine_rows("clips", failed, lambda item: item[0]["path"])
    rows = [c.to_row() for _, result in done for c in result.clips]
    dropped = [{"video_id": v["id"], "start_frame": d.start_frame, "end_frame": d.end_frame, "reason": d.reason}
               for (v, _), result in done for d in result.dropped]
    frame = pl.DataFrame(rows) if rows else pl.DataFrame(schema={"id": pl.String, "path": pl.String, "num_frames": pl.Int64})
    written = save_batch(context, lakehouse, "clips", batch, frame, "clips", quarantined)
    seconds = float(frame["num_frames"].sum() / config.target_fps) if len(frame) else 0.0
    return MaterializeResult(metadata={
        **written,
        "num_clips": len(frame), "clip_seconds": seconds, "scenes_dropped": len(dropped),
        "num_quarantined": len(quarantined), "virtual": not config.encode_files,
        "clip_dir": MetadataValue.path(storage.url("media", "clips" if config.encode_files else "frames")),
        "dropped_scenes": markdown_table(pl.DataFrame(dropped) if dropped else pl.DataFrame()),
        "preview": markdown_table(frame.select([c for c in ("id", "num_frames", "height", "width", "start_s", "end_s") if c in frame.columns])),
    })


# ---- captions ------------------------------------------------------------------------------------------------------
@batch_asset(deps=[clips], kinds={"transformers", "parquet"})
def captions(context: AssetExecutionContext, lakehouse: Lakehouse, model_store: ModelStore) -> MaterializeResult:
    """One caption per clip (`text`): sidecar captions shipped with the videos, else a local VLM; never made up."""
    from curation.captions import caption_clips, caption_counts, caption_table
    from curation.kept_frames import load_kept_frames

    batch = batch_key(context.partition_key)  # a key, never a path: refused before any I/O
    clip_rows = lakehouse.read_partition("clips", batch)
    videos = lakehouse.read_partition("raw_videos", batch).select(pl.col("id").alias("video_id"), pl.col("path").alias("video_path"))
    rows = clip_rows.join(videos, on="video_id", how="left").to_dicts() if len(clip_rows) else []
    folder = landing_folder(lakehouse, batch)  # sidecar captions are read from it (on S3: a cached local copy)
    if lakehouse.storage.remote:  # the videos' s3:// URLs as paths inside that copy, so sidecars match them
        url = landing_folder_url(lakehouse, batch)
        rows = [{**r, "video_path": rebase(r["video_path"], url, folder) if r.get("video_path") else None} for r in rows]
    captioner = None
    if model_store.captioner:
        from models.scorers.captioner import VLMCaptioner

        captioner = VLMCaptioner(model_store.captioner, batch_size=model_store.captioner_batch_size, device=model_store.device)
    result = caption_clips(rows, folder, captioner=captioner,
                           frames_loader=lambda r: load_kept_frames(local_media_path(r["frames_dir"]), "caption"),
                           progress=context.log.info)
    frame = caption_table(result)
    for bad in result.bad_sidecars:  # a bad sidecar costs only its own captions: quarantined, the rest proceeds
        context.log.warning(f"captions: sidecar {bad.path} quarantined: {bad.reason}")
    written = save_batch(context, lakehouse, "captions", batch, frame, "captions", result.quarantine_rows("captions"))
    counts = caption_counts(result)
    if not model_store.captioner:
        context.log.info("no captioner model configured: clips without sidecar captions stay uncaptioned")
    return MaterializeResult(metadata={**written, **counts, "captioner": model_store.captioner or "none",
                                       "preview": markdown_table(frame.select("id", "text", "source", "reason"))})


def published_scan(scan, folder, url: str):
    """A scan of a local copy of a landing folder, with its paths (and the reasons that name them) moved to ``url``."""
    local = str(folder.resolve())

    def moved(frame: pl.DataFrame) -> pl.DataFrame:
        columns = [pl.col(c).map_elements(lambda p: rebase(p, local, url), return_dtype=pl.String) for c in ("path",)
                   if c in frame.columns and len(frame)]
        if "reason" in frame.columns and len(frame):
            columns.append(pl.col("reason").str.replace_all(local, url, literal=True))
        return frame.with_columns(columns) if columns else frame

    from dataclasses import replace

    return replace(scan, videos=moved(scan.videos), quarantine=moved(scan.quarantine))


def publish_clips(storage, result):
    """Upload each cut clip and its kept-frames folder to ``media/clips/<id>.mp4`` and ``media/frames/<id>/``
    (immutable: an object already there is kept, never uploaded over); the result then names their URLs. A virtual
    clip has no file: its path already names its published source."""
    from dataclasses import replace
    from pathlib import Path

    from curation.kept_frames import MANIFEST

    published = []
    for clip in result.clips:
        clip_url = clip.path if clip.virtual else storage.url("media", "clips", f"{clip.id}.mp4")
        if not clip.virtual and not storage.exists(clip_url):
            storage.put_file(clip.path, "media", "clips", f"{clip.id}.mp4")
        frames_url = storage.url("media", "frames", clip.id)
        if Path(clip.frames_dir).is_dir() and not storage.exists(f"{frames_url}/{MANIFEST}"):
            storage.put_dir(clip.frames_dir, "media", "frames", clip.id, last=MANIFEST)
        published.append(replace(clip, path=clip_url, frames_dir=frames_url))
    return replace(result, clips=published)


CURATION_ASSETS = [raw_videos, scenes, clips, captions]
