"""The resolution tables in the repo equal the reference's, and the nearest-ratio lookup matches all 3,300 answers."""

from __future__ import annotations

import json

import pytest

from training.aspect import (
    ASPECT_RATIOS,
    DEMO_ASPECT_RATIOS,
    REFERENCE_ASPECT_RATIOS,
    get_closest_ratio,
    get_image_size,
)


@pytest.fixture(scope="module")
def golden_tables(conformance_dir):
    return json.loads((conformance_dir / "buckets" / "aspect_ratios.json").read_text())["resolutions"]


def test_reference_tables_equal_golden(golden_tables):
    assert list(REFERENCE_ASPECT_RATIOS) == list(golden_tables)
    for name, want in golden_tables.items():
        table = REFERENCE_ASPECT_RATIOS[name]
        assert table.pixels == want["pixels"], name
        # Key order decides ties, so compare it too (4k lists "0.62" before "0.56").
        assert list(table.ratios) == want["ratio_keys_in_order"], name
        assert {k: list(v) for k, v in table.ratios.items()} == want["ratios"], name


def test_table_sizes():
    for name in ("144p", "240p", "360p", "480p", "720p", "1080p", "4k"):
        assert len(REFERENCE_ASPECT_RATIOS[name].ratios) == 17
    for name in ("256", "512", "1024"):
        assert len(REFERENCE_ASPECT_RATIOS[name].ratios) == 40
    assert set(ASPECT_RATIOS) == set(REFERENCE_ASPECT_RATIOS) | set(DEMO_ASPECT_RATIOS)


def test_closest_ratio_all_golden_cases(conformance_dir):
    cases = json.loads((conformance_dir / "buckets" / "closest_ratio_cases.json").read_text())
    checked = 0
    for res, keys in cases["results"].items():
        ratios = ASPECT_RATIOS[res].ratios
        for (h, w), want in zip(cases["hw"], keys, strict=True):
            assert get_closest_ratio(h, w, ratios) == want, (res, h, w)
            checked += 1
    assert checked == 3300


def test_closest_ratio_float_rounding_and_ties():
    p = ASPECT_RATIOS["240p"].ratios
    assert get_closest_ratio(7, 8, p) == "0.75"  # exact float tie between 0.75 and 1.00: earlier key wins
    assert get_closest_ratio(91, 200, p) == "0.48"  # 0.455: float rounding, not a tie
    assert get_closest_ratio(81, 200, p) == "0.43"
    assert get_closest_ratio(1, 1000, p) == "0.38"  # clamps to the ends
    assert get_closest_ratio(1000, 1, ASPECT_RATIOS["256"].ratios) == "4.0"


def test_demo_tables_are_vae_and_patch_friendly():
    for name, table in DEMO_ASPECT_RATIOS.items():
        for key, (h, w) in table.ratios.items():
            assert h % 16 == 0 and w % 16 == 0, (name, key)
            assert abs(h / w - float(key)) < 0.05, (name, key)
            assert 0.7 * table.pixels <= h * w <= 1.25 * table.pixels, (name, key)
        # the table's own sizes map back to their key
        for key, (h, w) in table.ratios.items():
            assert get_closest_ratio(h, w, table.ratios) == key


def test_get_image_size_errors():
    assert get_image_size("240p", "0.56") == (240, 426)
    with pytest.raises(KeyError, match="unknown resolution"):
        get_image_size("999p", "1.00")
    with pytest.raises(KeyError, match="no aspect-ratio key"):
        get_image_size("240p", "1.0")
