"""Jobs: named selections the sensors, schedules and the UI launch."""

from dagster import AssetSelection, define_asset_job


# Every partitioned curation asset: one run per landing batch.
curation_job = define_asset_job(
    "curation_job",
    selection=AssetSelection.groups("curation") - AssetSelection.assets("curated_dataset"),
    description="Curate one landing batch: probe, shots, clips, scores, captions.",
)

# All batches -> one dataset version; requested after every successful curation run.
dataset_job = define_asset_job(
    "dataset_job",
    selection=AssetSelection.assets("curated_dataset"),
    description="Rebuild the curated dataset version from every batch (reused when nothing it reads changed).",
)

# Train on the newest dataset version, then evaluate the new checkpoint.
training_job = define_asset_job(
    "training_job",
    selection=AssetSelection.groups("training", "evaluation"),
    description="Train STDiT2 on the newest curated dataset and evaluate it.",
)
