"""Sensors: turn new (or changed) landing folders into ``video_batches`` partitions and curation runs."""


import hashlib
import json
import os

from dagster import RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from assets.partitions import video_batches
from opensora_dag.jobs import curation_job
from resources.batch_keys import is_valid_batch_key, read_landing_map, register_landing_folder
from resources.lakehouse import Lakehouse


def folder_digest(files: list[tuple[str, int]]) -> str:
    """A digest of a folder's file list: relative names and sizes (not mtimes, which ``cp -p``/``rsync -a`` keep)."""
    return hashlib.sha256(json.dumps(sorted(files)).encode()).hexdigest()[:16]


def landing_folders(storage) -> dict[str, str]:
    """Every non-empty, non-hidden folder directly under ``landing/`` (local or on S3) -> :func:`folder_digest`."""
    found = {}
    for name, _size, is_dir in storage.list_dir(storage.url("landing")):
        if not is_dir or name.startswith("."):
            continue
        files = storage.files(storage.url("landing", name))
        if files:
            found[name] = folder_digest(files)
    return found


def settled_batches(current: dict[str, str], previous: dict[str, str], requested: dict[str, str]) -> dict[str, str]:
    """Folders to curate now: the file list and sizes are what the previous evaluation saw (settled), and differ from
    what the folder's last run was requested with (new, or it gained or changed files since). Folder -> digest."""
    return {name: digest for name, digest in sorted(current.items())
            if previous.get(name) == digest and requested.get(name) != digest}


def _read_cursor(cursor: str | None) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """(seen on the previous tick, digest each folder was last requested with, keys of a cursor in the old format)."""
    state = json.loads(cursor) if cursor else {}
    if isinstance(state, list):  # the previous format: the keys already requested
        return {}, {}, {str(k) for k in state}
    return dict(state.get("seen", {})), dict(state.get("requested", {})), set()


@sensor(job=curation_job, minimum_interval_seconds=30,
        description="Registers landing/<folder>/ once its file list is settled, and curates it again when it changes.")
def landing_zone_sensor(context: SensorEvaluationContext, lakehouse: Lakehouse):
    seen, requested, legacy = _read_cursor(context.cursor)
    current = landing_folders(lakehouse.storage)
    registered = {folder: key for key, folder in read_landing_map(lakehouse).items()}
    if legacy:  # folders an old cursor already requested count as requested with what they hold now
        requested = {name: d for name, d in current.items() if registered.get(name) in legacy}
    keys, requests, problems = [], [], []
    for name, digest in settled_batches(current, seen, requested).items():
        key = registered.get(name, "")
        if not is_valid_batch_key(key):  # not mapped on an earlier tick (or by `ingest`): map it now
            try:
                key = register_landing_folder(lakehouse, name)
            except Exception as err:  # one unmappable folder must not stop the others; it is reported every tick
                problems.append(f"landing folder {name!r} skipped: {err}")
                context.log.warning(problems[-1])
                continue
        keys.append(key)
        requests.append(RunRequest(run_key=f"landing:{key}:{digest}", partition_key=key))
        requested[name] = digest
    cursor = json.dumps({"seen": current, "requested": {n: d for n, d in requested.items() if n in current}},
                        sort_keys=True)
    if not requests:
        context.update_cursor(cursor)
        return SkipReason("; ".join([f"no new or changed settled folders in {lakehouse.storage.url('landing')}",
                                     *problems]))
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[video_batches.build_add_request(sorted(set(keys)))],
        cursor=cursor,
    )


# A new dataset version must bring at least this many more clips than the latest model saw.
RETRAIN_MIN_NEW_CLIPS = int(os.environ.get("OPENSORA_RETRAIN_MIN_NEW_CLIPS", "100"))


def latest_metadata(instance, key: str) -> dict:
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
    dataset = latest_metadata(context.instance, "curated_dataset")
    model = latest_metadata(context.instance, "trained_model")
    go, why = retrain_decision(dataset, model, RETRAIN_MIN_NEW_CLIPS)
    if not go:
        return SkipReason(why)
    version = str(dataset["version"])
    if context.cursor == version:
        return SkipReason(f"a retrain for {version} was already requested")
    context.update_cursor(version)
    return RunRequest(run_key=f"retrain:{version}", tags={"opensora/dataset_version": version})


# Everything curated_dataset reads: a newer materialization of any of them (any batch) means a new dataset version
# may be due. Listed by name so this module does not import the asset modules.
DATASET_INPUTS = ("clips", "captions", "aesthetic_scores", "motion_scores", "ocr_scores", "match_scores")


@sensor(job_name="dataset_job", minimum_interval_seconds=60,
        description="Rebuilds the curated dataset when a batch's clips, scores or captions change and no curation run "
                    "is still going, so landing -> curation -> dataset -> retrain needs no manual step.")
def dataset_after_curation(context: SensorEvaluationContext):
    from dagster import AssetKey, DagsterRunStatus, RunsFilter

    latest = 0
    for key in DATASET_INPUTS:
        records = context.instance.fetch_materializations(AssetKey(key), limit=1, ascending=False).records
        latest = max(latest, records[0].storage_id if records else 0)
    seen = int(context.cursor or 0)
    if latest <= seen:
        return SkipReason("no curation output newer than the last dataset build")
    busy = context.instance.get_runs(RunsFilter(job_name="curation_job", statuses=[
        DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]),
        limit=1)
    if busy:
        return SkipReason(f"curation run {busy[0].run_id} is still going; the dataset waits for it")
    context.update_cursor(str(latest))
    return RunRequest(run_key=f"dataset:{latest}")
