"""Training launchers: how the ``trained_model`` asset starts ``training.train`` somewhere.

``LocalLauncher`` (embedded default) runs ``torchrun --nproc-per-node N`` on this machine through Dagster Pipes;
``KubernetesLauncher`` (resources/launcher_k8s.py) runs the same command as a multi-node Indexed Job. Both run the
same entry point, which reports back through dagster-pipes from rank 0.
"""

import os
import socket
import sys
from pathlib import Path

from dagster import AssetExecutionContext, ConfigurableResource, MaterializeResult, PipesSubprocessClient
from pydantic import Field

REPO_ROOT = Path(__file__).resolve().parents[1]


class TrainingLauncher(ConfigurableResource):
    """Starts ``python -m training.train ARGV`` and returns what rank 0 reported."""

    def launch(self, context: AssetExecutionContext, argv: list[str], env: dict[str, str] | None = None) -> MaterializeResult:
        raise NotImplementedError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalLauncher(TrainingLauncher):
    nproc: int = Field(2, ge=1, description="Processes (CPU: gloo ranks; GPU: one per device).")
    python: str = Field(default_factory=lambda: sys.executable)

    def command(self, argv: list[str]) -> list[str]:
        return [
            self.python, "-m", "torch.distributed.run", "--nproc-per-node", str(self.nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "training.train", *argv,
        ]

    def launch(self, context: AssetExecutionContext, argv: list[str], env: dict[str, str] | None = None) -> MaterializeResult:
        full_env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        invocation = PipesSubprocessClient(cwd=str(REPO_ROOT)).run(context=context, command=self.command(argv), env=full_env)
        return invocation.get_materialize_result()
