"""Multi-resolution training buckets of Open-Sora v1.1: bucket tables, assignment, presets and the bucket report.

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

``bucket_report`` explains where every row went (and why dropped rows were dropped), so "0 samples" is never a
mystery. ``training.sampler.VariableVideoBatchSampler`` turns the assignment into per-rank batches for a DataLoader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from training.aspect import ASPECT_RATIOS, AspectTable, get_closest_ratio

PRESETS_DIR = Path(__file__).parent / "presets"

# Bucket presets shipped with the repo: name -> YAML file. The names double as CLI / launchpad choices.
BUCKET_PRESETS: dict[str, Path] = {
    "stage1": PRESETS_DIR / "buckets_stage1.yaml",
    "stage2": PRESETS_DIR / "buckets_stage2.yaml",
    "stage3": PRESETS_DIR / "buckets_stage3.yaml",
    "demo_cpu": PRESETS_DIR / "buckets_demo_cpu.yaml",
}

# The columns of the training table (Open-Sora CSV / Parquet) that bucketing reads: the original file's frame count
# and size, before any resizing.
METADATA_COLUMNS = ("num_frames", "height", "width")

# The reference keeps a resolution when H * W >= 0.8 * its pixel budget.
MIN_PIXEL_FRACTION = 0.8


class BucketEntry(NamedTuple):
    """One ``bucket_config[res][t]`` entry. ``batch_size`` is per GPU; ``None`` only where ``keep_prob`` is 0."""

    keep_prob: float
    batch_size: int | None


BucketConfig = dict[str, dict[int, BucketEntry]]
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
# Config validation and presets
# ---------------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate_bucket_config(
    bucket_config: Mapping[Any, Any], aspect_ratios: Mapping[str, AspectTable] | None = None
) -> BucketConfig:
    """Check a ``{resolution: {t: (keep_prob, batch_size)}}`` mapping and return it normalised.

    Accepts what YAML and JSON give: integer resolution names (``256``) and string frame counts (``"16"``) are
    converted. Raises ``ValueError`` naming the offending entry for anything else.
    """
    tables = ASPECT_RATIOS if aspect_ratios is None else aspect_ratios
    if not isinstance(bucket_config, Mapping) or not bucket_config:
        raise ValueError(f"bucket_config must be a non-empty mapping resolution -> {{t: [keep_prob, batch_size]}}, "
                         f"got {bucket_config!r}")
    out: BucketConfig = {}
    for raw_res, entries in bucket_config.items():
        res = str(raw_res)
        if res in out:
            raise ValueError(f"bucket_config names resolution {res!r} twice")
        if res not in tables:
            raise ValueError(f"bucket_config: unknown resolution {res!r}; known: {', '.join(tables)}")
        if not isinstance(entries, Mapping) or not entries:
            raise ValueError(f"bucket_config[{res!r}] must be a non-empty mapping t -> [keep_prob, batch_size], "
                             f"got {entries!r}")
        out[res] = {}
        for raw_t, value in entries.items():
            where = f"bucket_config[{res!r}][{raw_t!r}]"
            if isinstance(raw_t, str) and raw_t.strip().isdigit():
                t = int(raw_t)
            elif isinstance(raw_t, (int, np.integer)) and not isinstance(raw_t, bool):
                t = int(raw_t)
            else:
                raise ValueError(f"{where}: the frame count must be a positive integer")
            if t < 1:
                raise ValueError(f"{where}: the frame count must be >= 1 (1 = images)")
            if t in out[res]:
                raise ValueError(f"{where}: frame count {t} appears twice")
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
                raise ValueError(f"{where}: expected [keep_prob, batch_size], got {value!r}")
            keep_prob, batch_size = value
            if not _is_number(keep_prob) or not 0.0 <= float(keep_prob) <= 1.0:
                raise ValueError(f"{where}: keep_prob must be a number in [0, 1], got {keep_prob!r}")
            if batch_size is None:
                if float(keep_prob) != 0.0:
                    raise ValueError(f"{where}: keep_prob {keep_prob} needs a batch size (None is only allowed "
                                     f"with keep_prob 0)")
            elif not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
                raise ValueError(f"{where}: batch_size must be a positive integer or null, got {batch_size!r}")
            out[res][t] = BucketEntry(float(keep_prob), None if batch_size is None else int(batch_size))
    return out


@dataclass(frozen=True, kw_only=True)
class BucketPreset:
    """A named bucket setup: the bucket table plus the two numbers the assignment depends on."""

    name: str
    """Preset name (file ``buckets_<name>.yaml``)."""
    bucket_config: BucketConfig
    """resolution -> {t: (keep_prob, per-GPU batch size)}."""
    frame_interval: int = 3
    """Dataset frame interval: a video fits bucket t when it has more than t * frame_interval frames."""
    seed: int = 42
    """Training seed; the keep draws are seeded from it."""
    description: str = ""


_PRESET_KEYS = {"name", "description", "frame_interval", "seed", "bucket_config"}


def load_bucket_preset(name_or_path: str | Path) -> BucketPreset:
    """Load a preset by name (``stage1``, ``stage2``, ``stage3``, ``demo_cpu``) or from a YAML file path."""
    import yaml

    key = str(name_or_path).replace("-", "_")
    if key in BUCKET_PRESETS:
        path = BUCKET_PRESETS[key]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"unknown bucket preset {str(name_or_path)!r}: not one of {', '.join(BUCKET_PRESETS)} "
                             f"and not a YAML file")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(_PRESET_KEYS)}")
    unknown = set(data) - _PRESET_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_PRESET_KEYS)}")
    if "bucket_config" not in data:
        raise ValueError(f"{path}: missing 'bucket_config'")
    frame_interval = data.get("frame_interval", 3)
    if not isinstance(frame_interval, int) or isinstance(frame_interval, bool) or frame_interval < 1:
        raise ValueError(f"{path}: frame_interval must be a positive integer, got {frame_interval!r}")
    seed = data.get("seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{path}: seed must be an integer, got {seed!r}")
    try:
        config = validate_bucket_config(data["bucket_config"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return BucketPreset(
        name=str(data.get("name", path.stem.removeprefix("buckets_"))),
        description=str(data.get("description", "")),
        frame_interval=frame_interval,
        seed=seed,
        bucket_config=config,
    )


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


# ---------------------------------------------------------------------------------------------------------------------
# Bucket report
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class BucketReport:
    """Where the rows of a training table go in one epoch, and why the others are left out."""

    num_rows: int
    epoch: int
    seed: int
    frame_interval: int
    num_bucket: int
    bucket_samples: dict[BucketId, int]
    """Samples per bucket, in resolution try order, then t descending, then aspect-key table order."""
    batch_sizes: dict[BucketId, int]
    thw: dict[BucketId, tuple[int, int, int]]
    dropped: dict[DropReason, int]
    """Dropped rows per reason, most frequent first."""
    examples: dict[DropReason, list[str]]
    """A few dropped rows per reason, e.g. ``row 7: has 20 frames, needs > 48 (...)``."""

    @property
    def num_kept(self) -> int:
        return sum(self.bucket_samples.values())

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def by_resolution_frames(self) -> dict[tuple[str, int], int]:
        """Samples per (resolution, t), summed over aspect ratios, in the same order as ``bucket_samples``."""
        out: dict[tuple[str, int], int] = {}
        for (res, t, _), n in self.bucket_samples.items():
            out[(res, t)] = out.get((res, t), 0) + n
        return out

    def full_batches(self, bucket_id: BucketId) -> int:
        """Batches of the bucket with ``drop_last=True`` (the sampler pads the last one otherwise)."""
        return self.bucket_samples[bucket_id] // self.batch_sizes[bucket_id]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for asset metadata or a file beside the dataset version)."""
        return {
            "num_rows": self.num_rows,
            "num_kept": self.num_kept,
            "num_dropped": self.num_dropped,
            "epoch": self.epoch,
            "seed": self.seed,
            "frame_interval": self.frame_interval,
            "num_bucket": self.num_bucket,
            "buckets": [
                {
                    "resolution": res,
                    "num_frames": t,
                    "aspect_ratio": ar,
                    "thw": list(self.thw[(res, t, ar)]),
                    "samples": n,
                    "batch_size": self.batch_sizes[(res, t, ar)],
                    "full_batches": self.full_batches((res, t, ar)),
                    "batches": math.ceil(n / self.batch_sizes[(res, t, ar)]),
                }
                for (res, t, ar), n in self.bucket_samples.items()
            ],
            "by_resolution_frames": [
                {"resolution": res, "num_frames": t, "samples": n}
                for (res, t), n in self.by_resolution_frames().items()
            ],
            "dropped": {str(reason): n for reason, n in self.dropped.items()},
            "drop_examples": {str(reason): list(ex) for reason, ex in self.examples.items()},
        }

    def to_markdown(self) -> str:
        lines = [
            f"**Buckets, epoch {self.epoch}** (seed {self.seed}, frame_interval {self.frame_interval}): "
            f"{self.num_kept} of {self.num_rows} rows kept in {len(self.bucket_samples)} buckets, "
            f"{self.num_dropped} dropped.",
            "",
        ]
        if self.num_rows == 0:
            lines.append("The table has no rows.")
        elif self.num_kept == 0:
            top, n = next(iter(self.dropped.items()))
            lines.append(f"**No row fits any bucket.** Main reason: {top} ({n} of {self.num_rows}), "
                         f"e.g. {self.examples[top][0]}.")
            lines.append("")
        if self.bucket_samples:
            lines += ["| resolution | t | samples |", "|---|---:|---:|"]
            lines += [f"| {res} | {t} | {n} |" for (res, t), n in self.by_resolution_frames().items()]
            lines.append("")
            lines += [
                "| resolution | t | aspect | T x H x W | samples | batch size | batches (full ones) |",
                "|---|---:|---:|---|---:|---:|---:|",
            ]
            for (res, t, ar), n in self.bucket_samples.items():
                bid = (res, t, ar)
                bs = self.batch_sizes[bid]
                thw = "x".join(map(str, self.thw[bid]))
                lines.append(f"| {res} | {t} | {ar} | {thw} | {n} | {bs} | {math.ceil(n / bs)} "
                             f"({self.full_batches(bid)}) |")
            lines.append("")
        if self.dropped:
            lines += ["| dropped because | rows | example |", "|---|---:|---|"]
            for reason, n in self.dropped.items():
                example = self.examples[reason][0] if self.examples[reason] else ""
                lines.append(f"| {reason} | {n} | {example} |")
            lines.append("")
        return "\n".join(lines)


