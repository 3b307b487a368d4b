"""Landing, media and dataset versions on S3 through one object-store layer (``common.storage``), against real
services: a PostgreSQL catalog and a moto S3 endpoint on 127.0.0.1 (tests/services.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.storage import Storage, local_media_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def _storages(tmp_path, s3_server, bucket) -> list[Storage]:
    return [Storage(str(tmp_path / "data"), tmp_path / "cache-local"),
            Storage(f"s3://{bucket}/root", tmp_path / "cache-s3")]


# ---- Storage, local and S3 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_storage_put_list_copy_remove(kind, tmp_path, s3_env, s3_bucket):
    storage = _storages(tmp_path, s3_env, s3_bucket)[kind == "s3"]
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("alpha")
    (source / "sub" / "b.bin").write_bytes(b"\0" * 10)
    (source / "manifest.json").write_text("{}")

    assert storage.list_dir(storage.url("media")) == [] and not storage.exists(storage.url("media", "one.txt"))
    url = storage.put_file(source / "a.txt", "media", "one.txt")
    assert url == storage.url("media", "one.txt") and storage.exists(url)
    folder = storage.put_dir(source, "media", "frames", "x", last="manifest.json")
    assert storage.list_dir(storage.url("media")) == [("frames", 0, True), ("one.txt", 5, False)]
    assert storage.files(folder) == [("a.txt", 5), ("manifest.json", 2), ("sub/b.bin", 10)]
    assert storage.modified(url) is not None and storage.modified(folder) is not None

    copy = storage.local_copy(url)
    assert copy.read_text() == "alpha" and copy.name == "one.txt"
    tree = storage.local_copy(folder)
    assert (tree / "sub" / "b.bin").read_bytes() == b"\0" * 10 and tree.name == "x"
    if kind == "local":
        assert copy == Path(url) and tree == Path(folder), "local paths are read in place, never copied"
        assert not (tmp_path / "cache-local").exists()
    else:
        assert str(copy).startswith(str(tmp_path / "cache-s3"))
        # unchanged objects are not downloaded again; a changed one gets a new copy
        before = copy.stat().st_mtime_ns
        assert storage.local_copy(url) == copy and copy.stat().st_mtime_ns == before
        (source / "a.txt").write_text("alpha, longer")
        storage.put_file(source / "a.txt", "media", "one.txt")
        fresh = storage.local_copy(url)
        assert fresh != copy and fresh.read_text() == "alpha, longer"

    storage.remove(folder)
    storage.remove(url)
    assert storage.list_dir(storage.url("media")) in ([], [("frames", 0, True)])  # local keeps an empty folder
    assert not storage.exists(url) and storage.files(folder) == []
    with pytest.raises(FileNotFoundError):
        storage.local_copy(url) if kind == "s3" else open(storage.local_copy(url))


@pytest.mark.parametrize("parts", [("..",), ("media", "../x"), ("/etc/passwd",), ("a//b",), (".",), ("s3://other/x",)])
def test_storage_refuses_paths_that_leave_the_root(tmp_path, parts):
    storage = Storage(str(tmp_path), tmp_path / "cache")
    with pytest.raises(ValueError):
        storage.url(*parts)
    remote = Storage("s3://bucket/p", tmp_path / "cache")
    with pytest.raises(ValueError):
        remote.url(*parts)
    with pytest.raises(ValueError, match="refusing"):
        remote.remove("s3://bucket/elsewhere/x")


def test_local_media_path_reads_the_environment(tmp_path, s3_env, s3_bucket, monkeypatch):
    s3_env.client().put_object(Bucket=s3_bucket, Key="p/media/clips/c.mp4", Body=b"clip")
    monkeypatch.setenv("OPENSORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OPENSORA_DATA_PATH", f"s3://{s3_bucket}/p")
    path = local_media_path(f"s3://{s3_bucket}/p/media/clips/c.mp4")
    assert path.read_bytes() == b"clip" and path.suffix == ".mp4"
    assert str(path).startswith(str(tmp_path / "home" / "cache" / "objects"))
    assert local_media_path("/some/local/clip.mp4") == Path("/some/local/clip.mp4")


# ---- the acceptance test: machines that share only the catalog and the bucket -------------------------------------
CURATE = "key:raw_videos or key:scenes or key:clips or key:captions"
TRAIN = textwrap.dedent("""
    import json, sys
    from dagster import materialize
    from assets.training import trained_model
    from opensora_dag.instance import get_instance, materialize_selection
    from resources.lakehouse import Lakehouse
    from resources.launcher import LocalLauncher
    from resources.tracking import Tracking
    from tests.training.conftest import TINY_OVERRIDES

    lake = Lakehouse()
    instance = get_instance(lake.root)
    [built] = materialize_selection("curated_dataset", None, instance)
    assert built.success, built
    result = materialize([trained_model], instance=instance, raise_on_error=False,
                         resources={"lakehouse": lake, "tracking": Tracking(), "launcher": LocalLauncher(nproc=1)},
                         run_config={"ops": {"trained_model": {"config": {"steps": 2, "overrides": TINY_OVERRIDES}}}})
    assert result.success
    meta = result.asset_materializations_for_node("trained_model")[0].metadata
    print(json.dumps({"checkpoint": meta["final_checkpoint"].value, "dataset_version": meta["dataset_version"].value}))
