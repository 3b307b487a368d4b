"""Cut scenes into clips: one decode pass per source video, frames routed into per-clip H.264 encoders.

The reference starts one ffmpeg process per scene (``-ss start -i in -t dur -r 30 -vf scale=...``), so a
video with 40 scenes is opened, seeked and partly decoded 40 times. Here the source is decoded once, in
order, and each decoded frame goes (scaled in YUV, no RGB round trip) to the encoder of the clip it belongs
to. Scenes tile the video, so at most one encoder is open at a time.

Frame-rate conversion is timestamp resampling: output frame ``k`` of a clip shows the source frame that is on
screen at ``k / target_fps`` seconds after the clip's first frame. A clip of duration ``D`` seconds has
``round(D * target_fps)`` frames (halves up), the count ffmpeg's ``-r 30 -t D`` gives the reference.

While a clip is encoded the frames that the scorers need are saved beside it (``curation.kept_frames``), so
the aesthetic, flow, OCR and matching/caption scorers never decode video again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from curation.kept_frames import MANIFEST, KeepFramesSpec, KeptFrameWriter
from curation.shots import Scene
from curation.virtual_clips import clip_source_frames, frame_index, iter_source_frames
from curation.video_io import probe_stream, scaler_threads, stored_size, upright_yuv420p
from curation.video_writer import even_size_for_short_side, open_writer


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
        rate = Fraction(cfg.target_fps).limit_denominator(1001) if cfg.target_fps else fps.limit_denominator(1001000)
        return cls(out_w, out_h, rotation, rate)

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


class _OpenClip:
    """The clip being encoded: resamples source frames to the output rate and feeds its encoder.

    Source frames arrive in order with their timestamps. A frame stays on screen until the next one's
    timestamp, so each arrival writes the previous (held) frame for every output instant before it;
    ``finish`` writes the held frame up to the clip's planned length.
    """

    def __init__(self, plan: ClipPlan, path: Path, fmt: ClipFormat, cfg: CutConfig, kept: KeptFrameWriter,
                 t0: Fraction):  # fmt: skip
        self.plan, self.rate, self.kept, self.t0 = plan, fmt.rate, kept, t0
        self._stack = contextlib.ExitStack()
        self.writer = self._stack.enter_context(open_writer(path, fmt.rate, fmt.width, fmt.height, cfg.crf, cfg.preset))
        self.held = None  # the last source frame seen (scaled, yuv420p)
        self.k = 0  # next output frame

    def push(self, t: Fraction, frame) -> None:
        if self.held is not None:
            self._emit_until(t - self.t0)
        self.held = frame

    def _emit_until(self, limit: Fraction | None) -> None:
        while self.k < self.plan.num_frames and (limit is None or Fraction(self.k) / self.rate < limit):
            self.writer.write(self.held)
            self.kept.offer(self.k, self.held)
            self.k += 1

    def finish(self) -> int:
        self._emit_until(None)
        self._stack.close()  # flush the encoder, rename the file into place
        self.kept.finish(self.plan.clip_id, self.k)
        return self.k

    def abort(self, err: BaseException) -> None:
        self._stack.__exit__(type(err), err, err.__traceback__)  # the writer removes its partial file


class _SourceEnded(Exception):
    """The video has fewer frames than the scenes claim."""


def cut_clips(
    video_path: str | Path,
    video_id: str,
    scenes: Sequence[Scene],
    out_dir: str | Path,
    cfg: CutConfig | None = None,
    keep: KeepFramesSpec | None = None,
    *,
    frames_root: str | Path | None = None,
) -> CutResult:
    """Write one clip per kept scene to ``{out_dir}/{clip_id}.mp4`` in a single decode pass.

    Kept frames go to ``{frames_root}/{clip_id}/`` (``frames_root`` defaults to ``{out_dir}/frames``).
    Scenes shorter than ``cfg.min_seconds`` are returned in ``CutResult.dropped`` with the reason.
    Decoding stops after the last frame of the last clip.
    """
    cfg = cfg or CutConfig()
    keep = keep or KeepFramesSpec()
    out_dir = Path(out_dir)
    frames_root = Path(frames_root) if frames_root is not None else out_dir / "frames"
    info = probe_stream(video_path)
    plans, dropped = plan_clips(video_id, scenes, info.fps, cfg)
    result = CutResult(dropped=dropped)
    if not plans:
        return result
    fmt = ClipFormat.of(info.width, info.height, info.rotation, info.fps, cfg)

    def clip_result(plan: ClipPlan, num_frames: int) -> ClipResult:
        return fmt.clip_result(plan, num_frames, video_id=video_id, path=str(out_dir / f"{plan.clip_id}.mp4"),
                               frames_dir=frames_root / plan.clip_id)  # fmt: skip

    # 1. Clips are immutable media named by source, frame range and encode settings: one written earlier (by any
    #    run) is reused as it is, never re-encoded over.
    to_encode = []
    for plan in plans:
        if _already_cut(out_dir, frames_root, plan, keep):
            result.clips.append(clip_result(plan, plan.num_frames))
        else:
            to_encode.append(plan)
    if not to_encode:
        return result

    # 2. Encode the others in one decode pass.
    encoded, result.frames_decoded = _encode_clips(video_path, to_encode, out_dir, frames_root, cfg, keep, fmt)
    result.clips += [clip_result(plan, num_frames) for plan, num_frames in encoded]
    result.clips.sort(key=lambda c: c.start_frame)

    # 3. A clip the source ended inside is dropped, never padded.
    written = {c.id for c in result.clips}
    for missing in (p for p in to_encode if p.clip_id not in written):
        reason = f"source ended at frame {result.frames_decoded}, inside or before the scene"
        result.dropped.append(DroppedScene(missing.scene_index, missing.start_frame, missing.end_frame, reason))
    result.dropped.sort(key=lambda d: d.start_frame)
    return result


def _already_cut(out_dir: Path, frames_root: Path, plan: ClipPlan, keep: KeepFramesSpec) -> bool:
    """The clip's file is there (and its kept frames, when any are to be kept)."""
    kept = not keep.indices(plan.num_frames) or (frames_root / plan.clip_id / MANIFEST).is_file()
    return (out_dir / f"{plan.clip_id}.mp4").is_file() and kept


