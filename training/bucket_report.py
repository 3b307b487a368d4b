"""The bucket report: where the rows of a training table go in one epoch and why the others are dropped, per
preset (``bucket_coverage``) and from the command line (``opensora-dag buckets``).

It uses exactly the assignment of ``training.buckets`` (same seeds), so its counts are the epoch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from training.bucket_presets import BUCKET_PRESETS, load_bucket_preset
from training.buckets import Bucket, BucketId, DropReason, assign_rows

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
# Coverage of the training presets
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


# ---------------------------------------------------------------------------------------------------------------------
# Command line: opensora-dag buckets
# ---------------------------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """The arguments of ``opensora-dag buckets``."""
    parser.add_argument("dataset", help="a .parquet / .csv table or a dataset version folder")
    parser.add_argument("--preset", default="stage1", help=f"bucket preset ({', '.join(BUCKET_PRESETS)}) or a YAML path")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")


def main(argv: list[str] | None = None) -> int:
    """``python -m training.bucket_report``: the arguments of ``opensora-dag buckets``."""
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