""")


def _source(folder: Path, videos: list[Path]) -> Path:
    folder.mkdir(parents=True)
    for video in videos:
        (folder / video.name).write_bytes(video.read_bytes())
        (folder / f"{video.stem}.txt").write_text(f"a coloured shape moving, then a still card ({video.stem})")
    return folder


def test_two_machines_curate_on_s3_and_a_third_trains_from_it(tmp_path, postgres_server, s3_server, tiny_videos,
                                                               monkeypatch):
    """Two machines (own OPENSORA_HOME, same Postgres catalog and S3 data path) land and curate different batches at
    the same time; a third builds a dataset version and trains on its clips, read from S3, with no local media."""
    import uuid

    from dagster import build_sensor_context, instance_for_test

    from opensora_dag.sensors import landing_zone_sensor
    from resources.lakehouse import Lakehouse

    tag = uuid.uuid4().hex[:8]
    conninfo = postgres_server.create_database(f"lake_media_{tag}")
    bucket = s3_server.create_bucket(f"media-{tag}")
    shared = {**s3_server.env, "OPENSORA_CATALOG": f"postgres:{conninfo}", "OPENSORA_DATA_PATH": f"s3://{bucket}/p"}
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"} | shared
    for key, value in shared.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    homes = {name: tmp_path / name for name in ("east", "west", "third", "sensor")}

    # west drops its files into landing/ with a plain S3 client; the landing sensor registers the folder
    west_src = _source(tmp_path / "west_src", tiny_videos[3:])
    s3 = s3_server.client()
    for file in sorted(west_src.iterdir()):
        s3.upload_file(str(file), bucket, f"p/landing/West drop/{file.name}")
    sensor_lake = Lakehouse(home=str(homes["sensor"]))
    with instance_for_test() as instance:
        with build_sensor_context(instance=instance, resources={"lakehouse": sensor_lake}) as context:
            assert not getattr(landing_zone_sensor(context), "run_requests", None)  # seen once: not settled yet
        with build_sensor_context(instance=instance, cursor=context.cursor,
                                  resources={"lakehouse": sensor_lake}) as context:
            result = landing_zone_sensor(context)
    [request] = result.run_requests
    west_key = request.partition_key
    assert west_key.startswith("West_drop-")

    # east ingests with the CLI (uploads into landing/), then both curate at the same time
    east_src = _source(tmp_path / "east_src", tiny_videos[:3])
    cli = [sys.executable, "-m", "opensora_dag.cli"]
    commands = {
        "east": f"{' '.join(cli)} ingest {east_src} --batch east && "
                f"{' '.join(cli)} materialize --select '{CURATE}' --batch east",
        "west": f"{' '.join(cli)} materialize --select '{CURATE}' --batch {west_key}",
    }
    procs = {name: subprocess.Popen(["bash", "-c", command], cwd=REPO, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env={**env, "OPENSORA_HOME": str(homes[name])})
             for name, command in commands.items()}
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    assert all(proc.returncode == 0 for proc in procs.values()), outputs

    # every row of both batches, exactly once; media named by s3:// URLs that exist
    lake = Lakehouse(home=str(homes["third"]))
    videos = lake.read_table("raw_videos")
    assert sorted(videos["batch"].to_list()) == sorted(["east"] * 3 + [west_key] * 2)
    assert videos["id"].n_unique() == 5
    assert all(p.startswith(f"s3://{bucket}/p/landing/") for p in videos["path"].to_list())
    # each video's bytes frozen once as content-named media, which every decoder reads instead of landing/
    assert all(s == f"s3://{bucket}/p/media/sources/{i}.mp4" for s, i in zip(videos["source"], videos["id"]))
    assert not any(videos["linked"].to_list())
    clips = lake.read_table("clips")
    assert len(clips) >= 5 and clips["id"].n_unique() == len(clips)
    assert set(clips["batch"].to_list()) == {"east", west_key}
    # virtual clips: frame ranges of the frozen sources, nothing encoded; their kept frames are published media
    assert clips["virtual"].all()
    assert all(p == f"s3://{bucket}/p/media/sources/{v}.mp4" for p, v in zip(clips["path"], clips["video_id"]))
    assert all(f == f"s3://{bucket}/p/media/frames/{i}" for f, i in zip(clips["frames_dir"], clips["id"]))
    captions = lake.read_table("captions")
    assert sorted(captions["id"].to_list()) == sorted(clips["id"].to_list())
    assert captions["text"].null_count() == 0, "the sidecar captions were read from the landed copies"
    storage = lake.storage
    stored = {name for name, _size, _d in storage.list_dir(storage.url("media", "clips"))}
    assert stored == set()

    # a third machine builds the dataset version and trains on it
    run = subprocess.run([sys.executable, "-c", TRAIN], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**env, "OPENSORA_HOME": str(homes["third"])})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    trained = json.loads(run.stdout.strip().splitlines()[-1])
    version = trained["dataset_version"]
    assert storage.exists(storage.url("lake", "datasets", version, "manifest.json"))
    published = lake.read_table("dataset_versions")
    assert published["path"].to_list() == [f"s3://{bucket}/p/lake/datasets/{version}"]
    assert lake.query("SELECT count(*) AS n FROM curated_dataset")["n"][0] == len(clips)
    state = json.loads((Path(trained["checkpoint"]) / "state.json").read_text())
    assert state["dataset_version"] == version
    # the clips came from S3 through the third machine's object cache; no machine has a media/ or landing/ folder
    cached = {p.name for p in (homes["third"] / "cache" / "objects").rglob("*.mp4")}
    assert cached and cached <= {f"{v}.mp4" for v in clips["video_id"]}, cached
    for home in homes.values():
        assert not (home / "media").exists() and not (home / "landing").exists() and not (home / "lake" / "datasets").exists()

    # gc on S3: media no snapshot or live version references go; referenced ones stay
    from resources.lake_maintenance import gc, parse_duration

    s3.put_object(Bucket=bucket, Key="p/media/clips/orphan.mp4", Body=b"x")
    s3.put_object(Bucket=bucket, Key="p/media/frames/orphan/kept.json", Body=b"{}")
    report = gc(lake, parse_duration("0s"))
    assert sorted(report.removed_media) == [f"s3://{bucket}/p/media/clips/orphan.mp4",
                                            f"s3://{bucket}/p/media/frames/orphan"]
    assert {name for name, _s, _d in storage.list_dir(storage.url("media", "clips"))} == stored
