"""Shots, and the scorer frames of the clips they become, from ONE decode pass (the ``scenes`` asset's default).

Shot detection decodes every frame; the clips asset then keeps a few frames of each clip for the scorers
(``curation.kept_frames``), and used to decode the video a second time to find them. Here both come from one pass.
The detector is streamed (``curation.shots.AdaptiveCutter`` decides frame ``t`` once frame ``t + window_width`` is
in), so frames enter the clip being formed ``window_width`` frames behind the decoder, already knowing whether a
new shot starts at them.

A clip keeps frames at fixed positions from its start (flow, OCR) and at fractions of its length (aesthetic 10/50/90 %,
the middle frame), and its length is known only when the next cut (or the ``max_seconds`` cap) comes. While a clip
is open, the frames that can still turn out to be one of those are held (as decoded: no copy, no conversion; once
the clip runs short of memory, scaled down to the clip), and the others are dropped as the pass goes; only the few a
clip keeps are converted and written. What is held is bounded by ``max_seconds`` whatever the video's length (at
worst about 160 frames) and capped by ``buffer_mb``.

When the pass closes a clip it writes exactly what ``curation.cutting.keep_virtual_frames`` would (same clip id, same
clip frame numbers, same scaling, same pixels: the tests compare them), so the clips asset finds the frames there and
decodes nothing. A clip the pass does not keep (over ``buffer_mb``, timestamps missing or out of order, no
``max_seconds``, a detector other than ``adaptive``) has no kept frames yet, and the clips asset keeps them as before.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from curation.clip_plan import ClipFormat, CutConfig, clip_end, clip_id_for, clip_rates, output_frames, shortest_clip
from curation.kept_frames import MANIFEST, KeepFramesSpec, KeptFrameWriter
from curation.shots import (AdaptiveCutter, AnalysisFrames, HsvScorer, Scene, SceneDetectConfig, cuts_to_scenes,
                            detect_scenes, pyscenedetect_size)
from curation.video_io import StreamInfo, iter_av_frames


@dataclass(frozen=True)
class KeepInPass:
    """Which clips' frames the pass keeps, and where: those the clips asset makes with ``cut`` (its defaults)."""

    frames_root: str
    cut: CutConfig = field(default_factory=CutConfig)
    spec: KeepFramesSpec = field(default_factory=KeepFramesSpec)
    buffer_mb: float = 256.0


@dataclass
class ShotPass:
    """What one pass found: the shots, how many clips have their frames kept (now or by an earlier run), and why any
    were left to the clips asset."""

    scenes: list[Scene]
    clips_kept: int = 0
    left_to_clips: list[str] = field(default_factory=list)


def detect_and_keep(path: str | Path, video_id: str, config: SceneDetectConfig, keep: KeepInPass | None) -> ShotPass:
    """The shots of ``path`` (exactly ``curation.shots.detect_scenes``'s) and, with ``keep``, the kept frames of the
    virtual clips they become, in one decode pass."""
    if keep is None or config.detector != "adaptive":
        return ShotPass(detect_scenes(path, video_id=video_id, config=config))
    cutter = AdaptiveCutter(adaptive_threshold=config.adaptive_threshold, min_scene_len=config.min_scene_len,
                            window_width=config.window_width, min_content_val=config.min_content_val)
    scorer = HsvScorer()
    cuts: list[int] = []
    behind: deque = deque()  # decoded frames whose cut decision is not final yet
    tracker: _ClipTracker | None = None
    num_frames = 0
    for index, _t, frame, info in iter_av_frames(path):
        if tracker is None:  # the first frame: upright size and rotation are known now
            analysis = AnalysisFrames(info, pyscenedetect_size(info.width, info.height) if config.downscale else None)
            tracker = _ClipTracker(video_id, info, keep)
        cut = cutter.push(scorer.score(analysis(frame)))  # the frame curation.shots.hsv_frame_scores scores
        if cut is not None:
            cuts.append(cut)
        behind.append((index, frame))
        while len(behind) > config.window_width:  # frames up to index - window_width are final
            j, fj = behind.popleft()
            tracker.push(j, fj, is_cut=j == cut)
        num_frames = index + 1
    if tracker is None:
        raise ValueError(f"{path}: no decodable frames")
    for j, fj in behind:  # the last window_width frames are never cuts
        tracker.push(j, fj, is_cut=False)
    tracker.close(num_frames)
    return ShotPass(cuts_to_scenes(cuts, num_frames, info.fps, video_id), tracker.kept, tracker.left)


