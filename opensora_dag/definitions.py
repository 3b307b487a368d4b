"""The code location: every asset, check, job, sensor, schedule and resource of opensora-dag."""

from dagster import Definitions

from assets.curation import raw_videos
from opensora_dag.jobs import curation_job
from opensora_dag.sensors import landing_zone_sensor
from resources.lakehouse import Lakehouse

defs = Definitions(
    assets=[raw_videos],
    jobs=[curation_job],
    sensors=[landing_zone_sensor],
    resources={"lakehouse": Lakehouse()},
)
