"""Prompt adherence without downloaded weights: does a video show the colours, shapes, motion and title its prompt
names?

The demo's videos live in a small synthetic world (``curation/samples.py``): a red circle (220, 30, 30) and a yellow
square (240, 220, 40) crossing a plain background of one of six palette colours, still cards of stripes in a
palette colour with a grey disc (128, 128, 128), and title cards of white letters on near-black (20, 20, 20). Its
captions are the prompt grammar this module reads::

    a red circle and a yellow square moving quickly across a plain orange background
    a still image of orange stripes and a grey disc, with no motion
    a still title card with the words "OPEN SORA 2024" written in large white letters on black

``parse_prompt`` turns a prompt into a :class:`PromptSpec` (named colours with their role, shapes, motion, a title);
words it does not know are ignored, and a prompt that names nothing measurable gives an empty spec, which scores
``None`` with a reason. ``score_video`` measures each criterion on the video with plain image analysis (numpy,
OpenCV, and the project's packaged OCR for titles) and returns a score in [0, 1] per criterion, their mean, and a
short reason per criterion a person can read. ``score_prompts`` averages over a prompt set and
``shuffled_control`` scores each video against another video's prompt: the gap between the two is what "follows
the text" means, since a video of the right *kind* can score well on a prompt it was not made for.

How each criterion is measured (the thresholds are module constants, chosen on the generator's palette and
explained where they are defined):

- colour: after a 3x3 median filter (pixel noise), every pixel is given the colour word of its nearest prototype
  in CIE Lab (``COLOUR_PROTOTYPES``) when it is within ``COLOUR_TOLERANCE`` of it. A named object colour counts
  as present in a frame when its largest compact connected component covers at least ``MIN_OBJECT_FRACTION`` of
  the frame and is solid (``MIN_SOLIDITY``; letters and stripes: all their components together, at least
  ``MIN_LETTERS_FRACTION`` / ``MIN_STRIPES_FRACTION``); a background colour ("a plain orange
  background", "on black") when it covers at least ``MIN_BACKGROUND_FRACTION``. Score: the fraction of frames
  where present, reaching 1 at ``MOST_FRAMES``.
- shape: the largest compact component of the object's colour (the largest blob that is not background when the
  prompt names a shape without a colour), measured by its fill of the minimum enclosing circle (circle ~1,
  square 2/pi at any angle), its fill of the minimum-area rectangle (a rotation-proof extent: circle pi/4,
  square 1, triangle 1/2) and its aspect ratio, each turned into a soft membership and combined with ``min``
  (fuzzy AND); the median over frames, preferring frames where the blob does not touch the border (a circle
  cut by the frame edge is not a circle). ``shape_membership`` gives the bands and the measurements behind them.
  Stripes are a pattern, not a blob: at least ``STRIPE_EDGES_FULL`` sharp colour edges along both the top and
  bottom bands of the frame (or the left and right), in frames where the stripes' colour is present.
- motion: the object's centroid track over the sampled frames (largest component for compact shapes, the whole
  colour's mask for letters, stripes and shapeless objects). Steps longer than ``MAX_STEP`` are dropped (the
  generator wraps shapes around the frame; a jump is a wrap or a different blob, not motion). "moving": the net
  displacement of the kept steps, in frame units (x / W, y / H); a named direction also needs the displacement to
  point that way. "still": the largest distance of any centroid from the median one. A prompt with motion words
  but no object to carry them is scored on how much of the frame changes between sampled frames.
- title: OCR (``models.scorers.ocr.OcrScorer``, the project's packaged rapidocr loader) on the middle frame; the
  score is the fraction of the title's words found in what it reads (case-insensitive, spaces ignored).

Limits: two objects of the same colour in one prompt both use that colour's largest blob; speed words ("slowly",
"quickly") are not scored (the generator's speed is in pixels per frame at its own resolution and frame rate);
colour words outside ``COLOUR_PROTOTYPES`` are unknown words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

# -- vocabulary ---------------------------------------------------------------------------------------------------

# Colour word -> RGB prototypes. The first ones of each word are what curation/samples.py draws: its PALETTE
# backgrounds (dark blue, orange, green, purple, cream, dark grey), the red circle, the yellow square, the grey disc,
# white letters on (20, 20, 20); the others are common renderings of the same word, so that a model's output that
# is plainly "red" but not exactly (220, 30, 30) still counts. Every pixel goes to its single nearest prototype, so
# each prototype also fences its neighbours in: "light grey" exists so that the cream card's stripes (178, 172, 160)
# are not taken for the grey disc they touch, "pink" and "brown" so that washed-out reds are not red.
COLOUR_PROTOTYPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((220, 30, 30), (255, 0, 0), (170, 20, 25)),
    "orange": ((200, 120, 30), (255, 140, 0), (240, 160, 60)),
    "yellow": ((240, 220, 40), (255, 255, 0), (230, 200, 80)),
    "green": ((30, 140, 70), (0, 128, 0), (60, 200, 60), (120, 200, 120)),
    "dark blue": ((22, 60, 140), (0, 0, 139), (25, 35, 90)),
    "blue": ((22, 60, 140), (0, 0, 139), (25, 35, 90), (0, 0, 255), (40, 100, 220), (70, 130, 200)),
    "light blue": ((135, 206, 250), (150, 190, 230)),
    "cyan": ((0, 200, 210), (0, 128, 128)),
    "purple": ((150, 30, 110), (128, 0, 128), (120, 60, 180)),
    "pink": ((255, 170, 190), (240, 110, 160)),
    "brown": ((130, 80, 40), (100, 60, 30)),
    "cream": ((230, 220, 200), (245, 235, 210)),
    "white": ((255, 255, 255), (240, 240, 240)),
    "black": ((0, 0, 0), (20, 20, 20)),
    "dark grey": ((40, 40, 40), (64, 64, 64)),
    "grey": ((128, 128, 128), (105, 105, 105)),
    "light grey": ((190, 190, 190),),
}
COLOUR_ALIASES = {
    "gray": "grey", "dark gray": "dark grey", "light gray": "light grey", "navy": "dark blue", "violet": "purple",
    "magenta": "purple", "beige": "cream", "teal": "cyan", "turquoise": "cyan",
}
# Shape word -> the shape scored. The generator draws circles, squares, a disc, stripes and letters; rectangle,
# ellipse and triangle cost nothing more to measure.
SHAPE_WORDS = {
    "circle": "circle", "circles": "circle", "disc": "circle", "discs": "circle", "disk": "circle",
    "ball": "circle", "dot": "circle", "square": "square", "squares": "square", "rectangle": "rectangle",
    "rectangles": "rectangle", "bar": "rectangle", "ellipse": "ellipse", "oval": "ellipse",
    "triangle": "triangle", "triangles": "triangle", "stripes": "stripes", "stripe": "stripes",
    "striped": "stripes", "letters": "letters", "letter": "letters", "text": "letters",
}
MEASURED_SHAPES = ("circle", "square", "rectangle", "ellipse", "triangle", "stripes")  # "letters": see title
DIFFUSE_SHAPES = ("stripes", "letters")  # many components: presence and tracking use the whole colour mask
BACKGROUND_WORDS = {"background", "backdrop", "backgrounds"}
SIZE_WORDS = {"small", "large", "big", "tiny", "little", "huge", "bright", "plain", "solid", "single", "pale", "vivid"}
MOVING_WORDS = {
    "moving", "moves", "move", "running", "runs", "flying", "flies", "sliding", "slides", "rolling", "rolls",
    "drifting", "drifts", "travelling", "traveling", "travels", "crossing", "crosses", "bouncing", "bounces",
    "rising", "rises", "falling", "falls", "sinking", "sinks",
}
IMPLIED_DIRECTION = {"rising": "up", "rises": "up", "falling": "down", "falls": "down", "sinking": "down",
                     "sinks": "down"}
STILL_WORDS = {"still", "static", "stationary", "motionless", "unmoving", "frozen", "immobile"}
NEGATIONS = {"no", "not", "without", "never"}
DIRECTION_WORDS = {
    "left": "left", "leftward": "left", "leftwards": "left", "right": "right", "rightward": "right",
    "rightwards": "right", "up": "up", "upward": "up", "upwards": "up", "down": "down", "downward": "down",
    "downwards": "down",
}
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

# -- thresholds ---------------------------------------------------------------------------------------------------

# CIE76 distance (Lab, L in 0..100) within which a pixel takes its nearest prototype's word. The generator's named
# colours sit 40-80 apart (red-orange 47, orange-yellow 47, grey-dark grey 37), so 30 still leaves room for H.264
# chroma blur and a model's approximate colours, while the nearest-prototype rule does the discriminating.
COLOUR_TOLERANCE = 30.0
# Smallest object, as a fraction of the frame. The generator's shapes cover 2-3 % (circle radius H/8, square side
# H/5); an untrained model's output through the demo's 8x VAE is block speckle in which every colour forms blobs of
# one to three blocks (0.4-1.3 % at 96x160) that are not solid. A compact object therefore needs a component of at
# least MIN_OBJECT_FRACTION that fills at least MIN_SOLIDITY of its convex hull (a raster circle or square
# fills > 0.9, a decoded blocky one > 0.85, an L of three blocks 0.75). A stripe card's named colour covers 42-88 %
# of it (MIN_STRIPES_FRACTION), a title's letters 3-4 % together (MIN_LETTERS_FRACTION), where speckle of a dozen
# colours gives each about 8 % in scattered pieces.
MIN_OBJECT_FRACTION = 0.01
MIN_SOLIDITY = 0.8
MIN_STRIPES_FRACTION = 0.25
MIN_LETTERS_FRACTION = 0.01
MIN_BACKGROUND_FRACTION = 0.3  # "a plain orange background": that colour covers most of the frame
COMPACT_CORE = 0.25  # a blob keeps at least this fraction of its pixels through a 3x3 erosion (see _components)
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
# Stripes: sharp colour edges (Lab jump > STRIPE_EDGE_DELTA between neighbouring columns of a band's median
# profile). The generator's stripe cards have ~12 edges (the faintest pair, dark grey 40 vs 64, differs by 10); a
# moving shape crossing a band makes 2.
STRIPE_EDGE_DELTA = 6.0
STRIPE_EDGES_ZERO, STRIPE_EDGES_FULL = 2, 6
DENOISE_KERNEL = 3  # median filter before labelling: pixel noise would break blobs into speckle
ANALYSIS_MAX_SIDE = 192  # frames are downscaled (INTER_AREA) to at most this side before colour analysis
DEFAULT_MAX_FRAMES = 16  # frames sampled evenly from the video
OCR_MIN_HEIGHT = 160  # smaller frames are upscaled before OCR (PP-OCR reads poorly below ~30 px letters)


# -- the spec -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One thing the prompt names: a colour and/or a shape, with the motion the prompt gives it.

    role: "object" (a blob) or "background" (a colour covering most of the frame: never shape- or motion-scored).
    motion: "moving", "still" or None; direction: "left" / "right" / "up" / "down" or None.
    """

    colour: str | None = None
    shape: str | None = None
    role: str = "object"
    motion: str | None = None
    direction: str | None = None

    @property
    def label(self) -> str:
        words = [w for w in (self.colour, self.shape) if w]
        if self.role == "background":
            words.append("background")
        return " ".join(words) or "object"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for that can be measured. ``scene_motion``: motion words with no object to carry them."""

    text: str
    objects: tuple[ObjectSpec, ...] = ()
    title: str | None = None
    scene_motion: str | None = None
    scene_direction: str | None = None

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o.colour for o in self.objects if o.colour))

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o.shape for o in self.objects if o.shape))

    @property
    def is_empty(self) -> bool:
        measurable = [o for o in self.objects if o.colour or o.shape in MEASURED_SHAPES or o.motion]
        return not measurable and self.title is None and self.scene_motion is None


_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|‘([^’]+)’|(?:(?<=\s)|^)\'([^\']+)\'(?=[\s.,;:!?]|$)')
_UPPER_RUN = re.compile(r"\b[A-Z0-9][A-Z0-9&'-]*(?:[ \t]+[A-Z0-9][A-Z0-9&'-]*)*\b")


def _titles(text: str) -> tuple[str | None, str]:
    """-> (the title, the text without it). Quoted text first; else a run of UPPERCASE words (one of them with at
    least two letters, so that a sentence's leading "A" is not a title), unless the whole prompt is uppercase."""
    match = _QUOTED.search(text)
    if match:
        title = next(g for g in match.groups() if g is not None).strip()
        return (title or None), text[: match.start()] + " " + text[match.end() :]
    if any(ch.islower() for ch in text):
        for run in _UPPER_RUN.finditer(text):
            if any(sum(ch.isalpha() for ch in word) >= 2 for word in run.group().split()):
                return run.group().strip(), text[: run.start()] + " " + text[run.end() :]
    return None, text


def _colour_at(tokens: list[str], i: int) -> tuple[str | None, int]:
    """The colour word starting at token i (two-word names first) and how many tokens it takes."""
    if i + 1 < len(tokens):
        pair = f"{tokens[i]} {tokens[i + 1]}"
        pair = COLOUR_ALIASES.get(pair, pair)
        if pair in COLOUR_PROTOTYPES:
            return pair, 2
    word = COLOUR_ALIASES.get(tokens[i], tokens[i])
    if word in COLOUR_PROTOTYPES:
        return word, 1
    return None, 0


def _direction_after(tokens: list[str], i: int) -> str | None:
    """A direction within the next few words: "right", "to the left", "from left to right" (-> right)."""
    window = tokens[i + 1 : i + 7]
    for k, word in enumerate(window):
        if word in DIRECTION_WORDS:
            if k > 0 and window[k - 1] == "from":  # "from left to right": the origin, not the direction
                continue
            return DIRECTION_WORDS[word]
        if word in {"and", "while", "but"} or word in MOVING_WORDS or word in STILL_WORDS:
            break
    return None


def parse_prompt(text: str) -> PromptSpec:
    """Read the colours, shapes, motion and title a prompt names (see the module docstring for the grammar)."""
    title, rest = _titles(text)
    tokens = re.findall(r"[a-z]+", rest.lower())
    # Events in prompt order: objects, then motion phrases, each at its token position.
    objects: list[dict[str, Any]] = []
    motions: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(tokens):
        colour, used = _colour_at(tokens, i)
        if colour:
            j = i + used
            while j < len(tokens) and tokens[j] in SIZE_WORDS:
                j += 1
            nxt = tokens[j] if j < len(tokens) else None
            role, shape = "object", None
            if nxt in BACKGROUND_WORDS:
                role = "background"
            elif nxt in SHAPE_WORDS:
                shape = SHAPE_WORDS[nxt]
                j += 1
            elif nxt is None and i > 0 and tokens[i - 1] == "on":  # "... letters on black"
                role = "background"
            objects.append({"pos": i, "colour": colour, "shape": shape, "role": role})
            i = max(j, i + used)
            continue
        word = tokens[i]
        if word in SHAPE_WORDS and word != "text":
            objects.append({"pos": i, "colour": None, "shape": SHAPE_WORDS[word], "role": "object"})
        elif word in MOVING_WORDS:
            negated = i > 0 and tokens[i - 1] in NEGATIONS or i > 1 and tokens[i - 2] in NEGATIONS
            if negated:
                motions.append((i, "still", None))
            else:
                motions.append((i, "moving", _direction_after(tokens, i) or IMPLIED_DIRECTION.get(word)))
        elif word in STILL_WORDS:
            motions.append((i, "still", None))
        elif word == "motion" and i > 0 and tokens[i - 1] in NEGATIONS:  # "with no motion"
            motions.append((i, "still", None))
        i += 1

    # A motion phrase belongs to the objects named since the previous one ("a red circle moving right and a blue
    # square standing still": right for the circle, still for the square). A phrase before every object describes
    # the whole scene ("a still image of orange stripes and a grey disc"); objects after the last phrase take it
    # only then ("a red circle moving right and a blue square": the square's motion is not given).
    movers = [o for o in objects if o["role"] == "object"]
    leading = [m for m in motions if movers and m[0] < min(o["pos"] for o in movers)]
    for obj in movers:
        after = [m for m in motions if m[0] > obj["pos"]]
        chosen = after[0] if after else (leading[-1] if leading else None)
        if chosen:
            obj["motion"], obj["direction"] = chosen[1], chosen[2]
    scene_motion = scene_direction = None
    if motions and not movers:
        scene_motion, scene_direction = motions[-1][1], motions[-1][2]
    return PromptSpec(
        text=text,
        objects=tuple(
            ObjectSpec(o["colour"], o["shape"], o["role"], o.get("motion"), o.get("direction")) for o in objects
        ),
        title=title,
        scene_motion=scene_motion,
        scene_direction=scene_direction,
    )


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


# -- image analysis -----------------------------------------------------------------------------------------------


def _ramp(x: float, zero: float, one: float) -> float:
    """0 at ``zero``, 1 at ``one``, linear between, clipped (``one`` may be below ``zero`` for a falling ramp)."""
    if one == zero:
        return float(x >= one)
    return float(min(1.0, max(0.0, (x - zero) / (one - zero))))


def _band(x: float, zero_lo: float, full_lo: float, full_hi: float, zero_hi: float) -> float:
    """1 inside [full_lo, full_hi], falling linearly to 0 at zero_lo and zero_hi."""
    return min(_ramp(x, zero_lo, full_lo), _ramp(x, zero_hi, full_hi))


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32 CIE Lab (L 0..100)."""
    import cv2

    arr = np.asarray(rgb, np.uint8)
    flat = arr.reshape(-1, 1, 3).astype(np.float32) / 255.0
    return cv2.cvtColor(flat, cv2.COLOR_RGB2Lab).reshape(arr.shape).astype(np.float32)


@lru_cache(maxsize=1)
def _prototypes() -> tuple[np.ndarray, tuple[tuple[int, int, int], ...], dict[str, np.ndarray]]:
    """-> (Lab of every distinct prototype [P, 3], the RGBs, word -> indices of its prototypes)."""
    rgbs = tuple(dict.fromkeys(rgb for protos in COLOUR_PROTOTYPES.values() for rgb in protos))
    lab = _rgb_to_lab(np.array(rgbs, np.uint8))
    index = {rgb: k for k, rgb in enumerate(rgbs)}
    words = {word: np.array([index[rgb] for rgb in protos]) for word, protos in COLOUR_PROTOTYPES.items()}
    return lab, rgbs, words


@lru_cache(maxsize=1)
def _label_table() -> np.ndarray:
    """Nearest prototype (-1 beyond COLOUR_TOLERANCE) for every colour at 6 bits per channel: [64**3] int16.

    Built once (~0.2 s); a bin's centre stands for its 4x4x4 colours (at most ~2 Lab units away), which is far
    below the tolerance and lets a frame be labelled by one lookup per pixel.
    """
    levels = np.arange(64, dtype=np.float32) * 4 + 1.5
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    import cv2

    lab = cv2.cvtColor(grid / 255.0, cv2.COLOR_RGB2Lab).reshape(-1, 3)
    protos = _prototypes()[0]
    table = np.empty(len(lab), np.int16)
    for start in range(0, len(lab), 32768):  # chunks keep the [n, P] distance matrix small
        d = np.linalg.norm(lab[start : start + 32768, None] - protos[None], axis=-1)
        nearest = d.argmin(axis=1)
        nearest[d[np.arange(len(d)), nearest] > COLOUR_TOLERANCE] = -1
        table[start : start + 32768] = nearest
    return table


@dataclass
class _Frames:
    """The sampled, downscaled frames with their Lab values and nearest-prototype labels (-1: no colour word)."""

    rgb: np.ndarray  # [N, h, w, 3] uint8
    lab: np.ndarray  # [N, h, w, 3] float32
    labels: np.ndarray  # [N, h, w] int16
    indices: list[int]  # which frames of the video
    blobs: dict = field(default_factory=dict)  # (frame, colour, diffuse) -> _Blob | None, filled by _object_blob

    @property
    def n(self) -> int:
        return len(self.rgb)

    @property
    def area(self) -> int:
        return int(self.labels.shape[1] * self.labels.shape[2])

    def colour_mask(self, k: int, colour: str) -> np.ndarray:
        return np.isin(self.labels[k], _prototypes()[2][colour])


def _check_video(video: Any) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) == 0:
        raise ValueError(f"expected a video as uint8 RGB [T, H, W, 3] with T >= 1, got {video.dtype} {video.shape}")
    return video


def _prepare(video: np.ndarray, max_frames: int) -> _Frames:
    import cv2

    t, h, w = video.shape[:3]
    indices = sorted({round(x) for x in np.linspace(0, t - 1, min(max_frames, t))})
    scale = min(1.0, ANALYSIS_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    frames = []
    for i in indices:
        frame = np.ascontiguousarray(video[i])
        if scale != 1.0:
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        frames.append(cv2.medianBlur(frame, DENOISE_KERNEL) if DENOISE_KERNEL > 1 else frame)
    rgb = np.stack(frames)
    lab = _rgb_to_lab(rgb)
    q = (rgb >> 2).astype(np.int32)  # 6 bits per channel: the lookup table's bins
    labels = _label_table()[(q[..., 0] << 12) | (q[..., 1] << 6) | q[..., 2]]
    return _Frames(rgb, lab, labels, indices)


@dataclass(frozen=True)
class _Blob:
    area: int  # pixels
    centroid: tuple[float, float]  # (x / w, y / h)
    touches_border: bool
    component_map: np.ndarray  # [h, w] component index per pixel (or a boolean mask when index is None)
    index: int | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.component_map if self.index is None else self.component_map == self.index


def _components(mask: np.ndarray, compact: bool = True) -> list[_Blob]:
    """Connected components (8-connectivity) of a boolean mask, largest first.

    compact: keep only components with a core, i.e. at least ``COMPACT_CORE`` of their pixels survive a 3x3
    erosion. A filled shape keeps most of its area (a circle of radius 6: 70 %); the anti-aliased fringe of a
    letter or an edge, one or two pixels wide, keeps almost none and is not a blob.
    """
    import cv2

    mask8 = mask.astype(np.uint8)
    count, comp, stats, cents = cv2.connectedComponentsWithStats(mask8, connectivity=8)
    if count <= 1:
        return []
    if compact:
        core = cv2.erode(mask8, np.ones((3, 3), np.uint8)).astype(bool)
        core_area = np.bincount(comp[core], minlength=count)
    h, w = mask.shape
    blobs = []
    for c in range(1, count):
        x, y, bw, bh, area = (int(v) for v in stats[c])
        if compact and core_area[c] < COMPACT_CORE * area:
            continue
        border = x == 0 or y == 0 or x + bw == w or y + bh == h
        blobs.append(_Blob(area, (float(cents[c][0]) / w, float(cents[c][1]) / h), border, comp, c))
    return sorted(blobs, key=lambda b: -b.area)


def _largest_non_background(frames: _Frames, k: int) -> _Blob | None:
    """The largest compact blob of one colour word that is not the frame's background (the border's commonest).

    Pixels are grouped by the first colour word owning their prototype (so the red circle's shades stay one
    blob); pixels far from every prototype form one more group, so an object of an unlisted colour still counts.
    """
    groups = _prototype_groups()
    labels = np.where(frames.labels[k] >= 0, groups[frames.labels[k]], -1)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    values, counts = np.unique(border, return_counts=True)
    background = values[counts.argmax()]
    best = None
    for value in np.unique(labels):
        if value == background:
            continue
        blobs = _objects(_components(labels == value), frames.area)
        if blobs and (best is None or blobs[0].area > best.area):
            best = blobs[0]
    return best


@lru_cache(maxsize=1)
def _prototype_groups() -> np.ndarray:
    """Prototype index -> index of the first colour word (in COLOUR_PROTOTYPES order) that lists it."""
    _, rgbs, words = _prototypes()
    groups = np.full(len(rgbs), -1, np.int16)
    for w, indices in enumerate(words.values()):
        for idx in indices:
            if groups[idx] < 0:
                groups[idx] = w
    return groups


def solidity(mask: np.ndarray) -> float:
    """Area of a blob's outline over the area of its convex hull (1 for a convex shape)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0
    contour = max(contours, key=cv2.contourArea)
    hull = float(cv2.contourArea(cv2.convexHull(contour)))
    return float(cv2.contourArea(contour)) / hull if hull > 0 else 0.0


