"""Training assets: launch ``training.train`` on the newest curated dataset version through a launcher resource."""

import json
from pathlib import Path

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from resources.lakehouse import Lakehouse
from resources.launcher import TrainingLauncher
from resources.tracking import Tracking


class TrainingRunConfig(Config):
    preset: str = Field("demo-cpu", description="Training preset: demo-cpu, stage1, stage2, stage3 or a YAML path.")
    steps: int | None = Field(None, description="Override the preset's number of steps.")
    overrides: list[str] = Field(default_factory=list, description="Config overrides, e.g. ['optim.lr=1e-4'].")
    dataset_version: str | None = Field(None, description="Train on this version instead of the newest curated one.")


def current_dataset_version(context: AssetExecutionContext, lakehouse: Lakehouse) -> str:
    """The version the latest ``curated_dataset`` materialization produced (else the newest on disk)."""
    from curation.datasets import latest_version

    event = context.instance.get_latest_materialization_event(AssetKey("curated_dataset"))
    if event is not None and event.asset_materialization is not None:
        version = event.asset_materialization.metadata.get("version")
        if version is not None:
            return str(version.value)
    latest = latest_version(lakehouse.lake_dir / "datasets")
    if latest is None:
        raise ValueError("no curated dataset version exists yet: materialize curated_dataset first")
    return latest.version


def run_folder(root: Path) -> Path:
    """Resume the newest run under ``root`` if it did not finish, else start the next ``run-NNN``."""
    runs = sorted(p for p in root.glob("run-*") if p.is_dir())
    if runs and not (runs[-1] / "final_metrics.json").is_file():
        return runs[-1]
    return root / f"run-{len(runs) + 1:03d}"


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
    dataset_dir = lakehouse.lake_dir / "datasets" / version
    if not (dataset_dir / "data.parquet").is_file():
        raise FileNotFoundError(f"dataset version {version} has no data.parquet under {dataset_dir}")
    num_rows = json.loads((dataset_dir / "manifest.json").read_text())["counts"]["kept"]
    outdir = run_folder(lakehouse.checkpoints_dir / Path(config.preset).stem / version)
    argv = [config.preset, "--dataset", str(dataset_dir), "--outdir", str(outdir), "--resume",
            "--tracking-uri", tracking.uri(lakehouse.root)]
    if config.steps is not None:
        argv += ["--steps", str(config.steps)]
    for override in config.overrides:
        argv += ["--set", override]
    context.log.info(f"training {config.preset} on dataset {version} ({num_rows} clips) into {outdir}")
    result = launcher.launch(context, argv, env={"OPENSORA_HOME": str(lakehouse.root)})

    metadata = dict(result.metadata or {})
    metadata.update({"dataset_version": version, "dataset_rows": num_rows, "preset": config.preset, "outdir": MetadataValue.path(str(outdir))})
    curve = outdir / "loss_curve.png"
    if curve.is_file():
        metadata["loss_curve"] = MetadataValue.path(str(curve))
    report = outdir / "bucket_report.md"
    if report.is_file():
        metadata["bucket_report"] = MetadataValue.md(report.read_text())
    return MaterializeResult(metadata=metadata, data_version=result.data_version)
