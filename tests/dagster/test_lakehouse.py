"""The DuckLake lakehouse: snapshots and time travel, read-only SQL, readers never block writers, odd homes, gc,
import of the previous layout, and one catalog shared by processes that share nothing else (Postgres + S3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from resources import lake_maintenance
from resources.lakehouse import Lakehouse, LakeError, LegacyLakeError, QueryRefused

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "opensora_dag.cli"]


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=REPO, env=env or os.environ.copy(),
                          timeout=timeout)


def test_every_write_is_one_snapshot_and_earlier_contents_stay_readable(home):
    lake = Lakehouse(home=str(home))
    first = lake.write_partition("things", "b1", pl.DataFrame({"x": [1, 2]}), run_id="run-a")
    second = lake.write_partition("things", "b1", pl.DataFrame({"x": [3]}), run_id="run-b")
    assert second == first + 1
    assert lake.read_table("things")["x"].to_list() == [3]
    assert sorted(lake.read_table("things", snapshot=first)["x"].to_list()) == [1, 2]

    out = cli("sql", "SELECT x FROM things ORDER BY x", "--snapshot", str(first), "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["x", "1", "2"]
    out = cli("sql", "SELECT x FROM things", "--format", "json")
    assert json.loads(out.stdout) == [{"x": 3}]

    out = cli("lake", "snapshots", "--format", "json")
    rows = {r["snapshot_id"]: r for r in json.loads(out.stdout)}
    assert (rows[first]["table"], rows[first]["batch"], rows[first]["run_id"]) == ("things", "b1", "run-a")
    assert rows[second]["run_id"] == "run-b" and set(rows[second]) == {"snapshot_id", "time", "table", "batch", "run_id"}


def test_an_asset_and_its_quarantine_records_are_one_snapshot(home):
    from resources.lakehouse import PartitionWrite

    lake = Lakehouse(home=str(home))
    before = lake.current_snapshot()
    snapshot = lake.write_partitions([
        PartitionWrite("scenes", "b1", pl.DataFrame({"video_id": ["v"]})),
        PartitionWrite("quarantine", "b1", pl.DataFrame({"path": ["bad.mp4"], "reason": ["boom"]}), key={"stage": "scenes"}),
    ])
    assert snapshot == before + 1
    lake.write_partition("quarantine", "b1", pl.DataFrame({"path": ["x.mp4"], "reason": ["r"]}), key={"stage": "clips"})
    stages = lake.read_partition("quarantine", "b1").sort("stage")["stage"].to_list()
    assert stages == ["clips", "scenes"]  # one stage's write never replaces another's


@pytest.mark.parametrize("query, word", [
    ("COPY (SELECT 'gone' AS id) TO '{target}'", "COPY"),
    ("ATTACH '{home}/other.db' AS other", "ATTACH"),
    ("INSTALL spatial", "INSTALL"),
    ("SELECT * FROM read_csv('/etc/passwd')", "outside the lake"),
    ("SELECT 1; DROP TABLE things", "one statement"),
])
def test_sql_refuses_anything_but_one_select_inside_the_lake(home, query, word):
    lake = Lakehouse(home=str(home))
    lake.write_partition("things", "b1", pl.DataFrame({"x": [1]}))
    files_before = sorted(p for p in (home / "lake").rglob("*") if p.is_file() and "catalog.sqlite" not in p.name)
    snapshot = lake.current_snapshot()
    target = next(p for p in files_before if p.suffix == ".parquet")
    out = cli("sql", query.format(target=target, home=home))
    assert out.returncode == 2 and "refused" in out.stderr and word.split()[0].lower() in out.stderr.lower(), out.stderr
    assert "/root" not in out.stdout and "root:" not in out.stdout
    assert lake.current_snapshot() == snapshot
    assert sorted(p for p in (home / "lake").rglob("*") if p.is_file() and "catalog.sqlite" not in p.name) == files_before
    assert not (home / "other.db").exists()
    assert lake.read_table("things")["x"].to_list() == [1]
    assert cli("sql", "SELECT count(*) AS n FROM things").returncode == 0


def test_a_long_reader_never_blocks_a_writer(home):
    lake = Lakehouse(home=str(home))
    lake.write_partition("things", "b0", pl.DataFrame({"x": list(range(1000))}))
    reader = subprocess.Popen(CLI + ["sql", "SELECT count(*) FROM things a, things b, things c, range(40)"],
                              cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(3)  # the reader has the catalog open and is scanning
        assert reader.poll() is None, reader.communicate()
        start = time.monotonic()
        for k in range(5):
            lake.write_partition("things", f"b{k + 1}", pl.DataFrame({"x": [k]}))
        took = time.monotonic() - start
        assert reader.poll() is None, "the reader finished too early to prove anything"
        assert took < 30, f"writers waited {took:.1f}s behind a reader"
        assert len(lake.partitions("things")) == 6
    finally:
        reader.kill()
        reader.wait()


def test_a_curation_run_succeeds_while_a_long_query_runs(home, tiny_videos):
    from dagster import instance_for_test

    from opensora_dag.instance import materialize_selection
    from tests.dagster.conftest import fill_batch

    lake = Lakehouse(home=str(home))
    lake.write_partition("things", "b0", pl.DataFrame({"x": list(range(1000))}))
    fill_batch(lake.landing_dir, "b", tiny_videos[:2])
    reader = subprocess.Popen(CLI + ["sql", "SELECT count(*) FROM things a, things b, things c, range(400)"],
                              cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(2)
        with instance_for_test() as instance:
            assert all(o.success for o in materialize_selection("raw_videos", ["b"], instance))
        assert reader.poll() is None
    finally:
        reader.kill()
        reader.wait()
    assert len(lake.read_partition("raw_videos", "b")) == 2


def test_a_home_with_a_space_and_an_apostrophe(tmp_path, monkeypatch, tiny_videos):
    from dagster import instance_for_test

    from opensora_dag.instance import materialize_selection
    from tests.dagster.conftest import fill_batch

    home = tmp_path / "Team's lake dir"
    monkeypatch.setenv("OPENSORA_HOME", str(home))
    lake = Lakehouse()
    fill_batch(lake.landing_dir, "b", tiny_videos[:1])
    with instance_for_test() as instance:
        assert all(o.success for o in materialize_selection("raw_videos", ["b"], instance))
    assert lake.query("SELECT count(*) AS n FROM raw_videos")["n"][0] == 1
    assert lake.location.sqlite_path.parent == home.resolve() / "lake"


def test_the_sqlite_catalog_is_in_wal_mode(home):
    import sqlite3

    lake = Lakehouse(home=str(home))
    lake.write_partition("things", None, pl.DataFrame({"x": [1]}))
    with sqlite3.connect(lake.location.sqlite_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_catalog_opened_with_another_data_path_is_a_clear_error(home, tmp_path):
    Lakehouse(home=str(home)).write_partition("things", None, pl.DataFrame({"x": [1]}))
    other = Lakehouse(home=str(home), data_path=str(tmp_path / "elsewhere"))
    with pytest.raises(LakeError, match="created for another data path"):
        other.read_table("things")


def test_evaluations_finishing_together_keep_both_rows(home):
    from assets.evaluation import EVALUATIONS_TABLE

    code = (
        "import polars as pl, sys\n"
        "from resources.lakehouse import Lakehouse\n"
        "lake = Lakehouse()\n"
        "for k in range(6):\n"
        "    ck = f'{sys.argv[1]}-{k}'\n"
        "    lake.write_partition(sys.argv[2], None, pl.DataFrame({'checkpoint': [ck], 'prompt_set': ['p'], 'v': [k]}),\n"
        "                         key={'checkpoint': ck, 'prompt_set': 'p'})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, name, EVALUATIONS_TABLE], cwd=REPO, env=os.environ.copy())
             for name in ("left", "right")]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    rows = Lakehouse(home=str(home)).read_table(EVALUATIONS_TABLE)
    assert sorted(rows["checkpoint"].to_list()) == sorted(f"{n}-{k}" for n in ("left", "right") for k in range(6))


def test_gc_keeps_what_a_live_dataset_version_pins_and_retire_releases_it(home):
    lake = Lakehouse(home=str(home))
    media = lake.media_dir / "clips"
    media.mkdir(parents=True)
    old_clip, new_clip = media / "old.mp4", media / "new.mp4"
    old_clip.write_bytes(b"old")
    new_clip.write_bytes(b"new")
    pinned = lake.write_partition("clips", "b1", pl.DataFrame({"id": ["old"], "path": [str(old_clip)]}))
    version = pl.DataFrame([{"version": "v1", "lake_snapshot": pinned, "path": str(home / "nowhere"), "num_rows": 1,
                             "created_at": "now", "retired": False}])
    lake.write_partition("dataset_versions", None, version, key={"version": "v1"})
    lake.write_partition("clips", "b1", pl.DataFrame({"id": ["new"], "path": [str(new_clip)]}))
    stray = media / "stray.mp4"
    stray.write_bytes(b"nobody references me")
    os.utime(stray, (time.time() - 3600, time.time() - 3600))

    dry = lake_maintenance.gc(lake, lake_maintenance.parse_duration("0s"), dry_run=True)
    assert str(stray) in dry.removed_media and stray.exists()

    report = lake_maintenance.gc(lake, lake_maintenance.parse_duration("0s"))
    assert pinned in report.pinned_snapshots and pinned not in report.expired_snapshots
    assert not stray.exists() and old_clip.exists() and new_clip.exists()
    assert lake.read_table("clips", snapshot=pinned)["path"].to_list() == [str(old_clip)]

    out = cli("lake", "retire", "v1")
    assert out.returncode == 0, out.stderr
    report = lake_maintenance.gc(lake, lake_maintenance.parse_duration("0s"))
    assert pinned in report.expired_snapshots and not old_clip.exists() and new_clip.exists()
    assert cli("lake", "gc", "--older-than", "soon").returncode == 2


def test_gc_keeps_frozen_sources_every_retained_or_pinned_snapshot_names(home):
    """media/sources/ follows the clips' rule, including a state written at an expired snapshot that a later pinned
    snapshot still sees; a linked source outside media/ is never touched."""
    lake = Lakehouse(home=str(home))
    sources = lake.media_dir / "sources"
    sources.mkdir(parents=True)
    files = {name: sources / f"{name}.mp4" for name in ("first", "middle", "current", "stray")}
    linked = home / "camera" / "linked.mp4"
    linked.parent.mkdir()
    for path in [*files.values(), linked]:
        path.write_bytes(path.name.encode())
        os.utime(path, (time.time() - 3600, time.time() - 3600))

    def raw(name: str, source, is_linked: bool = False) -> int:
        row = {"id": name, "path": f"/landing/b1/{name}.mp4", "source": str(source), "linked": is_linked}
        return lake.write_partition("raw_videos", "b1", pl.DataFrame([row]))

    def pin(version: str) -> int:
        snapshot = lake.write_partition("clips", "b1", pl.DataFrame({"id": [version], "path": [str(home / "none.mp4")]}))
        row = pl.DataFrame([{"version": version, "lake_snapshot": snapshot, "path": str(home / "nowhere"), "num_rows": 1,
                             "created_at": "now", "retired": False}])
        lake.write_partition("dataset_versions", None, row, key={"version": version})
        return snapshot

    raw("first", files["first"])
    pin("v1")
    middle_write = raw("middle", files["middle"])  # expired below, but v2's snapshot still sees its rows
    pin("v2")
    raw("current", files["current"])
    lake.write_partition("raw_videos", "b2", pl.DataFrame([{"id": "l", "path": "/landing/b2/l.mp4",
                                                            "source": str(linked), "linked": True}]))

    report = lake_maintenance.gc(lake, lake_maintenance.parse_duration("0s"))
    assert middle_write in report.expired_snapshots
    assert report.removed_media == [str(files["stray"])]
    assert all(files[n].exists() for n in ("first", "middle", "current")) and linked.exists()

    assert cli("lake", "retire", "v2").returncode == 0
    report = lake_maintenance.gc(lake, lake_maintenance.parse_duration("0s"))
    assert report.removed_media == [str(files["middle"])] and files["first"].exists() and files["current"].exists()
    assert linked.exists()


def test_an_old_layout_is_refused_until_imported_and_import_is_idempotent(home):
    """A home written by the previous version (Parquet folders + catalog.duckdb) is copied in, never moved."""
    old_lake = home / "lake"
    (old_lake / "raw_videos").mkdir(parents=True)
    (old_lake / "clips").mkdir()
    (old_lake / "quarantine").mkdir()
    clip = home / "media" / "clips" / "b1" / "c1.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"clip bytes")
    pl.DataFrame({"id": ["v1"], "path": ["a.mp4"], "batch": ["b1"]}).write_parquet(old_lake / "raw_videos" / "b1.parquet")
    pl.DataFrame({"id": ["c1"], "path": [str(clip)], "batch": ["b1"]}).write_parquet(old_lake / "clips" / "b1.parquet")
    pl.DataFrame({"path": ["bad.mp4"], "stage": ["scenes"], "reason": ["x"], "batch": ["b1"]}).write_parquet(
        old_lake / "quarantine" / "b1__scenes.parquet")
    (home / "catalog.duckdb").write_bytes(b"")

    with pytest.raises(LegacyLakeError, match="opensora-dag lake import"):
        Lakehouse(home=str(home)).read_table("raw_videos")
    out = cli("lake", "import", str(home))
    assert out.returncode == 0, out.stderr
    lake = Lakehouse(home=str(home))
    assert lake.read_table("raw_videos")["id"].to_list() == ["v1"]
    new_path = lake.read_table("clips")["path"][0]
    assert Path(new_path) == lake.media_dir / "clips" / "c1.mp4" and Path(new_path).read_bytes() == b"clip bytes"
    assert clip.exists()  # copied, never moved
    assert lake.read_partition("quarantine", "b1")["stage"].to_list() == ["scenes"]
    snapshots = lake.current_snapshot()
    assert cli("lake", "import", str(home)).returncode == 0
    assert lake.current_snapshot() == snapshots  # a second run changes nothing


def test_two_processes_sharing_only_postgres_and_s3_both_land_every_row(tmp_path, postgres_server, s3_server):
    """Different OPENSORA_HOMEs, one catalog on Postgres, one data path on S3, committing at the same time."""
    conninfo = postgres_server.create_database("lake_shared")
    bucket = s3_server.create_bucket("lake-shared")
    env = {**os.environ, **s3_server.env, "OPENSORA_CATALOG": f"postgres:{conninfo}",
           "OPENSORA_DATA_PATH": f"s3://{bucket}/team"}
    code = (
        "import polars as pl, sys\n"
        "from resources.lakehouse import Lakehouse\n"
        "lake = Lakehouse()\n"
        "for k in range(8):\n"
        "    lake.write_partition('clips', f'{sys.argv[1]}-{k}', pl.DataFrame({'id': [f'{sys.argv[1]}-{k}-{i}' for i in range(3)]}))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, name], cwd=REPO,
                              env={**env, "OPENSORA_HOME": str(tmp_path / name)}, stderr=subprocess.PIPE, text=True)
             for name in ("east", "west")]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    for key, value in env.items():
        os.environ[key] = value  # a third machine reads everything
    try:
        rows = Lakehouse(home=str(tmp_path / "third")).read_table("clips")
    finally:
        for key in ("OPENSORA_CATALOG", "OPENSORA_DATA_PATH"):
            os.environ.pop(key)
    assert sorted(rows["id"].to_list()) == sorted(f"{n}-{k}-{i}" for n in ("east", "west") for k in range(8)
                                                  for i in range(3))
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="team/lake/")["Contents"]]
    assert any(k.endswith(".parquet") for k in keys)
    assert not (tmp_path / "east" / "lake").exists()  # nothing local holds the lake


def test_a_missing_bucket_is_a_clear_error(tmp_path, postgres_server, s3_server, monkeypatch):
    conninfo = postgres_server.create_database("lake_nobucket")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    lake = Lakehouse(home=str(tmp_path), catalog=f"postgres:{conninfo}", data_path="s3://no-such-bucket/x")
    with pytest.raises(LakeError, match="no-such-bucket"):
        lake.write_partition("things", None, pl.DataFrame({"x": [1]}))


def test_queries_refused_in_process_too(home):
    lake = Lakehouse(home=str(home))
    lake.write_partition("things", None, pl.DataFrame({"x": [1]}))
    with pytest.raises(QueryRefused):
        lake.query("DELETE FROM things")
    assert lake.query("SELECT x FROM things")["x"].to_list() == [1]


def test_a_dataset_version_survives_a_recut_of_its_batch(home):
    """Re-materializing clips with other settings: the earlier rows stay readable at their snapshot, the version
    built before keeps its rows, and every one of its clips still decodes (immutable media)."""
    from dagster import instance_for_test

    from curation.samples import Shot, write_captions_csv, write_synthetic_video
    from curation.virtual_clips import read_clip_frames
    from opensora_dag.instance import materialize_selection

    lake = Lakehouse(home=str(home))
    batch = lake.landing_dir / "b1"
    batch.mkdir(parents=True)
    video = write_synthetic_video(batch / "shots.mp4", [Shot("moving", 60, (20, 60, 140), speed=4.0),
                                                        Shot("static", 60, (200, 120, 30))], width=128, height=80, fps=24)
    write_captions_csv([video], batch / "captions.csv")
    curation = "key:raw_videos or key:scenes or key:clips or key:captions"
    with instance_for_test() as instance:
        assert all(o.success for o in materialize_selection(curation, ["b1"], instance, resources={"lakehouse": lake}))
        before = lake.current_snapshot()
        outcomes = materialize_selection("key:curated_dataset", None, instance, resources={"lakehouse": lake},
                                         asset_config={"curated_dataset": {"preset": "demo"}})
        assert all(o.success for o in outcomes), outcomes
        versions = lake.read_table("dataset_versions")
        assert len(versions) == 1
        v1 = versions.row(0, named=True)
        v1_rows = pl.read_parquet(Path(v1["path"]) / "data.parquet").sort("id")
        assert len(v1_rows) == 2 and v1["lake_snapshot"] >= before

        # the batch is cut again with other settings: other clip ids, other files
        assert all(o.success for o in materialize_selection("key:clips", ["b1"], instance, resources={"lakehouse": lake},
                                                            asset_config={"clips": {"short_side": 64}}))
    now = lake.read_table("clips").sort("id")
    assert set(now["id"]) and not set(now["id"]) & set(v1_rows["id"])
    assert sorted(lake.read_table("clips", snapshot=v1["lake_snapshot"])["id"].to_list()) == v1_rows["id"].to_list()
    again = pl.read_parquet(Path(v1["path"]) / "data.parquet").sort("id")
    assert again.equals(v1_rows)
    for row in v1_rows.to_dicts():  # every clip of the old version still decodes (virtual: from its source)
        assert Path(row["path"]).is_file(), row["path"]
        assert len(read_clip_frames(row)) == row["num_frames"]
