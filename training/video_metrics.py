"""Metrics of generated videos (uint8 ``[T, H, W, 3]``), each sample scored on its own or against its prompt.

Open-Sora 1.1 used human evaluation and VBench; these are the automatic quantities ``training.evaluate`` reports:

- ``temporal_flicker``: VBench's temporal-flickering quantity, the mean absolute difference between consecutive
  frames on 0..255 (0 for a still video). VBench reports ``(255 - x) / 255``; that is ``temporal_flicker_score``.
- ``motion``: mean optical flow (``models.scorers.motion``, OpenCV, no weights) in pixels at 320x576.
- ``clip_score``: 100 x cosine of CLIP image and prompt features, averaged over frames (CLIPSIM). With CLIP weights
  local, the registry ranks by it (higher is better).
- ``prompt_adherence`` (and ``/colour``, ``/shape``, ``/motion``, ``/title``): weight-free adherence to prompts of the
  synthetic world (``models.scorers.adherence``), beside two controls from the same run: ``prompt_adherence_shuffled``
  (each sample scored against another prompt) and ``prompt_adherence_step0`` (the untrained model's samples).
  Without CLIP weights the registry ranks by it (higher is better), within the same prompt set.
- ``aesthetic``: the LAION aesthetic predictor on frames at 10/50/90 % of the video.
- ``vbench``: VBench's own suite, only where the package and its weights are on disk.

A metric whose weights are not on local disk is never computed from random weights: it is recorded as skipped with
the reason (``MetricResult(None, reason)``), logged as the MLflow tag ``eval.skipped.<metric>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CLIP_SCORE_MAX_FRAMES = 8  # frames per video embedded for the CLIP score (evenly spaced)
VBENCH_CUSTOM_DIMENSIONS = (  # the VBench dimensions that accept arbitrary prompts (custom_input mode)
    "subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
    "aesthetic_quality", "imaging_quality", "temporal_flickering",
)
ADHERENCE_CRITERIA = ("colour", "shape", "motion", "title")


@dataclass
class MetricResult:
    """A metric's value, or None with the reason it was skipped; ``values`` holds per-sample numbers if any."""

    value: float | None
    skipped_reason: str | None = None
    values: list[float] | None = None

    @property
    def skipped(self) -> bool:
        return self.value is None


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected a uint8 video [T, H, W, 3], got {video.dtype} {video.shape}")
    return video


# --------------------------------------------------------------------------------------------------------------
# Weight-free: flicker and motion
# --------------------------------------------------------------------------------------------------------------
def temporal_flicker(video: np.ndarray) -> float:
    """VBench temporal flickering: mean over consecutive pairs of mean |frame[t+1] - frame[t]| on 0..255.

    0 for a still video; VBench's score is ``(255 - x) / 255``. A single frame has no pairs and scores 0.
    """
    video = _check_video(video).astype(np.float32)
    if len(video) < 2:
        return 0.0
    per_pair = np.abs(video[1:] - video[:-1]).mean(axis=(1, 2, 3))  # [T-1]
    return float(per_pair.mean())


def flicker_score(flicker: float) -> float:
    """VBench's normalised temporal-flickering score (1 = no flicker)."""
    return (255.0 - flicker) / 255.0


def motion_frame_indices(num_frames: int) -> list[int]:
    """Frames 0/10/20/30 as in the curation scorer where the video has them; short generated videos (fewer than 11
    frames) use up to 4 evenly spaced frames instead, so there is always at least one pair."""
    reference = [i for i in (0, 10, 20, 30) if i < num_frames]
    if len(reference) >= 2:
        return reference
    if num_frames < 2:
        raise ValueError(f"motion needs at least 2 frames, got {num_frames}")
    return sorted({round(x) for x in np.linspace(0, num_frames - 1, min(4, num_frames))})


def motion(video: np.ndarray, backend: str = "dis") -> float:
    """Mean optical flow (pixels at 320x576) between the frames of :func:`motion_frame_indices`."""
    from models.scorers.motion import motion_score

    video = _check_video(video)
    return motion_score([video[i] for i in motion_frame_indices(len(video))], backend=backend)


