"""Training from Dagster: the retrain sensor's rule, and trained_model launched through Pipes with torchrun."""

import json
import sys

import polars as pl
import pytest
from dagster import AssetMaterialization, DagsterInstance, build_sensor_context, instance_for_test

from opensora_dag.sensors import retrain_decision, retrain_on_new_data


def report(instance: DagsterInstance, key: str, **metadata) -> None:
    instance.report_runless_asset_event(AssetMaterialization(asset_key=key, metadata=metadata))


def test_retrain_rule():
    assert retrain_decision({}, {}, 100)[0] is False
    assert retrain_decision({"version": "a", "num_rows": 150}, {}, 100)[0] is True
    assert retrain_decision({"version": "a", "num_rows": 150}, {"dataset_version": "a", "dataset_rows": 150}, 100)[0] is False
    assert retrain_decision({"version": "b", "num_rows": 200}, {"dataset_version": "a", "dataset_rows": 150}, 100)[0] is False
    go, why = retrain_decision({"version": "c", "num_rows": 260}, {"dataset_version": "a", "dataset_rows": 150}, 100)
    assert go and "110 more clips" in why


def test_retrain_sensor_fires_only_on_enough_new_data(monkeypatch):
    monkeypatch.setattr("opensora_dag.sensors.RETRAIN_MIN_NEW_CLIPS", 100)
    with instance_for_test() as instance:
        report(instance, "curated_dataset", version="v1", num_rows=150)
        report(instance, "trained_model", dataset_version="v1", dataset_rows=150)
        assert not getattr(retrain_on_new_data(build_sensor_context(instance=instance)), "run_key", None)

        report(instance, "curated_dataset", version="v2", num_rows=200)  # only 50 new clips
        assert not getattr(retrain_on_new_data(build_sensor_context(instance=instance)), "run_key", None)

        report(instance, "curated_dataset", version="v3", num_rows=300)  # 150 new clips
        context = build_sensor_context(instance=instance)
        request = retrain_on_new_data(context)
        assert request.run_key == "retrain:v3"
        again = retrain_on_new_data(build_sensor_context(instance=instance, cursor=context.cursor))
        assert not getattr(again, "run_key", None), "the same version is requested once"


def test_trained_model_through_pipes(tiny_dataset_version, tmp_path):
    """trained_model launches torchrun through PipesSubprocessClient and records what rank 0 reported."""
    from dagster import materialize

    from assets.training import trained_model
    from resources.lakehouse import Lakehouse
    from resources.launcher import LocalLauncher
    from resources.tracking import Tracking
    from tests.training.conftest import TINY_OVERRIDES

    home, version = tiny_dataset_version
    lake = Lakehouse(home=str(home))
    with instance_for_test() as instance:
        result = materialize(
            [trained_model],
            instance=instance,
            resources={"lakehouse": lake, "tracking": Tracking(), "launcher": LocalLauncher(nproc=2, python=sys.executable)},
            run_config={"ops": {"trained_model": {"config": {"steps": 2, "dataset_version": version, "overrides": TINY_OVERRIDES}}}},
        )
        assert result.success
        meta = result.asset_materializations_for_node("trained_model")[0].metadata
        assert meta["dataset_version"].value == version
        assert meta["steps"].value == 2
        assert meta["mlflow_run_id"].value
        checkpoint = meta["final_checkpoint"].value
        state = json.loads((__import__("pathlib").Path(checkpoint) / "state.json").read_text())
        assert state["world_size"] == 2 and state["dataset_version"] == version


@pytest.mark.parametrize("override, named", [("optim.lrr=1e-4", "lrr"), ("model.overrides.hiddn_size=64", "hiddn_size"),
                                             ("data.bucket_preset=stage9", "stage9")])
def test_a_bad_training_override_fails_in_dagster_before_any_process_starts(tiny_dataset_version, override, named):
    """A typo in an override (a config field, a model field, a preset name) fails the asset with it named, and no
    trainer ever starts (no run folder)."""
    from dagster import materialize

    from assets.training import trained_model
    from resources.lakehouse import Lakehouse
    from resources.launcher import LocalLauncher
    from resources.tracking import Tracking

    home, version = tiny_dataset_version
    lake = Lakehouse(home=str(home))
    with instance_for_test() as instance:
        result = materialize(
            [trained_model], instance=instance, raise_on_error=False,
            resources={"lakehouse": lake, "tracking": Tracking(), "launcher": LocalLauncher(nproc=2, python=sys.executable)},
            run_config={"ops": {"trained_model": {"config": {"dataset_version": version, "overrides": [override]}}}},
        )
        assert not result.success
        failure = [e for e in result.all_events if e.is_step_failure][0].step_failure_data.user_failure_data
        assert override in failure.description and named in failure.description
    assert not lake.checkpoints_dir.exists() or not any(lake.checkpoints_dir.rglob("run-*"))


@pytest.fixture
def tiny_dataset_version(tiny_dataset, tmp_path):
    from curation.datasets import build_dataset
    from curation.filters import FilterSpec

    home = tmp_path / "home"
    clips = pl.read_parquet(tiny_dataset)
    tables = {"clips": clips.drop("text"), "captions": clips.select("id", "text")}
    built = build_dataset(tables, FilterSpec(), {"clips": "tiny"}, home / "lake" / "datasets")
    return home, built.version
