"""The one video reader of the curation pipeline, on PyAV (``curation.video_writer`` writes).

Everything that opens a video (probing, scene detection, cutting, virtual clips, scorers' fallbacks, the sample
generator, tests) goes through here, so that frame numbering is the same everywhere: frame ``i`` is the ``i``-th
frame the decoder outputs, counted from 0, which is also what ``probe.probe_video`` counts as ``num_frames``
(``scan_video`` counts the packets). Frames are RGB uint8 ``[H, W, 3]``
unless a caller asks for another pixel format.

Frames come out upright: phones store portrait video as landscape frames plus a rotation in the stream's display
matrix (which FFmpeg's CLI applies and PyAV does not). The reader reads it (``StreamInfo.rotation``, from the first
decoded frame: PyAV 18 exposes the display matrix only on frames), reports sizes upright and turns every frame
it converts (``iter_frames``, ``read_frames``); ``iter_av_frames`` hands out stored frames with the rotation for
callers that scale first and turn the small frame (``upright_yuv420p``), as the cutter does.

Decoding uses FFmpeg's frame threads (``thread_type="AUTO"``) and scales inside swscale (``size=``), so a
detector that needs 256 px wide frames never pays for a full-resolution RGB conversion.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from curation.errors import InputRejected

if TYPE_CHECKING:  # pragma: no cover - typing only
    import av


class UndecodableVideo(InputRejected, ValueError):
    """The file has no video stream this FFmpeg can decode: a fact about the input, not a broken component.

    ``str(err)`` says what is wrong with the file (``scan_video``'s messages are the probe's quarantine reasons).
    """


@dataclass(frozen=True)
class StreamInfo:
    """What a reader needs to know about the first video stream before decoding it."""

    width: int  # upright (display) size: the stored frame turned by ``rotation``
    height: int
    fps: Fraction  # average frame rate (exact rational)
    time_base: Fraction
    start_pts: int | None  # pts of the stream's first frame as declared by the container
    declared_frames: int  # 0 when the container does not say
    rotation: int = 0  # counter-clockwise degrees (0, 90, 180, 270) that turn a stored frame upright

    @property
    def stored_size(self) -> tuple[int, int]:
        """(width, height) of the frames as the decoder outputs them, before turning them upright."""
        return stored_size(self.width, self.height, self.rotation)


def frame_rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise degrees (0, 90, 180 or 270) the frame's display matrix turns it; 0 without one.

    PyAV's ``VideoFrame.rotation`` is FFmpeg's display-matrix angle in [-180, 180], counter-clockwise, the
    way the ffmpeg CLI's autorotate reads it. Angles that are not a quarter turn are rounded to one; flips in
    the matrix are not applied.
    """
    try:
        degrees = float(frame.rotation or 0)
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - older PyAV
        return 0
    return int(round(degrees / 90.0)) % 4 * 90


def stored_size(width: int, height: int, rotation: int) -> tuple[int, int]:
    """The stored (width, height) of an upright ``width`` x ``height`` frame turned by ``rotation``."""
    return (height, width) if rotation in (90, 270) else (width, height)


