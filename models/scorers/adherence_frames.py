"""Frame analysis for prompt adherence: a colour word per pixel, the blob that stands for a named object, the
outline measures that tell its shape, and the edges of stripes.

- colour: after a 3x3 median filter (pixel noise), every pixel is given the colour word of its nearest prototype
  in CIE Lab (``COLOUR_PROTOTYPES``) when it is within ``COLOUR_TOLERANCE`` of it.
- blobs: a named object's blob in a frame (``object_blob``) is its colour's largest compact connected component
  covering at least ``MIN_OBJECT_FRACTION`` of the frame and solid (``MIN_SOLIDITY``); letters and stripes are
  all their colour's components together, at least ``MIN_LETTERS_FRACTION`` / ``MIN_STRIPES_FRACTION``. When the
  prompt names a shape without a colour, the largest such blob that is not background stands for it.
- shape: a blob's fill of its minimum enclosing circle (circle ~1, square 2/pi at any angle), its fill of the
  minimum-area rectangle (a rotation-proof extent: circle pi/4, square 1, triangle 1/2) and its aspect ratio,
  each turned into a soft membership and combined with ``min`` (fuzzy AND). ``shape_membership`` gives the bands
  and the measurements behind them.
- stripes are a pattern, not a blob: ``stripe_edges`` counts sharp colour edges along both the top and bottom
  bands of the frame (or the left and right).

Limit: two objects of the same colour in one prompt both use that colour's largest blob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from models.scorers.adherence_prompt import COLOUR_PROTOTYPES, DIFFUSE_SHAPES, ObjectSpec

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
COMPACT_CORE = 0.25  # a blob keeps at least this fraction of its pixels through a 3x3 erosion (see _components)
# Stripes: sharp colour edges (Lab jump > STRIPE_EDGE_DELTA between neighbouring columns of a band's median
# profile). The generator's stripe cards have ~12 edges (the faintest pair, dark grey 40 vs 64, differs by 10); a
# moving shape crossing a band makes 2. How many edges make stripes: STRIPE_EDGES_* in models.scorers.adherence.
STRIPE_EDGE_DELTA = 6.0
DENOISE_KERNEL = 3  # median filter before labelling: pixel noise would break blobs into speckle
ANALYSIS_MAX_SIDE = 192  # frames are downscaled (INTER_AREA) to at most this side before colour analysis

# -- soft scores --------------------------------------------------------------------------------------------------


def ramp(x: float, zero: float, one: float) -> float:
    """0 at ``zero``, 1 at ``one``, linear between, clipped (``one`` may be below ``zero`` for a falling ramp)."""
    if one == zero:
        return float(x >= one)
    return float(min(1.0, max(0.0, (x - zero) / (one - zero))))


def _band(x: float, zero_lo: float, full_lo: float, full_hi: float, zero_hi: float) -> float:
    """1 inside [full_lo, full_hi], falling linearly to 0 at zero_lo and zero_hi."""
    return min(ramp(x, zero_lo, full_lo), ramp(x, zero_hi, full_hi))


# -- colour labelling ---------------------------------------------------------------------------------------------


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
class Frames:
    """The sampled, downscaled frames with their Lab values and nearest-prototype labels (-1: no colour word)."""

    rgb: np.ndarray  # [N, h, w, 3] uint8
    lab: np.ndarray  # [N, h, w, 3] float32
    labels: np.ndarray  # [N, h, w] int16
    indices: list[int]  # which frames of the video
    blobs: dict = field(default_factory=dict)  # (frame, colour, diffuse) -> Blob | None, filled by object_blob

    @property
    def n(self) -> int:
        return len(self.rgb)

    @property
    def area(self) -> int:
        return int(self.labels.shape[1] * self.labels.shape[2])

    def colour_mask(self, k: int, colour: str) -> np.ndarray:
        return np.isin(self.labels[k], _prototypes()[2][colour])



def prepare_frames(video: np.ndarray, max_frames: int) -> Frames:
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
    return Frames(rgb, lab, labels, indices)


# -- blobs --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    area: int  # pixels
    centroid: tuple[float, float]  # (x / w, y / h)
    touches_border: bool
    component_map: np.ndarray  # [h, w] component index per pixel (or a boolean mask when index is None)
    index: int | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.component_map if self.index is None else self.component_map == self.index


def _components(mask: np.ndarray, compact: bool = True) -> list[Blob]:
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
        blobs.append(Blob(area, (float(cents[c][0]) / w, float(cents[c][1]) / h), border, comp, c))
    return sorted(blobs, key=lambda b: -b.area)


def _largest_non_background(frames: Frames, k: int) -> Blob | None:
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


def _outline(mask: np.ndarray) -> np.ndarray | None:
    """The largest external contour of a blob's mask (through its boundary pixels' centres), or None."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return max(contours, key=cv2.contourArea) if contours else None


