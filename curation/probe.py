"""Probe video files with PyAV: the metadata row of ``raw_videos`` or a reason to quarantine the file.

A probe demuxes every packet of the video stream (cheap: no decoding) to count frames and catch truncated
files, and decodes the first frame to prove the stream is decodable at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from curation.errors import InputRejected
from curation.video_io import frame_rotation, stored_size

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"}


class ProbeError(InputRejected):
    """The file is not a usable video; ``str(err)`` is the quarantine reason."""


@dataclass(frozen=True)
class VideoInfo:
    id: str
    path: str
    size: int
    codec: str
    fps: float
    num_frames: int
    height: int
    width: int
    aspect_ratio: float  # H / W, as the reference's datautil
    resolution: int  # H * W pixels
    duration: float  # seconds
    bitrate: int  # bits per second over the whole file
    rotation: int = 0  # counter-clockwise degrees the display matrix turns the stored frames; sizes are upright

    def to_row(self) -> dict:
        """The ``raw_videos`` row (``rotation`` is not a column: the sizes are already upright)."""
        row = asdict(self)
        row.pop("rotation")
        return row


def content_hasher():
    """A fresh hasher of the video id's kind (``curation.sources`` hashes while it copies, so it needs the same one)."""
    return hashlib.blake2b(digest_size=10)


def content_hash(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex digest of the file's bytes: the video id, identical for byte-identical copies."""
    digest = content_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def landing_path(path: Path) -> str:
    """Where a file lies: its folder resolved, its own name kept, so a link is recorded where it is, not its target."""
    path = Path(path)
    return str(path.parent.resolve() / path.name)


def is_candidate(path: Path) -> bool:
    """Files the curation pipeline considers: anything but sidecars and hidden files.

    Non-video files that carry a video extension are probed (and quarantined if they are not videos); files
    with other extensions are sidecars (captions, notes) and skipped.
    """
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in VIDEO_EXTENSIONS


def probe_video(path: Path) -> VideoInfo:
    """Return the metadata of ``path`` or raise ``ProbeError`` with a human-readable reason.

    Every failure on this one file is a ``ProbeError``: the expected ones (not a container, no decoder, truncated)
    with their own reason, anything unexpected as ``probe failed: <type>: <message>``.
    """
    path = Path(path)
    try:
        return _probe(path)
    except ProbeError:
        raise
    except Exception as err:  # anything else PyAV or the OS throws for this one file is still a reason, not a crash
        raise ProbeError(f"probe failed: {type(err).__name__}: {err}") from err


def _probe(path: Path) -> VideoInfo:
    import av

    size = path.stat().st_size
    if size == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        # Container and stream metadata (title, comment, ...) is not always UTF-8: a Latin-1 title must not make a
        # decodable video unreadable, so undecodable metadata bytes become U+FFFD.
        container = av.open(str(path), mode="r", metadata_errors="replace")
    except av.FFmpegError as err:
        raise ProbeError(f"cannot open as a video container: {err}") from err
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise ProbeError(f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise ProbeError("no decoder for the video stream's codec (FFmpeg does not know it)")
        codec = stream.codec_context.name
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ProbeError("video stream has no frame rate")
        fps = float(Fraction(rate))
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise ProbeError("video stream has no frame size")
        declared = stream.frames

        try:
            first_frame = next(container.decode(stream), None)
        except av.FFmpegError as err:
            raise ProbeError(f"first frame does not decode: {err}") from err
        if first_frame is None:
            raise ProbeError("video stream contains no decodable frame")
        # Sizes as the video plays: a phone's portrait clip is stored landscape with a quarter turn to apply.
        rotation = frame_rotation(first_frame)
        width, height = stored_size(width, height, rotation)

        container.seek(0)
        packets = 0
        try:
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
        except av.FFmpegError as err:
            raise ProbeError(f"truncated or corrupt stream after {packets} packets: {err}") from err

    if declared and packets < declared:
        raise ProbeError(f"truncated: header declares {declared} frames but only {packets} are present")
    num_frames = packets
    if num_frames == 0:
        raise ProbeError("video stream has no frames")
    duration = num_frames / fps
    return VideoInfo(
        id=content_hash(path),
        path=landing_path(path),
        size=size,
        codec=codec,
        fps=round(fps, 6),
        num_frames=num_frames,
        height=height,
        width=width,
        aspect_ratio=height / width,
        resolution=height * width,
        duration=duration,
        bitrate=int(size * 8 / duration) if duration > 0 else 0,
        rotation=rotation,
    )
