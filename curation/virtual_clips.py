"""Virtual clips: a clip is a frame-exact range of its frozen source, decoded on demand, never re-encoded.

A clip row names its source (``path``), the source frames ``[start_frame, end_frame)`` (decode-count indices, as
the shot detector counts them), its output rate (``fps``) and length (``num_frames``) and its upright size
(``width`` x ``height``, shorter side capped as an exported file would be). Output frame ``k`` shows the source
frame on screen ``k / fps`` seconds after the clip's first frame: the timestamp resampling ``curation.cutting``
uses when it writes a file, so a virtual clip and its exported file hold the same frames (within the codec).

Frame-exact seeking: demuxing a source (no decoding) lists every frame's presentation timestamp, so the ``k``-th
smallest timestamp is frame ``k``, and the keyframes before any range. Reading seeks to the keyframe before the
first wanted frame and decodes forward; every decoded frame is identified by its timestamp, never by counting
after a seek. A source whose timestamps are missing or repeated, or whose decoder gives a frame the index does not
know, is read by decoding from the first frame instead: slower, never different frames.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from curation.video_io import iter_av_frames, open_video, probe_stream, stored_size, upright_array

if TYPE_CHECKING:
    import av
    import numpy as np


@dataclass(frozen=True)
class FrameIndex:
    """Presentation timestamps of a source's frames in frame order, and which frames are keyframes."""

    num_frames: int  # frames the decoder will output (packets the demuxer does not discard)
    pts: tuple[int, ...] | None  # None: timestamps missing or repeated, frames are found by counting only
    keyframes: tuple[int, ...]  # frame indices, ascending
    time_base: Fraction
    fps: Fraction
    rotation: int
    width: int  # upright
    height: int

    @property
    def seekable(self) -> bool:
        return self.pts is not None and bool(self.keyframes)

    def time(self, frame: int) -> Fraction:
        """Seconds from the first frame to ``frame``: what ``iter_av_frames`` reports for it."""
        if self.pts is None:
            return Fraction(frame) / self.fps
        return (self.pts[frame] - self.pts[0]) * self.time_base

    def keyframe_before(self, frame: int) -> int:
        return self.keyframes[max(0, bisect.bisect_right(self.keyframes, frame) - 1)]


