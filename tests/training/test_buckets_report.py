"""Bucket report counts and drop reasons; bucket config and preset validation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import polars as pl
import pytest

from training.bucket_presets import load_bucket_preset, validate_bucket_config
from training.bucket_report import bucket_report
from training.buckets import Bucket, DropReason, bucket_seed, read_metadata

STAGE1 = {
    "144p": {1: (0.5, 48), 16: (1.0, 6), 32: (1.0, 3), 96: (1.0, 1)},
    "256": {1: (0.5, 24), 16: (0.5, 3), 48: (0.5, 1), 64: (0.0, None)},
    "240p": {16: (0.3, 2), 32: (0.3, 1), 64: (0.0, None)},
    "512": {1: (0.4, 12)},
    "1024": {1: (0.3, 3)},
}


def _row(t, h, w, **extra):
    return {"path": f"clip_{t}_{h}x{w}.mp4", "text": "a clip", "num_frames": t, "height": h, "width": w, **extra}


def test_report_on_crafted_rows():
    bucket = Bucket(STAGE1)
    rows = [
        _row(20, 720, 1280),  # 0: video too short for t=16 x FI 3 anywhere
        _row(100, 64, 64),  # 1: 4096 px < 0.8 x 36864
        _row(100, 144, 256),  # 2: 144p, t=32, keep_prob 1: always kept
        _row(49, 144, 256),  # 3: 144p, t=16 (49 > 48, strict)
        _row(48, 144, 256),  # 4: 48 frames: needs > 48
        _row(float("nan"), 144, 256),  # 5: missing metadata
        _row(300, 192, 192),  # 6: 144p t=96, square
        _row(0, 144, 256),  # 7: 0 frames
    ]
    report = bucket_report(rows, bucket, frame_interval=3, seed=42, epoch=0)
    assert report.num_rows == 8
    assert report.num_kept == 3
    assert report.bucket_samples == {("144p", 96, "1.00"): 1, ("144p", 32, "0.56"): 1, ("144p", 16, "0.56"): 1}
    assert report.dropped == {DropReason.TOO_FEW_FRAMES: 2, DropReason.INVALID_METADATA: 2, DropReason.TOO_SMALL: 1}
    too_few = report.examples[DropReason.TOO_FEW_FRAMES]
    assert too_few[0].startswith("row 0: has 20 frames, needs > 48")
    assert too_few[1].startswith("row 4: has 48 frames, needs > 48")
    assert "row 1: 64x64 = 4096 px" in report.examples[DropReason.TOO_SMALL][0]
    assert "144p: 36864 px) needs >= 29492 px" in report.examples[DropReason.TOO_SMALL][0]
    assert report.batch_sizes[("144p", 32, "0.56")] == 3
    assert report.thw[("144p", 32, "0.56")] == (32, 144, 256)
    assert report.by_resolution_frames() == {("144p", 96): 1, ("144p", 32): 1, ("144p", 16): 1}

    d = report.to_dict()
    json.dumps(d)  # JSON-friendly
    assert d["num_kept"] == 3 and d["num_dropped"] == 5
    assert d["dropped"]["too few frames for any t"] == 2
    assert d["buckets"][0] == {
        "resolution": "144p", "num_frames": 96, "aspect_ratio": "1.00", "thw": [96, 192, 192],
        "samples": 1, "batch_size": 1, "full_batches": 1, "batches": 1,
    }
    md = report.to_markdown()
    assert "3 of 8 rows kept in 3 buckets, 5 dropped" in md
    assert "| too few frames for any t | 2 | row 0: has 20 frames, needs > 48" in md
    assert "| 144p | 32 | 0.56 | 32x144x256 | 1 | 3 | 1 (0) |" in md


def test_keep_prob_zero_and_no_image_bucket():
    bucket = Bucket({"240p": {16: (1.0, 2), 64: (0.0, None)}, "144p": {1: (1.0, 4)}})
    rows = [
        _row(200, 240, 426),  # caught by the 240p t=64 blocker; 144p has no video bucket
        _row(1, 240, 426),  # image: 240p has no t=1, 144p does (keep_prob 1, still drawn)
        _row(100, 240, 426),  # 240p t=16
    ]
    report = bucket_report(rows, bucket, frame_interval=3, seed=0)
    assert report.dropped == {DropReason.KEEP_PROB_ZERO: 1}
    assert "240p/t=64" in report.examples[DropReason.KEEP_PROB_ZERO][0]
    assert report.bucket_samples == {("240p", 16, "0.56"): 1, ("144p", 1, "0.56"): 1}

    only_video = Bucket({"144p": {16: (1.0, 2)}})
    report = bucket_report([_row(1, 240, 426)], only_video, frame_interval=3, seed=0)
    assert report.dropped == {DropReason.NO_IMAGE_BUCKET: 1}
    only_image = Bucket({"144p": {1: (1.0, 2)}})
    report = bucket_report([_row(60, 240, 426)], only_image, frame_interval=3, seed=0)
    assert report.dropped == {DropReason.NO_VIDEO_BUCKET: 1}


def test_draw_failures_counted_like_an_independent_draw():
    bucket = Bucket({"144p": {16: (0.5, 2)}})
    n = 200
    rows = pl.DataFrame({"num_frames": [60] * n, "height": [144] * n, "width": [256] * n})
    report = bucket_report(rows, bucket, frame_interval=3, seed=7, epoch=2)
    # One (res, t) pair: offset 0, so the draw for row i is default_rng(bucket_seed(...)).random().
    kept = sum(np.random.default_rng(bucket_seed(7, 2, i, bucket.num_bucket)).random() < 0.5 for i in range(n))
    assert report.num_kept == kept
    assert report.dropped == {DropReason.DRAWS_FAILED: n - kept}
    assert "144p/t=16 (p=0.5, u=" in report.examples[DropReason.DRAWS_FAILED][0]
    assert 60 < kept < 140


def test_zero_kept_is_explained():
    report = bucket_report([_row(10, 720, 1280)] * 5, Bucket(STAGE1), frame_interval=3, seed=42)
    assert report.num_kept == 0
    md = report.to_markdown()
    assert "**No row fits any bucket.** Main reason: too few frames for any t (5 of 5)" in md
    assert "has 10 frames, needs > 48" in md
    assert "no rows" in bucket_report([], Bucket(STAGE1), 3, 42).to_markdown()


def test_missing_columns_name_the_expected_ones():
    bucket = Bucket(STAGE1)
    expected = r"num_frames, height, width.*missing: height, width; present: path, num_frames"
    with pytest.raises(ValueError, match=expected):
        bucket_report(pl.DataFrame({"path": ["a.mp4"], "num_frames": [10]}), bucket, 3, 42)
    with pytest.raises(ValueError, match=r"row 1 is missing: width"):
        bucket_report([_row(10, 10, 10), {"num_frames": 3, "height": 4}], bucket, 3, 42)


def test_metadata_from_polars_pandas_and_dicts_agree():
    meta = {"num_frames": [100, 1, 7], "height": [240, 512, 1080], "width": [426, 512, 1920]}
    as_dicts = [dict(zip(meta, v)) for v in zip(*meta.values())]
    want = ([100, 1, 7], [240, 512, 1080], [426, 512, 1920])
    assert read_metadata(pl.DataFrame(meta)) == want
    assert read_metadata(pd.DataFrame(meta)) == want
    assert read_metadata(as_dicts) == want
    # floats from a CSV with missing values, strings from an untyped read
    assert read_metadata([{"num_frames": 12.0, "height": "240", "width": None}]) == ([12], [240], [-1])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "non-empty mapping"),
        ({"999p": {16: (1.0, 2)}}, "unknown resolution '999p'"),
        ({"240p": {}}, r"bucket_config\['240p'\] must be a non-empty mapping"),
        ({"240p": {0: (1.0, 2)}}, "must be >= 1"),
        ({"240p": {"x": (1.0, 2)}}, "positive integer"),
        ({"240p": {16: (1.5, 2)}}, "keep_prob must be a number in"),
        ({"240p": {16: (0.5, None)}}, "needs a batch size"),
        ({"240p": {16: (0.5, 0)}}, "batch_size must be a positive integer"),
        ({"240p": {16: 0.5}}, r"expected \[keep_prob, batch_size\]"),
        ({"240p": {16: (1.0, 2), "16": (1.0, 2)}}, "appears twice"),
    ],
)
def test_config_validation_errors(config, message):
    with pytest.raises(ValueError, match=message):
        validate_bucket_config(config)


def test_config_normalisation():
    cfg = validate_bucket_config({256: {"16": [0.5, 3], 64: [0, None]}})
    assert cfg == {"256": {16: (0.5, 3), 64: (0.0, None)}}


def test_preset_loading(tmp_path):
    demo = load_bucket_preset("demo-cpu")
    assert demo.name == "demo_cpu" and demo.frame_interval == 2
    bucket = Bucket(demo.bucket_config)
    assert bucket.resolutions == ["128px", "64px"]
    # a synthetic 128x128 clip of 40 frames: t=8 at 128px (drawn at 0.5) or t=16 at 64px
    assert bucket.get_bucket_id(40, 128, 128, 2, 0)[1:] in {(8, "1.00"), (16, "1.00")}
    assert bucket.get_bucket_id(40, 64, 64, 2, 0) == ("64px", 16, "1.00")

    bad = tmp_path / "bad.yaml"
    bad.write_text("bucket_config:\n  240p: {16: [0.5, null]}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: bucket_config\['240p'\]\[16\]: keep_prob 0.5 needs a batch size"):
        load_bucket_preset(bad)
    bad.write_text("bucket_confg: {}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_bucket_preset(bad)
    with pytest.raises(ValueError, match="unknown bucket preset 'stage9'"):
        load_bucket_preset("stage9")
    good = tmp_path / "mine.yaml"
    good.write_text("frame_interval: 1\nbucket_config:\n  '256': {1: [1.0, 4]}\n")
    preset = load_bucket_preset(good)
    assert preset.name == "mine" and preset.seed == 42 and preset.bucket_config == {"256": {1: (1.0, 4)}}
