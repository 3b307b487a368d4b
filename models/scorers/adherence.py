"""Prompt adherence without downloaded weights: does a video show the colours, shapes, motion and title its prompt
names?

``score_video`` reads the prompt (``models.scorers.adherence_prompt.parse_prompt``: the synthetic world's caption
grammar), measures each criterion on the video with plain image analysis (numpy and OpenCV, in
``models.scorers.adherence_frames``, and the project's packaged OCR for titles) and returns a score in [0, 1] per
criterion, their mean, and a short reason per criterion a person can read; a prompt that names nothing measurable
scores ``None`` with a reason. ``score_prompts`` averages over a prompt set and ``shuffled_control`` scores each
video against another video's prompt: the gap between the two is what "follows the text" means, since a video of
the right *kind* can score well on a prompt it was not made for.

How each criterion is measured (the thresholds are module constants, here and in ``adherence_frames``, chosen on
the generator's palette and explained where they are defined):

- colour: a named object colour counts as present in a frame when the frame has its blob (``object_blob``: large
  and solid enough, see ``adherence_frames``); a background colour ("a plain orange background", "on black") when
  it covers at least ``MIN_BACKGROUND_FRACTION``. Score: the fraction of frames where present, reaching 1 at
  ``MOST_FRAMES``.
- shape: the object's blob (the largest blob that is not background when the prompt names a shape without a
  colour), scored by ``shape_membership``; the median over frames, preferring frames where the blob does not touch
  the border (a circle cut by the frame edge is not a circle). Stripes: at least ``STRIPE_EDGES_FULL`` sharp colour
  edges (``stripe_edges``) in frames where the stripes' colour is present.
- motion: the object's centroid track over the sampled frames (largest component for compact shapes, the whole
  colour's mask for letters, stripes and shapeless objects). Steps longer than ``MAX_STEP`` are dropped (the
  generator wraps shapes around the frame; a jump is a wrap or a different blob, not motion). "moving": the net
  displacement of the kept steps, in frame units (x / W, y / H); a named direction also needs the displacement to
  point that way. "still": the largest distance of any centroid from the median one. A prompt with motion words
  but no object to carry them is scored on how much of the frame changes between sampled frames.
- title: OCR (``models.scorers.ocr.OcrScorer``, the project's packaged rapidocr loader) on the middle frame; the
  score is the fraction of the title's words found in what it reads (case-insensitive, spaces ignored).

Limits: speed words ("slowly", "quickly") are not scored (the generator's speed is in pixels per frame at its own
resolution and frame rate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from models.scorers.adherence_frames import (
    MIN_SOLIDITY,
    Frames,
    min_fraction,
    object_blob,
    prepare_frames,
    ramp,
    shape_features,
    shape_membership,
    stripe_edges,
)
from models.scorers.adherence_prompt import (
    DIFFUSE_SHAPES,
    DIRECTION_VECTORS,
    MEASURED_SHAPES,
    ObjectSpec,
    PromptSpec,
    parse_prompt,
)

# -- thresholds ---------------------------------------------------------------------------------------------------

MIN_BACKGROUND_FRACTION = 0.3  # "a plain orange background": that colour covers most of the frame
MIN_SHAPE_PIXELS = 30  # below this a blob's outline is too coarse to measure (circle of radius ~3)
MOST_FRAMES = 0.75  # present in this fraction of the sampled frames -> colour score 1 (linear below)
# Motion, in frame units (centroid x / W, y / H). The generator's shapes cross the whole frame (net displacement
# 0.3-1 over a shot); its still cards do not move at all; H.264 and anti-aliasing jitter a centroid by < 0.5 %.
MOVING_ZERO, MOVING_FULL = 0.03, 0.10  # net displacement: below 3 % "not moving", above 10 % "moving"
STILL_FULL, STILL_ZERO = 0.02, 0.06  # largest distance from the median centroid: < 2 % still, > 6 % not still
MAX_STEP = 0.35  # a step longer than this between sampled frames is a wrap-around or another blob: dropped
DIRECTION_COS_ZERO, DIRECTION_COS_FULL = 0.5, 0.9  # cosine between the displacement and the named direction
# Scene motion (no object named): fraction of pixels whose colour changes by more than SCENE_CHANGE_DELTA (Lab)
# between consecutive sampled frames. A still card changes ~0 %, the generator's moving shapes 3-6 %.
SCENE_CHANGE_DELTA = 12.0
SCENE_STILL_FULL, SCENE_MOVING_FULL = 0.002, 0.01
# Stripes: sharp colour edges counted by stripe_edges (adherence_frames.STRIPE_EDGE_DELTA). The generator's stripe
# cards have ~12 edges; a moving shape crossing a band makes 2.
STRIPE_EDGES_ZERO, STRIPE_EDGES_FULL = 2, 6
DEFAULT_MAX_FRAMES = 16  # frames sampled evenly from the video
OCR_MIN_HEIGHT = 160  # smaller frames are upscaled before OCR (PP-OCR reads poorly below ~30 px letters)


# -- results ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriterionResult:
    """One criterion ("colour", "shape", "motion", "title"): the mean over the items it checked, and why."""

    name: str
    score: float
    reason: str


@dataclass(frozen=True)
class AdherenceResult:
    """score: mean of the criteria's scores, None when the prompt names nothing measurable (``reason`` says so)."""

    prompt: str
    score: float | None
    criteria: dict[str, CriterionResult] = field(default_factory=dict)
    reason: str = ""

    @property
    def scores(self) -> dict[str, float]:
        return {name: c.score for name, c in self.criteria.items()}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: prompt, score, reason, and per criterion its score and reason."""
        return {
            "prompt": self.prompt,
            "score": self.score,
            "reason": self.reason,
            "criteria": {n: {"score": c.score, "reason": c.reason} for n, c in self.criteria.items()},
        }


# -- criteria -----------------------------------------------------------------------------------------------------


def _score_colour(frames: Frames, obj: ObjectSpec) -> tuple[float, str]:
    if obj.role == "background":
        cover = [float(frames.colour_mask(k, obj.colour).mean()) for k in range(frames.n)]
        present = sum(c >= MIN_BACKGROUND_FRACTION for c in cover)
        score = ramp(present / frames.n, 0.0, MOST_FRAMES)
        return score, (f"{obj.colour} background: covers >= {MIN_BACKGROUND_FRACTION:.0%} in {present}/{frames.n} "
                       f"frames, median {100 * float(np.median(cover)):.1f} %")
    areas = []
    for k in range(frames.n):
        blob = object_blob(frames, k, ObjectSpec(obj.colour, obj.shape if obj.shape in DIFFUSE_SHAPES else None))
        if blob is not None:
            areas.append(blob.area / frames.area)
    what = "pixels" if obj.shape in DIFFUSE_SHAPES else "blob"
    if not areas:
        solid = "" if obj.shape in DIFFUSE_SHAPES else f", solid to {MIN_SOLIDITY:.0%}"
        return 0.0, f"{obj.colour}: no {what} >= {100 * min_fraction(obj.shape):.2g} %{solid} in any of {frames.n} frames"
    score = ramp(len(areas) / frames.n, 0.0, MOST_FRAMES)
    return score, f"{obj.colour}: {what} in {len(areas)}/{frames.n} frames, area {100 * float(np.median(areas)):.1f} %"


def _score_shape(frames: Frames, obj: ObjectSpec) -> tuple[float, str]:
    label = obj.label
    if obj.shape == "stripes":
        # The pattern is measured on the whole frame; the stripes' colour must be there too, as a circle's must.
        counts = [stripe_edges(frames.lab[k]) if obj.colour is None or object_blob(frames, k, obj) else 0
                  for k in range(frames.n)]
        edges = float(np.median(counts))
        score = ramp(edges, STRIPE_EDGES_ZERO, STRIPE_EDGES_FULL)
        where = f" where {obj.colour} is present" if obj.colour else ""
        return score, f"{label}: {edges:.0f} stripe edges (median over {frames.n} frames, counted{where})"
    measured = []  # (touches_border, membership, features)
    for k in range(frames.n):
        blob = object_blob(frames, k, obj)
        if blob is None or blob.area < MIN_SHAPE_PIXELS:
            continue
        feats = shape_features(blob.mask)
        if feats is not None:
            measured.append((blob.touches_border, shape_membership(obj.shape, feats), feats))
    if not measured:
        whose = f"{obj.colour} blob" if obj.colour else "blob apart from the background"
        return 0.0, f"{label}: no {whose} large enough to measure"
    inside = [m for m in measured if not m[0]] or measured  # whole outlines when there are any
    score = float(np.median([m[1] for m in inside]))
    med = {key: float(np.median([m[2][key] for m in inside])) for key in ("rect_fill", "circle_fill", "aspect")}
    return score, (f"{label}: {obj.shape} match {score:.2f} over {len(inside)} frames (rect fill "
                   f"{med['rect_fill']:.2f}, circle fill {med['circle_fill']:.2f}, aspect {med['aspect']:.2f})")


def _direction_score(net: np.ndarray, direction: str) -> tuple[float, float]:
    norm = float(np.linalg.norm(net))
    if norm == 0:
        return 0.0, 0.0
    cos = float(np.dot(net, DIRECTION_VECTORS[direction]) / norm)
    return ramp(cos, DIRECTION_COS_ZERO, DIRECTION_COS_FULL), cos


def _score_motion(frames: Frames, obj: ObjectSpec) -> tuple[float, str]:
    label = obj.label
    track = [b.centroid for k in range(frames.n) if (b := object_blob(frames, k, obj)) is not None]
    if not track:
        return 0.0, f"{label}: nothing to track (not found in any frame)"
    points = np.array(track)
    if obj.motion == "still":
        spread = float(np.max(np.linalg.norm(points - np.median(points, axis=0), axis=1)))
        score = ramp(spread, STILL_ZERO, STILL_FULL)
        return score, f"{label}: still? centroid within {100 * spread:.1f} % of the frame over {len(track)} frames"
    if len(track) < 2:
        return 0.0, f"{label}: seen in 1 frame, no track"
    steps = np.diff(points, axis=0)
    kept = steps[np.linalg.norm(steps, axis=1) <= MAX_STEP]
    net = kept.sum(axis=0) if len(kept) else np.zeros(2)
    moved = float(np.linalg.norm(net))
    score = ramp(moved, MOVING_ZERO, MOVING_FULL)
    reason = f"{label}: moved {100 * moved:.1f} % of the frame over {len(track)} frames"
    if len(kept) < len(steps):
        reason += f" ({len(steps) - len(kept)} jumps dropped)"
    if obj.direction:
        dir_score, cos = _direction_score(net, obj.direction)
        score *= dir_score
        reason += f", {obj.direction}? cos {cos:.2f}"
    return score, reason


def _score_scene_motion(frames: Frames, motion: str, direction: str | None) -> tuple[float, str]:
    if frames.n < 2:
        return 0.0, "scene: one frame, motion cannot be measured"
    changes = [float((np.linalg.norm(frames.lab[k + 1] - frames.lab[k], axis=-1) > SCENE_CHANGE_DELTA).mean())
               for k in range(frames.n - 1)]
    change = float(np.mean(changes))
    if motion == "still":
        score = ramp(change, SCENE_MOVING_FULL, SCENE_STILL_FULL)
    else:
        score = ramp(change, SCENE_STILL_FULL, SCENE_MOVING_FULL)
    reason = f"scene {motion}? {100 * change:.2f} % of pixels change between sampled frames"
    if direction:
        reason += f" (direction {direction} not measured without an object)"
    return score, reason


# -- OCR ----------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def default_ocr() -> Any:
    """The project's OCR scorer (rapidocr with the ONNX models packaged in its wheel), built once on first use."""
    from models.scorers.ocr import OcrScorer

    return OcrScorer()


