"""Cut scenes into clips: one decode pass per source video, frames routed into per-clip H.264 encoders.

The reference starts one ffmpeg process per scene (``-ss start -i in -t dur -r 30 -vf scale=...``), so a
video with 40 scenes is opened, seeked and partly decoded 40 times. Here the source is decoded once, in
order, and each decoded frame goes (scaled in YUV, no RGB round trip) to the encoder of the clip it belongs
to. Scenes tile the video, so at most one encoder is open at a time. Which frames and how many: the plans of
``curation.clip_plan``.

While a clip is encoded the frames that the scorers need are saved beside it (``curation.kept_frames``), so
the aesthetic, flow, OCR and matching/caption scorers never decode video again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from curation.clip_plan import ClipFormat, ClipPlan, ClipResult, CutConfig, CutResult, DroppedScene, plan_clips
from curation.kept_frames import MANIFEST, KeepFramesSpec, KeptFrameWriter
from curation.shots import Scene
from curation.virtual_clips import clip_source_frames, frame_index, iter_source_frames
from curation.video_io import probe_stream
from curation.video_writer import open_writer


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


__all__ = ["cut_clips", "keep_virtual_frames"]
