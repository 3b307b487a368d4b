"""The curated dataset builder on a crafted input where every clip's fate is known in advance."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest
from pydantic import ValidationError

from curation import datasets
from curation.dataset_selection import DROP_ORDER
from curation.datasets import CSV_COLUMNS, build_dataset, dataset_version
from curation.filters import PRESETS, FilterSpec

SPEC = FilterSpec(
    min_frames=16, max_frames=200, min_resolution=240 * 426, max_resolution=1080 * 1920,
    fpsmin=15, fpsmax=60, aesmin=5.0, flowmin=0.5, flowmax=20.0, ocrmax=3, matchmin=20.0,
)  # fmt: skip
INPUTS = {"clips": "v1", "aesthetic_scores": "v1", "motion_scores": "v1", "ocr_scores": "v1", "captions": "v1",
          "match_scores": "v1"}  # fmt: skip

# id -> (what it is built to fail, overrides of a clip that passes everything). Order = clip table order.
CASES = {
    "keep0": (None, {}),
    "nocap": ("no caption", {"text": None, "num_frames": 5}),  # also too short: counted at the first check
    "blank": ("no caption", {"text": "   "}),
    "short": ("min_frames", {"num_frames": 5, "aes": 1.0}),
    "long": ("max_frames", {"num_frames": 500}),
    "tiny": ("min_resolution", {"height": 144, "width": 256}),
    "huge": ("max_resolution", {"height": 2160, "width": 3840}),
    "slow": ("fpsmin", {"fps": 10.0}),
    "fast": ("fpsmax", {"fps": 120.0}),
    "ugly": ("aesmin", {"aes": 4.0}),
    "unscored": ("aesmin", {"aes": None}),  # no aesthetic row at all: fails the bound, as in the reference
    "still": ("flowmin", {"flow": 0.1}),
    "shaky": ("flowmax", {"flow": 50.0}),
    "texty": ("ocrmax", {"ocr": 9}),
    "offtopic": ("matchmin", {"match": 10.0}),
    "keep1": (None, {"text": 'a "quoted", comma\nand a newline'}),
}
BASE = dict(num_frames=48, height=480, width=854, fps=30.0, aes=6.0, flow=3.0, ocr=0, match=25.0, text="a clip")


def crafted_tables(*, null_flow: bool = False) -> dict[str, pl.DataFrame]:
    rows = []
    for i, (cid, (_, over)) in enumerate(CASES.items()):
        rows.append(BASE | {"id": cid, "video_id": f"v{i % 3}", "path": f"/media/b1/{cid}.mp4", "start_frame": 10 * i,
                            "end_frame": 10 * i + 48, "start_s": i / 3, "end_s": i / 3 + 1.6, "batch": "b1"} | over)
    # The same content landed again in batch b2: same id as keep0, another path.
    rows.append(dict(rows[0]) | {"path": "/media/b2/keep0.mp4", "batch": "b2"})
    table = pl.DataFrame(rows)
    clips = table.select("id", "video_id", "path", "start_frame", "end_frame", "start_s", "end_s", "num_frames",
                         "height", "width", "fps", "batch")  # fmt: skip
    scores = table.unique("id", keep="first", maintain_order=True)
    flow = (scores.select("id", pl.lit(None).alias("flow"), pl.lit("flow backend not configured").alias("reason"))
            if null_flow else scores.select("id", "flow"))  # fmt: skip
    return {
        "clips": clips,
        "aesthetic_scores": scores.filter(pl.col("aes").is_not_null()).select("id", "aes", "batch"),
        "motion_scores": flow,
        "ocr_scores": scores.select("id", "ocr"),
        "captions": scores.filter(pl.col("text").is_not_null()).select("id", "text", pl.lit("sidecar").alias("source")),
        "match_scores": scores.select("id", "match"),
    }


def expected_drops(spec_names: list[str]) -> dict[str, int]:
    counts = {key: 0 for key in DROP_ORDER if key in spec_names}
    for reason, _ in CASES.values():
        if reason is not None and reason in counts:
            counts[reason] += 1
    return counts


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_drop_counts_per_filter_in_fixed_order(tmp_path: Path):
    result = build_dataset(crafted_tables(), SPEC, INPUTS, tmp_path)
    assert list(result.drop_counts) == list(DROP_ORDER)  # every check ran, reported in the fixed order
    assert result.drop_counts == expected_drops(list(DROP_ORDER)) | {"duplicate": 1}
    assert result.num_clips == len(CASES) + 1
    assert result.num_rows == 2 and result.skipped == []
    kept = pl.read_parquet(result.data_path)
    assert sorted(kept["id"]) == ["keep0", "keep1"]
    assert kept.filter(pl.col("id") == "keep0")["batch"].item() == "b1"  # the first batch's copy is kept
    dropped = pl.read_parquet(result.dropped_path)
    reasons = dict(zip(dropped["path"], dropped["reason"]))
    assert reasons["/media/b2/keep0.mp4"] == "duplicate"
    assert {reasons[f"/media/b1/{cid}.mp4"] for cid in ("ugly", "unscored")} == {"aesmin"}
    assert reasons["/media/b1/nocap.mp4"] == "no caption"
    details = dict(zip(dropped["path"], dropped["detail"]))  # each drop says why, a missing value included
    assert details["/media/b1/ugly.mp4"] == "aes 4.0 fails >= 5.0"
    assert details["/media/b1/unscored.mp4"] == "no aes value: no aesthetic_scores row for the clip"
    report = {r.criterion: r for r in result.criteria}
    assert [r.criterion for r in result.criteria] == list(DROP_ORDER[1:-1])
    assert {r.status for r in result.criteria} == {"applied"}
    assert (report["aesmin"].dropped, report["aesmin"].dropped_without_value) == (2, 1)


def test_csv_has_opensora_columns_and_values(tmp_path: Path):
    result = build_dataset(crafted_tables(), SPEC, INPUTS, tmp_path)
    with open(result.csv_path, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == CSV_COLUMNS
    assert header[:3] == ["path", "text", "num_frames"]  # the reference's required columns, first
    rows = {r["id"]: r for r in read_csv_rows(result.csv_path)}
    assert rows["keep1"]["text"] == 'a "quoted", comma\nand a newline'  # quoting survives
    row = rows["keep0"]
    assert (row["height"], row["width"], row["resolution"]) == ("480", "854", str(480 * 854))
    assert float(row["aspect_ratio"]) == pytest.approx(480 / 854)
    assert float(row["aes"]) == 6.0 and float(row["match"]) == 25.0 and row["video_id"] == "v0"
    # Polars reads it back with the right types.
    frame = pl.read_csv(result.csv_path)
    assert frame["num_frames"].dtype == pl.Int64 and frame["aes"].dtype == pl.Float64


def test_all_null_score_column_fails_its_criteria_unless_the_spec_skips_them(tmp_path: Path):
    # An all-null column (a scorer without weights, a broken scorer) is never skipped on the data's say-so:
    # every clip fails the criterion, with the reason the value is missing.
    result = build_dataset(crafted_tables(null_flow=True), SPEC, INPUTS, tmp_path / "strict")
    assert result.skipped == [] and result.num_rows == 0
    flowmin = {r.criterion: r for r in result.criteria}["flowmin"]
    assert flowmin.status == "applied" and flowmin.with_value == 0
    # keep0 (both copies), keep1, still, shaky, texty, offtopic reach flowmin and fail it
    assert flowmin.dropped == flowmin.dropped_without_value == result.drop_counts["flowmin"] == 7
    assert "motion_scores.flow is null for all 17 clips: flow backend not configured" in flowmin.reason
    assert "every clip fails flowmin" in flowmin.reason
    dropped = pl.read_parquet(result.dropped_path)
    assert set(dropped.filter(pl.col("reason") == "flowmin")["detail"]) == {"no flow value: flow backend not configured"}

    spec = SPEC.model_copy(update={"skip": ("flowmin", "flowmax")})
    result = build_dataset(crafted_tables(null_flow=True), FilterSpec(**spec.model_dump()), INPUTS, tmp_path / "skip")
    assert [(s.criterion, s.column) for s in result.skipped] == [("flowmin", "flow"), ("flowmax", "flow")]
    assert result.skipped[0].reason.startswith("skipped by the spec (skip=['flowmin', 'flowmax'])")
    assert "motion_scores.flow is null for all 17 clips: flow backend not configured" in result.skipped[0].reason
    assert "flowmin" not in result.drop_counts and "flowmax" not in result.drop_counts
    kept = set(pl.read_parquet(result.data_path)["id"])
    assert kept == {"keep0", "keep1", "still", "shaky"}  # flow no longer decides anything
    manifest = json.loads(result.manifest_path.read_text())
    assert [s["criterion"] for s in manifest["skipped"]] == ["flowmin", "flowmax"]
    assert "flowmin" not in manifest["applied"] and manifest["applied"]["aesmin"] == "aes >= 5.0"
    assert {c["criterion"]: c["status"] for c in manifest["criteria"]}["flowmax"] == "skipped"


def test_missing_score_table_fails_its_criteria_unless_skipped(tmp_path: Path):
    tables = crafted_tables()
    del tables["ocr_scores"]
    tables["match_scores"] = pl.DataFrame()  # what the Lakehouse returns for a table with no partitions
    strict = build_dataset(tables, SPEC, INPUTS, tmp_path / "strict")
    assert strict.skipped == [] and strict.num_rows == 0
    assert "table ocr_scores was not provided" in {r.criterion: r for r in strict.criteria}["ocrmax"].reason

    spec = FilterSpec(**(SPEC.model_dump() | {"skip": ["ocrmax", "matchmin"]}))
    result = build_dataset(tables, spec, INPUTS, tmp_path / "skip")
    skipped = {s.criterion: s.reason for s in result.skipped}
    assert set(skipped) == {"ocrmax", "matchmin"}
    assert "ocr_scores was not provided" in skipped["ocrmax"]
    assert set(pl.read_parquet(result.data_path)["id"]) == {"keep0", "keep1", "texty", "offtopic"}
    assert pl.read_parquet(result.data_path)["ocr"].null_count() == 4


def test_unset_criteria_are_not_skipped(tmp_path: Path):
    tables = crafted_tables(null_flow=True)
    result = build_dataset(tables, FilterSpec(aesmin=5.0), INPUTS, tmp_path)
    assert result.skipped == []  # flow is all null but no flow bound was asked for
    assert list(result.drop_counts) == ["no caption", "aesmin", "duplicate"]


def test_no_caption_drop_and_its_switch(tmp_path: Path):
    spec = FilterSpec(min_frames=16)
    with_caption = build_dataset(crafted_tables(), spec, INPUTS, tmp_path)
    assert with_caption.drop_counts == {"no caption": 2, "min_frames": 1, "duplicate": 1}
    without = build_dataset(crafted_tables(), FilterSpec(min_frames=16, require_caption=False), INPUTS, tmp_path)
    assert without.drop_counts == {"min_frames": 2, "duplicate": 1}  # nocap is also 5 frames long
    ids = set(pl.read_parquet(without.data_path)["id"])
    assert "blank" in ids and "nocap" not in ids


def test_dedupe_switch_keeps_both_copies(tmp_path: Path):
    result = build_dataset(crafted_tables(), FilterSpec(dedupe=False, require_caption=False), INPUTS, tmp_path)
    assert result.drop_counts == {}
    assert result.num_rows == len(CASES) + 1
    assert pl.read_parquet(result.data_path).filter(pl.col("id") == "keep0").height == 2


def test_version_is_deterministic_and_content_addressed():
    v = dataset_version(SPEC, INPUTS)
    assert len(v) == 12 and int(v, 16) >= 0
    assert dataset_version(FilterSpec(**json.loads(SPEC.canonical_json())), dict(reversed(INPUTS.items()))) == v
    assert dataset_version(SPEC.model_copy(update={"aesmin": 5.5}), INPUTS) != v
    assert dataset_version(SPEC, INPUTS | {"captions": "v2"}) != v
    assert dataset_version(SPEC, {k: INPUTS[k] for k in list(INPUTS)[:-1]}) != v


def test_rebuild_is_idempotent(tmp_path: Path):
    first = build_dataset(crafted_tables(), SPEC, INPUTS, tmp_path)
    snapshot = {p.name: p.read_bytes() for p in first.path.iterdir()}
    again = build_dataset(crafted_tables(), SPEC, INPUTS, tmp_path)
    assert again.reused and not first.reused
    assert again.version == first.version and again.path == first.path
    assert again.drop_counts == first.drop_counts and again.created_at == first.created_at
    assert {p.name: p.read_bytes() for p in again.path.iterdir()} == snapshot
    other = build_dataset(crafted_tables(), SPEC, INPUTS | {"clips": "v2"}, tmp_path)
    assert other.version != first.version
    # Same tables, same spec: same bytes in a different version folder (content depends on inputs only).
    assert other.data_path.read_bytes() == first.data_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.version, other.version])  # no temp folders


def test_lost_rename_race_reuses_the_winner(tmp_path: Path, monkeypatch):
    real_rename = os.rename

    def rename_after_rival(src, dst):
        shutil.copytree(src, dst)  # another process finished the same version first
        return real_rename(src, dst)

    monkeypatch.setattr(datasets.os, "rename", rename_after_rival)
    result = build_dataset(crafted_tables(), SPEC, INPUTS, tmp_path)
    assert result.reused
    assert [p.name for p in tmp_path.iterdir()] == [result.version]


def test_duckdb_connection_gives_the_same_dataset(tmp_path: Path):
    con = duckdb.connect()
    for name, frame in crafted_tables().items():
        con.register(name, frame)
    from_con = build_dataset(con, SPEC, INPUTS, tmp_path / "a")
    from_dict = build_dataset(crafted_tables(), SPEC, INPUTS, tmp_path / "b")
    assert from_con.drop_counts == from_dict.drop_counts
    assert from_con.data_path.read_bytes() == from_dict.data_path.read_bytes()
    assert con.execute("SELECT count(*) FROM clips").fetchone()[0] == len(CASES) + 1  # connection still usable


def test_clips_are_required(tmp_path: Path):
    tables = crafted_tables()
    with pytest.raises(ValueError, match="no clips table"):
        build_dataset({k: v for k, v in tables.items() if k != "clips"}, SPEC, INPUTS, tmp_path)
    with pytest.raises(ValueError, match="lacks column"):
        build_dataset(tables | {"clips": tables["clips"].drop("height")}, SPEC, INPUTS, tmp_path)
    assert not any(tmp_path.iterdir())


def test_latest_version(tmp_path: Path):
    assert datasets.latest_version(tmp_path / "none") is None
    first = build_dataset(crafted_tables(), SPEC, INPUTS, tmp_path)
    second = build_dataset(crafted_tables(), FilterSpec(), INPUTS, tmp_path)
    # Make the order unambiguous whatever the clock's resolution.
    manifest = json.loads(second.manifest_path.read_text())
    manifest["created_at"] = "2999-01-01T00:00:00+00:00"
    second.manifest_path.write_text(json.dumps(manifest))
    (tmp_path / ".tmp-half-written").mkdir()
    latest = datasets.latest_version(tmp_path)
    assert latest is not None and latest.version == second.version != first.version
    assert latest.spec == FilterSpec()


def test_filter_spec_validation():
    with pytest.raises(ValidationError, match="greater than"):
        FilterSpec(min_frames=100, max_frames=10)
    with pytest.raises(ValidationError):
        FilterSpec(aes_min=5)  # unknown field: a typo must not silently filter nothing
    assert PRESETS["reference"].aesmin == 5.0
    # skip: criteria names or CLI flags, canonical order; unknown names and unset bounds are refused.
    assert FilterSpec(aesmin=5, min_frames=16, skip=["aesmin", "fmin", "aesmin"]).skip == ("min_frames", "aesmin")
    with pytest.raises(ValidationError, match="unknown filter criterion"):
        FilterSpec(aesmin=5, skip=["aes"])
    with pytest.raises(ValidationError, match="does not set"):
        FilterSpec(aesmin=5, skip=["matchmin"])
    demo = PRESETS["demo"]
    assert demo.skip == ("aesmin", "matchmin") and demo.active() == []  # the demo has no CLIP weights


def test_histograms():
    frame = pl.DataFrame({"aes": [1.0, 2.0, 2.5, None, 4.0], "flow": [None] * 5, "text": ["a"] * 5},
                         schema_overrides={"flow": pl.Float64})  # fmt: skip
    hist = datasets.histograms(frame, ["aes", "flow", "text", "missing"], bins=3)
    assert list(hist) == ["aes"]
    assert hist["aes"]["counts"] == [1, 2, 1] and sum(hist["aes"]["counts"]) == hist["aes"]["count"] == 4
    assert hist["aes"]["edges"] == [1.0, 2.0, 3.0, 4.0] and hist["aes"]["nulls"] == 1
