"""The foundation: lakehouse writes, partitions, the landing sensor, the CLI and concurrent runs."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, build_sensor_context, instance_for_test

from opensora_dag.instance import materialize_selection
from opensora_dag.sensors import landing_zone_sensor
from resources.batch_keys import key_for_folder
from resources.lakehouse import Lakehouse
from tests.dagster.conftest import fill_batch

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "opensora_dag.cli"]


def test_write_partition_replaces_atomically(home):
    lake = Lakehouse(home=str(home))
    lake.write_partition("things", "b1", pl.DataFrame({"x": [1, 2, 3]}))
    lake.write_partition("things", "b2", pl.DataFrame({"x": [10]}))
    lake.write_partition("things", "b1", pl.DataFrame({"x": [4]}))  # replaces b1, leaves b2
    assert sorted(lake.read_table("things")["x"].to_list()) == [4, 10]
    assert lake.read_partition("things", "b1")["batch"].to_list() == ["b1"]
    lake.refresh_catalog()
    assert lake.query("SELECT sum(x) AS s FROM things")["s"][0] == 14
    with pytest.raises(FileNotFoundError, match="materialize the upstream asset"):
        lake.read_partition("things", "missing")


def test_sql_is_read_only(home):
    lake = Lakehouse(home=str(home))
    lake.write_partition("things", None, pl.DataFrame({"x": [1]}))
    lake.refresh_catalog()
    out = subprocess.run(CLI + ["sql", "DROP VIEW things"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "read-only" in out.stderr
    out = subprocess.run(CLI + ["sql", "SELECT count(*) AS n FROM things"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "1" in out.stdout


def _tick(lake, instance, cursor=None):
    """One sensor evaluation; returns (result, the cursor it left)."""
    context = build_sensor_context(instance=instance, cursor=cursor, resources={"lakehouse": lake})
    result = landing_zone_sensor(context)
    return result, getattr(result, "cursor", None) or context.cursor


def test_landing_sensor_registers_new_folders_once(home, tiny_videos):
    lake = Lakehouse(home=str(home))
    fill_batch(lake.landing_dir, "new batch", tiny_videos[:1])
    (lake.landing_dir / "still_empty").mkdir()

    with instance_for_test() as instance:
        first, cursor = _tick(lake, instance)  # seen once: not settled yet
        assert not getattr(first, "run_requests", None)
        result, cursor = _tick(lake, instance, cursor)  # the same files and sizes on the next tick: settled
        key = key_for_folder("new batch", {})  # a name with a space gets a stable slug-and-hash key
        assert key.startswith("new_batch-")
        assert [r.partition_key for r in result.run_requests] == [key]
        assert len(result.dynamic_partitions_requests) == 1
        assert list(result.dynamic_partitions_requests[0].partition_keys) == [key]

        again, after = _tick(lake, instance, cursor)
        assert not getattr(again, "run_requests", None)
        state = json.loads(after)
        assert set(state["requested"]) == set(state["seen"]) == {"new batch"}


def test_sensor_waits_for_a_folder_still_being_copied(home, tiny_videos):
    """Settled means "file list and sizes unchanged between two ticks", not old mtimes (cp -p and rsync -a keep
    them), and a registered folder that gains or changes files gets a new run for its batch."""
    lake = Lakehouse(home=str(home))
    folder = fill_batch(lake.landing_dir, "copying", tiny_videos[:1])
    old = time.time() - 3600
    with instance_for_test() as instance:
        result, cursor = _tick(lake, instance)
        assert not getattr(result, "run_requests", None)
        shutil.copy2(tiny_videos[1], folder / tiny_videos[1].name)  # still copying, with preserved (old) mtimes
        os.utime(folder / tiny_videos[1].name, (old, old))
        result, cursor = _tick(lake, instance, cursor)
        assert not getattr(result, "run_requests", None), "the file list changed since the last tick"
        result, cursor = _tick(lake, instance, cursor)
        [first] = result.run_requests
        assert first.partition_key == "copying"

        shutil.copy(tiny_videos[2], folder / tiny_videos[2].name)  # the registered folder gains a file
        result, cursor = _tick(lake, instance, cursor)
        assert not getattr(result, "run_requests", None)
        result, cursor = _tick(lake, instance, cursor)
        [second] = result.run_requests
        assert second.partition_key == "copying" and second.run_key != first.run_key
        result, cursor = _tick(lake, instance, cursor)
        assert not getattr(result, "run_requests", None)


def test_rematerialize_replaces_rows(home, tiny_videos):
    lake = Lakehouse(home=str(home))
    folder = fill_batch(lake.landing_dir, "b", tiny_videos[:3])
    with instance_for_test() as instance:
        assert all(o.success for o in materialize_selection("raw_videos", ["b"], instance))
        assert lake.query("SELECT count(*) AS n FROM raw_videos")["n"][0] == 3
        (folder / tiny_videos[0].name).unlink()
        assert all(o.success for o in materialize_selection("raw_videos", ["b"], instance))
        counts = lake.query("SELECT count(*) AS n, count(DISTINCT id) AS d FROM raw_videos WHERE batch = 'b'")
        assert (counts["n"][0], counts["d"][0]) == (2, 2)


def test_two_partitions_in_two_processes_at_once(home, tiny_videos):
    """Two runs of different partitions at the same time: every row of both lands exactly once."""
    lake = Lakehouse(home=str(home))
    fill_batch(lake.landing_dir, "left", tiny_videos[:2])
    fill_batch(lake.landing_dir, "right", tiny_videos[2:])
    env = {**os.environ, "OPENSORA_HOME": str(home)}
    for batch in ("left", "right"):  # register first, as the sensor or `ingest` would
        subprocess.run(CLI + ["ingest", str(lake.landing_dir / batch)], check=True, env=env, cwd=REPO, capture_output=True)
    procs = [
        subprocess.Popen(CLI + ["materialize", "--select", "group:curation", "--batch", b], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for b in ("left", "right")
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs

    rows = lake.query("SELECT batch, path, id FROM raw_videos ORDER BY path")
    expected = {("left", v.name) for v in tiny_videos[:2]} | {("right", v.name) for v in tiny_videos[2:]}
    assert {(b, Path(p).name) for b, p, _ in rows.iter_rows()} == expected
    assert len(rows) == len(expected) == rows["id"].n_unique()


def test_cli_ingest_registers_partition(home, tiny_videos, tmp_path):
    source = tmp_path / "drop"
    fill_batch(tmp_path, "drop", tiny_videos[:1])
    env = {**os.environ, "OPENSORA_HOME": str(home)}
    out = subprocess.run(CLI + ["ingest", str(source), "--batch", "cam_1"], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (home / "landing" / "cam_1" / tiny_videos[0].name).is_file()
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    assert "cam_1" in DagsterInstance.get().get_dynamic_partitions("video_batches")


def test_cli_curate_ingests_and_materializes_training_ready_clips_in_one_command(home, tiny_videos, tmp_path):
    source = tmp_path / "drop"
    fill_batch(tmp_path, "drop", tiny_videos[:2])
    env = {**os.environ, "OPENSORA_HOME": str(home)}
    bad = subprocess.run(CLI + ["curate", str(source), "--set", "clips"], env=env, cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "ASSET.FIELD=VALUE" in bad.stderr
    assert not (home / "landing" / "drop").exists()  # a bad --set is refused before anything lands

    out = subprocess.run(CLI + ["curate", str(source)], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "batch 'drop' registered" in out.stdout and "ok     batch drop: clips, raw_videos, scenes" in out.stdout
    lake = Lakehouse(home=str(home))
    assert len(lake.read_partition("raw_videos", "drop")) == 2
    clips = lake.read_partition("clips", "drop")
    assert len(clips) > 0 and clips["virtual"].all()


def test_code_location_loads_with_dagster_cli(home):
    home.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "DAGSTER_HOME": str(home)},
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_named_views_survive_later_refreshes(home):
    lake = Lakehouse(home=str(home))
    lake.write_partition("things", "b1", pl.DataFrame({"x": [1, 2]}))
    lake.refresh_catalog(extra_views={"two_things": "SELECT * FROM things WHERE x = 2"})
    lake.write_partition("things", "b2", pl.DataFrame({"x": [2]}))
    lake.refresh_catalog()  # another asset's materialization
    assert lake.query("SELECT count(*) AS n FROM two_things")["n"][0] == 2


def test_weekly_retrain_runs_only_when_there_is_new_data_since_the_last_model():
    from datetime import datetime, timezone

    from dagster import AssetMaterialization, build_schedule_context, instance_for_test

    from opensora_dag.definitions import defs
    from opensora_dag.schedules import weekly_retrain

    assert weekly_retrain.cron_schedule == "0 3 * * 1" and weekly_retrain.job_name == "training_job"
    job = defs.resolve_job_def("training_job")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {"trained_model", "model_evaluation"}

    def tick(instance):
        when = datetime(2026, 12, 7, 3, tzinfo=timezone.utc)
        return weekly_retrain.evaluate_tick(build_schedule_context(instance=instance, scheduled_execution_time=when))

    with instance_for_test() as instance:
        assert not list(tick(instance).run_requests)  # no dataset yet
        instance.report_runless_asset_event(AssetMaterialization("curated_dataset", metadata={"version": "v1", "num_rows": 10}))
        requests = list(tick(instance).run_requests)
        assert len(requests) == 1 and requests[0].tags["opensora/dataset_version"] == "v1"
        instance.report_runless_asset_event(AssetMaterialization("trained_model", metadata={"dataset_version": "v1",
                                                                                            "dataset_rows": 10}))
        skipped = tick(instance)
        assert not list(skipped.run_requests) and "no new data" in skipped.skip_message
        instance.report_runless_asset_event(AssetMaterialization("curated_dataset", metadata={"version": "v2", "num_rows": 11}))
        assert len(list(tick(instance).run_requests)) == 1  # one new clip is new data for the weekly run


def test_cli_home_flag_is_the_home_of_every_command(home, tiny_videos, tmp_path):
    """`--home H materialize` runs against H even when $OPENSORA_HOME names another place (it used to look there)."""
    source = tmp_path / "drop"
    fill_batch(tmp_path, "drop", tiny_videos[:1])
    elsewhere = tmp_path / "elsewhere"
    env = {**os.environ, "OPENSORA_HOME": str(elsewhere)}
    for args in (["ingest", str(source), "--batch", "cam_2"], ["materialize", "--select", "raw_videos", "--batch", "cam_2"]):
        out = subprocess.run(CLI + ["--home", str(home), *args], env=env, cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(Lakehouse(home=str(home)).read_partition("raw_videos", "cam_2")) == 1
    assert not (elsewhere / "lake").exists()
