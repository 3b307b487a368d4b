"""The one video writer of the pipeline: H.264 (libx264, yuv420p) mp4 files, written atomically.

The cutter, the sample-video generator and the sampler's outputs write through ``open_writer``; ``curation.video_io``
reads. Frames are RGB uint8 ``[H, W, 3]`` arrays or ``av.VideoFrame`` objects (yuv420p frames are muxed as they are,
anything else goes through one swscale context per writer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import av


def even_size_for_short_side(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the shorter side at ``min(short, short_side)`` (never upscaled), both even.

    H.264 in yuv420p needs even dimensions; the longer side keeps the aspect ratio, rounded to even.
    """
    short = min(width, height)
    target = short if short_side is None else min(short, short_side)
    target -= target % 2
    if width <= height:
        new_w = target
        new_h = int(round(height * target / width / 2.0)) * 2
    else:
        new_h = target
        new_w = int(round(width * target / height / 2.0)) * 2
    return max(2, new_w), max(2, new_h)


@contextlib.contextmanager
def repeatable_heap() -> Iterator[None]:
    """Fill every heap block glibc hands out with one byte pattern while the block runs.

    libx264 reads a little memory it never wrote: the frames it encodes do not change, but a few bitstream bytes do,
    so the same frames gave other file bytes after another import had used the heap. Files named by their content
    (the sample videos, hence their clip ids) need the same bytes every time. glibc only (``mallopt(M_PERTURB)``);
    elsewhere this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        yield
        return
    m_perturb = -6  # glibc's M_PERTURB
    mallopt(m_perturb, 0xA5)
    try:
        yield
    finally:
        mallopt(m_perturb, 0)


X264Preset = Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]
"""libx264's speed presets: anything else would fail inside the encoder, long after the run was configured."""


class VideoWriter:
    """H.264 (libx264, yuv420p) writer for RGB arrays or ``av.VideoFrame`` objects at a constant rate."""

    def __init__(
        self,
        container: av.container.OutputContainer,
        stream: av.VideoStream,
        fps: Fraction,
        *,
        interpolation: str | None = "BICUBIC",
    ):
        from av.video.reformatter import VideoReformatter

        self._container = container
        self._stream = stream
        self._time_base = 1 / fps
        self._reformatter = VideoReformatter()
        self._interpolation = interpolation
        self.width = stream.width
        self.height = stream.height
        self.frames_written = 0

    def write(self, frame: np.ndarray | av.VideoFrame) -> None:
        """Append one frame; arrays are RGB uint8 [H, W, 3] at the writer's size."""
        import av

        if isinstance(frame, np.ndarray):
            if frame.shape[:2] != (self.height, self.width):
                raise ValueError(f"frame is {frame.shape[1]}x{frame.shape[0]}, writer is {self.width}x{self.height}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        if frame.width != self.width or frame.height != self.height or frame.format.name != "yuv420p":
            frame = self._reformatter.reformat(
                frame, width=self.width, height=self.height, format="yuv420p", interpolation=self._interpolation
            )
        # The encoder copies the frame (pts included) on send, so re-stamping a frame that is written
        # twice (frame-rate up-conversion) is safe.
        frame.pts = self.frames_written
        frame.time_base = self._time_base
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def _flush(self) -> None:
        for packet in self._stream.encode(None):
            self._container.mux(packet)


@contextlib.contextmanager
def open_writer(
    path: str | Path,
    fps: float | Fraction,
    width: int,
    height: int,
    crf: int = 18,
    preset: str = "veryfast",
    *,
    threads: int | None = None,
    thread_type: str = "AUTO",
    interpolation: str | None = "BICUBIC",
) -> Iterator[VideoWriter]:
    """Write an H.264 mp4 to ``path`` atomically.

    Frames go to a hidden ``.part`` file beside ``path``, renamed into place only when the block exits cleanly, so a
    crash never leaves a half-written clip that a re-run would mistake for a finished one. On an exception
    the partial file is removed and the exception propagates.

    threads: encoder threads, None = ``curation.video_io.video_threads()`` (one in a curation pool worker that has a
    core to itself, else as many as FFmpeg likes). thread_type: the encoder's FFmpeg threading, ``"AUTO"`` (frame
    threads, as the ffmpeg CLI) or ``"SLICE"`` (PyAV's default; the synthetic sample videos are encoded that way).
    x264's output depends on both (its pixels stay within the codec's tolerance).
    interpolation: the swscale filter that turns RGB (or other sizes) into the writer's yuv420p frames; None is
    swscale's BILINEAR, which is what PyAV's encoder applies to frames it converts itself.
    """
    import av

    from common.files import atomic_file
    from curation.video_io import video_threads

    if width % 2 or height % 2:
        raise ValueError(f"H.264 yuv420p needs even dimensions, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001000)
    with atomic_file(path, suffix=".part") as tmp:  # renamed into place only when the block exits cleanly
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # Frame threads by default, as the ffmpeg CLI uses (PyAV defaults to slice threads, which scale worse).
            stream.codec_context.thread_type = thread_type
            stream.codec_context.thread_count = video_threads() if threads is None else threads
            stream.options = {"crf": str(crf), "preset": preset}
            writer = VideoWriter(container, stream, rate, interpolation=interpolation)
            yield writer
            writer._flush()
