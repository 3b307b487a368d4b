"""KubernetesLauncher against mocked CoreV1Api / BatchV1Api (no cluster), driven through a real Dagster run.

A scripted fake cluster answers the launcher's polls: the Job's status, the Job's pods, and pod 0's log (which
carries the Dagster Pipes messages rank 0 would write). Each scenario asserts what reached the API (bodies,
deletes) and what Dagster recorded (materialization metadata, or the Failure's description and metadata).
"""

# No `from __future__ import annotations`: Dagster inspects the asset's `context` annotation at definition time.
import json
import threading
from collections.abc import Callable, Iterator
from unittest.mock import MagicMock

import pytest
from dagster import AssetExecutionContext, MaterializeResult, asset, materialize
from kubernetes import client
from kubernetes.client.rest import ApiException

from resources.launcher import TrainingLauncher
from resources.launcher_k8s import KubernetesLauncher, LaunchResult
from training.k8s import INDEX_ANNOTATION, JOB_LABEL, RANK0_PREFIX

ARGV = ["demo_cpu", "--dataset", "v1", "--steps", "2", "--outdir", "/data/checkpoints/demo"]


def pipes_line(method: str, params: dict | None) -> str:
    return json.dumps({"__dagster_pipes_version": "0.1", "method": method, "params": params})


RANK0_LOG = [
    "[rank0] step 1/2 loss=0.91",
    pipes_line("opened", {"extras": {}}),
    "[rank0] step 2/2 loss=0.52",
    pipes_line("report_asset_materialization", {
        "asset_key": "trained_model",
        "metadata": {"final_loss": {"raw_value": 0.52, "type": "float"}, "mlflow_run_id": {"raw_value": "abc123", "type": "text"}},
        "data_version": None,
    }),
    pipes_line("closed", {}),
]


def stamped(lines: list[str]) -> list[bytes]:
    return [f"2026-01-01T00:00:{i:02d}.000000000Z {line}\n".encode() for i, line in enumerate(lines)]


class FakeCluster:
    """Just enough of the Kubernetes API for one training Job, scripted per poll."""

    def __init__(self, nodes: int = 2):
        self.nodes = nodes
        self.core = MagicMock(spec=client.CoreV1Api)
        self.batch = MagicMock(spec=client.BatchV1Api)
        self.polls = 0
        self.job_name: str | None = None
        self.job_state: Callable[[int], str] = lambda poll: "Complete" if poll >= 3 else "Running"
        self.pod_phases: Callable[[int], dict[int, str] | None] = lambda poll: {i: "Running" for i in range(self.nodes)}
        self.pod0_waiting: str | None = None
        self.follow_log: Callable[[], Iterator[bytes] | list[bytes]] = lambda: stamped(RANK0_LOG)
        self.tail_logs: dict[int, str] = {}
        self.job_deleted_underneath = False
        self.api_blips: list[Exception] = []  # raised by the next job reads, in order

        self.batch.create_namespaced_job.side_effect = self._create_job
        self.batch.read_namespaced_job_status.side_effect = self._read_job
        self.core.list_namespaced_pod.side_effect = self._list_pods
        self.core.read_namespaced_pod_log.side_effect = self._read_log

    # -- API answers ------------------------------------------------------------------------------------------
    def _create_job(self, namespace, body):
        self.job_name = body["metadata"]["name"]
        return client.V1Job(metadata=client.V1ObjectMeta(name=self.job_name, namespace=namespace))

    def _read_job(self, name, namespace):
        assert name == self.job_name
        if self.job_deleted_underneath:
            raise ApiException(status=404, reason="Not Found")
        if self.api_blips:
            raise self.api_blips.pop(0)
        self.polls += 1
        state = self.job_state(self.polls)
        status = client.V1JobStatus(active=self.nodes)
        if state == "Complete":
            status = client.V1JobStatus(succeeded=self.nodes, conditions=[
                client.V1JobCondition(type="Complete", status="True")])
        elif state == "Failed":
            status = client.V1JobStatus(failed=1, conditions=[
                client.V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded",
                                      message="Job has reached the specified backoff limit")])
        return client.V1Job(status=status)

    def pod_name(self, index: int, generation: int = 0) -> str:
        return f"{self.job_name}-{index}-{'abcde' if generation == 0 else 'zzzzz'}"

    def _list_pods(self, namespace, label_selector):
        assert label_selector == f"{JOB_LABEL}={self.job_name}"
        phases = self.pod_phases(self.polls)
        items = []
        for index, phase in (phases or {}).items():
            waiting = None
            if index == 0 and self.pod0_waiting:
                waiting = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(
                    reason=self.pod0_waiting, message="Back-off pulling image \"registry.example.com/opensora:missing\""))
            items.append(client.V1Pod(
                metadata=client.V1ObjectMeta(name=self.pod_name(index), uid=f"uid-{index}",
                                             annotations={INDEX_ANNOTATION: str(index)}),
                status=client.V1PodStatus(phase=phase, container_statuses=[client.V1ContainerStatus(
                    name="trainer", image="x", image_id="", ready=phase == "Running", restart_count=0,
                    state=waiting or client.V1ContainerState())] if phase else None)))
        return client.V1PodList(items=items)

    def _read_log(self, name, namespace, **kwargs):
        if kwargs.get("follow"):
            assert name == self.pod_name(0), "only pod 0's log carries Pipes messages"
            return self.follow_log()
        index = int(name.rsplit("-", 2)[-2])
        return self.tail_logs.get(index, "")

    # -- what the launcher sent -------------------------------------------------------------------------------
    @property
    def job_body(self) -> dict:
        return self.batch.create_namespaced_job.call_args.args[1]

    @property
    def service_body(self) -> dict:
        return self.core.create_namespaced_service.call_args.args[1]

    def assert_cleaned_up(self):
        self.batch.delete_namespaced_job.assert_called_once_with(self.job_name, "opensora", propagation_policy="Background")
        self.core.delete_namespaced_service.assert_called_once_with(f"{self.job_name}-rdzv", "opensora")


