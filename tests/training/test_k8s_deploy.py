"""deploy/: the production dagster.yaml passes Dagster's own config validation, and the README's manifests are valid."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from training.k8s_validation import validate_manifest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
INSTANCE_YAML = DEPLOY / "dagster.k8s.yaml"

FAKE_PG = {
    "DAGSTER_PG_USERNAME": "dagster_fake_user",
    "DAGSTER_PG_PASSWORD": "fake-pg-password-1a2b",
    "DAGSTER_PG_HOST": "postgres.fake.internal",
    "DAGSTER_PG_DB": "dagster_fake_db",
    "DAGSTER_PG_PORT": "6543",
}

FAKE_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {server: "https://127.0.0.1:6443"}
contexts:
- name: fake
  context: {cluster: fake, user: fake}
current-context: fake
users:
- name: fake
  user: {token: not-a-real-token}
"""


@pytest.fixture
def pg_env(monkeypatch):
    for key, value in FAKE_PG.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def instance_config(tmp_path, pg_env) -> dict:
    """The file as Dagster loads it: schema-validated by `dagster_instance_config`."""
    from dagster._core.instance.config import dagster_instance_config

    shutil.copy(INSTANCE_YAML, tmp_path / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    return dict(config)


def test_instance_config_validates_and_holds_no_credentials(instance_config):
    from dagster._config import process_config
    from dagster._core.storage.config import pg_config

    # Every Postgres field is an env reference; resolving it reads the (fake) environment.
    db = instance_config["storage"]["postgres"]["postgres_db"]
    for key in ("username", "password", "hostname", "db_name", "port"):
        assert set(db[key]) == {"env"}, f"postgres_db.{key} must come from the environment"
    resolved = process_config(pg_config(), instance_config["storage"]["postgres"])
    assert resolved.success, resolved.errors
    assert resolved.value["postgres_db"]["password"] == FAKE_PG["DAGSTER_PG_PASSWORD"]
    assert resolved.value["postgres_db"]["port"] == 6543

    text = INSTANCE_YAML.read_text()
    for value in FAKE_PG.values():
        assert value not in text


def test_run_coordinator_and_concurrency(instance_config):
    from dagster._core.instance.config import ConcurrencyConfig, PoolGranularity
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster._serdes.config_class import ConfigurableClassData

    rc = instance_config["run_coordinator"]
    coordinator = ConfigurableClassData(rc["module"], rc["class"], yaml.dump(rc.get("config", {}))).rehydrate()
    assert isinstance(coordinator, QueuedRunCoordinator)

    concurrency = ConcurrencyConfig.from_concurrency_settings(instance_config["concurrency"], None)
    assert concurrency.pool_config.pool_granularity == PoolGranularity.RUN
    assert concurrency.pool_config.default_pool_limit == 1
    assert instance_config["run_monitoring"]["enabled"] is True
    # The `gpu` pool's limit is set with the CLI, documented next to the file.
    assert "dagster instance concurrency set gpu" in INSTANCE_YAML.read_text()
    assert "dagster instance concurrency set gpu" in (DEPLOY / "README.md").read_text()


def test_k8s_run_launcher_builds_a_valid_run_worker_job(instance_config, tmp_path):
    """Instantiate the configured K8sRunLauncher (fake kubeconfig instead of in-cluster) and render a run worker."""
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._serdes.config_class import ConfigurableClassData
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job
    from kubernetes.client import ApiClient

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(FAKE_KUBECONFIG)
    rl = instance_config["run_launcher"]
    assert rl["config"]["load_incluster_config"] is True
    config = {**rl["config"], "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    launcher = ConfigurableClassData(rl["module"], rl["class"], yaml.dump(config)).rehydrate()
    assert isinstance(launcher, K8sRunLauncher)
    assert launcher.job_namespace == "opensora"
    assert launcher.env_secrets == ["opensora-dagster-postgres", "opensora-lake", "opensora-object-store"]

    run = DagsterRun(job_name="training_job", run_id="0123abcd-0000-4000-8000-000000000000")
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
    job = construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(job_image="registry.example.com/opensora:1.0", run_launcher=launcher),
        args=["dagster", "api", "execute_run", "{}"],
        job_name="dagster-run-0123abcd",
        pod_name="dagster-run-0123abcd",
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/run-id": run.run_id},
    )
    body = ApiClient().sanitize_for_serialization(job)
    validate_manifest(body)
    pod = body["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "opensora-dagster-runs"
    assert {"secretRef": {"name": "opensora-dagster-postgres"}} in pod["containers"][0]["envFrom"]
    assert {"name": "opensora-data", "persistentVolumeClaim": {"claimName": "opensora-data"}} in pod["volumes"]
    assert FAKE_PG["DAGSTER_PG_PASSWORD"] not in str(body)


def test_readme_manifests_are_valid():
    blocks = re.findall(r"```yaml\n(.*?)```", (DEPLOY / "README.md").read_text(), flags=re.DOTALL)
    manifests = [doc for block in blocks for doc in yaml.safe_load_all(block) if doc and "apiVersion" in doc]
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == ["PersistentVolumeClaim", "Role", "RoleBinding", "ServiceAccount", "ServiceAccount"]
    for manifest in manifests:
        validate_manifest(manifest)


def test_the_readme_python_snippets_run(tmp_path):
    """Every ``python - <<'EOF'`` example in deploy/README.md runs as written (a moved import once broke one)."""
    import subprocess
    import sys

    snippets = re.findall(r"python - <<'EOF'\n(.*?)\nEOF", (DEPLOY / "README.md").read_text(), flags=re.S)
    assert snippets
    for code in snippets:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=DEPLOY.parent,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
