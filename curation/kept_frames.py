"""Kept frames: the few frames of each clip saved beside it for the scorers, so no scorer decodes video again.

Which frames (``KeepFramesSpec``), how they are written while a clip is cut (``KeptFrameWriter``, with the
folder's ``kept.json`` manifest last) and how the scorers read them back (``load_kept_frames``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import write_bytes_atomic, write_text_atomic

from curation.video_io import resize_short_side

PURPOSES = ("aesthetic", "flow", "ocr", "match")
PURPOSE_ALIASES = {"caption": "match"}  # the caption model looks at the same middle frame as matching
MANIFEST = "kept.json"


@dataclass(frozen=True)
class KeepFramesSpec:
    """Which clip frames to save for the scorers, and how.

    aesthetic: fractions of the clip (the reference scores frames at 10%, 50%, 90%); flow: clip frame
    indices, clamped to the clip (the reference's UniMatch pairs 0-10-20-30); ocr: one frame index (the
    middle one when the clip is shorter); match: the middle frame (CLIP matching and captioning).
    Aesthetic and match frames are stored with the shorter side capped at ``small_short_side`` (enough for
    CLIP at 224 or 336 px); flow and OCR frames at clip resolution.
    """

    aesthetic: tuple[float, ...] = (0.1, 0.5, 0.9)
    flow: tuple[int, ...] = (0, 10, 20, 30)
    ocr: int = 10
    small_short_side: int = 336
    image_format: str = "jpg"  # "jpg" or "png"
    jpeg_quality: int = 95
    enabled: bool = True

    def indices(self, num_frames: int) -> dict[str, list[int]]:
        """Clip frame indices per purpose for a clip of ``num_frames`` frames."""
        if not self.enabled or num_frames <= 0:
            return {}
        last = num_frames - 1
        middle = num_frames // 2
        return {
            "aesthetic": [min(last, int(f * num_frames)) for f in self.aesthetic],
            "flow": [min(last, i) for i in self.flow],
            "ocr": [self.ocr if self.ocr < num_frames else middle],
            "match": [middle],
        }

    def full_resolution(self, purpose: str) -> bool:
        return purpose in ("flow", "ocr")

    def needs_small(self, purposes) -> bool:
        """Whether any of ``purposes`` keeps the small copy of its frame."""
        return any(not self.full_resolution(p) for p in purposes)

    def images(self, frame, *, small: bool) -> tuple:
        """(clip-size BGR image, small BGR image or None) of a clip frame (an av.VideoFrame at clip size): the pixels
        every kept file of that frame is written from."""
        bgr = frame.to_ndarray(format="bgr24")  # OpenCV writes BGR: convert once, no channel flip copy
        return bgr, (resize_short_side(bgr, self.small_short_side) if small else None)


class KeptFrameWriter:
    """Saves the scorer frames of one clip into ``frames_dir`` and writes its manifest."""

    def __init__(self, frames_dir: Path, spec: KeepFramesSpec, num_frames: int):
        self.dir = frames_dir
        self.spec = spec
        self.by_purpose = spec.indices(num_frames)
        self.wanted: dict[int, set[str]] = {}
        for purpose, indices in self.by_purpose.items():
            for i in indices:
                self.wanted.setdefault(i, set()).add(purpose)
        if self.wanted:
            self.dir.mkdir(parents=True, exist_ok=True)

    def file_name(self, purpose: str, k: int) -> str:
        return f"{purpose}_{k:05d}.{self.spec.image_format}"

    def offer(self, k: int, frame) -> None:
        """Save clip frame ``k`` (an av.VideoFrame at clip size) for every purpose that wants it."""
        purposes = self.wanted.get(k)
        if purposes:
            self.save(k, *self.spec.images(frame, small=self.spec.needs_small(purposes)))

    def save(self, k: int, full, small) -> None:
        """Write clip frame ``k`` for every purpose that wants it, from the images ``KeepFramesSpec.images`` made.

        Each file is encoded in memory and renamed into place: a reader of a folder another run is still (re)writing
        never sees half an image."""
        import cv2

        params = [cv2.IMWRITE_JPEG_QUALITY, self.spec.jpeg_quality] if self.spec.image_format == "jpg" else []
        for purpose in sorted(self.wanted.get(k, ())):
            image = full if self.spec.full_resolution(purpose) else small
            target = self.dir / self.file_name(purpose, k)
            ok, encoded = cv2.imencode(f".{self.spec.image_format}", image, params)
            if not ok:
                raise OSError(f"could not encode {target}")
            write_bytes_atomic(target, encoded.tobytes(), suffix=".part")

    def finish(self, clip_id: str, num_frames: int) -> None:
        if not self.wanted:
            return
        frames = {
            purpose: [{"index": i, "file": self.file_name(purpose, i)} for i in indices]
            for purpose, indices in self.by_purpose.items()
        }
        manifest = {"clip_id": clip_id, "num_frames": num_frames, "frames": frames}
        write_text_atomic(self.dir / MANIFEST, json.dumps(manifest, indent=1), suffix=".part")


def load_kept_frames(frames_dir: str | Path, purpose: str) -> list[np.ndarray]:
    """RGB uint8 frames saved for ``purpose`` (aesthetic, flow, ocr, match or caption), in clip order."""
    import cv2

    frames_dir = Path(frames_dir)
    purpose = PURPOSE_ALIASES.get(purpose, purpose)
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; one of {PURPOSES + tuple(PURPOSE_ALIASES)}")
    manifest = json.loads((frames_dir / MANIFEST).read_text())
    frames = []
    for entry in manifest["frames"].get(purpose, []):
        image = cv2.imread(str(frames_dir / entry["file"]), cv2.IMREAD_COLOR)
        if image is None:
            raise OSError(f"cannot read kept frame {frames_dir / entry['file']}")
        frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return frames


def kept_frame_indices(frames_dir: str | Path, purpose: str) -> list[int]:
    """Clip frame indices of the frames ``load_kept_frames`` returns for ``purpose``."""
    purpose = PURPOSE_ALIASES.get(purpose, purpose)
    manifest = json.loads((Path(frames_dir) / MANIFEST).read_text())
    return [e["index"] for e in manifest["frames"].get(purpose, [])]


__all__ = [
    "MANIFEST",
    "PURPOSES",
    "PURPOSE_ALIASES",
    "KeepFramesSpec",
    "KeptFrameWriter",
    "kept_frame_indices",
    "load_kept_frames",
]
