"""Sensors: turn new landing folders into ``video_batches`` partitions and curation runs."""


import json
import os
import time
from pathlib import Path

from dagster import RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from opensora_dag.jobs import curation_job
from opensora_dag.partitions import video_batches
from resources.batch_keys import is_valid_batch_key, read_landing_map, register_landing_folder
from resources.lakehouse import Lakehouse

# A folder still being copied into landing/ is left for a later tick.
SETTLE_SECONDS = float(os.environ.get("OPENSORA_LANDING_SETTLE_SECONDS", "5"))


def settled_batches(landing_dir: Path, settle_seconds: float = SETTLE_SECONDS) -> dict[str, Path]:
    """Non-empty sub-folders of ``landing_dir`` whose files have not changed for ``settle_seconds``, by folder name.

    Folder names are not keys: :func:`resources.batch_keys.register_landing_folder` maps each to its batch key.
    """
    found: dict[str, Path] = {}
    if not landing_dir.is_dir():
        return found
    now = time.time()
    for folder in sorted(p for p in landing_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in folder.rglob("*") if f.is_file()]
        if not files or now - max(f.stat().st_mtime for f in files) < settle_seconds:
            continue
        found[folder.name] = folder
    return found


@sensor(job=curation_job, minimum_interval_seconds=30, description="Registers new landing/<batch>/ folders and curates them.")
def landing_zone_sensor(context: SensorEvaluationContext, lakehouse: Lakehouse):
    known = set(json.loads(context.cursor)) if context.cursor else set()
    folders = settled_batches(lakehouse.landing_dir)
    registered = {folder: key for key, folder in read_landing_map(lakehouse).items()}
    keys, problems = set(), []
    for name in folders:
        if is_valid_batch_key(registered.get(name, "")):  # mapped on an earlier tick (or by `ingest`): no write needed
            keys.add(registered[name])
            continue
        try:
            keys.add(register_landing_folder(lakehouse, name))
        except Exception as err:  # one unmappable folder must not stop the others; it is reported every tick
            problems.append(f"landing folder {name!r} skipped: {err}")
            context.log.warning(problems[-1])
    new_keys = sorted(keys - known)
    if not new_keys:
        return SkipReason("; ".join([f"no new folders in {lakehouse.landing_dir}", *problems]))
    return SensorResult(
        run_requests=[RunRequest(run_key=f"landing:{key}", partition_key=key) for key in new_keys],
        dynamic_partitions_requests=[video_batches.build_add_request(new_keys)],
        cursor=json.dumps(sorted(known | set(new_keys))),
    )


# A new dataset version must bring at least this many more clips than the latest model saw.
RETRAIN_MIN_NEW_CLIPS = int(os.environ.get("OPENSORA_RETRAIN_MIN_NEW_CLIPS", "100"))


def _latest_metadata(instance, key: str) -> dict:
    from dagster import AssetKey

    event = instance.get_latest_materialization_event(AssetKey(key))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def retrain_decision(dataset: dict, model: dict, min_new_clips: int) -> tuple[bool, str]:
    """Whether a dataset version (metadata of ``curated_dataset``) warrants retraining over the latest model."""
    version, rows = dataset.get("version"), dataset.get("num_rows")
    if version is None or rows is None:
        return False, "no curated dataset version yet"
    if not model:
        return rows >= min_new_clips, f"no model yet; dataset {version} has {rows} clips (need {min_new_clips})"
    if model.get("dataset_version") == version:
        return False, f"the latest model already trained on {version}"
    new = int(rows) - int(model.get("dataset_rows") or 0)
    return new >= min_new_clips, f"dataset {version} has {new} more clips than the model's (need {min_new_clips})"


@sensor(job_name="training_job", minimum_interval_seconds=300, description="Retrains when a dataset version brings enough new clips.")
def retrain_on_new_data(context: SensorEvaluationContext):
    dataset = _latest_metadata(context.instance, "curated_dataset")
    model = _latest_metadata(context.instance, "trained_model")
    go, why = retrain_decision(dataset, model, RETRAIN_MIN_NEW_CLIPS)
    if not go:
        return SkipReason(why)
    version = str(dataset["version"])
    if context.cursor == version:
        return SkipReason(f"a retrain for {version} was already requested")
    context.update_cursor(version)
    return RunRequest(run_key=f"retrain:{version}", tags={"opensora/dataset_version": version})
