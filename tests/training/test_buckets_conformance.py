"""Bucket assignment equals Open-Sora v1.1.0's on every golden case (bucket, batch size, thw and the draws made)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from training.bucket_presets import BUCKET_PRESETS, load_bucket_preset
from training.buckets import Bucket, bucket_seed
from training.sampler import VariableVideoBatchSampler

STAGES = ("stage1", "stage2", "stage3")


@pytest.fixture(scope="module")
def golden_configs(conformance_dir):
    return json.loads((conformance_dir / "buckets" / "bucket_configs.json").read_text())["stages"]


def _golden_cases(conformance_dir, stage):
    return json.loads((conformance_dir / "buckets" / f"assignments_{stage}.json").read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_presets_equal_reference_configs(golden_configs, stage):
    preset = load_bucket_preset(stage)
    want = golden_configs[stage]
    got = {res: {str(t): [e.keep_prob, e.batch_size] for t, e in d.items()} for res, d in preset.bucket_config.items()}
    assert got == want["bucket_config"]
    assert preset.frame_interval == want["dataset_frame_interval"]
    assert preset.seed == want["train_seed"]


@pytest.mark.parametrize("stage", STAGES)
def test_derived_orders_offsets_num_bucket(golden_configs, stage):
    bucket = Bucket(load_bucket_preset(stage).bucket_config)
    derived = golden_configs[stage]["derived"]
    assert bucket.resolutions == derived["resolution_try_order"]
    assert bucket.num_frames_order == derived["num_frames_try_order"]
    assert {r: {str(t): o for t, o in d.items()} for r, d in bucket.seed_offset.items()} == derived["hw_t_seed_offset"]
    assert bucket.num_bucket == derived["num_bucket"]
    assert {r: bucket.pixels(r) for r in bucket.resolutions} == derived["pixels"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_golden_assignment(conformance_dir, stage):
    fx = _golden_cases(conformance_dir, stage)
    bucket = Bucket(load_bucket_preset(stage).bucket_config)
    assert bucket.num_bucket == fx["num_bucket"]
    kept = 0
    for c in fx["cases"]:
        seed = bucket_seed(fx["train_seed"], c["epoch"], c["sample_id"], bucket.num_bucket)
        assert seed == c["bucket_seed"]
        a = bucket.assign(c["num_frames"], c["height"], c["width"], c["frame_interval"], seed)
        # The draws first: on a mismatch they show whether the pixel test, frame rule, seed or stream is off.
        got_draws = [d._asdict() for d in a.draws]
        assert got_draws == c["draws"], c
        got = None if a.bucket_id is None else [a.bucket_id[0], a.bucket_id[1], a.bucket_id[2]]
        assert got == c["bucket"], c
        assert bucket.get_bucket_id(c["num_frames"], c["height"], c["width"], c["frame_interval"], seed) == (
            None if got is None else tuple(got)
        )
        if a.bucket_id is None:
            assert c["batch_size"] is None and c["thw"] is None
            assert a.reason is not None and a.detail
        else:
            kept += 1
            assert bucket.get_batch_size(a.bucket_id) == c["batch_size"]
            assert list(bucket.get_thw(a.bucket_id)) == c["thw"]
    assert kept == {"stage1": 302, "stage2": 325, "stage3": 325}[stage]


def test_keep_draw_stream(conformance_dir):
    """The 1,525 distinct (seed, u) pairs of the fixtures are numpy default_rng(seed).random()."""
    pairs = {
        (d["seed"], d["u"])
        for stage in STAGES
        for c in _golden_cases(conformance_dir, stage)["cases"]
        for d in c["draws"]
        if d["u"] is not None
    }
    assert len(pairs) == 1525
    for seed, u in pairs:
        assert np.random.default_rng(seed).random() == u


@pytest.mark.parametrize("stage", STAGES)
def test_sampler_grouping_matches_golden(conformance_dir, stage):
    """The README's sampler-level check: row sample_id of a padded table lands in the golden bucket for its epoch."""
    fx = _golden_cases(conformance_dir, stage)
    preset = load_bucket_preset(stage)
    bucket = Bucket(preset.bucket_config)
    by_epoch: dict[int, dict[int, dict]] = {}
    for c in fx["cases"]:
        if c["sample_id"] < 5000:  # keep the padded tables small
            by_epoch.setdefault(c["epoch"], {}).setdefault(c["sample_id"], c)
    checked = 0
    for epoch, cases in by_epoch.items():
        n = max(cases) + 1
        meta = {"num_frames": [2] * n, "height": [2] * n, "width": [2] * n}  # 2x2 padding never fits a bucket
        for i, c in cases.items():
            meta["num_frames"][i], meta["height"][i], meta["width"][i] = c["num_frames"], c["height"], c["width"]
        sampler = VariableVideoBatchSampler(pl.DataFrame(meta), bucket, preset.frame_interval, seed=fx["train_seed"])
        sampler.set_epoch(epoch)
        where = {i: bid for bid, rows in sampler.group_by_bucket().items() for i in rows}
        assert set(where) <= set(cases)
        for i, c in cases.items():
            got = where.get(i)
            assert (None if got is None else list(got)) == c["bucket"], c
            checked += 1
    assert checked >= 180


def test_preset_names():
    assert set(BUCKET_PRESETS) == {"stage1", "stage2", "stage3", "demo_cpu"}
    for path in BUCKET_PRESETS.values():
        assert path.is_file()