class _ClipTracker:
    """Follows the clip being formed through the final frames and keeps its scorer frames (see the module doc)."""

    def __init__(self, video_id: str, info: StreamInfo, keep: KeepInPass):
        self.video_id, self.keep, self.spec = video_id, keep, keep.spec
        self.fps_q, self.rate = clip_rates(info.fps, keep.cut)
        self.ticks = info.time_base * self.rate  # output frames per timestamp tick: integer arithmetic per frame
        self.format = ClipFormat.of(info.width, info.height, info.rotation, info.fps, keep.cut)
        self.scale = self.format.scaler()
        self.frames_root = Path(keep.frames_root)
        self.kept, self.left = 0, []
        self.clip: _OpenClip | None = None
        self.last_pts: int | None = None
        self.timed = True  # frames come with strictly increasing timestamps (else the pass keeps nothing)

    def push(self, j: int, frame, *, is_cut: bool) -> None:
        """Source frame ``j`` (an av.VideoFrame); ``is_cut``: a shot starts at it."""
        pts = frame.pts
        if self.timed and (pts is None or (self.last_pts is not None and pts <= self.last_pts)):
            # The clips asset maps clip frames by the source's packet timestamps; without strictly increasing ones
            # the decode order cannot stand in for them.
            self.timed, self.clip = False, None
            self.left.append(f"timestamps missing or out of order at frame {j}: frames left to the clips asset")
        self.last_pts = pts
        clip = self.clip
        if clip is not None and (is_cut or j == clip.cap_end):
            self._close(j)
            clip = None
        if j == 0 or is_cut:
            clip = self.clip = self._open(j, pts) if self.timed else None
        if clip is not None:
            clip.push(j, pts, frame)

    def close(self, num_frames: int) -> None:
        if self.clip is not None:
            self._close(num_frames)

    def _open(self, start: int, pts0: int) -> _OpenClip | None:
        cut = self.keep.cut
        shortest = start + shortest_clip(self.fps_q, cut)
        cap_end = clip_end(start, sys.maxsize, self.fps_q, cut)
        if cut.max_seconds is None or cap_end < shortest:
            self.left.append("max_seconds is unset or below min_seconds: clips' frames left to the clips asset")
            return None
        lengths = tuple(output_frames(start, end, self.fps_q, self.rate) for end in (shortest, cap_end))
        return _OpenClip(self, start, pts0, shortest, cap_end, lengths)

    def _close(self, end: int) -> None:
        clip, self.clip = self.clip, None
        if end < clip.shortest_end:
            return  # shorter than min_seconds: the clips asset drops it
        if clip.over_budget:
            self.left.append(f"clip at frame {clip.start}: over the pass's {self.keep.buffer_mb:g} MB frame buffer")
            return
        clip_id = clip_id_for(self.video_id, clip.start, end, self.keep.cut, virtual=True)
        frames_dir = self.frames_root / clip_id
        if (frames_dir / MANIFEST).is_file():
            self.kept += 1  # kept by an earlier run: immutable, reused as it is
            return
        num = output_frames(clip.start, end, self.fps_q, self.rate)
        clip.close(num)
        writer = KeptFrameWriter(frames_dir, self.spec, num)
        missing = [k for k in writer.wanted if k not in clip.held_frames]
        if missing:  # never expected: the held frames cover every length the clip could have
            self.left.append(f"clip {clip_id}: frames {missing} were not held")
            return
        images = {}  # one conversion per distinct frame (several output frames can show the same source frame)
        for k, purposes in sorted(writer.wanted.items()):
            held = clip.held_frames[k]
            small = self.spec.needs_small(purposes)
            if id(held) not in images or (small and images[id(held)][1] is None):
                images[id(held)] = self.spec.images(held.clip_frame(self.scale), small=small)
            writer.save(k, *images[id(held)])
        writer.finish(clip_id, num)  # the manifest last: a killed run leaves no half-kept clip
        self.kept += 1


class _Held:
    """A source frame that output frames of the open clip may keep: as decoded (holding it costs nothing) until the
    clip runs short of memory, then scaled to the clip (for a source larger than the clip, much smaller)."""

    __slots__ = ("frame", "scaled", "nbytes")

    def __init__(self, frame):
        self.scaled = False
        self._hold(frame)

    def _hold(self, frame) -> None:
        self.frame, self.nbytes = frame, sum(plane.buffer_size for plane in frame.planes)

    def clip_frame(self, scale):
        """The frame at clip size and upright, as ``curation.cutting`` would write it."""
        if not self.scaled:
            self._hold(scale(self.frame))
            self.scaled = True
        return self.frame


