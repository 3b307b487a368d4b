"""The report of one checkpoint's evaluation, and logging it to MLflow.

    report.save()                                             # <out_dir>/report.json
    run_id = log_to_mlflow(report, tracking_uri)              # eval/<metric>, eval.skipped.<metric>, previews

``training.evaluate`` fills the report; ``training.registry`` ranks and registers checkpoints by it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SampleRecord:
    index: int
    prompt: str
    files: dict[str, str]  # "mp4" (or "png" for one frame) and "gif" -> path
    metrics: dict[str, float | None] = field(default_factory=dict)
    adherence: str = ""  # why the sample scored what it did against its prompt ("red: blob in 7/8 frames, ...")


@dataclass
class EvaluationReport:
    checkpoint: str
    step: int
    objective: str
    dataset_version: str | None
    mlflow_run_id: str | None
    prompt_set: str  # PromptSet.version
    settings: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)  # means over samples, val_loss, val_loss/<bucket>
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> reason
    samples: list[SampleRecord] = field(default_factory=list)
    out_dir: str = ""
    seconds: float = 0.0
    preset: str | None = None  # the training preset's name (TrainConfig.name)

    @property
    def val_loss(self) -> float | None:
        return self.metrics.get("val_loss")

    @property
    def ranked_by(self) -> str:
        """The metric the registry ranks this checkpoint by (:data:`training.registry.RANKING_METRICS`): the CLIP
        score when CLIP weights were local, else weight-free prompt adherence when the prompt set names anything it
        can measure, else the held-out validation loss."""
        if "clip_score" in self.metrics:
            return "clip_score"
        if "prompt_adherence" in self.metrics:
            return "prompt_adherence"
        return "val_loss"

    @property
    def ranking_value(self) -> float | None:
        return self.metrics.get(self.ranked_by)

    @property
    def cohort(self) -> dict[str, str]:
        """What makes two checkpoints comparable: same dataset version, preset and objective (validation losses of
        other data or objectives mean other things), ranked by the same metric, and for the prompt metrics the same
        prompt set (a score on other prompts is another exam)."""
        cohort = {"dataset_version": str(self.dataset_version), "preset": str(self.preset), "objective": self.objective}
        if self.ranked_by != "val_loss":
            cohort.update(ranked_by=self.ranked_by, prompt_set=self.prompt_set)
        return cohort

    @property
    def ema_dir(self) -> Path:
        return Path(self.checkpoint) / "ema"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or Path(self.out_dir) / "report.json")
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


# --------------------------------------------------------------------------------------------------------------
# MLflow: metrics on the training run (the registry of the best checkpoint is training.registry)
# --------------------------------------------------------------------------------------------------------------
def mlflow_client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri)


def ensure_run(client, tracking_uri: str, run_id: str | None, report: EvaluationReport) -> str:
    """The training run (``report.mlflow_run_id``) if there is one, else a fresh evaluation run."""
    from training.tracking import ensure_experiment

    run_id = run_id or report.mlflow_run_id
    if run_id:
        return run_id
    experiment_id = ensure_experiment(tracking_uri)
    run = client.create_run(experiment_id, run_name=f"eval-{Path(report.checkpoint).name}",
                            tags={"checkpoint": report.checkpoint})
    client.set_terminated(run.info.run_id)
    report.mlflow_run_id = run.info.run_id  # later calls (log, register) use the same run
    return run.info.run_id


def log_to_mlflow(report: EvaluationReport, tracking_uri: str, run_id: str | None = None) -> str:
    """Metrics as ``eval/<name>`` at the checkpoint's step, skipped metrics as tags ``eval.skipped.<name>``,
    previews and the report as artifacts under ``eval/step-NNNNNNNN/``. Returns the run id used."""
    from mlflow.entities import Metric, RunTag

    from training.tracking import metric_key

    client = mlflow_client(tracking_uri)
    run_id = ensure_run(client, tracking_uri, run_id, report)
    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(f"eval/{k}"), float(v), now, report.step) for k, v in sorted(report.metrics.items())]
    tags = [RunTag(f"eval.skipped.{metric_key(k).replace('/', '.')}", reason[:5000]) for k, reason in sorted(report.skipped.items())]
    tags += [RunTag("eval.prompt_set", report.prompt_set), RunTag("eval.last_checkpoint", report.checkpoint)]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    where = f"eval/{Path(report.checkpoint).name}"
    if (Path(report.out_dir) / "samples").is_dir():
        client.log_artifacts(run_id, str(Path(report.out_dir) / "samples"), f"{where}/samples")
    report_path = Path(report.out_dir) / "report.json"
    if report_path.is_file():
        client.log_artifact(run_id, str(report_path), where)
    return run_id