def _encode_clips(
    video_path: str | Path, plans: list[ClipPlan], out_dir: Path, frames_root: Path, cfg: CutConfig,
    keep: KeepFramesSpec, fmt: ClipFormat,
) -> tuple[list[tuple[ClipPlan, int]], int]:
    """Encode ``plans`` (in order, not overlapping) from one decode pass of the source.

    Returns (plan, frames written) of every finished clip and the number of source frames decoded. A clip the
    source ends inside is aborted (its partial file removed) and left out.
    """
    scale = fmt.scaler()
    finished: list[tuple[ClipPlan, int]] = []
    decoded = 0
    pending = iter(plans)
    plan: ClipPlan | None = next(pending)
    clip: _OpenClip | None = None
    try:
        # Decoding starts at the keyframe before the first clip (frame-exact: curation.virtual_clips), not at frame 0.
        source_index = frame_index(video_path)
        for index, frame in iter_source_frames(video_path, range(plans[0].start_frame, plans[-1].end_frame), strict=False):
            t = source_index.time(index)
            decoded = index + 1
            if clip is not None and index >= clip.plan.end_frame:
                finished.append((clip.plan, clip.finish()))
                clip, plan = None, next(pending, None)
            if plan is None:
                break
            if index < plan.start_frame:
                continue  # between clips (a dropped scene or a truncated tail): decoded, not converted
            if clip is None:
                kept = KeptFrameWriter(frames_root / plan.clip_id, keep, plan.num_frames)
                clip = _OpenClip(plan, out_dir / f"{plan.clip_id}.mp4", fmt, cfg, kept, t0=t)
            clip.push(t, scale(frame))
        if clip is not None and decoded >= clip.plan.end_frame:
            finished.append((clip.plan, clip.finish()))  # the stream ended right at the end of the last clip
            clip = None
        if clip is not None:  # scenes from another decoder or a damaged file: never pad with frozen frames
            raise _SourceEnded()
    except _SourceEnded as err:
        clip.abort(err)
    except BaseException as err:
        if clip is not None:
            clip.abort(err)
        raise
    return finished, decoded


