"""Multi-resolution training buckets of Open-Sora v1.1: which bucket each sample lands in.

A bucket is ``(resolution, t, aspect_ratio_key)``. Every batch holds samples of one bucket only, so they can be
resized to the same ``[t, H, W]`` and stacked. Which bucket a sample lands in follows the reference exactly (the
rules and 1,152 golden answers are in ``conformance/buckets/README.md``):

1. Resolutions are tried from the largest pixel budget down (not in config order). A resolution is skipped when
   ``H * W < 0.8 * budget``; there is no upper bound.
2. An image (``T == 1``, whatever the file type) can only take ``t = 1`` and always draws its keep coin.
   A video takes the largest ``t != 1`` with ``T > t * frame_interval`` (strict) and draws only when
   ``keep_prob != 1``. A failed draw moves on to the next *resolution*, never to a smaller ``t`` of the same one,
   so ``keep_prob = 0`` entries block long videos from a resolution.
3. Each draw is ``numpy.random.default_rng(bucket_seed + offset[res][t]).random() < keep_prob`` with
   ``bucket_seed = seed + epoch + sample_id * num_bucket``: a fresh generator per attempted (res, t), so buckets are
   re-drawn every epoch and are reproducible from (seed, epoch, row position) alone.
4. The aspect-ratio key is the nearest one in the resolution's whole table (``training.aspect.get_closest_ratio``).

The bucket tables and their presets are ``training.bucket_presets``. ``training.bucket_report`` explains where every
row went (and why dropped rows were dropped), so "0 samples" is never a mystery, and
``training.sampler.VariableVideoBatchSampler`` turns the assignment into per-rank batches for a DataLoader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np

from training.aspect import ASPECT_RATIOS, AspectTable, get_closest_ratio
from training.bucket_presets import BucketConfig, validate_bucket_config

# The columns of the training table (Open-Sora CSV / Parquet) that bucketing reads: the original file's frame count
# and size, before any resizing.
METADATA_COLUMNS = ("num_frames", "height", "width")

# The reference keeps a resolution when H * W >= 0.8 * its pixel budget.
MIN_PIXEL_FRACTION = 0.8

BucketId = tuple[str, int, str]  # (resolution, t, aspect_ratio_key)


class DropReason(StrEnum):
    """Why a row got no bucket this epoch (the category; ``Assignment.detail`` has the numbers)."""

    INVALID_METADATA = "invalid metadata"
    TOO_SMALL = "resolution below 80% of the smallest budget"
    NO_IMAGE_BUCKET = "image but no image bucket (t=1) at any resolution it reaches"
    NO_VIDEO_BUCKET = "video but no video bucket (t>1) at any resolution it reaches"
    TOO_FEW_FRAMES = "too few frames for any t"
    KEEP_PROB_ZERO = "keep_prob 0"
    DRAWS_FAILED = "dropped by keep_prob draws"


# ---------------------------------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------------------------------


def bucket_seed(train_seed: int, epoch: int, sample_id: int, num_bucket: int) -> int:
    """The per-sample seed the reference sampler passes to ``get_bucket_id``.

    ``sample_id`` is the 0-based row position in the training table; the stride ``num_bucket`` is larger than any
    (res, t) offset, so no two draws of one epoch share a seed.
    """
    return train_seed + epoch + sample_id * num_bucket


class Draw(NamedTuple):
    """One keep-coin generator created while assigning a sample (``u`` is None when keep_prob == 1: no draw)."""

    resolution: str
    num_frames: int
    seed: int
    u: float | None
    keep_prob: float


@dataclass
class Assignment:
    """The outcome for one sample: its bucket or why it has none, and every draw made on the way."""

    bucket_id: BucketId | None
    draws: list[Draw] = field(default_factory=list)
    reason: DropReason | None = None
    detail: str = ""


class Bucket:
    """Bucket table of one training stage (see the module docstring for the rules).

    Derived once: ``resolutions`` (try order, pixel budget descending), ``num_frames_order[res]`` (descending, 1
    included), ``seed_offset[res][t]`` (a counter over those two orders) and ``num_bucket`` (the seed stride: sum of
    entries x aspect keys, keep_prob 0 entries included).
    """

    def __init__(self, bucket_config: Mapping[Any, Any], aspect_ratios: Mapping[str, AspectTable] | None = None):
        tables = ASPECT_RATIOS if aspect_ratios is None else aspect_ratios
        self.config: BucketConfig = validate_bucket_config(bucket_config, tables)
        self.tables: dict[str, AspectTable] = {res: tables[res] for res in self.config}
        # 1. Resolution try order: largest pixel budget first (stable sort: config order only breaks equal budgets).
        self.resolutions: list[str] = sorted(self.config, key=lambda res: self.tables[res].pixels, reverse=True)
        # 2. Frame try order within a resolution, images (t = 1) included.
        self.num_frames_order: dict[str, list[int]] = {
            res: sorted(self.config[res], reverse=True) for res in self.resolutions
        }
        # 3. Seed offsets: one per (res, t) pair in try order.
        self.seed_offset: dict[str, dict[int, int]] = {}
        counter = 0
        for res in self.resolutions:
            self.seed_offset[res] = {}
            for t in self.num_frames_order[res]:
                self.seed_offset[res][t] = counter
                counter += 1
        # 4. Seed stride: every (res, t, aspect key) triple, keep_prob 0 entries too.
        self.num_bucket: int = sum(len(self.config[res]) * len(self.tables[res].ratios) for res in self.resolutions)

    def __repr__(self) -> str:
        return f"Bucket(resolutions={self.resolutions}, num_bucket={self.num_bucket})"

    def pixels(self, resolution: str) -> int:
        return self.tables[resolution].pixels

    def assign(self, num_frames: int, height: int, width: int, frame_interval: int, seed: int) -> Assignment:
        """Bucket of one sample (``seed`` = ``bucket_seed(...)``), with the draws made and the drop reason if any."""
        if num_frames < 1 or height < 1 or width < 1:
            return Assignment(None, reason=DropReason.INVALID_METADATA,
                              detail=f"num_frames={num_frames}, height={height}, width={width} must all be >= 1")
        draws: list[Draw] = []
        num_pixels = height * width
        reached: list[str] = []  # resolutions that pass the pixel test
        for res in self.resolutions:
            # 1. Pixel test (float compare, like the reference).
            if num_pixels < self.tables[res].pixels * MIN_PIXEL_FRACTION:
                continue
            reached.append(res)
            # 2. Frame bucket: images only take t = 1; videos the largest t that fits strictly.
            if num_frames == 1:
                if 1 not in self.config[res]:
                    continue
                t = 1
            else:
                t = next((t for t in self.num_frames_order[res] if t != 1 and num_frames > t * frame_interval), 0)
                if t == 0:
                    continue
            # 3. Keep draw: fresh generator per attempted (res, t); videos with keep_prob 1 skip the draw.
            keep_prob = self.config[res][t].keep_prob
            draw_seed = seed + self.seed_offset[res][t]
            if t != 1 and keep_prob == 1:
                draws.append(Draw(res, t, draw_seed, None, keep_prob))
                return Assignment(self._bucket_id(res, t, height, width), draws)
            u = float(np.random.default_rng(draw_seed).random())
            draws.append(Draw(res, t, draw_seed, u, keep_prob))
            if u < keep_prob:
                return Assignment(self._bucket_id(res, t, height, width), draws)
            # A failed draw falls through to the next resolution, never to a smaller t of this one.
        return self._explain_drop(num_frames, height, width, frame_interval, reached, draws)

    def _bucket_id(self, res: str, t: int, height: int, width: int) -> BucketId:
        return (res, t, get_closest_ratio(height, width, self.tables[res].ratios))

    def _explain_drop(
        self, num_frames: int, height: int, width: int, frame_interval: int, reached: list[str], draws: list[Draw]
    ) -> Assignment:
        if any(d.keep_prob > 0 for d in draws):
            tried = ", ".join(f"{d.resolution}/t={d.num_frames} (p={d.keep_prob:g}, u={d.u:.3f})" for d in draws)
            return Assignment(None, draws, DropReason.DRAWS_FAILED, f"every keep draw failed: {tried}")
        if draws:
            tried = ", ".join(f"{d.resolution}/t={d.num_frames}" for d in draws)
            return Assignment(None, draws, DropReason.KEEP_PROB_ZERO,
                              f"only keep_prob 0 entries fit and they block the sample: {tried}")
        if not reached:
            smallest = self.resolutions[-1]
            need = math.ceil(self.tables[smallest].pixels * MIN_PIXEL_FRACTION)
            return Assignment(None, draws, DropReason.TOO_SMALL,
                              f"{height}x{width} = {height * width} px, the smallest budget ({smallest}: "
                              f"{self.tables[smallest].pixels} px) needs >= {need} px")
        reach = ", ".join(reached)
        if num_frames == 1:
            return Assignment(None, draws, DropReason.NO_IMAGE_BUCKET, f"reaches {reach}; none has a t=1 entry")
        video_ts = [t for res in reached for t in self.config[res] if t != 1]
        if not video_ts:
            return Assignment(None, draws, DropReason.NO_VIDEO_BUCKET, f"reaches {reach}; none has a t>1 entry")
        need = min(video_ts) * frame_interval
        return Assignment(None, draws, DropReason.TOO_FEW_FRAMES,
                          f"has {num_frames} frames, needs > {need} (t={min(video_ts)} x frame_interval "
                          f"{frame_interval})")

    def get_bucket_id(
        self, num_frames: int, height: int, width: int, frame_interval: int, seed: int
    ) -> BucketId | None:
        """``(resolution, t, aspect_ratio_key)`` of a sample, or None when it sits out this epoch."""
        return self.assign(num_frames, height, width, frame_interval, seed).bucket_id

    def get_batch_size(self, bucket_id: BucketId) -> int | None:
        """Per-GPU batch size of a bucket."""
        res, t, _ = bucket_id
        return self.config[res][t].batch_size

    def get_thw(self, bucket_id: BucketId) -> tuple[int, int, int]:
        """``(t, H, W)`` a sample of this bucket is loaded, resized and centre-cropped to."""
        res, t, ar_key = bucket_id
        height, width = self.tables[res].ratios[ar_key]
        return t, height, width


# ---------------------------------------------------------------------------------------------------------------------
# Reading metadata
# ---------------------------------------------------------------------------------------------------------------------


def _column_to_list(column: Any) -> list[Any]:
    if hasattr(column, "to_list"):  # polars Series
        return column.to_list()
    if hasattr(column, "tolist"):  # pandas Series, numpy array
        return column.tolist()
    return list(column)


def _as_count(value: Any) -> int:
    """A frame count or size as int; -1 (invalid) for missing, NaN, non-integral or non-numeric values."""
    if value is None or isinstance(value, bool):
        return -1
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return -1
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != int(value):
            return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def read_metadata(rows: Any) -> tuple[list[int], list[int], list[int]]:
    """``(num_frames, heights, widths)`` of a training table: a polars/pandas DataFrame or a sequence of dicts.

    Raises ``ValueError`` naming the expected columns when one is missing. Bad values become -1 (reported as
    invalid metadata, never crash the epoch).
    """
    hint = ("bucketing needs the columns num_frames, height, width (the original file's frame count and size, as "
            "written by the info step of the Open-Sora CSV)")
    if hasattr(rows, "columns"):
        present = [str(c) for c in rows.columns]
        missing = [c for c in METADATA_COLUMNS if c not in present]
        if missing:
            raise ValueError(f"{hint}; missing: {', '.join(missing)}; present: {', '.join(present) or '(none)'}")
        columns = [_column_to_list(rows[c]) for c in METADATA_COLUMNS]
    else:
        rows = list(rows)
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"{hint}; row {i} is a {type(row).__name__}, not a mapping")
            missing = [c for c in METADATA_COLUMNS if c not in row]
            if missing:
                raise ValueError(f"{hint}; row {i} is missing: {', '.join(missing)}; it has: "
                                 f"{', '.join(map(str, row)) or '(nothing)'}")
        columns = [[row[c] for row in rows] for c in METADATA_COLUMNS]
    num_frames, heights, widths = ([_as_count(v) for v in col] for col in columns)
    return num_frames, heights, widths


def assign_rows(
    rows: Any, bucket: Bucket, frame_interval: int, seed: int, epoch: int
) -> list[Assignment]:
    """Assignment of every row of a training table for one epoch (row position = sample id)."""
    num_frames, heights, widths = read_metadata(rows)
    return [
        bucket.assign(t, h, w, frame_interval, bucket_seed(seed, epoch, i, bucket.num_bucket))
        for i, (t, h, w) in enumerate(zip(num_frames, heights, widths))
    ]

