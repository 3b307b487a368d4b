"""The Gradio app's controls and how one click's values become a :class:`training.sample_io.SampleRequest`.

Plain Python (no gradio, no torch), so the mapping is unit-tested on its own; ``training/app.py`` lays the controls
out on the page and runs the requests.

How the controls become a request (:func:`build_request`):

- (resolution, aspect) -> (H, W) from the reference's tables in ``training/aspect.py``: the aspect "H:W" picks the key
  nearest to H/W ("9:16" -> "0.56" -> 240p is 240x426, landscape, as in the reference).
- length in seconds -> ``seconds * fps / frame_interval`` frames at the v1.1 inference config's fps 24 and frame
  interval 3: 2/4/8/16 s -> 16/32/64/128 frames, saved at 24 / 3 = 8 fps, so a "2 s" video plays for 2 s.
- a reference image -> mask strategy ``"0"`` with that image as reference 0 (its latent is frame 0 of the sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from training.aspect import ASPECT_RATIOS, DEMO_ASPECT_RATIOS, get_closest_ratio, get_image_size

if TYPE_CHECKING:
    from training.sample_io import SampleRequest

__all__ = [
    "ASPECT_CHOICES",
    "ASPECT_LABELS",
    "DEFAULTS",
    "LENGTH_CHOICES",
    "RESOLUTIONS",
    "TINY_RESOLUTIONS",
    "AppDefaults",
    "Mode",
    "build_request",
    "image_size_for",
    "num_frames_for",
]

RESOLUTIONS: tuple[str, ...] = ("144p", "240p", "360p", "480p", "720p")
"""The reference demo's resolutions (their tables are in training/aspect.py)."""
TINY_RESOLUTIONS: tuple[str, ...] = tuple(DEMO_ASPECT_RATIOS)
"""Offered only with ``tiny_sizes=True``: sizes a tiny model samples on a CPU in seconds."""
ASPECT_CHOICES: dict[str, tuple[int, int]] = {
    "9:16": (9, 16), "16:9": (16, 9), "3:4": (3, 4), "4:3": (4, 3), "1:1": (1, 1),
}
"""Aspect ratio value (H:W, the reference's reading) -> (H, W) proportions."""
ASPECT_LABELS: dict[str, str] = {
    "9:16": "16:9 landscape", "16:9": "9:16 portrait", "3:4": "4:3 landscape", "4:3": "3:4 portrait", "1:1": "1:1 square",
}
"""What each choice shows: the shape it produces, as width:height (the reference's "9:16" gives 426x240)."""
LENGTH_CHOICES: tuple[str, ...] = ("2s", "4s", "8s", "16s")

Mode = Literal["image", "video"]


@dataclass(frozen=True)
class AppDefaults:
    """The reference demo's initial values and ranges, plus the sampling config the lengths are counted in."""

    resolution: str = "240p"
    aspect_ratio: str = "9:16"
    length: str = "2s"
    seed: int = 1024
    seed_range: tuple[int, int] = (1, 2048)
    sampling_steps: int = 100
    steps_range: tuple[int, int] = (1, 200)
    cfg_scale: float = 7.0
    cfg_range: tuple[float, float] = (0.0, 10.0)
    fps: int = 24
    frame_interval: int = 3


DEFAULTS = AppDefaults()


def image_size_for(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(H, W) of a resolution for an "H:W" label, from the resolution's table (nearest key to H/W)."""
    if aspect_ratio not in ASPECT_CHOICES:
        raise ValueError(f"unknown aspect ratio {aspect_ratio!r}; choose from {', '.join(ASPECT_CHOICES)}")
    if resolution not in ASPECT_RATIOS:
        raise ValueError(f"unknown resolution {resolution!r}; choose from {', '.join(ASPECT_RATIOS)}")
    h, w = ASPECT_CHOICES[aspect_ratio]
    key = get_closest_ratio(h, w, ASPECT_RATIOS[resolution].ratios)
    return get_image_size(resolution, key)


def num_frames_for(length: str | int, fps: int = DEFAULTS.fps, frame_interval: int = DEFAULTS.frame_interval) -> int:
    """Frames of a video ``length`` seconds long ("2s" or 2) once saved at ``fps / frame_interval``."""
    seconds = int(str(length).strip().removesuffix("s"))
    if seconds < 1:
        raise ValueError(f"length must be at least 1 s, got {length!r}")
    return seconds * fps // frame_interval


def build_request(
    mode: Mode,
    prompt: str,
    resolution: str,
    aspect_ratio: str,
    length: str | int,
    seed: int | float,
    sampling_steps: int | float,
    cfg_scale: float,
    reference_image: str | Path | None = None,
    *,
    defaults: AppDefaults = DEFAULTS,
) -> SampleRequest:
    """The sample request the app runs for one click; ``mode`` "image" is one frame, "video" the chosen length."""
    from training.sample_io import SampleRequest

    if mode not in ("image", "video"):
        raise ValueError(f"mode must be 'image' or 'video', got {mode!r}")
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("enter a prompt")
    lo, hi = defaults.steps_range
    steps = int(sampling_steps)
    if not lo <= steps <= hi:
        raise ValueError(f"sampling steps must be in {lo}..{hi}, got {steps}")
    lo_cfg, hi_cfg = defaults.cfg_range
    if not lo_cfg <= float(cfg_scale) <= hi_cfg:
        raise ValueError(f"CFG scale must be in {lo_cfg}..{hi_cfg}, got {cfg_scale}")
    reference = str(reference_image) if reference_image else None
    return SampleRequest(
        prompts=[prompt],
        num_frames=1 if mode == "image" else num_frames_for(length, defaults.fps, defaults.frame_interval),
        image_size=image_size_for(resolution, aspect_ratio),
        fps=defaults.fps,
        frame_interval=defaults.frame_interval,
        num_sampling_steps=steps,
        cfg_scale=float(cfg_scale),
        seed=int(seed),
        reference_paths=[reference] if reference else None,
        mask_strategy=["0"] if reference else None,
    )
