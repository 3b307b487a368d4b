"""The automatic chain: a folder dropped into landing/ ends in a requested retrain, with no manual step."""

from __future__ import annotations

from dagster import DagsterInstance, build_sensor_context, instance_for_test

from opensora_dag import sensors
from opensora_dag.definitions import defs
from resources.lakehouse import Lakehouse
from tests.dagster.conftest import fill_batch


def _execute(job_name: str, instance: DagsterInstance, request, lake: Lakehouse) -> None:
    job = defs.resolve_job_def(job_name)
    result = job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                    tags=request.tags, resources={"lakehouse": lake}, raise_on_error=True)
    assert result.success


def test_a_landing_folder_ends_in_a_requested_retrain(home, tiny_videos, monkeypatch):
    monkeypatch.setattr(sensors, "RETRAIN_MIN_NEW_CLIPS", 1)
    lake = Lakehouse(home=str(home))
    folder = fill_batch(lake.landing_dir, "new footage", tiny_videos[:2])
    for video in tiny_videos[:2]:  # sidecar captions, so the default spec (captions required) keeps the clips
        (folder / f"{video.stem}.txt").write_text(f"a synthetic shot number {video.stem[-1]}")

    with instance_for_test() as instance:
        # 1. The landing sensor registers the settled folder and requests its curation run.
        cursor = None
        for _ in range(2):  # first tick sees it, second sees it unchanged (settled)
            context = build_sensor_context(instance=instance, cursor=cursor, resources={"lakehouse": lake})
            landing = sensors.landing_zone_sensor(context)
            cursor = getattr(landing, "cursor", None) or context.cursor
        [curation] = landing.run_requests
        instance.add_dynamic_partitions("video_batches", [curation.partition_key])
        _execute("curation_job", instance, curation, lake)

        # 2. New curation output: the dataset sensor requests a dataset build, once.
        context = build_sensor_context(instance=instance)
        dataset_request = sensors.dataset_after_curation(context)
        assert dataset_request.job_name in (None, "dataset_job") and dataset_request.run_key
        again = sensors.dataset_after_curation(build_sensor_context(instance=instance, cursor=context.cursor))
        assert not getattr(again, "run_key", None)
        _execute("dataset_job", instance, dataset_request, lake)

        # 3. A new dataset version with new clips: the retrain sensor requests training_job.
        retrain = sensors.retrain_on_new_data(build_sensor_context(instance=instance))
        assert getattr(retrain, "run_key", "").startswith("retrain:"), retrain
        version = retrain.tags["opensora/dataset_version"]
        assert version == lake.read_table("dataset_versions")["version"][0]
        assert defs.resolve_sensor_def("retrain_on_new_data").job_name == "training_job"
