"""The curation graph materialized in-process on a real batch: synthetic clips with known truth + a corrupt file."""

import shutil

import pytest
from dagster import instance_for_test

from curation.samples import Shot, write_captions_csv, write_synthetic_video
from opensora_dag.instance import materialize_selection
from resources.lakehouse import Lakehouse


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    home = tmp_path_factory.mktemp("curation_home")
    lake = Lakehouse(home=str(home))
    batch = lake.batch_dir("b1")
    batch.mkdir(parents=True)
    cuts = write_synthetic_video(batch / "cuts.mp4", [
        Shot("moving", 60, (20, 60, 140), speed=5.0),
        Shot("static", 60, (200, 120, 30)),
        Shot("text", 60, (40, 40, 40), text="HELLO DAGSTER"),
    ], width=192, height=112, fps=24)
    write_captions_csv([cuts], batch / "captions.csv")
    (batch / "broken.mp4").write_bytes(cuts.path.read_bytes()[:2000])
    shutil.copy(cuts.path, batch / "cuts_copy.mp4")
    with instance_for_test() as instance:
        outcomes = materialize_selection("group:curation", ["b1"], instance, resources={"lakehouse": lake})
        assert all(o.success for o in outcomes), outcomes
        yield lake, cuts, instance


def test_quarantine_keeps_the_batch_going(curated):
    lake, _, _ = curated
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in lake.query("SELECT path, reason FROM quarantine").to_dicts()}
    assert "broken.mp4" in reasons and "cuts_copy.mp4" in reasons
    assert reasons["cuts_copy.mp4"].startswith("byte-identical duplicate")
    assert lake.query("SELECT count(*) AS n FROM raw_videos")["n"][0] == 1


def test_scenes_are_the_true_shots(curated):
    lake, cuts, _ = curated
    scenes = lake.query("SELECT start_frame, end_frame FROM scenes ORDER BY start_frame").rows()
    assert len(scenes) == 3
    for (start, end), (true_start, true_end) in zip(scenes, cuts.shot_ranges()):
        assert abs(start - true_start) <= 1 and abs(end - true_end) <= 1


def test_the_scenes_pass_keeps_every_clips_scorer_frames(curated):
    from dagster import AssetKey

    lake, _, instance = curated
    event = instance.get_latest_materialization_event(AssetKey("scenes"))
    assert event.asset_materialization.metadata["clips_with_frames_kept"].value == 3  # the clips asset decodes nothing
    assert len(list((lake.media_dir / "frames").glob("*/kept.json"))) == 3


def test_clips_scores_and_captions(curated):
    lake, _, _ = curated
    rows = lake.query(
        "SELECT c.start_frame, c.num_frames, c.fps, c.height, m.flow, o.ocr, o.ocr_text, t.text, a.aes, a.reason AS aes_reason "
        "FROM clips c JOIN motion_scores m USING (id) JOIN ocr_scores o USING (id) JOIN captions t USING (id) "
        "JOIN aesthetic_scores a USING (id) ORDER BY c.start_frame"
    ).to_dicts()
    assert [r["fps"] for r in rows] == [30.0] * 3
    assert all(r["height"] == 112 for r in rows), "never upscaled"
    moving, static, text = rows
    assert moving["flow"] > 100 * max(static["flow"], 1e-4) and static["flow"] < 0.05
    assert text["ocr"] >= 1 and "HELLO" in text["ocr_text"] and moving["ocr"] == 0
    assert "moving" in moving["text"] and "HELLO DAGSTER" in text["text"]
    assert all(r["aes"] is None and "CLIP checkpoint path is not set" in r["aes_reason"] for r in rows), "no weights: null with reason"


