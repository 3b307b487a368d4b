"""Clip plans: which scenes become clips, over which source frames, with how many output frames, under which id
and at which size. No video is touched here; ``curation.cutting`` (clip files, kept frames) and
``curation.shot_frames`` (kept frames in the detection pass) decode by these plans.

Frame-rate conversion is timestamp resampling: output frame ``k`` of a clip shows the source frame that is on
screen at ``k / target_fps`` seconds after the clip's first frame. A clip of duration ``D`` seconds has
``round(D * target_fps)`` frames (halves up), the count ffmpeg's ``-r 30 -t D`` gives the reference.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from curation.shots import Scene
from curation.video_io import scaler_threads, stored_size, upright_yuv420p
from curation.video_writer import even_size_for_short_side


@dataclass(frozen=True)
class CutConfig:
    """How scenes become clips; defaults are the reference's (2..15 s, 30 fps, shorter side 720).

    short_side is a cap: a smaller source keeps its size (never upscaled), dimensions are made even.
    crf / preset: libx264 quality and speed. min_seconds / max_seconds: shorter scenes are dropped, longer
    ones keep their first max_seconds. None disables a bound; target_fps None keeps the source rate.
    """

    min_seconds: float | None = 2.0
    max_seconds: float | None = 15.0
    target_fps: float | None = 30.0
    short_side: int | None = 720
    crf: int = 18
    preset: str = "veryfast"

    def encode_key(self) -> str:
        """Short digest of everything that changes a clip's pixels: part of the clip id. ``upright`` marks clips cut
        with the display rotation applied, so a sideways clip made by an earlier version is never reused."""
        payload = json.dumps(
            {"fps": self.target_fps, "short": self.short_side, "crf": self.crf, "preset": self.preset, "upright": 1},
            sort_keys=True,
        )
        return hashlib.blake2b(payload.encode(), digest_size=4).hexdigest()

    def frames_key(self) -> str:
        """Short digest of what fixes a virtual clip's frames (rate, size, upright): no encoder settings."""
        payload = json.dumps({"fps": self.target_fps, "short": self.short_side, "upright": 1}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=4).hexdigest()


CUT_PRESETS: dict[str, CutConfig] = {
    "reference": CutConfig(),
    "preview": CutConfig(short_side=360, crf=23, preset="ultrafast"),
}


@dataclass(frozen=True)
class ClipPlan:
    """A clip to write: source frames ``[start_frame, end_frame)`` of scene ``scene_index``."""

    clip_id: str
    scene_index: int
    start_frame: int
    end_frame: int  # exclusive, source frames (after the max_seconds cap)
    start_s: float
    end_s: float
    num_frames: int  # output frames


@dataclass(frozen=True)
class DroppedScene:
    scene_index: int
    start_frame: int
    end_frame: int
    reason: str


@dataclass(frozen=True)
class ClipResult:
    """One written clip; the first eight fields are the Open-Sora ``info`` columns."""

    path: str
    id: str
    num_frames: int
    fps: float
    height: int
    width: int
    aspect_ratio: float  # H / W
    resolution: int  # H * W
    video_id: str
    scene_index: int
    start_frame: int  # source frames, end exclusive
    end_frame: int
    start_s: float
    end_s: float
    frames_dir: str
    virtual: bool = False  # True: ``path`` is the frozen source and the clip is its frame range (curation.virtual_clips)
    linked: bool = False  # the source is a file referenced in place (``ingest --link``): its hash is checked on read

    def to_row(self) -> dict:
        return asdict(self)


@dataclass
class CutResult:
    """What ``cut_clips`` did with one video: the clips written and the scenes dropped (with why)."""

    clips: list[ClipResult] = field(default_factory=list)
    dropped: list[DroppedScene] = field(default_factory=list)
    frames_decoded: int = 0


def clip_id_for(video_id: str, start_frame: int, end_frame: int, cfg: CutConfig, *, virtual: bool = False) -> str:
    """Stable id: same source, same frames, same encode settings -> same id (never random). A virtual clip's id
    carries no encoder settings (``v`` + ``frames_key``): it is the frames, not a file."""
    key = f"v{cfg.frames_key()}" if virtual else cfg.encode_key()
    return f"{video_id}_{start_frame:06d}-{end_frame:06d}_{key}"


def clip_rates(fps: float | Fraction, cfg: CutConfig) -> tuple[Fraction, Fraction]:
    """(source rate, output rate) as the plan holds them: exact fractions, so frame counts never drift."""
    fps_q = Fraction(fps).limit_denominator(1001000)
    return fps_q, (Fraction(cfg.target_fps).limit_denominator(1001) if cfg.target_fps else fps_q)


def shortest_clip(fps_q: Fraction, cfg: CutConfig) -> int:
    """The fewest source frames a scene needs to become a clip (``min_seconds``)."""
    if cfg.min_seconds is None:
        return 1
    return max(1, math.ceil(Fraction(cfg.min_seconds).limit_denominator(1000) * fps_q))