def keep_virtual_frames(
    source: str | Path, video_id: str, scenes: Sequence[Scene], frames_root: str | Path, cfg: CutConfig | None = None,
    keep: KeepFramesSpec | None = None, *, source_url: str | None = None, linked: bool = False,
) -> CutResult:
    """Plan the virtual clips of one source and save the frames its scorers need; nothing is encoded.

    The kept frames are the ones ``curation.cutting.cut_clips`` would save beside a clip file (same clip frame
    numbers, scaled to the clip size the same way), so every scorer sees the same pixels either way. Only the
    source frames they show are decoded, seeking past the rest. Returns a ``CutResult`` whose clips are virtual:
    ``path`` is ``source_url`` (default: ``source``), ``frames_dir`` is ``{frames_root}/{clip_id}``. A clip
    whose kept frames are already there (immutable media, named by content) is reused.
    """
    cfg, keep = cfg or CutConfig(), keep or KeepFramesSpec()
    frames_root = Path(frames_root)
    index = frame_index(source)
    plans, dropped = plan_clips(video_id, scenes, index.fps, cfg, virtual=True)
    result = CutResult(dropped=list(dropped))
    fmt = ClipFormat.of(index.width, index.height, index.rotation, index.fps, cfg)

    # 1. Every clip the source holds; the frames each new one keeps, by the source frame that shows them.
    needs: dict[int, list[tuple[KeptFrameWriter, int]]] = {}  # source frame -> (clip's writer, clip frame)
    writers = []
    for plan in plans:
        if plan.end_frame > index.num_frames:  # scenes from another decoder or a damaged file: never padded
            reason = f"source ended at frame {index.num_frames}, inside or before the scene"
            result.dropped.append(DroppedScene(plan.scene_index, plan.start_frame, plan.end_frame, reason))
            continue
        frames_dir = frames_root / plan.clip_id
        result.clips.append(fmt.clip_result(plan, plan.num_frames, video_id=video_id, path=str(source_url or source),
                                            frames_dir=frames_dir, virtual=True, linked=linked))  # fmt: skip
        if (frames_dir / MANIFEST).is_file():
            continue  # kept by an earlier run: immutable, reused as it is
        writer = KeptFrameWriter(frames_dir, keep, plan.num_frames)
        writers.append((writer, plan))
        mapping = clip_source_frames(index, plan.start_frame, plan.end_frame, plan.num_frames, fmt.rate)
        for k in writer.wanted:
            needs.setdefault(mapping[k], []).append((writer, k))

    # 2. Decode only those source frames, seeking past the rest.
    scale = fmt.scaler()
    for j, frame in iter_source_frames(source, sorted(needs)):
        scaled = scale(frame)
        for writer, k in needs[j]:
            writer.offer(k, scaled)
    for writer, plan in writers:
        writer.finish(plan.clip_id, plan.num_frames)  # the manifest last: a killed run leaves no half-kept clip
    result.frames_decoded = index.num_frames
    result.dropped.sort(key=lambda d: d.start_frame)
    return result


__all__ = [
    "CUT_PRESETS", "ClipPlan", "ClipResult", "CutConfig", "CutResult", "DroppedScene", "clip_end", "clip_id_for",
    "clip_rates", "cut_clips", "keep_virtual_frames", "output_frames", "plan_clips", "shortest_clip",
]  # fmt: skip