def test_curated_dataset_version_and_rematerialize(curated):
    lake, _, instance = curated
    outcomes = materialize_selection("curated_dataset", None, instance, resources={"lakehouse": lake})
    assert all(o.success for o in outcomes)
    row = lake.query("SELECT count(*) AS n, count(DISTINCT text) AS d FROM curated_dataset")
    assert (row["n"][0], row["d"][0]) == (3, 3)
    versions = list((lake.lake_dir / "datasets").iterdir())
    assert len(versions) == 1 and (versions[0] / "opensora.csv").is_file()

    # Re-materializing the batch replaces its rows: still one set of clips, no duplicates.
    assert all(o.success for o in materialize_selection("group:curation", ["b1"], instance, resources={"lakehouse": lake}))
    n = lake.query("SELECT count(*) AS n, count(DISTINCT id) AS d FROM clips")
    assert n["n"][0] == n["d"][0] == 3
    # Virtual clips by default: nothing encoded, the kept frames are immutable media, reused and not re-kept.
    assert not (lake.media_dir / "clips").exists() or not list((lake.media_dir / "clips").glob("*.mp4"))
    assert len(list((lake.media_dir / "frames").glob("*/kept.json"))) == 3
    rows = lake.query("SELECT virtual, path, video_id FROM clips").to_dicts()
    assert all(r["virtual"] and f"/media/sources/{r['video_id']}" in r["path"] for r in rows)


def _dataset_rows(lake):
    import polars as pl

    versions = sorted((lake.lake_dir / "datasets").iterdir())
    return versions[-1].name, pl.read_parquet(versions[-1] / "data.parquet")


def test_export_writes_clip_files_that_equal_the_virtual_clips(curated, tmp_path, capsys, monkeypatch):
    import numpy as np
    import polars as pl

    from curation.video_io import read_frames
    from curation.virtual_clips import read_clip_frames
    from opensora_dag.cli import main

    lake, _, instance = curated
    monkeypatch.setenv("OPENSORA_HOME", str(lake.home))  # --home sets it for the process: restored after the test
    assert all(o.success for o in materialize_selection("curated_dataset", None, instance, resources={"lakehouse": lake}))
    version, rows = _dataset_rows(lake)
    assert rows["virtual"].all()
    out = tmp_path / "export"
    assert main(["--home", str(lake.home), "data", "export", version, str(out), "--workers", "2"]) == 0
    assert "3 encoded" in capsys.readouterr().out
    table = pl.read_csv(out / "opensora.csv")
    assert len(table) == 3 and "virtual" not in table.columns
    by_id = {r["id"]: r for r in rows.to_dicts()}
    for line in table.to_dicts():
        path = out / "clips" / line["path"].rsplit("/", 1)[-1]
        assert line["path"] == str(path.resolve()) and path.is_file()
        assert (lake.media_dir / "clips" / path.name).is_file()  # published as immutable media
        virtual = read_clip_frames(by_id[line["id"]])
        from_file = read_frames(path, range(line["num_frames"]))
        assert len(virtual) == len(from_file) == line["num_frames"] == by_id[line["id"]]["num_frames"]
        assert from_file[0].shape == (line["height"], line["width"], 3)
        diff = np.abs(np.stack(virtual).astype(np.int16) - np.stack(from_file).astype(np.int16))
        assert diff.mean() < 2.5
    # Exporting again reuses the published files: nothing is encoded twice.
    again = tmp_path / "again"
    assert main(["--home", str(lake.home), "data", "export", "latest", str(again)]) == 0
    assert "0 encoded, 3 reused" in capsys.readouterr().out
    assert main(["--home", str(lake.home), "data", "export", "../x", str(again)]) == 2


def test_editing_a_landing_file_does_not_change_a_dataset_versions_frames(curated, tmp_path):
    import numpy as np

    from curation.samples import Shot, write_synthetic_video
    from curation.virtual_clips import read_clip_frames

    lake, cuts, instance = curated
    assert all(o.success for o in materialize_selection("curated_dataset", None, instance, resources={"lakehouse": lake}))
    _, rows = _dataset_rows(lake)
    row = rows.to_dicts()[0]
    before = read_clip_frames(row)
    landing = lake.batch_dir("b1") / "cuts.mp4"
    saved = landing.read_bytes()
    try:  # a user replaces the inbox file with other footage of the same length
        other = write_synthetic_video(tmp_path / "other.mp4", [Shot("static", 180, (250, 250, 250))], width=192,
                                      height=112, fps=24)
        landing.write_bytes(other.path.read_bytes())
        after = read_clip_frames(row)
    finally:
        landing.write_bytes(saved)
    assert len(after) == len(before)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