def frame_index(path: str | Path) -> FrameIndex:
    """The source's frame index (cached per process while the file is unchanged)."""
    st = os.stat(path)
    return _frame_index(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _frame_index(path: str, _size: int, _mtime_ns: int) -> FrameIndex:
    info = probe_stream(path)  # rate, time base and the rotation of the decoded first frame
    container, stream = open_video(path, threads=False)
    pts: list[int] = []
    keys: set[int] = set()
    untimed = 0
    with container:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream flush packet
            if packet.is_discard:
                continue  # an edit list hides it: the decoder never outputs it
            if packet.pts is None:
                untimed += 1
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.add(packet.pts)
    ordered = sorted(pts)
    shape = dict(time_base=info.time_base, fps=info.fps, rotation=info.rotation, width=info.width, height=info.height)
    if untimed or len(set(ordered)) != len(ordered):
        return FrameIndex(len(pts) + untimed, None, (), **shape)
    keyframes = tuple(i for i, p in enumerate(ordered) if p in keys)
    return FrameIndex(len(ordered), tuple(ordered), keyframes, **shape)


def clip_source_frames(index: FrameIndex, start: int, end: int, num_frames: int, rate: Fraction) -> list[int]:
    """Source frame shown at each output frame of the clip ``[start, end)`` resampled to ``rate`` frames/s.

    Output ``k`` shows the last source frame whose time since ``start`` is at most ``k / rate`` (a frame stays on
    screen until the next one), and the range's last frame once the range has no later one: exactly what
    ``curation.cutting`` encodes."""
    if not 0 <= start < end:
        raise ValueError(f"empty or negative frame range [{start}, {end})")
    if end > index.num_frames:
        raise IndexError(f"frame range [{start}, {end}) is past the source's {index.num_frames} frames")
    t0 = index.time(start)
    offsets = [index.time(j) - t0 for j in range(start, end)]
    return [start + max(0, bisect.bisect_right(offsets, Fraction(k) / rate) - 1) for k in range(num_frames)]


class _IndexMismatch(Exception):
    """A decoded frame the index does not know: the source is read by counting instead."""


def iter_source_frames(path: str | Path, wanted: Sequence[int], *, strict: bool = True
                       ) -> Iterator[tuple[int, "av.VideoFrame"]]:
    """Decoded source frames at the indices ``wanted`` in ascending order (repeats once), as stored (not upright).

    Seeks to the keyframe before a wanted frame whenever that keyframe lies ahead of what was already decoded;
    decodes forward from there. Falls back to decoding from the start (see the module doc). ``strict``: a wanted
    frame past the end of the stream raises ``IndexError``; otherwise the frames simply end there (a damaged tail)."""
    wanted = sorted(set(int(i) for i in wanted))
    if not wanted:
        return
    if wanted[0] < 0:
        raise IndexError(f"negative frame index {wanted[0]}")
    index = frame_index(path)
    given = 0
    if index.seekable:
        try:
            for item in _seeking(path, index, wanted, strict):
                given += 1
                yield item
            return
        except _IndexMismatch:
            pass  # frames already yielded are exact; the rest come by counting from the first frame
    rest = set(wanted[given:])
    last = -1
    for i, _t, frame, _info in iter_av_frames(path, stop=wanted[-1] + 1):
        last = i
        if i in rest:
            yield i, frame
    if strict and last < wanted[-1]:
        raise IndexError(f"{path}: frame {wanted[-1]} is past the source's last frame {last}")


def _seeking(path: str | Path, index: FrameIndex, wanted: list[int], strict: bool
             ) -> Iterator[tuple[int, "av.VideoFrame"]]:
    import av

    if wanted[-1] >= len(index.pts):  # strict: fails here; else the counting fallback stops where the frames do
        raise (IndexError if strict else _IndexMismatch)(f"{path}: frame {wanted[-1]} is past the source's {len(index.pts)} frames")
    by_pts = {p: i for i, p in enumerate(index.pts)}
    container, stream = open_video(path)
    with container:
        position = -1  # the last frame decoded since the last seek
        frames = None
        for target in wanted:
            key = index.keyframe_before(target)
            if frames is None or target <= position or key > position + 1:
                # Seek when decoding on would pass frames a keyframe lets us skip (or we are already past).
                container.seek(index.pts[key], stream=stream, backward=True, any_frame=False)
                frames, position = container.decode(stream), -1
            while position < target:
                try:
                    frame = next(frames)
                except (StopIteration, av.FFmpegError) as err:
                    raise _IndexMismatch(f"decoding stopped before frame {target}") from err
                found = by_pts.get(frame.pts)
                if found is None:
                    raise _IndexMismatch(f"decoded a frame with pts {frame.pts} the index lacks")
                position = found
            if position != target:
                raise _IndexMismatch(f"seek landed past frame {target}")
            yield target, frame


def read_source_frames(
    path: str | Path, indices: Sequence[int], size: tuple[int, int] | None = None, *, format: str = "rgb24",
    interpolation: str | None = "BICUBIC",
) -> list["np.ndarray"]:
    """Upright source frames at ``indices`` (any order, repeats allowed), frame-exact.

    size: ``(width, height)`` of the upright frame, or None for the source size."""
    from av.video.reformatter import VideoReformatter

    rotation = frame_index(path).rotation
    scaler = VideoReformatter()
    got: dict[int, np.ndarray] = {}
    for i, frame in iter_source_frames(path, indices):
        width, height = stored_size(*size, rotation) if size is not None else (None, None)
        image = scaler.reformat(frame, width=width, height=height, format=format, interpolation=interpolation)
        got[i] = upright_array(image.to_ndarray(), rotation)
    return [got[int(i)] for i in indices]


def clip_rate(fps: float) -> Fraction:
    """A clip's output rate as the cutter holds it (``CutConfig.target_fps`` to the nearest 1/1001)."""
    return Fraction(fps).limit_denominator(1001)


def read_clip_frames(row: Mapping, indices: Sequence[int] | None = None, size: tuple[int, int] | None = None
                     ) -> list["np.ndarray"]:
    """Frames ``indices`` (clip frame numbers; all when None) of a clip row: a virtual clip decoded from its
    source at the clip's size (``size`` overrides), a clip file read as it is."""
    from curation.sources import decodable_source

    num_frames = int(row["num_frames"])
    indices = list(range(num_frames)) if indices is None else [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < num_frames]
    if bad:
        raise IndexError(f"clip {row.get('id')}: frames {bad[:5]} outside its {num_frames} frames")
    if not row.get("virtual"):
        from curation.video_io import read_frames
        from common.storage import local_media_path

        return read_frames(local_media_path(row["path"]), indices, size)
    # The clip's own ``id`` is not its source's: hand over only the source's fields (``video_id`` is its hash).
    source = decodable_source({"source": row["path"], "video_id": row.get("video_id"), "linked": bool(row.get("linked"))})
    mapping = clip_source_frames(frame_index(source), int(row["start_frame"]), int(row["end_frame"]), num_frames,
                                 clip_rate(float(row["fps"])))
    size = size or (int(row["width"]), int(row["height"]))
    return read_source_frames(source, [mapping[i] for i in indices], size)



def range_problems(rows: Sequence[Mapping], workers: int | None = None) -> dict[str, str]:
    """Virtual clips whose source does not hold their range or does not decode there: ``{clip id: reason}``.

    Per source, one frame index says whether every range lies within the source's frames, and one seeking pass
    decodes each clip's first frame: a check that costs a keyframe's worth of decoding per clip, not the clip. The
    sources are checked in ``curation.pool`` worker processes (``workers``: None = one per core, 1 = here)."""
    from curation.pool import run_pool

    by_source: dict[tuple, list[dict]] = {}
    for row in rows:
        by_source.setdefault((row["path"], row.get("video_id"), bool(row.get("linked"))), []).append(dict(row))
    problems: dict[str, str] = {}
    groups = list(by_source.values())
    for outcome in run_pool(source_range_problems, groups, workers=workers if len(groups) > 1 else 1,
                            preload=("curation.virtual_clips", "av")):
        if outcome.ok:
            problems.update(outcome.result)
        else:  # the worker died on this source (or our code broke): its clips are not known to be good
            problems.update({r["id"]: f"source {r['path']} could not be checked: {outcome.error.detail}"
                             for r in outcome.item})
    return problems


def source_range_problems(group: Sequence[Mapping]) -> dict[str, str]:
    """``range_problems`` of the clips of ONE source."""
    from curation.sources import decodable_source

    path, video_id, linked = group[0]["path"], group[0].get("video_id"), bool(group[0].get("linked"))
    try:
        source = decodable_source({"source": path, "video_id": video_id, "linked": linked})
        index = frame_index(source)
    except Exception as err:  # the source is gone, changed or unreadable: every clip of it is a problem
        return {r["id"]: f"source {path}: {type(err).__name__}: {err}" for r in group}
    problems: dict[str, str] = {}
    first_frames: dict[int, list[str]] = {}
    for row in group:
        start, end = int(row["start_frame"]), int(row["end_frame"])
        if not 0 <= start < end <= index.num_frames:
            problems[row["id"]] = f"range {start}..{end} is outside the {index.num_frames} frames of {path}"
        else:
            first_frames.setdefault(start, []).append(row["id"])
    try:
        decoded = {i for i, _frame in iter_source_frames(source, sorted(first_frames))}
    except Exception as err:  # a decode failure inside the source: its clips are the problem
        decoded = set()
        reason = f"{path} does not decode: {type(err).__name__}: {err}"
    else:
        reason = f"first frame does not decode from {path}"
    for start, ids in first_frames.items():
        if start not in decoded:
            problems.update({clip_id: reason for clip_id in ids})
    return problems
