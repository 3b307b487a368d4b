"""Frozen sources (issue 14, item 1): a probed video's bytes become immutable, content-named media in the lake, and a
file `ingest --link` references in place is checked against its recorded hash before every decode."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from dagster import instance_for_test

from curation.errors import InputRejected, is_input_rejection
from curation.ingest import RAW_VIDEO_SCHEMA, land_files, scan_batch
from curation.probe import content_hash
from curation.samples import Shot, write_synthetic_video
from curation.sources import SourceChanged, SourceStore, decodable_source, freeze_file, source_name
from opensora_dag.instance import materialize_selection
from resources.lakehouse import Lakehouse
from common.storage import Storage


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """Two tiny videos with distinct bytes."""
    folder = tmp_path_factory.mktemp("frozen_videos")
    out = []
    for i, colour in enumerate([(20, 60, 140), (200, 120, 30)]):
        path = folder / f"v{i}.mp4"
        write_synthetic_video(path, [Shot("static", 12, colour)], width=64, height=48, fps=12)
        out.append(path)
    return out


def _materialize_raw_videos(lake: Lakehouse, batch: str) -> list[dict]:
    with instance_for_test() as instance:
        [outcome] = materialize_selection("raw_videos", [batch], instance, resources={"lakehouse": lake})
        assert outcome.success
    return sorted(lake.read_partition("raw_videos", batch).to_dicts(), key=lambda r: r["path"])


# ---- the raw_videos asset freezes what it probes -----------------------------------------------------------------
def test_raw_videos_rows_point_at_frozen_copies_the_inbox_cannot_change(home, videos):
    lake = Lakehouse(home=str(home))
    batch = lake.batch_dir("b1")
    batch.mkdir(parents=True)
    for v in videos:
        shutil.copy(v, batch / v.name)
    (batch / "v9_again.MP4").write_bytes(videos[0].read_bytes())  # a duplicate: quarantined, never frozen twice

    rows = _materialize_raw_videos(lake, "b1")
    assert set(RAW_VIDEO_SCHEMA) <= set(rows[0]) and {"source", "linked"} <= set(RAW_VIDEO_SCHEMA)
    sources = lake.media_dir / "sources"
    assert [Path(r["path"]) for r in rows] == [(batch / v.name).resolve() for v in videos], "path stays the landing path"
    for row, video in zip(rows, videos):
        frozen = Path(row["source"])
        assert frozen == sources / f"{row['id']}.mp4" and row["linked"] is False
        assert frozen.read_bytes() == video.read_bytes() and content_hash(frozen) == row["id"]
        assert not os.access(frozen, os.W_OK) or os.geteuid() == 0, "read-only"
        assert decodable_source(row) == frozen
    assert sorted(p.name for p in sources.iterdir()) == sorted(f"{r['id']}.mp4" for r in rows), "no temporaries left"

    # Editing the inbox afterwards does not reach the frozen copy the row names.
    first = rows[0]
    frozen = Path(first["source"])
    before = (frozen.stat().st_mtime_ns, frozen.stat().st_ino)
    (batch / videos[0].name).write_bytes(videos[1].read_bytes()[:500] + b"edited")
    assert frozen.read_bytes() == videos[0].read_bytes() and content_hash(frozen) == first["id"]

    # Re-probing the same bytes reuses the object: same name, same inode, mtime untouched.
    (batch / videos[0].name).write_bytes(videos[0].read_bytes())
    again = _materialize_raw_videos(lake, "b1")
    assert [r["source"] for r in again] == [r["source"] for r in rows]
    assert (frozen.stat().st_mtime_ns, frozen.stat().st_ino) == before


def test_linked_files_are_used_in_place_and_checked_before_decoding(home, videos, tmp_path):
    from opensora_dag import cli

    outside = tmp_path / "camera"
    outside.mkdir()
    for v in videos:
        shutil.copy(v, outside / v.name)
    assert cli.main(["--home", str(home), "ingest", str(outside), "--link"]) == 0
    lake = Lakehouse(home=str(home))
    assert (lake.landing_dir / "camera" / "v0.mp4").is_symlink()

    rows = _materialize_raw_videos(lake, "camera")
    assert [r["linked"] for r in rows] == [True, True]
    assert [r["source"] for r in rows] == [str((outside / v.name).resolve()) for v in videos]
    assert [Path(r["path"]).parent for r in rows] == [(lake.landing_dir / "camera").resolve()] * 2
    assert not (lake.media_dir / "sources").exists() or not list((lake.media_dir / "sources").iterdir()), "not copied"
    row = rows[0]
    assert decodable_source(row) == (outside / "v0.mp4").resolve()
    assert decodable_source(row) == (outside / "v0.mp4").resolve()  # cached: same answer, no re-hash needed

    # The referenced file is edited in place: never silently different frames.
    (outside / "v0.mp4").write_bytes(videos[1].read_bytes() + b"x")
    with pytest.raises(SourceChanged) as caught:
        decodable_source(row)
    err = caught.value
    found = content_hash(outside / "v0.mp4")
    assert err.expected == row["id"] and err.found == found and err.path == row["source"]
    assert row["id"] in str(err) and found in str(err) and str(outside / "v0.mp4") in str(err)
    assert isinstance(err, InputRejected) and is_input_rejection(err), "the video is quarantined, the batch goes on"

    (outside / "v0.mp4").unlink()
    with pytest.raises(SourceChanged, match="is gone"):
        decodable_source(row)
    assert decodable_source(rows[1]) == (outside / "v1.mp4").resolve(), "the other link is untouched"


def test_rows_written_before_sources_fall_back_to_their_path(tmp_path, videos):
    legacy = {"id": content_hash(videos[0]), "path": str(videos[0])}  # no source, no linked column at all
    assert decodable_source(legacy) == videos[0]
    assert decodable_source({**legacy, "source": None, "linked": None}) == videos[0]
    with pytest.raises(ValueError):
        decodable_source({"id": "x"})


# ---- the library -------------------------------------------------------------------------------------------------
def test_freeze_is_atomic_content_named_and_never_overwrites(tmp_path, videos):
    folder = tmp_path / "media" / "sources"
    video_id = content_hash(videos[0])
    frozen = freeze_file(videos[0], folder, video_id)
    assert frozen == folder / source_name(video_id, ".mp4") and frozen.read_bytes() == videos[0].read_bytes()
    assert source_name("abc", ".MP4") == "abc.mp4"

    # without an expected id the name comes from the copy's own hash (one read pass), and the object is reused
    stamp = frozen.stat().st_mtime_ns
    assert freeze_file(videos[0], folder) == frozen and frozen.stat().st_mtime_ns == stamp

    # bytes that do not hash to the probed id (edited between probe and freeze) are refused, nothing is published
    with pytest.raises(SourceChanged, match="expected content hash 0000"):
        freeze_file(videos[1], folder, "0" * 20)
    assert sorted(p.name for p in folder.iterdir()) == [frozen.name], "no temporary and no object left behind"


def test_a_file_that_changes_between_probe_and_freeze_is_quarantined(tmp_path, videos):
    batch = tmp_path / "b"
    batch.mkdir()
    shutil.copy(videos[0], batch / "a.mp4")
    store = SourceStore(Storage(str(tmp_path / "data"), tmp_path / "cache"))

    def edited_meanwhile(path, video_id):
        path.write_bytes(videos[1].read_bytes())
        return store(path, video_id)

    scan = scan_batch(batch, freeze=edited_meanwhile)
    assert scan.videos.is_empty()
    [reason] = scan.quarantine["reason"].to_list()
    assert "changed since it was probed" in reason and content_hash(videos[0]) in reason


def test_scan_without_freeze_and_inside_links_are_not_linked(tmp_path, videos):
    batch = tmp_path / "b"
    batch.mkdir()
    shutil.copy(videos[0], batch / "a.mp4")
    scan = scan_batch(batch)  # library use without freezing: no source, decoders read path
    assert scan.videos.select("source", "linked").rows() == [(None, False)]

    # a link made by hand inside the folder is part of the inbox: frozen like any file, not "linked"
    land = tmp_path / "land"
    land_files(batch, land)
    (land / "b.mp4").symlink_to(videos[1])  # leaves the folder without ingest's record: quarantined, not followed
    store = SourceStore(Storage(str(tmp_path / "data"), tmp_path / "cache"))
    scan = scan_batch(land, freeze=store)
    assert scan.videos["linked"].to_list() == [False] and len(scan.quarantine) == 1
    assert Path(scan.videos["source"][0]).parent == tmp_path / "data" / "media" / "sources"


# ---- S3 ----------------------------------------------------------------------------------------------------------
def test_sources_on_s3_are_uploaded_once_and_read_through_the_cache(tmp_path, videos, s3_server, s3_bucket, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OPENSORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OPENSORA_DATA_PATH", f"s3://{s3_bucket}/p")
    storage = Storage.from_env()
    store = SourceStore(storage, scratch=tmp_path / "home" / "scratch")
    video_id = content_hash(videos[0])

    url = store(videos[0], video_id)
    assert url == f"s3://{s3_bucket}/p/media/sources/{video_id}.mp4" and storage.exists(url)
    uploaded = storage.modified(url)
    assert store(videos[0], video_id) == url and storage.modified(url) == uploaded, "kept, never uploaded over"
    assert not list((tmp_path / "home" / "scratch").iterdir()), "staging cleaned up"

    local = decodable_source({"id": video_id, "path": "s3://elsewhere/landing/x.mp4", "source": url, "linked": False})
    assert local.read_bytes() == videos[0].read_bytes() and local.suffix == ".mp4"
