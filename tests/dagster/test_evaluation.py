"""model_evaluation and not_worse_than_best materialized in-process against tiny checkpoints made offline."""

import json
from pathlib import Path

import mlflow
import pytest
from dagster import AssetKey, AssetMaterialization, DagsterInstance, MetadataValue, materialize

from assets.evaluation import EVALUATION_ASSETS, EVALUATION_CHECKS, model_evaluation, not_worse_than_best
from resources.lakehouse import Lakehouse
from resources.model_store import ModelStore
from resources.tracking import Tracking
from tests.training.test_evaluate import make_tiny_checkpoint

RUN_CONFIG = {"ops": {"model_evaluation": {"config": {
    "max_prompts": 2, "num_frames": 8, "height": 32, "width": 48, "num_sampling_steps": 3, "embed_previews": 1,
    "vbench_dir": "/nonexistent/vbench",
}}}}


def report_trained_model(instance: DagsterInstance, checkpoint: Path, run_id: str | None) -> None:
    """What the trained_model asset records (through Pipes): the final checkpoint path and the MLflow run."""
    instance.report_runless_asset_event(AssetMaterialization(
        "trained_model", metadata={"final_checkpoint": MetadataValue.path(str(checkpoint)), "mlflow_run_id": run_id or ""}))


def check_result(result):
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == "not_worse_than_best"
    return evaluation


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    home = root / "home"
    lake = Lakehouse(home=str(home))
    lake.ensure_layout()
    uri = f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"
    from training.tracking import ensure_experiment

    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(uri), run_name="demo-cpu").info.run_id
    client.set_terminated(run_id)
    first = make_tiny_checkpoint(root / "ckpts", step=1, seed=0, mlflow_run_id=run_id)
    second = make_tiny_checkpoint(root / "ckpts", step=2, seed=1, mlflow_run_id=run_id)
    resources = {"lakehouse": lake, "tracking": Tracking(tracking_uri=uri), "model_store": ModelStore(device="cpu")}
    instance = DagsterInstance.ephemeral()
    return {"lake": lake, "uri": uri, "run_id": run_id, "ckpts": (first, second), "resources": resources, "instance": instance}


def test_exports():
    assert EVALUATION_ASSETS == [model_evaluation] and EVALUATION_CHECKS == [not_worse_than_best]
    spec = model_evaluation.specs_by_key[AssetKey("model_evaluation")]
    assert spec.group_name == "evaluation" and model_evaluation.op.pool == "gpu"
    assert AssetKey("trained_model") in {dep.asset_key for dep in spec.deps}


def test_evaluate_register_and_check_two_checkpoints(setup):
    instance, first, second = setup["instance"], *setup["ckpts"]

    # 1. The first checkpoint: nothing registered yet, so it becomes the best and the check passes.
    report_trained_model(instance, first, setup["run_id"])
    result = materialize([model_evaluation, not_worse_than_best], instance=instance, resources=setup["resources"],
                         run_config=RUN_CONFIG)
    assert result.success
    meta = result.asset_materializations_for_node("model_evaluation")[0].metadata
    val1 = meta["val_loss"].value
    # No CLIP weights, and the prompts name colours and shapes: the registry ranks by weight-free prompt adherence.
    assert meta["ranked_by"].value == "prompt_adherence"
    adh1 = meta["prompt_adherence"].value
    # tiny random encoders: a demo checkpoint, registered beside (never among) real ones
    assert meta["is_best"].value is True and meta["registered_version"].value == "opensora-stdit2-demo v1"
    assert meta["registered_model"].value == "opensora-stdit2-demo" and meta["cohort_objective"].value == "iddpm"
    # prompt adherence (weight-free) with its shuffled-prompt and step-0 controls, per sample beside the previews
    assert 0.0 <= adh1 <= 1.0 and "prompt_adherence_shuffled" in meta and "prompt_adherence_step0" in meta
    assert "| adherence |" in meta["previews"].value
    controls = meta["prompt_adherence_vs_controls"].value
    assert "step 0 (untrained)" in controls and "shuffled prompts" in controls and "| mean |" in controls
    assert "best_before" not in meta and "best_val_loss_before" not in meta
    assert "data:image/gif;base64," in meta["previews"].value  # the UI shows the sample inline
    assert Path(meta["sample_00"].value).suffix == ".mp4" and Path(meta["sample_00"].value).is_file()
    assert "CLIP checkpoint path is not set" in meta["skipped"].value
    assert "weights not found at /nonexistent/vbench" in meta["skipped"].value
    first_check = check_result(result)
    assert first_check.passed and first_check.metadata["best_registered_prompt_adherence"].value == "none registered"
    assert first_check.metadata["ranked_by"].value == "prompt_adherence"

    # 2. The second checkpoint (other weights): registered only if better; the check fails exactly when worse.
    report_trained_model(instance, second, setup["run_id"])
    result = materialize([model_evaluation, not_worse_than_best], instance=instance, resources=setup["resources"],
                         run_config=RUN_CONFIG)
    assert result.success  # a failed non-blocking check does not fail the run
    meta = result.asset_materializations_for_node("model_evaluation")[0].metadata
    val2, adh2 = meta["val_loss"].value, meta["prompt_adherence"].value
    assert val2 != val1 and meta["best_before"].value == pytest.approx(adh1)
    assert meta["is_best"].value is (adh2 > adh1)  # higher adherence is better; a tie is no improvement
    second_check = check_result(result)
    assert second_check.passed == (adh2 >= adh1)
    assert second_check.metadata["prompt_adherence"].value == pytest.approx(adh2)
    assert second_check.metadata["best_registered_prompt_adherence"].value == pytest.approx(adh1)

    client = mlflow.MlflowClient(setup["uri"])
    best = client.get_model_version_by_alias("opensora-stdit2-demo", "best")
    assert best.tags["ranked_by"] == "prompt_adherence"
    assert float(best.tags["prompt_adherence"]) == pytest.approx(max(adh1, adh2))
    assert best.tags["checkpoint"] == str((second if adh2 > adh1 else first).resolve())

    # 3. Both evaluations are logged to the training run and kept in the evaluations table.
    run = client.get_run(setup["run_id"])
    assert [m.step for m in client.get_metric_history(setup["run_id"], "eval/val_loss")] == [1, 2]
    assert run.data.tags["eval.skipped.clip_score"].startswith("CLIP score skipped")
    assert {"eval/prompt_adherence", "eval/prompt_adherence_shuffled", "eval/prompt_adherence_step0"} <= set(run.data.metrics)
    lake = setup["lake"]
    table = lake.query("SELECT step, val_loss, is_best, skipped FROM evaluations ORDER BY step")
    assert table["step"].to_list() == [1, 2]
    assert table["val_loss"].to_list() == pytest.approx([val1, val2])
    assert table["is_best"].to_list() == [True, adh2 > adh1]
    assert "clip_score" in json.loads(table["skipped"][0])


    # 4. Evaluating the first checkpoint again: not better than itself or the best, and its row is replaced.
    report_trained_model(instance, first, setup["run_id"])
    result = materialize([model_evaluation, not_worse_than_best], instance=instance, resources=setup["resources"],
                         run_config=RUN_CONFIG)
    meta = result.asset_materializations_for_node("model_evaluation")[0].metadata
    assert meta["val_loss"].value == pytest.approx(val1) and meta["is_best"].value is False  # deterministic
    assert meta["prompt_adherence"].value == pytest.approx(adh1)
    assert check_result(result).passed == (adh1 >= adh2)
    assert sorted(lake.query("SELECT step FROM evaluations")["step"].to_list()) == [1, 2]
