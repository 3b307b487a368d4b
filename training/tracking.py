"""MLflow tracking for training runs: one MLflow run per training run, logged from rank 0 only.

The tracking URI comes from the caller (the Dagster ``Tracking`` resource, the CLI) or ``MLFLOW_TRACKING_URI``;
the embedded default is a sqlite store under ``$OPENSORA_HOME/mlruns``. Credentials for a tracking server come
from the environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``), never from code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

EXPERIMENT = "opensora-dag"


def default_tracking_uri(opensora_home: str | Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = Path(opensora_home or os.environ.get("OPENSORA_HOME", ".opensora")).resolve()
    (home / "mlruns").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts beside a sqlite store (``mlruns/artifacts``); a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def ensure_experiment(tracking_uri: str, name: str = EXPERIMENT) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(tracking_uri))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits and ``_ - . / space``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


class RunTracker:
    """A thin wrapper over one MLflow run; every method is a no-op when ``enabled`` is False (ranks > 0)."""

    def __init__(self, tracking_uri: str, run_name: str, enabled: bool, run_id: str | None = None, experiment: str = EXPERIMENT):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._run_name = run_name
        self._experiment = experiment

    def start(self, system_metrics: bool = True) -> str | None:
        if not self.enabled:
            return None
        import mlflow

        experiment_id = ensure_experiment(self.tracking_uri, self._experiment)
        run = mlflow.start_run(
            run_id=self.run_id, run_name=None if self.run_id else self._run_name,
            experiment_id=experiment_id, log_system_metrics=system_metrics,
        )
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            existing = mlflow.get_run(self.run_id).data.params
            fresh = {k: v for k, v in flatten(params).items() if k not in existing}
            if fresh:
                mlflow.log_params(fresh)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled and metrics:
            import mlflow

            mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items() if v is not None}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path)

    def log_dataset(self, frame, name: str, version: str, source: str) -> None:
        """Record the training table as an MLflow dataset input, tagged with its version."""
        if not self.enabled:
            return
        import mlflow

        dataset = mlflow.data.from_pandas(frame.to_pandas(), source=source, name=f"{name}@{version}", digest=version[:36])
        mlflow.log_input(dataset, context="training", tags={"version": version})

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run(status=status)

    @property
    def run_url(self) -> str | None:
        if not self.run_id:
            return None
        if self.tracking_uri.startswith(("http://", "https://")):
            import mlflow

            experiment_id = mlflow.get_run(self.run_id).info.experiment_id
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
        return f"{self.tracking_uri} run {self.run_id}"
