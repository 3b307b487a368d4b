"""The per-video work of the curation assets, as plain picklable tasks for ``curation.pool`` worker processes.

Each task takes one video's ``raw_videos`` row (plus, for cutting, its scenes) and returns plain data; the assets
turn results into table rows and failures into quarantine records. Decoders read the frozen source named by the
row (``curation.sources.decodable_source``: an ``s3://`` source through the object cache, a linked one only while
its bytes still hash to the recorded id), so a worker needs no shared disk with the run, only the lake's storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.clip_plan import CutConfig, CutResult
from curation.shot_frames import KeepInPass, ShotPass
from curation.shots import Scene, SceneDetectConfig

PRELOAD = ("curation.batch_tasks", "curation.shots", "curation.shot_frames", "curation.clip_plan",
           "curation.virtual_clips", "curation.cutting", "cv2", "av")
"""Modules the pool's forkserver imports once, so each worker starts in milliseconds."""


def detect_video(config: SceneDetectConfig, keep: KeepInPass | None, video: dict[str, Any]) -> ShotPass:
    """The shots of one video (``scenes`` asset) and, with ``keep``, its clips' scorer frames from the same pass."""
    from curation.shot_frames import detect_and_keep
    from curation.sources import decodable_source

    return detect_and_keep(decodable_source(video), video["id"], config, keep)


@dataclass(frozen=True)
class ClipJob:
    """What the ``clips`` asset asks of one video: where kept frames (and, when encoding, clip files) go."""

    frames_dir: str
    clip_dir: str | None = None  # None: virtual clips (nothing encoded); a folder: clip files are written there
    cut: CutConfig = field(default_factory=CutConfig)


def clip_video(job: ClipJob, item: tuple[dict[str, Any], list[Scene]]) -> CutResult:
    """One video's clips: virtual ranges of its source with their scorer frames, or (``job.clip_dir``) files."""
    from curation.cutting import cut_clips, keep_virtual_frames
    from curation.sources import decodable_source

    video, scenes = item
    source = decodable_source(video)
    if job.clip_dir is None:
        url = video.get("source") or video["path"]  # rows from before frozen sources decode their landing file
        return keep_virtual_frames(source, video["id"], scenes, job.frames_dir, job.cut, source_url=url,
                                   linked=bool(video.get("linked")))
    return cut_clips(source, video["id"], scenes, Path(job.clip_dir), job.cut, frames_root=job.frames_dir)


__all__ = ["PRELOAD", "ClipJob", "clip_video", "detect_video"]