def clip_end(start: int, scene_end: int, fps_q: Fraction, cfg: CutConfig) -> int:
    """Where the clip of a scene starting at ``start`` ends: the scene's end, or after its first ``max_seconds``
    (rounded to whole source frames, as the reference's FrameTimecode)."""
    if cfg.max_seconds is None:
        return scene_end
    return min(scene_end, start + round(float(fps_q) * cfg.max_seconds))


def output_frames(start: int, end: int, fps_q: Fraction, target: Fraction) -> int:
    """Output frames of the clip over source frames ``[start, end)``: its duration times the output rate, halves up."""
    ratio = target / fps_q  # floor(n * p/q + 1/2) in integers: the pass calls this for every frame
    return max(1, (2 * (end - start) * ratio.numerator + ratio.denominator) // (2 * ratio.denominator))


def plan_clips(
    video_id: str, scenes: Sequence[Scene], fps: float | Fraction, cfg: CutConfig, *, virtual: bool = False
) -> tuple[list[ClipPlan], list[DroppedScene]]:
    """Decide which scenes become clips (and over which frames) without touching the video."""
    fps_q, target = clip_rates(fps, cfg)
    plans: list[ClipPlan] = []
    dropped: list[DroppedScene] = []
    for scene in sorted(scenes, key=lambda s: s.start_frame):
        n_src = scene.end_frame - scene.start_frame
        if n_src <= 0:
            dropped.append(DroppedScene(scene.index, scene.start_frame, scene.end_frame, "empty scene"))
            continue
        if n_src < shortest_clip(fps_q, cfg):
            reason = f"shorter than min_seconds: {float(Fraction(n_src) / fps_q):.3f}s < {cfg.min_seconds}s"
            dropped.append(DroppedScene(scene.index, scene.start_frame, scene.end_frame, reason))
            continue
        end = clip_end(scene.start_frame, scene.end_frame, fps_q, cfg)
        plans.append(
            ClipPlan(
                clip_id=clip_id_for(video_id, scene.start_frame, end, cfg, virtual=virtual),
                scene_index=scene.index,
                start_frame=scene.start_frame,
                end_frame=end,
                start_s=float(scene.start_frame / fps_q),
                end_s=float(end / fps_q),
                num_frames=output_frames(scene.start_frame, end, fps_q, target),
            )
        )
    for a, b in zip(plans, plans[1:]):
        if b.start_frame < a.end_frame:
            raise ValueError(f"scenes overlap: {a.start_frame}-{a.end_frame} and {b.start_frame}-{b.end_frame}")
    return plans, dropped


@dataclass(frozen=True)
class ClipFormat:
    """What every clip of one source looks like: its size (upright, as it plays), rate and the source's rotation."""

    width: int
    height: int
    rotation: int  # a phone's portrait video: scale the stored frame, then turn the small one upright
    rate: Fraction

    @classmethod
    def of(cls, width: int, height: int, rotation: int, fps: Fraction, cfg: CutConfig) -> "ClipFormat":
        out_w, out_h = even_size_for_short_side(width, height, cfg.short_side)
        return cls(out_w, out_h, rotation, clip_rates(fps, cfg)[1])

    def scaler(self) -> Callable[[Any], Any]:
        """A function bringing a decoded source frame to the clip: yuv420p at clip size, upright."""
        from av.video.reformatter import VideoReformatter

        reformatter = VideoReformatter()
        scale_w, scale_h = stored_size(self.width, self.height, self.rotation)
        threads = scaler_threads(self.width, self.height)

        def scale(frame):
            # Scale in YUV straight to the clip size (the frame itself when no scaling is needed), then turn upright.
            scaled = reformatter.reformat(frame, width=scale_w, height=scale_h, format="yuv420p",
                                          interpolation="BICUBIC", threads=threads)  # fmt: skip
            return upright_yuv420p(scaled, self.rotation) if self.rotation else scaled

        return scale

    def clip_result(self, plan: ClipPlan, num_frames: int, *, video_id: str, path: str, frames_dir: Path,
                    virtual: bool = False, linked: bool = False) -> ClipResult:  # fmt: skip
        return ClipResult(
            path=path, id=plan.clip_id, num_frames=num_frames, fps=float(self.rate), height=self.height,
            width=self.width, aspect_ratio=self.height / self.width, resolution=self.height * self.width,
            video_id=video_id, scene_index=plan.scene_index, start_frame=plan.start_frame, end_frame=plan.end_frame,
            start_s=plan.start_s, end_s=plan.end_s, frames_dir=str(frames_dir), virtual=virtual, linked=linked,
        )


__all__ = [
    "CUT_PRESETS", "ClipFormat", "ClipPlan", "ClipResult", "CutConfig", "CutResult", "DroppedScene", "clip_end",
    "clip_id_for", "clip_rates", "output_frames", "plan_clips", "shortest_clip",
]  # fmt: skip