# --------------------------------------------------------------------------------------------------------------
# Weight-free: prompt adherence in the synthetic world, with its shuffled-prompt control
# --------------------------------------------------------------------------------------------------------------
def criterion_means(results: Sequence[Any]) -> dict[str, float]:
    """Mean score per criterion (colour, shape, motion, title) over the results that measured it.

    The overall mean mixes criteria a model learns at very different speeds (colour long before shape), so the
    per-criterion means are what say *what* a model follows."""
    means = {}
    for name in ADHERENCE_CRITERIA:
        values = [r.criteria[name].score for r in results if name in getattr(r, "criteria", {})]
        if values:
            means[name] = float(np.mean(values))
    return means


@dataclass
class AdherenceSummary:
    per_prompt: list  # models.scorers.adherence.AdherenceResult, one per video
    mean: float | None
    shuffled_mean: float | None  # each video scored against another prompt: what ignoring the text would give
    by_criterion: dict[str, float] = field(default_factory=dict)
    shuffled_by_criterion: dict[str, float] = field(default_factory=dict)

    def metrics(self, suffix: str = "") -> dict[str, float]:
        """``prompt_adherence{suffix}``, ``prompt_adherence{suffix}/<criterion>`` and, for the trained model, the
        shuffled control the same way (``prompt_adherence_shuffled``)."""
        out: dict[str, float] = {}
        for name, mean, by in (("prompt_adherence", self.mean, self.by_criterion),
                               ("prompt_adherence_shuffled", self.shuffled_mean, self.shuffled_by_criterion)):
            if mean is None or (suffix and name.endswith("_shuffled")):
                continue  # the shuffled control is reported for the trained model only
            out[f"{name}{suffix}"] = mean
            out.update({f"{name}{suffix}/{k}": v for k, v in by.items()})
        return out


def prompt_adherence(videos: Sequence[np.ndarray], prompts: Sequence[str], seed: int = 0) -> AdherenceSummary:
    """Weight-free prompt adherence for the synthetic world, with the shuffled-prompt control."""
    from models.scorers.adherence import score_prompts, shuffled_control

    results, mean = score_prompts(list(videos), list(prompts))
    shuffled, shuffled_mean = shuffled_control(list(videos), list(prompts), seed) if len(prompts) > 1 else ([], None)
    return AdherenceSummary(results, mean, shuffled_mean, criterion_means(results), criterion_means(shuffled))


# --------------------------------------------------------------------------------------------------------------
# With local weights only: CLIP score, aesthetic, VBench
# --------------------------------------------------------------------------------------------------------------
def _spaced(video: np.ndarray, count: int) -> list[np.ndarray]:
    idx = sorted({round(x) for x in np.linspace(0, len(video) - 1, min(count, len(video)))})
    return [video[i] for i in idx]


def _load_clip(clip_checkpoint, clip_model_name: str, device: str | None):
    """A ClipBackbone (passed through when already loaded), or WeightsUnavailable."""
    from models.scorers.clip_backbone import ClipBackbone, load_clip

    if isinstance(clip_checkpoint, ClipBackbone):
        return clip_checkpoint
    return load_clip(clip_checkpoint, clip_model_name, device=device)


def shared_clip(clip_checkpoint, clip_model_name: str | None = None, device: str | None = None):
    """One loaded CLIP for :func:`clip_score` and :func:`aesthetic` to share; the checkpoint itself when it is unset
    or cannot load, so that each metric records the reason it was skipped."""
    from models.scorers import WeightsUnavailable
    from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL

    if clip_checkpoint is None:
        return None
    try:
        return _load_clip(clip_checkpoint, clip_model_name or DEFAULT_CLIP_MODEL, device)
    except WeightsUnavailable:
        return clip_checkpoint


