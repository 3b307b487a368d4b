"""The code location: every asset, check, job, sensor, schedule and resource of opensora-dag."""

from dagster import Definitions

from assets.checks import CURATION_CHECKS
from assets.curation import CURATION_ASSETS
from assets.datasets import curated_dataset
from assets.evaluation import EVALUATION_ASSETS, EVALUATION_CHECKS
from assets.scoring import SCORE_ASSETS
from assets.training import trained_model
from opensora_dag.jobs import curation_job, dataset_job, training_job
from opensora_dag.schedules import weekly_retrain
from opensora_dag.sensors import dataset_after_curation, landing_zone_sensor, retrain_on_new_data
from resources.lakehouse import Lakehouse
from resources.launcher import LocalLauncher
from resources.model_store import ModelStore
from resources.tracking import Tracking

defs = Definitions(
    assets=[*CURATION_ASSETS, *SCORE_ASSETS, curated_dataset, trained_model, *EVALUATION_ASSETS],
    asset_checks=[*CURATION_CHECKS, *EVALUATION_CHECKS],
    jobs=[curation_job, dataset_job, training_job],
    sensors=[landing_zone_sensor, dataset_after_curation, retrain_on_new_data],
    schedules=[weekly_retrain],
    resources={
        "lakehouse": Lakehouse(),
        "model_store": ModelStore(),
        "tracking": Tracking(),
        "launcher": LocalLauncher(),
    },
)
