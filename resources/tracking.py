"""MLflow as a Dagster resource: where runs are tracked and how to link to them.

Embedded default: a sqlite store under ``$OPENSORA_HOME/mlruns``. Production: a tracking server URL; its
credentials come from the environment (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or
``MLFLOW_TRACKING_TOKEN``, set from a Kubernetes Secret), which MLflow reads itself: they never pass through here.
"""

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field


class Tracking(ConfigurableResource):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; unset = sqlite under OPENSORA_HOME/mlruns.")
    experiment: str = "opensora-dag"

    def uri(self, opensora_home: str | Path) -> str:
        from training.tracking import default_tracking_uri

        return self.tracking_uri or default_tracking_uri(opensora_home)

    def client(self, opensora_home: str | Path):
        import mlflow

        return mlflow.MlflowClient(self.uri(opensora_home))