def upright_array(image: np.ndarray, rotation: int) -> np.ndarray:
    """A stored frame (``[H, W]`` or ``[H, W, C]``) turned upright; the array itself when ``rotation`` is 0."""
    if not rotation:
        return image
    return np.ascontiguousarray(np.rot90(image, rotation // 90))


def upright_yuv420p(frame: av.VideoFrame, rotation: int) -> av.VideoFrame:
    """A yuv420p frame turned upright plane by plane (no RGB round trip); the frame itself at rotation 0.

    Even sizes only (the planes of an odd yuv420p frame do not turn into a yuv420p frame).
    """
    if not rotation:
        return frame
    import av

    if frame.format.name != "yuv420p" or frame.width % 2 or frame.height % 2:
        raise ValueError(f"upright_yuv420p needs an even-sized yuv420p frame, got {frame.format.name} "
                         f"{frame.width}x{frame.height}")  # fmt: skip
    w, h = frame.width, frame.height
    packed = frame.to_ndarray()  # [h * 3 / 2, w]: Y, then U and V each h/2 x w/2
    k = rotation // 90
    planes = (packed[:h], packed[h : h + h // 4].reshape(h // 2, w // 2), packed[h + h // 4 :].reshape(h // 2, w // 2))
    out_w, out_h = stored_size(w, h, rotation)
    turned = np.concatenate([np.rot90(p, k).ravel() for p in planes]).reshape(out_h * 3 // 2, out_w)
    out = av.VideoFrame.from_ndarray(turned, format="yuv420p")
    out.pts = frame.pts
    if frame.time_base is not None:
        out.time_base = frame.time_base
    return out


def open_container(path: str | Path) -> av.container.InputContainer:
    """Open ``path`` for reading; the one ``av.open`` of a video the pipeline reads.

    Container and stream metadata (title, comment, ...) is not always UTF-8: a Latin-1 title must not make a
    decodable video unreadable, so undecodable metadata bytes become U+FFFD. Raises ``av.FFmpegError`` when
    FFmpeg cannot open the file as a container.
    """
    import av

    return av.open(str(path), mode="r", metadata_errors="replace")


VIDEO_THREADS_ENV = "OPENSORA_VIDEO_THREADS"


def video_threads() -> int:
    """Codec threads per video (decoders and the clip encoder): ``$OPENSORA_VIDEO_THREADS``, else 0 (FFmpeg picks
    from the number of cores).

    The curation pool sets 1 in its workers when there are as many workers as cores: each worker then has a core to
    itself, and one thread does the same work in 10-20 % less CPU than frame threads handing frames around."""
    import os

    raw = os.environ.get(VIDEO_THREADS_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise ValueError(f"{VIDEO_THREADS_ENV}={raw!r} is not a whole number of threads (0: as many as FFmpeg likes)")
    return int(raw)


def open_video(path: str | Path, *, threads: bool = True) -> tuple[av.container.InputContainer, av.VideoStream]:
    """Open ``path`` and return (container, first video stream), with ``video_threads()`` decoder threads unless
    ``threads`` is False (one)."""
    container = open_container(path)
    if not container.streams.video:
        container.close()
        raise UndecodableVideo(f"{path}: no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise UndecodableVideo(f"{path}: no decoder for the video stream's codec (FFmpeg does not know it)")
    count = video_threads() if threads else 1
    if count != 1:
        # Frame + slice threads; thread_count 0 lets FFmpeg pick from the number of cores.
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = count
    return container, stream


def stream_info(stream: av.VideoStream, rotation: int = 0) -> StreamInfo:
    """The stream's StreamInfo with sizes upright for ``rotation`` (read from a decoded frame)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise ValueError("video stream has no frame rate")
    width, height = stored_size(stream.codec_context.width, stream.codec_context.height, rotation)
    return StreamInfo(
        width=width,
        height=height,
        fps=Fraction(rate),
        time_base=Fraction(stream.time_base) if stream.time_base else Fraction(1, 1) / Fraction(rate),
        start_pts=stream.start_time,
        declared_frames=stream.frames or 0,
        rotation=rotation,
    )


def probe_stream(path: str | Path) -> StreamInfo:
    """Stream size (upright), rate, time base and rotation; decodes the first frame only (for the rotation)."""
    import av

    container, stream = open_video(path, threads=False)
    with container:
        rotation = 0
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError:
            first = None  # the caller's own decode reports the damage; sizes stay as stored
        if first is not None:
            rotation = frame_rotation(first)
        return stream_info(stream, rotation)


@dataclass(frozen=True)
class VideoScan:
    """What one pass over a file's first video stream found (``scan_video``): the facts a probe records."""

    codec: str  # FFmpeg's decoder name
    fps: Fraction  # average (else guessed) frame rate
    width: int  # upright (display) size, as ``StreamInfo``
    height: int
    rotation: int  # counter-clockwise degrees that turn a stored frame upright
    declared_frames: int  # what the container header says; 0 when it does not say
    packets: int  # non-empty packets of the stream: one per frame


def scan_video(path: str | Path) -> VideoScan:
    """Open ``path``, decode its first frame and demux (not decode) every packet of its first video stream.

    Cheap enough to run on every file that lands: the first frame proves the stream decodes at all (and carries
    the rotation), the packet count is the frame count and catches a truncated file. Raises ``UndecodableVideo``
    whose message is the reason (not a container, no video stream, no decoder, no rate or size, first frame
    broken, corrupt packets); judging the counts (a header that declares more frames) is the caller's.
    """
    import av

    try:
        container = open_container(path)
    except av.FFmpegError as err:
        raise UndecodableVideo(f"cannot open as a video container: {err}") from err
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise UndecodableVideo(f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise UndecodableVideo("no decoder for the video stream's codec (FFmpeg does not know it)")
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise UndecodableVideo("video stream has no frame rate")
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise UndecodableVideo("video stream has no frame size")
        try:
            first_frame = next(container.decode(stream), None)
        except av.FFmpegError as err:
            raise UndecodableVideo(f"first frame does not decode: {err}") from err
        if first_frame is None:
            raise UndecodableVideo("video stream contains no decodable frame")
        # Sizes as the video plays: a phone's portrait clip is stored landscape with a quarter turn to apply.
        rotation = frame_rotation(first_frame)

        container.seek(0)
        packets = 0
        try:
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
        except av.FFmpegError as err:
            raise UndecodableVideo(f"truncated or corrupt stream after {packets} packets: {err}") from err
        width, height = stored_size(width, height, rotation)
        return VideoScan(
            codec=stream.codec_context.name,
            fps=Fraction(rate),
            width=width,
            height=height,
            rotation=rotation,
            declared_frames=stream.frames or 0,
            packets=packets,
        )


def iter_av_frames(
    path: str | Path, *, stop: int | None = None, threads: bool = True
) -> Iterator[tuple[int, Fraction, av.VideoFrame, StreamInfo]]:
    """Decoded ``av.VideoFrame`` objects with their index and exact pts (seconds since the first frame).

    The low-level form of ``iter_frames`` for callers that keep frames in YUV (the cutter encodes them
    without an RGB round trip). ``stop`` (exclusive) ends decoding early. The frames are as stored: the
    ``StreamInfo`` (upright sizes, read once the first frame is decoded) carries the ``rotation`` that turns
    them upright (``upright_yuv420p`` / ``upright_array``), so a caller can scale before it turns.
    """
    container, stream = open_video(path, threads=threads)
    with container:
        info = stream_info(stream)
        first_pts: int | None = None
        index = 0
        for frame in container.decode(stream):
            if stop is not None and index >= stop:
                break
            if index == 0:
                rotation = frame_rotation(frame)  # the stream's display matrix, as the decoder attaches it
                if rotation:
                    info = stream_info(stream, rotation)
            if frame.pts is not None and first_pts is None:
                first_pts = frame.pts
            if frame.pts is None or first_pts is None:
                # No timestamps (raw streams, some AVIs): fall back to a constant rate.
                t = Fraction(index) / info.fps
            else:
                t = (frame.pts - first_pts) * info.time_base
            yield index, t, frame, info
            index += 1


def iter_frames(
    path: str | Path,
    size: tuple[int, int] | None = None,
    *,
    format: str = "rgb24",
    interpolation: str | None = None,
    start: int = 0,
    stop: int | None = None,
    threads: bool = True,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(index, pts_seconds, frame)`` for every frame of ``path`` in presentation order.

    size: ``(width, height)`` of the upright frame to scale to inside swscale (cheaper than converting at full
    size and resizing in numpy); None keeps the source size. Frames are upright (the stream's rotation applied
    after scaling). format: any FFmpeg pixel format PyAV can turn into
    an array (``rgb24`` default, ``bgr24`` for OpenCV consumers, ``gray``). Frames before ``start`` are
    decoded (H.264 needs them) but not converted. pts_seconds counts from the first frame.
    """
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()  # one swscale context reused for the whole video
    swscale_threads = None
    for index, t, frame, info in iter_av_frames(path, stop=stop, threads=threads):
        if index < start:
            continue
        if swscale_threads is None:
            width, height = stored_size(*size, info.rotation) if size is not None else (None, None)
            swscale_threads = scaler_threads(width or frame.width, height or frame.height)
        out = reformatter.reformat(
            frame, width=width, height=height, format=format, interpolation=interpolation, threads=swscale_threads
        )
        yield index, float(t), _upright(out.to_ndarray(), info.rotation, format)


def _upright(image: np.ndarray, rotation: int, format: str) -> np.ndarray:
    if rotation and image.ndim == 2 and not format.startswith("gray"):
        raise ValueError(f"cannot turn a planar {format} frame upright; ask for a packed format (rgb24, bgr24, gray)")
    return upright_array(image, rotation)


def scaler_threads(width: int, height: int) -> int:
    """swscale threads: one for small outputs (thread hand-off costs more than it saves), auto above."""
    return 1 if width * height <= 640 * 360 else 0


def read_frames(
    path: str | Path, indices: Sequence[int], size: tuple[int, int] | None = None, *, format: str = "rgb24"
) -> list[np.ndarray]:
    """Upright frames at ``indices`` (any order, repeats allowed), frame-exact by decode count.

    size: ``(width, height)`` of the upright frame, or None for the source size.

    Decodes sequentially from the first frame up to the largest index: seeking lands on keyframes and
    would make the count depend on the container's timestamps, which is exactly what must not happen.
    """
    if not indices:
        return []
    wanted = sorted(set(int(i) for i in indices))
    if wanted[0] < 0:
        raise IndexError(f"negative frame index {wanted[0]}")
    got: dict[int, np.ndarray] = {}
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    targets = set(wanted)
    for index, _t, frame, info in iter_av_frames(path, stop=wanted[-1] + 1):
        if index in targets:
            width, height = stored_size(*size, info.rotation) if size is not None else (None, None)
            image = reformatter.reformat(frame, width=width, height=height, format=format).to_ndarray()
            got[index] = _upright(image, info.rotation, format)
    missing = [i for i in wanted if i not in got]
    if missing:
        raise IndexError(f"{path}: frames {missing} out of range ({len(got)} of the requested frames exist)")
    return [got[int(i)] for i in indices]


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Downscale an image (any channel order) so its shorter side is ``short_side``; smaller ones pass.

    INTER_AREA: the anti-aliased filter for shrinking (what CLIP preprocessing's antialiased resize
    approximates).
    """
    import cv2

    h, w = image.shape[:2]
    if min(h, w) <= short_side:
        return image
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