class _OpenClip:
    """One clip being formed: resamples its frames to the output rate (as ``curation.cutting`` does) and holds the
    output frames that may still be kept."""

    PRUNE_EVERY = 16  # source frames between prunes of the held frames (a prune costs ~160 x 9 comparisons)

    def __init__(self, tracker: _ClipTracker, start: int, pts0: int, shortest_end: int, cap_end: int,
                 lengths: tuple[int, int]):  # fmt: skip
        self.tracker, self.start, self.pts0 = tracker, start, pts0
        self.shortest_end, self.cap_end = shortest_end, cap_end
        self.min_len, self.max_len = lengths  # the fewest and most output frames the clip can end up with
        self.held = None  # the source frame on screen (av.VideoFrame)
        self.k = 0  # the next output frame
        self.held_frames: dict[int, _Held] = {}  # output frame -> the source frame it shows
        self.bytes = 0  # of the distinct held frames
        self.scale_on_hold = False  # set once the clip ran short of memory holding decoded frames
        self.over_budget = False
        self.pushes = 0
        self.last_positions = _positions(tracker.spec, self.max_len)

    def push(self, j: int, pts: int, frame) -> None:
        if self.held is not None:
            # The clip holds frame j, so it ends after it: no fewer output frames than that.
            lower = max(self.min_len, output_frames(self.start, j + 1, self.tracker.fps_q, self.tracker.rate))
            ranges = self._ranges(lower)
            ticks = self.tracker.ticks  # output frame k starts before frame j's time: k < (pts - pts0) * ticks
            self.emit(ranges, num=-(-(pts - self.pts0) * ticks.numerator // ticks.denominator))
            self.pushes += 1
            if self.pushes % self.PRUNE_EVERY == 0:
                self._prune(ranges)
        self.held = frame

    def emit(self, ranges: list[tuple[int, int]], *, num: int) -> None:
        """Output frames up to ``num`` (exclusive) show the held source frame. If any is inside ``ranges`` the frame is
        held (``_Held``); it becomes images only if the clip keeps it."""
        shown = []
        while self.k < min(num, self.max_len):
            if any(a <= self.k <= b for a, b in ranges):
                shown.append(self.k)
            self.k += 1
        if not shown or self.over_budget:
            return
        held = _Held(self.held)
        if self.scale_on_hold:
            held.clip_frame(self.tracker.scale)
        for k in shown:
            self.held_frames[k] = held
        self.bytes += held.nbytes
        budget = self.tracker.keep.buffer_mb * 2**20
        if self.bytes > budget:
            self._prune(ranges)
        if self.bytes > budget and not self.scale_on_hold:  # hold clip-size frames from now on
            self.scale_on_hold = True
            for held in {id(h): h for h in self.held_frames.values()}.values():
                held.clip_frame(self.tracker.scale)
            self._prune(ranges)
        if self.bytes > budget:
            self.over_budget, self.held_frames, self.bytes = True, {}, 0

    def close(self, num: int) -> None:
        """The clip has ``num`` output frames: the held frame shows the rest of them."""
        self.last_positions = _positions(self.tracker.spec, num)
        self.emit(self._ranges(num), num=num)

    def _ranges(self, lower: int) -> list[tuple[int, int]]:
        """The output frames each kept position can be at for any length from ``lower`` to the longest: every position
        is a non-decreasing function of the length, so its range is [position at lower, position at the longest]."""
        return list(zip(_positions(self.tracker.spec, lower), self.last_positions))

    def _prune(self, ranges: list[tuple[int, int]]) -> None:
        """Drop held frames no length the clip can still have keeps."""
        for k in [k for k in self.held_frames if not any(a <= k <= b for a, b in ranges)]:
            del self.held_frames[k]
        self.bytes = sum(h.nbytes for h in {id(h): h for h in self.held_frames.values()}.values())


def _positions(spec: KeepFramesSpec, length: int) -> list[int]:
    """Every kept clip frame of a clip of ``length`` output frames, purpose by purpose (the same order every time)."""
    return [k for positions in spec.indices(length).values() for k in positions]


__all__ = ["KeepInPass", "ShotPass", "detect_and_keep"]