def _objects(blobs: list[_Blob], frame_area: int) -> list[_Blob]:
    """The components that can stand for a compact object: large enough and solid (see MIN_OBJECT_FRACTION)."""
    return [b for b in blobs if b.area >= MIN_OBJECT_FRACTION * frame_area and solidity(b.mask) >= MIN_SOLIDITY]


def min_fraction(shape: str | None) -> float:
    """The smallest share of the frame an object of this shape covers when present."""
    return {"stripes": MIN_STRIPES_FRACTION, "letters": MIN_LETTERS_FRACTION}.get(shape or "", MIN_OBJECT_FRACTION)


def _object_blob(frames: _Frames, k: int, obj: ObjectSpec) -> _Blob | None:
    """The blob that stands for ``obj`` in frame k, or None when there is none (``min_fraction``, ``_objects``).

    A compact object: its colour's largest solid compact component (the largest such non-background blob when the
    prompt gives no colour). Letters and stripes: all the colour's components of 4+ pixels together (for stripes,
    compact ones only).
    """
    diffuse = obj.shape in DIFFUSE_SHAPES
    key = (k, obj.colour, diffuse)
    if key in frames.blobs:
        return frames.blobs[key]
    if obj.colour is None:
        blob = _largest_non_background(frames, k)
    elif diffuse:
        # Stripes are filled bars (compact); letters are strokes 2-3 px wide that an erosion would remove.
        comps = _components(frames.colour_mask(k, obj.colour), compact=obj.shape == "stripes")
        kept = [b for b in comps if b.area >= 4]  # drop anti-aliasing specks
        blob = None
        if kept:
            mask = np.isin(kept[0].component_map, [b.index for b in kept])
            ys, xs = np.nonzero(mask)
            h, w = mask.shape
            blob = _Blob(len(xs), (float(xs.mean()) / w, float(ys.mean()) / h), False, mask)
        if blob is not None and blob.area < min_fraction(obj.shape) * frames.area:
            blob = None
    else:
        blobs = _objects(_components(frames.colour_mask(k, obj.colour)), frames.area)
        blob = blobs[0] if blobs else None
    frames.blobs[key] = blob
    return blob


