"""Jobs: named selections the sensors, schedules and the UI launch."""

from dagster import AssetSelection, define_asset_job

from assets.curation import BATCH_ASSETS

# Every partitioned curation asset: one run per landing batch.
curation_job = define_asset_job(
    "curation_job",
    selection=AssetSelection.assets(*BATCH_ASSETS),
    description="Curate one landing batch: probe, shots, clips, scores, captions.",
)
