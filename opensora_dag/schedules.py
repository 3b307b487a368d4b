"""Schedules: a weekly retrain on the newest curated dataset, when there is new data since the last model."""

from dagster import RunRequest, ScheduleEvaluationContext, SkipReason, schedule

from opensora_dag.jobs import training_job


@schedule(
    name="weekly_retrain",
    job=training_job,
    cron_schedule="0 3 * * 1",  # Mondays 03:00
    execution_timezone="UTC",
    description="Every week, retrain and evaluate on the newest curated dataset version, unless the latest model "
                "already trained on it.",
)
def weekly_retrain(context: ScheduleEvaluationContext):
    from opensora_dag.sensors import latest_metadata, retrain_decision

    dataset = latest_metadata(context.instance, "curated_dataset")
    model = latest_metadata(context.instance, "trained_model")
    go, why = retrain_decision(dataset, model, min_new_clips=1)  # any new data is worth the weekly run
    if not go:
        return SkipReason(f"no new data since the last model: {why}")
    version = str(dataset["version"])
    return RunRequest(run_key=f"weekly:{version}:{context.scheduled_execution_time:%Y-%m-%d}",
                      tags={"opensora/dataset_version": version})