# -- criteria -----------------------------------------------------------------------------------------------------


def _score_colour(frames: _Frames, obj: ObjectSpec) -> tuple[float, str]:
    if obj.role == "background":
        cover = [float(frames.colour_mask(k, obj.colour).mean()) for k in range(frames.n)]
        present = sum(c >= MIN_BACKGROUND_FRACTION for c in cover)
        score = _ramp(present / frames.n, 0.0, MOST_FRAMES)
        return score, (f"{obj.colour} background: covers >= {MIN_BACKGROUND_FRACTION:.0%} in {present}/{frames.n} "
                       f"frames, median {100 * float(np.median(cover)):.1f} %")
    areas = []
    for k in range(frames.n):
        blob = _object_blob(frames, k, ObjectSpec(obj.colour, obj.shape if obj.shape in DIFFUSE_SHAPES else None))
        if blob is not None:
            areas.append(blob.area / frames.area)
    what = "pixels" if obj.shape in DIFFUSE_SHAPES else "blob"
    if not areas:
        solid = "" if obj.shape in DIFFUSE_SHAPES else f", solid to {MIN_SOLIDITY:.0%}"
        return 0.0, f"{obj.colour}: no {what} >= {100 * min_fraction(obj.shape):.2g} %{solid} in any of {frames.n} frames"
    score = _ramp(len(areas) / frames.n, 0.0, MOST_FRAMES)
    return score, f"{obj.colour}: {what} in {len(areas)}/{frames.n} frames, area {100 * float(np.median(areas)):.1f} %"


