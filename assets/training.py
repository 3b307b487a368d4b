"""Training assets: launch ``training.train`` on the newest curated dataset version through a launcher resource."""

import json
from pathlib import Path

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from common.storage import DATASETS, local_dataset_version
from resources.lakehouse import Lakehouse
from resources.launcher import TrainingLauncher
from resources.tracking import Tracking


class TrainingRunConfig(Config):
    preset: str = Field("demo-cpu", description="Training preset: demo-cpu, stage1, stage2, stage3 or a YAML path.")
    steps: int | None = Field(None, description="Override the preset's number of steps.")
    overrides: list[str] = Field(default_factory=list, description="Config overrides, e.g. ['optim.lr=1e-4'].")
    dataset_version: str | None = Field(None, description="Train on this version instead of the newest curated one.")


def validated_train_config(config: TrainingRunConfig):
    """The run's ``training.config.TrainConfig``: the preset with the overrides applied, validated; a bad preset,
    field or value raises ``dagster.Failure`` naming it."""
    from dagster import Failure
    from pydantic import ValidationError

    from training.config import load_train_config

    overrides = [*config.overrides, *([f"steps={config.steps}"] if config.steps is not None else [])]
    try:
        return load_train_config(config.preset, overrides)
    except (ValueError, ValidationError, FileNotFoundError) as err:
        raise Failure(description=f"training config {config.preset!r} with overrides {overrides}: {err}") from err


def current_dataset_version(context: AssetExecutionContext, lakehouse: Lakehouse) -> str:
    """The version the latest ``curated_dataset`` materialization produced (else the newest on disk)."""
    from curation.datasets import latest_published_version

    event = context.instance.get_latest_materialization_event(AssetKey("curated_dataset"))
    if event is not None and event.asset_materialization is not None:
        version = event.asset_materialization.metadata.get("version")
        if version is not None:
            return str(version.value)
    latest = latest_published_version(lakehouse.storage)  # local folder, or the newest published on the object store
    if latest is None:
        raise ValueError("no curated dataset version exists yet: materialize curated_dataset first")
    return latest.version


def runs_root(lakehouse: Lakehouse, preset: str, version: str) -> Path:
    """Where the runs of ``preset`` on dataset ``version`` live: ``checkpoints/<preset>/<version>/run-NNN``.

    ``training.train --resume auto`` picks the run folder: it continues the newest run if it did not finish and no
    live process holds its lease (a crashed materialization), and starts the next ``run-NNN`` otherwise, so a
    second materialization, the weekly schedule during a long run or a relaunched Kubernetes Job never writes
    into a folder that another training still writes.
    """
    return lakehouse.checkpoints_dir / Path(preset).stem / version


@asset(
    deps=["curated_dataset"],
    group_name="training",
    pool="gpu",
    kinds={"pytorch", "mlflow"},
    description="STDiT2 trained on the newest curated dataset version (ColossalAI, launched by the TrainingLauncher).",
)
def trained_model(
    context: AssetExecutionContext,
    config: TrainingRunConfig,
    lakehouse: Lakehouse,
    tracking: Tracking,
    launcher: TrainingLauncher,
) -> MaterializeResult:
    version = config.dataset_version or current_dataset_version(context, lakehouse)
    dataset_dir = local_dataset_version(lakehouse, version)  # on S3: a cached local copy of the version folder
    if not (dataset_dir / "data.parquet").is_file():
        raise FileNotFoundError(f"dataset version {version} has no data.parquet under {dataset_dir}")
    num_rows = json.loads((dataset_dir / "manifest.json").read_text())["counts"]["kept"]
    root = runs_root(lakehouse, config.preset, version)
    # The trainers get the version's own location: an s3:// URL on an object store (each pod, on any node, reads it
    # through its own cache), the folder itself on local disk.
    dataset_arg = lakehouse.storage.url(*DATASETS, version) if lakehouse.location.remote else str(dataset_dir)
    # The whole config is validated here, so a typo in an override fails this asset before any process starts; the
    # trainers get it serialised, exactly as validated.
    train_config = validated_train_config(config)
    argv = [config.preset, "--dataset", dataset_arg, "--outdir", str(root), "--resume=auto",
            "--tracking-uri", tracking.uri(lakehouse.root), "--config-json", train_config.model_dump_json()]
    context.log.info(f"training {config.preset} on dataset {version} ({num_rows} clips) in a run folder under {root}")
    result = launcher.launch(context, argv, env={"OPENSORA_HOME": str(lakehouse.root)})

    metadata = dict(result.metadata or {})
    run_dir = metadata.get("run_dir")  # the run folder rank 0 trained in
    outdir = Path(str(run_dir.value)) if run_dir is not None else root
    metadata.update({"dataset_version": version, "dataset_rows": num_rows, "preset": config.preset, "outdir": MetadataValue.path(str(outdir))})
    curve = outdir / "loss_curve.png"
    if curve.is_file():
        metadata["loss_curve"] = MetadataValue.path(str(curve))
    report = outdir / "bucket_report.md"
    if report.is_file():
        metadata["bucket_report"] = MetadataValue.md(report.read_text())
    return MaterializeResult(metadata=metadata, data_version=result.data_version)