def clip_score(videos: Sequence[np.ndarray], prompts: Sequence[str], clip_checkpoint=None, *,
               clip_model_name: str | None = None, device: str | None = None) -> MetricResult:
    """Mean over videos of 100 x cos(CLIP(frame), CLIP(prompt)) averaged over up to 8 evenly spaced frames.

    ``clip_checkpoint``: a local CLIP path (see ``models.scorers.clip_backbone``) or a loaded ``ClipBackbone``.
    """
    from models.scorers import WeightsUnavailable
    from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL
    from models.scorers.clip_match import ClipMatchScorer

    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    try:
        backbone = _load_clip(clip_checkpoint, clip_model_name or DEFAULT_CLIP_MODEL, device)
    except WeightsUnavailable as err:
        return MetricResult(None, f"CLIP score skipped: {err}")
    scorer = ClipMatchScorer(backbone)
    values = []
    for video, prompt in zip(videos, prompts):
        frames = _spaced(_check_video(video), CLIP_SCORE_MAX_FRAMES)
        values.append(float(np.mean(scorer.score(frames, [prompt] * len(frames)))))
    return MetricResult(float(np.mean(values)) if values else None, None if values else "no videos", values)


def aesthetic(videos: Sequence[np.ndarray], clip_checkpoint=None, aesthetic_mlp: str | Path | None = None, *,
              clip_model_name: str | None = None, device: str | None = None) -> MetricResult:
    """Mean LAION aesthetic score (about 4-7) over videos; each video scored on its frames at 10/50/90 %."""
    from models.scorers import WeightsUnavailable
    from models.scorers.aesthetic import AESTHETIC_FRAME_POINTS, AestheticScorer, check_mlp_checkpoint
    from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL

    try:
        check_mlp_checkpoint(aesthetic_mlp)  # before building CLIP: a missing MLP should not cost a ViT-L/14 load
        backbone = _load_clip(clip_checkpoint, clip_model_name or DEFAULT_CLIP_MODEL, device)
        scorer = AestheticScorer(backbone, aesthetic_mlp)
    except WeightsUnavailable as err:
        return MetricResult(None, f"aesthetic score skipped: {err}")
    clips = []
    for video in videos:
        video = _check_video(video)
        clips.append([video[min(int(p * len(video)), len(video) - 1)] for p in AESTHETIC_FRAME_POINTS])
    values = scorer.score_clips(clips) if clips else []
    return MetricResult(float(np.mean(values)) if values else None, None if values else "no videos", values)


def vbench_weights_dir(weights_dir: str | Path | None = None) -> Path:
    """Where VBench keeps its weights: the argument, else ``$VBENCH_CACHE_DIR``, else ``~/.cache/vbench``."""
    return Path(weights_dir or os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench").expanduser()


def run_vbench(videos: dict[str, str], out_dir: str | Path, *, weights_dir: str | Path | None = None,
               device: str | None = None, dimensions: Sequence[str] = VBENCH_CUSTOM_DIMENSIONS) -> dict[str, MetricResult]:
    """The hook for VBench's full suite (custom-prompt mode), run only when the package and its weights are local.

    ``videos`` maps each mp4 path to its prompt. Returns ``vbench/<dimension>`` results,
    or ``{"vbench": skipped}`` saying what is missing. VBench would download missing weights itself, which must not
    happen here, so an absent or empty weights folder skips before VBench is imported. Not exercised by the tests
    (neither VBench nor its weights are installed on the development machines).
    """
    folder = vbench_weights_dir(weights_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        return {"vbench": MetricResult(None, f"skipped: weights not found at {folder}")}
    try:
        import vbench  # noqa: F401  (optional dependency)
    except ImportError:
        return {"vbench": MetricResult(None, f"skipped: the vbench package is not installed (weights are at {folder})")}
    import importlib.resources

    import torch
    from vbench import VBench

    os.environ["VBENCH_CACHE_DIR"] = str(folder)
    out_dir = Path(out_dir)
    videos_dir = out_dir / "videos"  # VBench reads every file of a folder: give it only the mp4s
    videos_dir.mkdir(parents=True, exist_ok=True)
    prompts = {}
    for path, prompt in videos.items():
        link = videos_dir / Path(path).name
        if not link.exists():
            link.symlink_to(Path(path).resolve())
        prompts[link.name] = prompt
    full_info = importlib.resources.files("vbench") / "VBench_full_info.json"
    bench = VBench(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), str(full_info), str(out_dir))
    bench.evaluate(videos_path=str(videos_dir), name="opensora_dag", prompt_list=prompts,
                   dimension_list=list(dimensions), local=True, mode="custom_input")
    results = json.loads((out_dir / "opensora_dag_eval_results.json").read_text())
    return {f"vbench/{dim}": MetricResult(float(value[0])) for dim, value in results.items()}