def shape_features(mask: np.ndarray) -> dict[str, float] | None:
    """Outline measures of a blob's mask: rect_fill (area / minimum-area rectangle), circle_fill (area / minimum
    enclosing circle), aspect (short / long side of that rectangle), circularity (4 pi A / P^2). Areas are of the
    outline polygon through the boundary pixels' centres, so a raster square fills its rectangle exactly."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    area = float(cv2.contourArea(contour))
    if area <= 0:
        return None
    (_, _), (rw, rh), _ = cv2.minAreaRect(contour)
    _, radius = cv2.minEnclosingCircle(contour)
    perimeter = float(cv2.arcLength(contour, True))
    return {
        "rect_fill": area / max(rw * rh, 1e-6),
        "circle_fill": area / max(math.pi * radius * radius, 1e-6),
        "aspect": min(rw, rh) / max(rw, rh, 1e-6),
        "circularity": 4 * math.pi * area / max(perimeter * perimeter, 1e-6),
    }


def shape_membership(shape: str, f: dict[str, float]) -> float:
    """Soft [0, 1] match of outline measures to a shape (fuzzy AND = min of the measures' memberships).

    Measured on raster shapes of radius / half-side 4-40 px, plain and anti-aliased, squares turned 0-45 degrees:
    circles fill their enclosing circle 0.76-0.98 (ideal 1; 0.76 only at radius 4) and their rectangle 0.73-0.82
    (ideal pi/4 = 0.785; 0.92 for an anti-aliased radius 4); squares fill their enclosing circle 0.62-0.64 at
    every angle (ideal 2/pi) and their rectangle 0.84-1.0 (small turned squares lose corners). The
    enclosing-circle fill is what separates the two (no overlap); rectangle fill and aspect keep ellipses,
    triangles and bars out.
    """
    rect, circ, aspect = f["rect_fill"], f["circle_fill"], f["aspect"]
    round_fill = _band(rect, 0.62, 0.70, 0.88, 0.95)
    if shape == "circle":
        return min(round_fill, _ramp(circ, 0.70, 0.78), _ramp(aspect, 0.65, 0.80))
    if shape == "ellipse":
        return round_fill
    if shape == "square":
        return min(_ramp(rect, 0.78, 0.86), _ramp(circ, 0.80, 0.72), _ramp(aspect, 0.65, 0.80))
    if shape == "rectangle":
        return _ramp(rect, 0.78, 0.86)
    if shape == "triangle":
        return _band(rect, 0.38, 0.45, 0.58, 0.66)
    raise ValueError(f"no outline measure for shape {shape!r}")


def _stripe_edges(lab: np.ndarray) -> int:
    """Sharp colour edges of vertical (or horizontal) stripes: the smaller count of the two outer bands."""

    def edges(profile: np.ndarray) -> int:  # profile [L, 3]
        jump = np.linalg.norm(np.diff(profile, axis=0), axis=-1) > STRIPE_EDGE_DELTA
        return int(np.count_nonzero(jump[1:] & ~jump[:-1]) + int(jump[0])) if len(jump) else 0  # runs of edges

    h, w = lab.shape[:2]
    q_h, q_w = max(1, h // 4), max(1, w // 4)
    vertical = min(edges(np.median(lab[:q_h], axis=0)), edges(np.median(lab[-q_h:], axis=0)))
    horizontal = min(edges(np.median(lab[:, :q_w], axis=1)), edges(np.median(lab[:, -q_w:], axis=1)))
    return max(vertical, horizontal)


def _score_shape(frames: _Frames, obj: ObjectSpec) -> tuple[float, str]:
    label = obj.label
    if obj.shape == "stripes":
        # The pattern is measured on the whole frame; the stripes' colour must be there too, as a circle's must.
        counts = [_stripe_edges(frames.lab[k]) if obj.colour is None or _object_blob(frames, k, obj) else 0
                  for k in range(frames.n)]
        edges = float(np.median(counts))
        score = _ramp(edges, STRIPE_EDGES_ZERO, STRIPE_EDGES_FULL)
        where = f" where {obj.colour} is present" if obj.colour else ""
        return score, f"{label}: {edges:.0f} stripe edges (median over {frames.n} frames, counted{where})"
    measured = []  # (touches_border, membership, features)
    for k in range(frames.n):
        blob = _object_blob(frames, k, obj)
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
    return _ramp(cos, DIRECTION_COS_ZERO, DIRECTION_COS_FULL), cos


def _score_motion(frames: _Frames, obj: ObjectSpec) -> tuple[float, str]:
    label = obj.label
    track = [b.centroid for k in range(frames.n) if (b := _object_blob(frames, k, obj)) is not None]
    if not track:
        return 0.0, f"{label}: nothing to track (not found in any frame)"
    points = np.array(track)
    if obj.motion == "still":
        spread = float(np.max(np.linalg.norm(points - np.median(points, axis=0), axis=1)))
        score = _ramp(spread, STILL_ZERO, STILL_FULL)
        return score, f"{label}: still? centroid within {100 * spread:.1f} % of the frame over {len(track)} frames"
    if len(track) < 2:
        return 0.0, f"{label}: seen in 1 frame, no track"
    steps = np.diff(points, axis=0)
    kept = steps[np.linalg.norm(steps, axis=1) <= MAX_STEP]
    net = kept.sum(axis=0) if len(kept) else np.zeros(2)
    moved = float(np.linalg.norm(net))
    score = _ramp(moved, MOVING_ZERO, MOVING_FULL)
    reason = f"{label}: moved {100 * moved:.1f} % of the frame over {len(track)} frames"
    if len(kept) < len(steps):
        reason += f" ({len(steps) - len(kept)} jumps dropped)"
    if obj.direction:
        dir_score, cos = _direction_score(net, obj.direction)
        score *= dir_score
        reason += f", {obj.direction}? cos {cos:.2f}"
    return score, reason


def _score_scene_motion(frames: _Frames, motion: str, direction: str | None) -> tuple[float, str]:
    if frames.n < 2:
        return 0.0, "scene: one frame, motion cannot be measured"
    changes = [float((np.linalg.norm(frames.lab[k + 1] - frames.lab[k], axis=-1) > SCENE_CHANGE_DELTA).mean())
               for k in range(frames.n - 1)]
    change = float(np.mean(changes))
    if motion == "still":
        score = _ramp(change, SCENE_MOVING_FULL, SCENE_STILL_FULL)
    else:
        score = _ramp(change, SCENE_STILL_FULL, SCENE_MOVING_FULL)
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
    frames = _prepare(video, max_frames)
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
    "COLOUR_PROTOTYPES",
    "AdherenceResult",
    "CriterionResult",
    "ObjectSpec",
    "PromptSpec",
    "default_ocr",
    "derangement",
    "parse_prompt",
    "read_text",
    "score_prompts",
    "score_video",
    "shape_features",
    "shape_membership",
    "shuffled_control",
]