def solidity(mask: np.ndarray) -> float:
    """Area of a blob's outline over the area of its convex hull (1 for a convex shape)."""
    import cv2

    contour = _outline(mask)
    if contour is None:
        return 0.0
    hull = float(cv2.contourArea(cv2.convexHull(contour)))
    return float(cv2.contourArea(contour)) / hull if hull > 0 else 0.0


def _objects(blobs: list[Blob], frame_area: int) -> list[Blob]:
    """The components that can stand for a compact object: large enough and solid (see MIN_OBJECT_FRACTION)."""
    return [b for b in blobs if b.area >= MIN_OBJECT_FRACTION * frame_area and solidity(b.mask) >= MIN_SOLIDITY]


def min_fraction(shape: str | None) -> float:
    """The smallest share of the frame an object of this shape covers when present."""
    return {"stripes": MIN_STRIPES_FRACTION, "letters": MIN_LETTERS_FRACTION}.get(shape or "", MIN_OBJECT_FRACTION)


def object_blob(frames: Frames, k: int, obj: ObjectSpec) -> Blob | None:
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
            blob = Blob(len(xs), (float(xs.mean()) / w, float(ys.mean()) / h), False, mask)
        if blob is not None and blob.area < min_fraction(obj.shape) * frames.area:
            blob = None
    else:
        blobs = _objects(_components(frames.colour_mask(k, obj.colour)), frames.area)
        blob = blobs[0] if blobs else None
    frames.blobs[key] = blob
    return blob


# -- shape measures -----------------------------------------------------------------------------------------------


def shape_features(mask: np.ndarray) -> dict[str, float] | None:
    """Outline measures of a blob's mask: rect_fill (area / minimum-area rectangle), circle_fill (area / minimum
    enclosing circle), aspect (short / long side of that rectangle), circularity (4 pi A / P^2). Areas are of the
    outline polygon through the boundary pixels' centres, so a raster square fills its rectangle exactly."""
    import cv2

    contour = _outline(mask)
    if contour is None:
        return None
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
        return min(round_fill, ramp(circ, 0.70, 0.78), ramp(aspect, 0.65, 0.80))
    if shape == "ellipse":
        return round_fill
    if shape == "square":
        return min(ramp(rect, 0.78, 0.86), ramp(circ, 0.80, 0.72), ramp(aspect, 0.65, 0.80))
    if shape == "rectangle":
        return ramp(rect, 0.78, 0.86)
    if shape == "triangle":
        return _band(rect, 0.38, 0.45, 0.58, 0.66)
    raise ValueError(f"no outline measure for shape {shape!r}")


def stripe_edges(lab: np.ndarray) -> int:
    """Sharp colour edges of vertical (or horizontal) stripes: the smaller count of the two outer bands."""

    def edges(profile: np.ndarray) -> int:  # profile [L, 3]
        jump = np.linalg.norm(np.diff(profile, axis=0), axis=-1) > STRIPE_EDGE_DELTA
        return int(np.count_nonzero(jump[1:] & ~jump[:-1]) + int(jump[0])) if len(jump) else 0  # runs of edges

    h, w = lab.shape[:2]
    q_h, q_w = max(1, h // 4), max(1, w // 4)
    vertical = min(edges(np.median(lab[:q_h], axis=0)), edges(np.median(lab[-q_h:], axis=0)))
    horizontal = min(edges(np.median(lab[:, :q_w], axis=1)), edges(np.median(lab[:, -q_w:], axis=1)))
    return max(vertical, horizontal)


__all__ = [
    "Blob",
    "Frames",
    "min_fraction",
    "object_blob",
    "prepare_frames",
    "ramp",
    "shape_features",
    "shape_membership",
    "solidity",
    "stripe_edges",
]