@asset
def trained_model(context: AssetExecutionContext, launcher: TrainingLauncher) -> MaterializeResult:
    # The call assets/training.py makes on any TrainingLauncher.
    return launcher.launch(context, ARGV, env={"OPENSORA_HOME": "/data/opensora"})


@pytest.fixture
def cluster(monkeypatch) -> FakeCluster:
    fake = FakeCluster(nodes=2)
    monkeypatch.setattr(KubernetesLauncher, "_clients", lambda self: (fake.core, fake.batch))
    return fake


def launcher(**overrides) -> KubernetesLauncher:
    fields = dict(
        image="registry.example.com/opensora:1.0", namespace="opensora", nodes=2, gpus_per_node=8,
        pvc_claim="opensora-data", mlflow_secret="mlflow-credentials", poll_interval_s=0.01,
        timeout_s=30.0, startup_timeout_s=30.0, log_drain_timeout_s=5.0,
    )
    fields.update(overrides)
    return KubernetesLauncher(**fields)


def run(launcher_resource: KubernetesLauncher):
    return materialize([trained_model], resources={"launcher": launcher_resource}, raise_on_error=False)


def failure_of(result) -> tuple[str, dict]:
    assert not result.success
    (event,) = result.get_step_failure_events()
    data = event.step_failure_data.user_failure_data
    assert data is not None, event.step_failure_data.error
    return data.description, {k: v.value for k, v in data.metadata.items()}