def bucket_report(
    rows: Any, bucket: Bucket, frame_interval: int, seed: int, epoch: int = 0, max_examples: int = 3
) -> BucketReport:
    """Count the rows of a training table per bucket for ``epoch`` and explain every dropped row.

    Uses exactly the assignment the sampler will make for that epoch (same seeds), so the counts are the epoch's.
    """
    assignments = assign_rows(rows, bucket, frame_interval, seed, epoch)
    counts: dict[BucketId, int] = {}
    dropped: dict[DropReason, int] = {}
    examples: dict[DropReason, list[str]] = {}
    for i, a in enumerate(assignments):
        if a.bucket_id is not None:
            counts[a.bucket_id] = counts.get(a.bucket_id, 0) + 1
            continue
        assert a.reason is not None
        dropped[a.reason] = dropped.get(a.reason, 0) + 1
        ex = examples.setdefault(a.reason, [])
        if len(ex) < max_examples:
            ex.append(f"row {i}: {a.detail}")
    # Stable, readable order: resolution try order, then t descending, then aspect key in table order.
    res_rank = {res: k for k, res in enumerate(bucket.resolutions)}

    def order(bid: BucketId) -> tuple[int, int, int]:
        res, t, ar = bid
        return res_rank[res], -t, list(bucket.tables[res].ratios).index(ar)

    ordered = {bid: counts[bid] for bid in sorted(counts, key=order)}
    batch_sizes: dict[BucketId, int] = {}
    for bid in ordered:
        bs = bucket.get_batch_size(bid)
        assert bs is not None, "a kept sample always has a batch size (only keep_prob 0 entries have None)"
        batch_sizes[bid] = bs
    dropped = dict(sorted(dropped.items(), key=lambda kv: -kv[1]))
    return BucketReport(
        num_rows=len(assignments),
        epoch=epoch,
        seed=seed,
        frame_interval=frame_interval,
        num_bucket=bucket.num_bucket,
        bucket_samples=ordered,
        batch_sizes=batch_sizes,
        thw={bid: bucket.get_thw(bid) for bid in ordered},
        dropped=dropped,
        examples={reason: examples[reason] for reason in dropped},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Batch sampler
# ---------------------------------------------------------------------------------------------------------------------


def training_bucket_presets() -> list[str]:
    """The bucket presets the training presets train with (``data.bucket_preset`` of each), in preset order."""
    from training.config import TRAIN_PRESETS, load_train_config

    names: list[str] = []
    for preset in TRAIN_PRESETS:
        name = load_train_config(preset).data.bucket_preset
        if name not in names:
            names.append(name)
    return names


def bucket_coverage(rows, presets: Sequence[str] | None = None) -> str:
    """Markdown: how a dataset's clips fall into each training preset's buckets (so "0 samples" is never a surprise).

    ``presets``: bucket preset names; default those the training presets use (:func:`training_bucket_presets`)."""
    if not len(rows):
        return "_(empty dataset)_"
    lines = []
    for name in presets if presets is not None else training_bucket_presets():
        preset = load_bucket_preset(name)
        report = bucket_report(rows, Bucket(preset.bucket_config), preset.frame_interval, preset.seed)
        lines.append(f"### buckets `{name}`: {report.num_kept} kept, {report.num_dropped} dropped\n")
        lines.append(report.to_markdown())
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """The arguments of ``opensora-dag buckets``."""
    parser.add_argument("dataset", help="a .parquet / .csv table or a dataset version folder")
    parser.add_argument("--preset", default="stage1", help=f"bucket preset ({', '.join(BUCKET_PRESETS)}) or a YAML path")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")


def main(argv: list[str] | None = None) -> int:
    """``python -m training.buckets``: the arguments of ``opensora-dag buckets``."""
    import argparse

    parser = argparse.ArgumentParser(prog="opensora-dag buckets", description="Bucket report of a training table.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    """``opensora-dag buckets DATASET [--preset NAME] [--epoch E] [--json]``: where every row lands, and why not."""
    import json

    from training.data import load_rows

    try:
        preset = load_bucket_preset(args.preset)
        rows = load_rows(args.dataset)
        report = bucket_report(rows, Bucket(preset.bucket_config), preset.frame_interval, preset.seed, epoch=args.epoch)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_markdown())
    return 0