def _normalise(text: str) -> str:
    return "".join(ch for ch in text.upper() if ch.isalnum())


def read_text(frame: np.ndarray, ocr: Any = None) -> tuple[str, ...]:
    """What OCR reads in one RGB frame; frames under ``OCR_MIN_HEIGHT`` rows are upscaled first."""
    import cv2

    frame = np.ascontiguousarray(frame)
    h = frame.shape[0]
    if h < OCR_MIN_HEIGHT:
        factor = math.ceil(OCR_MIN_HEIGHT / h)
        frame = cv2.resize(frame, (frame.shape[1] * factor, h * factor), interpolation=cv2.INTER_CUBIC)
    return tuple((ocr or default_ocr()).score(frame).texts)


def _score_title(video: np.ndarray, title: str, ocr: Any) -> tuple[float, str]:
    words = [w for w in (_normalise(x) for x in title.split()) if w]
    if not words:
        return 0.0, f'title "{title}": no letters or digits to look for'
    texts = read_text(video[len(video) // 2], ocr)
    read = _normalise("".join(texts))
    found = [w for w in words if w in read]
    shown = " | ".join(texts) if texts else "nothing"
    return len(found) / len(words), (f'title "{title}": {len(found)}/{len(words)} words read in frame '
                                     f'{len(video) // 2} (OCR: "{shown}")')


# -- scoring ------------------------------------------------------------------------------------------------------


def _check_video(video: Any) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) == 0:
        raise ValueError(f"expected a video as uint8 RGB [T, H, W, 3] with T >= 1, got {video.dtype} {video.shape}")
    return video


def score_video(video: np.ndarray, spec: PromptSpec | str, *, ocr: Any = None,
                max_frames: int = DEFAULT_MAX_FRAMES) -> AdherenceResult:
    """Score a video (uint8 RGB [T, H, W, 3]) against a prompt (a PromptSpec or its text).

    ``ocr``: an object with ``score(frame) -> OcrResult`` (default: ``default_ocr()``), used only for a title.
    """
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    video = _check_video(video)
    if spec.is_empty:
        return AdherenceResult(spec.text, None, {}, "the prompt names nothing measurable (no known colour, shape, "
                                                     "motion or title)")
    frames = prepare_frames(video, max_frames)
    items: dict[str, list[tuple[float, str]]] = {"colour": [], "shape": [], "motion": [], "title": []}
    seen_colours = set()
    for obj in spec.objects:
        if obj.colour and (obj.colour, obj.role) not in seen_colours:
            seen_colours.add((obj.colour, obj.role))
            items["colour"].append(_score_colour(frames, obj))
        if obj.role == "object" and obj.shape in MEASURED_SHAPES:
            items["shape"].append(_score_shape(frames, obj))
        if obj.role == "object" and obj.motion:
            items["motion"].append(_score_motion(frames, obj))
    if spec.scene_motion:
        items["motion"].append(_score_scene_motion(frames, spec.scene_motion, spec.scene_direction))
    if spec.title:
        items["title"].append(_score_title(video, spec.title, ocr))
    criteria = {
        name: CriterionResult(name, float(np.mean([s for s, _ in found])), "; ".join(r for _, r in found))
        for name, found in items.items()
        if found
    }
    if not criteria:  # e.g. only "letters" with no colour: nothing was measured after all
        return AdherenceResult(spec.text, None, {}, "the prompt names nothing measurable")
    mean = float(np.mean([c.score for c in criteria.values()]))
    summary = ", ".join(f"{c.name} {c.score:.2f}" for c in criteria.values())
    return AdherenceResult(spec.text, mean, criteria, f"mean of {summary}")


def _mean(results: Sequence[AdherenceResult]) -> float | None:
    values = [r.score for r in results if r.score is not None]
    return float(np.mean(values)) if values else None


def score_prompts(videos: Sequence[np.ndarray], prompts: Sequence[str], *, ocr: Any = None,
                  max_frames: int = DEFAULT_MAX_FRAMES) -> tuple[list[AdherenceResult], float | None]:
    """Score videos[i] against prompts[i] -> (per-prompt results, mean over the prompts that could be scored)."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    results = [score_video(v, p, ocr=ocr, max_frames=max_frames) for v, p in zip(videos, prompts)]
    return results, _mean(results)


def derangement(prompts: Sequence[str], seed: int = 0, tries: int = 1000) -> list[int]:
    """A permutation with no fixed point, preferring one where no video keeps a prompt of identical text."""
    n = len(prompts)
    if n < 2:
        raise ValueError(f"a shuffled control needs at least 2 prompts, got {n}")
    rng = np.random.default_rng(seed)
    fallback = None
    for _ in range(tries):
        perm = rng.permutation(n)
        if np.any(perm == np.arange(n)):
            continue
        if all(prompts[j] != prompts[i] for i, j in enumerate(perm)):
            return perm.tolist()
        fallback = fallback if fallback is not None else perm.tolist()
    if fallback is None:  # cannot happen for n >= 2 in practice; a cyclic shift is a derangement
        fallback = [(i + 1) % n for i in range(n)]
    return fallback


def shuffled_control(videos: Sequence[np.ndarray], prompts: Sequence[str], seed: int = 0, *, ocr: Any = None,
                     max_frames: int = DEFAULT_MAX_FRAMES) -> tuple[list[AdherenceResult], float | None]:
    """Score videos[i] against prompts[perm[i]] for a seeded derangement ``perm``: the "follows text" baseline.

    Each result's ``prompt`` is the prompt it was scored against. A model whose videos follow their prompts scores
    clearly higher with ``score_prompts`` than here; equal scores mean the videos ignore the text.
    """
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    perm = derangement(prompts, seed)
    return score_prompts(videos, [prompts[j] for j in perm], ocr=ocr, max_frames=max_frames)


__all__ = [
    "AdherenceResult",
    "CriterionResult",
    "default_ocr",
    "derangement",
    "read_text",
    "score_prompts",
    "score_video",
    "shuffled_control",
]