# ---- scenarios ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_success_returns_rank0_results_and_cleans_up(cluster, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "fake-mlflow-pw-7c1e")
    result = run(launcher())
    assert result.success

    (mat,) = result.asset_materializations_for_node("trained_model")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["final_loss"] == 0.52 and meta["mlflow_run_id"] == "abc123"  # reported by rank 0
    assert meta["k8s_job"] == cluster.job_name and meta["k8s_namespace"] == "opensora"
    assert meta["nodes"] == 2 and meta["world_size"] == 16 and meta["pod0"] == cluster.pod_name(0)

    # Service before Job; both validated bodies; the Pipes context reached the manifest for pod 0 only.
    names = [c[0] for c in cluster.core.method_calls + cluster.batch.method_calls if c[0].startswith("create")]
    assert names == ["create_namespaced_service", "create_namespaced_job"]
    assert cluster.service_body["spec"]["clusterIP"] == "None"
    env = {e["name"]: e for e in cluster.job_body["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert f"{RANK0_PREFIX}DAGSTER_PIPES_CONTEXT" in env and "DAGSTER_PIPES_CONTEXT" not in env
    assert env["OPENSORA_HOME"]["value"] == "/data/opensora"  # the launch's own env reached the trainers
    assert "fake-mlflow-pw-7c1e" not in json.dumps(cluster.job_body)
    args = cluster.job_body["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("-m") + 1:] == ["training.train", *ARGV]
    cluster.assert_cleaned_up()


@pytest.mark.timeout(60)
def test_failed_job_raises_failure_with_pod_log_excerpt(cluster):
    cluster.job_state = lambda poll: "Failed" if poll >= 3 else "Running"
    cluster.pod_phases = lambda poll: {0: "Running", 1: "Failed" if poll >= 3 else "Running"}
    cluster.follow_log = lambda: stamped(RANK0_LOG[:2])
    cluster.tail_logs = {
        1: "[rank8] step 1\nTraceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory",
        0: pipes_line("opened", {"extras": {}}) + "\n[rank0] waiting on all_reduce",
    }
    description, meta = failure_of(run(launcher()))
    assert f"Training Job opensora/{cluster.job_name} failed (BackoffLimitExceeded" in description
    assert "torch.OutOfMemoryError: CUDA out of memory" in description  # the failing pod's own words
    assert "[rank0] waiting on all_reduce" in description
    assert "__dagster_pipes_version" not in description  # protocol lines are left out of the excerpt
    assert meta["reason"] == "job_failed" and "CUDA out of memory" in meta["pod_logs"]
    cluster.assert_cleaned_up()


@pytest.mark.timeout(60)
def test_pod0_deleted_underneath_fails_fast_instead_of_hanging(cluster, monkeypatch):
    """dagster-io/dagster#22453: the log stream of a deleted pod may never end; the launcher must not care."""
    from dagster._core.pipes.context import PipesMessageHandler

    release = threading.Event()
    step_over = threading.Event()
    late_messages = []
    handle = PipesMessageHandler.handle_message

    def spy(self, message):
        if step_over.is_set():
            late_messages.append(message["method"])
        return handle(self, message)

    monkeypatch.setattr(PipesMessageHandler, "handle_message", spy)

    def hanging_stream() -> Iterator[bytes]:
        yield from stamped(RANK0_LOG[:2])
        release.wait()  # a follow=True stream on a vanished pod: nothing more, never closed

    cluster.job_state = lambda poll: "Running"  # the Job itself never finishes on its own
    cluster.pod_phases = lambda poll: {0: "Running", 1: "Running"} if poll < 5 else {1: "Running"}
    cluster.follow_log = hanging_stream
    try:
        description, meta = failure_of(run(launcher(timeout_s=600.0)))
    finally:
        step_over.set()
        release.set()
    assert meta["reason"] == "pod0_deleted"  # noticed on a poll, long before timeout_s
    assert f"lost pod {cluster.pod_name(0)} (rank 0)" in description
    assert cluster.polls < 50
    cluster.assert_cleaned_up()

    # When the stuck stream finally ends, its buffered "opened" message must not reach the finished step.
    followers = [t for t in threading.enumerate() if t.name.startswith("pipes-logs-")]
    assert followers, "the log follower of the vanished pod is still blocked until released"
    for thread in followers:
        thread.join(10)
        assert not thread.is_alive()
    assert late_messages == []


@pytest.mark.timeout(60)
def test_job_deleted_underneath_fails(cluster):
    def state(poll: int) -> str:
        if poll >= 3:
            cluster.job_deleted_underneath = True
        return "Running"

    cluster.job_state = state
    description, meta = failure_of(run(launcher()))
    assert meta["reason"] == "job_deleted" and "was deleted while it was running" in description
    cluster.assert_cleaned_up()


@pytest.mark.timeout(60)
def test_timeout_deletes_the_job_and_fails(cluster):
    cluster.job_state = lambda poll: "Running"
    description, meta = failure_of(run(launcher(timeout_s=0.3)))
    assert meta["reason"] == "timeout" and "did not finish within timeout_s=0s" in description
    cluster.assert_cleaned_up()


@pytest.mark.timeout(60)
def test_unpullable_image_fails_at_startup(cluster):
    cluster.pod_phases = lambda poll: {0: "Pending", 1: "Pending"}
    cluster.pod0_waiting = "ImagePullBackOff"
    description, meta = failure_of(run(launcher()))
    assert meta["reason"] == "pod_start_failed" and "ImagePullBackOff" in description
    cluster.core.read_namespaced_pod_log.assert_not_called()  # never started following a log
    cluster.assert_cleaned_up()


@pytest.mark.timeout(60)
def test_pod0_never_scheduled_hits_the_startup_timeout(cluster):
    cluster.pod_phases = lambda poll: {0: "Pending", 1: "Pending"}
    description, meta = failure_of(run(launcher(startup_timeout_s=0.2)))
    assert meta["reason"] == "startup_timeout" and "pod 0 did not start within" in description
    cluster.assert_cleaned_up()


@pytest.mark.timeout(60)
def test_success_without_a_pipes_report_is_a_failure(cluster):
    cluster.follow_log = lambda: stamped(["[rank0] trained, but forgot to report"])
    description, meta = failure_of(run(launcher()))
    assert meta["reason"] == "no_pipes_report" and "rank 0 reported nothing" in description
    cluster.assert_cleaned_up()


@pytest.mark.timeout(60)
def test_cleanup_tolerates_objects_already_gone(cluster):
    cluster.batch.delete_namespaced_job.side_effect = ApiException(status=404, reason="Not Found")
    cluster.core.delete_namespaced_service.side_effect = ApiException(status=404, reason="Not Found")
    assert run(launcher()).success


@pytest.mark.timeout(60)
def test_transient_api_errors_are_retried(cluster):
    import urllib3

    cluster.api_blips = [ApiException(status=503, reason="Service Unavailable"),
                         urllib3.exceptions.ProtocolError("connection reset"),
                         ApiException(status=429, reason="Too Many Requests")]
    assert run(launcher()).success
    assert cluster.api_blips == []


@pytest.mark.timeout(60)
def test_persistent_api_errors_fail_and_still_clean_up(cluster):
    cluster.api_blips = [ApiException(status=403, reason="Forbidden")]
    result = run(launcher())
    assert not result.success
    (event,) = result.get_step_failure_events()
    cause = event.step_failure_data.error.cause
    assert cause.cls_name == "ApiException" and "403" in cause.message
    cluster.assert_cleaned_up()


@asset
def trained_model_full(context: AssetExecutionContext, launcher: KubernetesLauncher) -> MaterializeResult:
    result = launcher.run_job(context, ARGV, extras={"preset": "demo_cpu"})
    assert isinstance(result, LaunchResult)
    assert result.metadata["k8s_job"].startswith("ostrain-") and result.metadata["duration_s"] >= 0
    (reported,) = result.get_results()
    assert reported.metadata["final_loss"].value == 0.52
    return result.get_materialize_result()


@pytest.mark.timeout(60)
def test_run_job_returns_the_launch_result(cluster, monkeypatch):
    cluster.follow_log = lambda: stamped([line.replace('"trained_model"', '"trained_model_full"') for line in RANK0_LOG])
    result = materialize([trained_model_full], resources={"launcher": launcher()})
    assert result.success
    # The Pipes context carried the extras to pod 0.
    env = {e["name"]: e.get("value") for e in cluster.job_body["spec"]["template"]["spec"]["containers"][0]["env"]}
    from dagster_pipes import decode_env_var

    context_params = decode_env_var(env[f"{RANK0_PREFIX}DAGSTER_PIPES_CONTEXT"])
    assert context_params["data"]["extras"] == {"preset": "demo_cpu"}


def test_launch_env_refuses_credentials():
    with pytest.raises(ValueError, match="Kubernetes Secret"):
        launcher().build_spec("0123abcd", ARGV, env={"HF_TOKEN": "x"})
    assert isinstance(launcher(), TrainingLauncher)
