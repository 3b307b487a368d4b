"""Schedules: a weekly retrain on whatever the newest curated dataset is."""

from dagster import ScheduleDefinition

from opensora_dag.jobs import training_job

weekly_retrain = ScheduleDefinition(
    name="weekly_retrain",
    job=training_job,
    cron_schedule="0 3 * * 1",  # Mondays 03:00
    execution_timezone="UTC",
    description="Retrain and evaluate every week on the newest curated dataset version.",
)
