"""Probe video files: the metadata row of ``raw_videos`` or a reason to quarantine the file.

A probe demuxes every packet of the video stream (cheap: no decoding) to count frames and catch truncated
files, and decodes the first frame to prove the stream is decodable at all; ``video_io.scan_video`` reads the
file (the one place that opens PyAV), this module turns what it found into a row or a quarantine reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from curation.errors import InputRejected
from curation.video_io import UndecodableVideo, scan_video

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
    size = path.stat().st_size
    if size == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        scan = scan_video(path)
    except UndecodableVideo as err:
        raise ProbeError(str(err)) from err
    fps = float(scan.fps)
    declared, packets = scan.declared_frames, scan.packets
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
        codec=scan.codec,
        fps=round(fps, 6),
        num_frames=num_frames,
        height=scan.height,
        width=scan.width,
        aspect_ratio=scan.height / scan.width,
        resolution=scan.height * scan.width,
        duration=duration,
        bitrate=int(size * 8 / duration) if duration > 0 else 0,
        rotation=scan.rotation,
    )
