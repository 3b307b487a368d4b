"""KubernetesLauncher: run `training.train` as a multi-node torchrun Job and hear rank 0 back through Dagster Pipes.

The manifests come from ``training.k8s`` (pure builders); this resource owns the conversation with the cluster:

1. open a Pipes session (context in env vars, messages read from pod 0's log with dagster-k8s's
   ``PipesK8sPodLogsMessageReader``),
2. render and validate the headless Service and the Indexed Job, create both,
3. wait for pod 0 to start, then follow its log on a background thread,
4. poll the Job and its pods until the Job succeeds, fails, pod 0 disappears, or the deadline passes,
5. delete the Job (background propagation: the pods go with it) and the Service, whatever happened,
6. return what rank 0 reported, with the launch facts added as metadata.

Why not ``PipesK8sClient.run``: it launches one bare Pod, not a multi-node Job, and it waits on that pod with no
guard against the pod being deleted underneath (dagster-io/dagster#22453: the wait never returns). Here the main
thread only ever polls with a deadline; the log follower is a daemon thread that is joined with a timeout, so a
stream that hangs on a vanished pod can delay nothing.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import urllib3
from dagster import (
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    PipesClientCompletedInvocation,
    PipesEnvContextInjector,
    PipesExecutionResult,
    PipesMessageReader,
    open_pipes_session,
)
from pydantic import Field

from resources.launcher import TrainingLauncher
from training.k8s import (
    CONTAINER_NAME,
    GPU_RESOURCE,
    INDEX_ANNOTATION,
    JOB_LABEL,
    K8sTrainingSpec,
)
from training.k8s_manifests import build_headless_service, build_indexed_job
from training.k8s_validation import DEFAULT_K8S_VERSION, validate_manifest

# API answers worth retrying (throttling, API server restarts) rather than failing a running training.
TRANSIENT_API_STATUS = frozenset({429, 500, 502, 503, 504})
# Waiting reasons that never resolve by themselves: fail at once instead of sitting out the startup timeout.
FATAL_WAITING_REASONS = frozenset(
    {"ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)
if TYPE_CHECKING:  # the kubernetes client takes ~1.5 s to import: only a launch pays for it
    from kubernetes.client import BatchV1Api, CoreV1Api

_PIPES_LINE = re.compile(r'^\s*\{"__dagster_pipes_version"')


@dataclass(frozen=True)
class LaunchResult:
    """What a training launch reported: the Pipes invocation (rank 0's results) plus the launch facts.

    The same reading interface as ``PipesClient.run(...)``: ``get_materialize_result()`` / ``get_results()``;
    the launch facts (Job name, namespace, nodes, GPUs, duration) are merged into every result's metadata.
    """

    invocation: PipesClientCompletedInvocation
    metadata: dict[str, Any] = field(default_factory=dict)

    def get_results(self) -> Sequence[PipesExecutionResult]:
        return self.invocation.get_results()

    def get_materialize_result(self) -> MaterializeResult:
        return self.invocation.get_materialize_result()


class _LaunchError(Exception):
    """Internal: why a launch stopped; turned into a dagster.Failure after cleanup bookkeeping."""

    def __init__(self, reason: str, description: str, pods_for_logs: Sequence[str] = ()):
        super().__init__(description)
        self.reason = reason
        self.description = description
        self.pods_for_logs = list(pods_for_logs)


class _MessageGate:
    """Passes Pipes messages to the session's handler until closed, then drops them."""

    def __init__(self, handler: Any):
        self._handler = handler
        self._open = True

    def handle_message(self, message: Any) -> None:
        if self._open:
            self._handler.handle_message(message)

    def close(self) -> None:
        self._open = False


class _GatedPodLogsReader(PipesMessageReader):
    """dagster-k8s's ``PipesK8sPodLogsMessageReader``, with a gate the launcher closes when the launch is over.

    A log stream left hanging on a deleted pod may wake up after the step has ended; its late messages must not
    reach a context (and an event log) that is gone.
    """

    def __init__(self) -> None:
        from dagster_k8s.pipes import PipesK8sPodLogsMessageReader

        self._inner = PipesK8sPodLogsMessageReader()
        self._gate: _MessageGate | None = None

    @contextmanager
    def read_messages(self, handler: Any) -> Iterator[Any]:
        self._gate = _MessageGate(handler)
        with self._inner.read_messages(self._gate) as params:  # type: ignore[arg-type]
            yield params

    def consume_pod_logs(self, context: Any, core_api: Any, pod_name: str, namespace: str) -> None:
        self._inner.consume_pod_logs(context=context, core_api=core_api, pod_name=pod_name, namespace=namespace)

    def no_messages_debug_text(self) -> str:
        return self._inner.no_messages_debug_text()

    def close_gate(self) -> None:
        if self._gate is not None:
            self._gate.close()


class _PodLogFollower:
    """Follows pod 0's log on a daemon thread, feeding Pipes messages to the session's handler."""

    def __init__(self, reader: _GatedPodLogsReader, context: Any, core: Any, pod: str, namespace: str):
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(reader, context, core, pod, namespace), name=f"pipes-logs-{pod}", daemon=True
        )

    def _run(self, reader: _GatedPodLogsReader, context: Any, core: Any, pod: str, namespace: str) -> None:
        try:
            reader.consume_pod_logs(context=context, core_api=core, pod_name=pod, namespace=namespace)
        except Exception as err:  # noqa: BLE001 - kept and reported by the launcher once the Job is over
            self.error = err

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """True when the log stream ended within ``timeout`` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _condition(job: Any, *types: str) -> Any | None:
    for cond in (job.status.conditions or []) if job.status else []:
        if cond.type in types and cond.status == "True":
            return cond
    return None


def _pod_index(pod: Any) -> str | None:
    annotations = pod.metadata.annotations or {}
    labels = pod.metadata.labels or {}
    return annotations.get(INDEX_ANNOTATION, labels.get(INDEX_ANNOTATION))


def _waiting_reason(pod: Any) -> tuple[str, str] | None:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        waiting = status.state.waiting if status.state else None
        if waiting is not None and waiting.reason in FATAL_WAITING_REASONS:
            return waiting.reason, waiting.message or ""
    return None


def _scheduling_message(pod: Any) -> str:
    for cond in (pod.status.conditions or []) if pod.status else []:
        if cond.type == "PodScheduled" and cond.status != "True":
            return f"{cond.reason}: {cond.message}"
    return ""


def _no_pipes_report_failure(spec: K8sTrainingSpec, facts: Mapping[str, Any]) -> Failure:
    """A Job that succeeded while rank 0 never opened Dagster Pipes: a wiring bug that no retry fixes."""
    return Failure(
        description=(
            f"Training Job {spec.namespace}/{spec.name} succeeded but rank 0 reported nothing through Dagster Pipes "
            f"(no Pipes messages in pod {facts['pod0']}'s log). training/train.py must open Dagster "
            "Pipes on RANK 0 and report the materialization."
        ),
        metadata={**facts, "reason": "no_pipes_report"},
        allow_retries=False,
    )


class KubernetesLauncher(TrainingLauncher):
    """Launches ``python -m training.train ...`` under torchrun on ``nodes`` x ``gpus_per_node`` GPUs.

    A drop-in ``TrainingLauncher`` (``launch(context, argv, env)`` returns rank 0's ``MaterializeResult``);
    ``run_job`` returns the fuller ``LaunchResult``. Paths in ``argv`` must mean the same thing in the run worker
    and in the training pods: mount the shared claim at the same path in both (``/data`` in deploy/).

    Credentials never pass through this resource: MLflow's come from the Secret named by ``mlflow_secret``
    (keys MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN), object-store keys from
    the Secrets in ``env_from_secrets``, and the cluster credentials from the in-cluster service account or a
    kubeconfig file.
    """

    image: str = Field(description="Training image (this repository + torch + torchrun).")
    namespace: str = Field(default="default", description="Namespace for the Job and Service.")
    nodes: int = Field(default=1, description="Pods, one per node (torchrun --nnodes).")
    gpus_per_node: int = Field(default=8, description="nvidia.com/gpu per pod; 0 for a CPU-only job.")
    nproc_per_node: int | None = Field(default=None, description="Workers per pod; defaults to gpus_per_node.")
    cpu: str = Field(default="16", description="CPU request per pod.")
    memory: str = Field(default="200Gi", description="Memory request (and limit) per pod.")
    shm_size: str = Field(default="64Gi", description="In-memory /dev/shm size per pod.")
    pvc_claim: str | None = Field(default=None, description="ReadWriteMany claim with datasets and checkpoints.")
    pvc_mount_path: str = Field(default="/data", description="Where the claim is mounted.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector, e.g. a GPU node pool.")
    tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        description="Pod tolerations (Kubernetes field names).",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Plain, non-secret env vars for the trainers.")
    env_from_secrets: list[str] = Field(default_factory=list, description="Secrets loaded whole with envFrom.")
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow server URI (no credentials in it).")
    mlflow_secret: str | None = Field(default=None, description="Secret holding the MLflow credentials.")
    service_account: str | None = Field(default=None, description="Service account of the training pods.")
    image_pull_secrets: list[str] = Field(default_factory=list)
    backoff_limit: int = Field(default=0, description="Job backoffLimit; 0 fails the launch on the first pod failure.")
    active_deadline_s: int = Field(default=86_400, description="Job activeDeadlineSeconds (server-side cap).")
    timeout_s: float = Field(default=90_000.0, description="Launcher-side deadline for the whole launch.")
    startup_timeout_s: float = Field(default=1_800.0, description="Deadline for pod 0 to start running.")
    poll_interval_s: float = Field(default=10.0, description="Seconds between Job/pod polls.")
    log_drain_timeout_s: float = Field(default=60.0, description="Wait for pod 0's log stream to end after success.")
    log_tail_lines: int = Field(default=80, description="Lines of pod log quoted in a failure.")
    api_retries: int = Field(default=5, description="Retries of a poll request on HTTP 429/5xx or a dropped connection.")
    require_pipes_report: bool = Field(default=True, description="Fail a successful Job whose rank 0 reported nothing.")
    k8s_version: str = Field(default=DEFAULT_K8S_VERSION, description="Kubernetes version manifests are validated for.")
    load_incluster_config: bool | None = Field(default=None, description="True inside the cluster; None: auto-detect.")
    kubeconfig_file: str | None = Field(default=None, description="Kubeconfig path when outside the cluster.")
    kube_context: str | None = Field(default=None, description="Kubeconfig context.")

    # ---- specs ---------------------------------------------------------------------------------------------
    def job_name(self, run_id: str) -> str:
        """``ostrain-<run id prefix>-<random>``: unique per launch, so a retried step never meets its own corpse."""
        prefix = re.sub(r"[^a-z0-9]", "", run_id.lower())[:8] or "run"
        return f"ostrain-{prefix}-{secrets.token_hex(3)}"

    def build_spec(self, run_id: str, argv: Sequence[str], name: str | None = None,
                   env: Mapping[str, str] | None = None) -> K8sTrainingSpec:
        """The training spec for one launch (``argv`` = the arguments of ``python -m training.train``).

        ``env`` adds plain variables for this launch on top of the resource's ``env``; names that look like
        credentials are refused (they belong in a Secret).
        """
        # The launcher's settings carry over by name: every field the spec shares with this resource.
        shared = {field: getattr(self, field) for field in K8sTrainingSpec.model_fields if field in type(self).model_fields}
        return K8sTrainingSpec.model_validate({
            **shared,
            "name": name or self.job_name(run_id),
            "run_id": run_id,
            "train_args": list(argv),
            "env": {**self.env, **(env or {})},
        })

    # ---- cluster clients -----------------------------------------------------------------------------------
    def _clients(self) -> tuple[CoreV1Api, BatchV1Api]:
        """Core and Batch API clients on a private configuration (the process-wide default stays untouched).

        Tests replace this method to hand in mocks.
        """
        from kubernetes import client, config

        in_cluster = self.load_incluster_config
        if in_cluster is None:
            in_cluster = self.kubeconfig_file is None and bool(os.getenv("KUBERNETES_SERVICE_HOST"))
        if in_cluster:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api = client.ApiClient(configuration)
        else:
            api = config.new_client_from_config(config_file=self.kubeconfig_file, context=self.kube_context)
        return client.CoreV1Api(api), client.BatchV1Api(api)

    # ---- launch --------------------------------------------------------------------------------------------
    def launch(  # type: ignore[override]  # adds the optional `extras`
        self,
        context: AssetExecutionContext | OpExecutionContext,
        argv: list[str],
        env: dict[str, str] | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> MaterializeResult:
        """The ``TrainingLauncher`` contract: rank 0's materialization, with the launch facts in its metadata."""
        return self.run_job(context, argv, env=env, extras=extras).get_materialize_result()

    def run_job(
        self,
        context: AssetExecutionContext | OpExecutionContext,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> LaunchResult:
        """Run one training launch to the end; raise ``dagster.Failure`` naming what went wrong."""
        core, batch = self._clients()
        spec = self.build_spec(context.run.run_id, argv, env=env)
        ns, name = spec.namespace, spec.name
        reader = _GatedPodLogsReader()
        started = time.monotonic()
        facts: dict[str, Any] = {
            "k8s_job": name,
            "k8s_namespace": ns,
            "nodes": spec.nodes,
            "gpus_per_node": spec.gpus_per_node,
            "world_size": spec.world_size,
            "image": spec.image,
        }

        with open_pipes_session(
            context=context,
            context_injector=PipesEnvContextInjector(),
            message_reader=reader,
            extras=dict(extras or {}),
        ) as session:
            # 1. Render and validate before touching the cluster.
            service = build_headless_service(spec)
            job = build_indexed_job(spec, session.get_bootstrap_env_vars())
            validate_manifest(service, self.k8s_version)
            validate_manifest(job, self.k8s_version)

            context.log.info(
                f"Launching Kubernetes Job {ns}/{name}: {spec.nodes} node(s) x {spec.workers_per_node} worker(s), "
                f"image {spec.image}"
            )
            try:
                # 2. Create; a Service first so pod DNS names exist as soon as pods get IPs.
                core.create_namespaced_service(ns, service)
                batch.create_namespaced_job(ns, job)

                # 3-4. Follow pod 0's log and poll until the Job is done.
                self._follow_pod0_until_done(context, core, batch, spec, reader, started, facts)
            except _LaunchError as err:
                raise self._launch_failure(core, spec, err, started, facts) from None
            finally:
                # 5. Clean up whatever happened (ttlSecondsAfterFinished is the safety net if we never get here).
                reader.close_gate()
                self._cleanup(context, core, batch, spec)

            facts["duration_s"] = round(time.monotonic() - started, 1)
            if self.require_pipes_report and not session.message_handler.received_opened_message:
                raise _no_pipes_report_failure(spec, facts)

        # 6. Rank 0's results, with the launch facts attached.
        return LaunchResult(invocation=PipesClientCompletedInvocation(session, metadata=facts), metadata=facts)

    def _follow_pod0_until_done(
        self,
        context: Any,
        core: Any,
        batch: Any,
        spec: K8sTrainingSpec,
        reader: _GatedPodLogsReader,
        started: float,
        facts: dict[str, Any],
    ) -> None:
        """Steps 3-4 of :meth:`run_job`; records pod 0's name in ``facts`` as soon as it is known."""
        # 3. Pod 0 running (or already finished): its log can be followed.
        pod0, pod0_uid = self._wait_for_pod0(core, batch, spec, started)
        facts["pod0"] = pod0
        context.log.info(f"Pod {pod0} started; following its log for Dagster Pipes messages")
        follower = _PodLogFollower(reader, context, core, pod0, spec.namespace)
        follower.start()

        # 4. Poll until the Job is done (or pod 0 vanished, or the deadline passed).
        self._wait_for_job(core, batch, spec, started, pod0, pod0_uid)
        if not follower.join(self.log_drain_timeout_s):
            context.log.warning(
                f"Pod {pod0}'s log stream was still open {self.log_drain_timeout_s:.0f}s after the Job "
                "finished; Pipes messages written after that point are lost"
            )
        if follower.error is not None:
            context.log.warning(f"Reading pod {pod0}'s log failed: {follower.error!r}")

    def _launch_failure(
        self, core: Any, spec: K8sTrainingSpec, err: _LaunchError, started: float, facts: dict[str, Any]
    ) -> Failure:
        """The ``dagster.Failure`` for a launch that went wrong, quoting the logs of the pods ``err`` names."""
        ns, name = spec.namespace, spec.name
        excerpt = self._log_excerpt(core, ns, err.pods_for_logs)
        facts["duration_s"] = round(time.monotonic() - started, 1)
        return Failure(
            description=f"Training Job {ns}/{name} {err.description}" + (f"\n\n{excerpt}" if excerpt else ""),
            metadata={**facts, "reason": err.reason, "pod_logs": MetadataValue.text(excerpt or "(none)")},
            # A missing image or Secret key fails the same way every time; anything else may pass on retry.
            allow_retries=err.reason != "pod_start_failed",
        )

    # ---- waiting -------------------------------------------------------------------------------------------
    def _api(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """One poll request, retried through API-server blips: a day of training is not lost to one HTTP 503."""
        from kubernetes.client.exceptions import ApiException

        for attempt in range(self.api_retries + 1):
            try:
                return call(*args, **kwargs)
            except ApiException as err:
                if err.status not in TRANSIENT_API_STATUS or attempt == self.api_retries:
                    raise
            except urllib3.exceptions.HTTPError:
                if attempt == self.api_retries:
                    raise
            time.sleep(self.poll_interval_s)
        raise AssertionError("unreachable")

    def _read_job(self, batch: Any, spec: K8sTrainingSpec) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._api(batch.read_namespaced_job_status, spec.name, spec.namespace)
        except ApiException as err:
            if err.status == 404:
                raise _LaunchError("job_deleted", "was deleted while it was running") from None
            raise

    def _job_pods(self, core: Any, spec: K8sTrainingSpec) -> list[Any]:
        pods = self._api(core.list_namespaced_pod, spec.namespace, label_selector=f"{JOB_LABEL}={spec.name}")
        return list(pods.items)

    def _check_job_failed(self, job: Any, pods: Sequence[Any]) -> None:
        cond = _condition(job, "Failed", "FailureTarget")
        if cond is not None:
            failed = [p.metadata.name for p in pods if p.status and p.status.phase == "Failed"]
            others = [p.metadata.name for p in pods if _pod_index(p) == "0" and p.metadata.name not in failed]
            raise _LaunchError("job_failed", f"failed ({cond.reason}: {cond.message})", failed + others)

    def _deadline_error(self, spec: K8sTrainingSpec, pods: Sequence[Any]) -> _LaunchError:
        return _LaunchError(
            "timeout",
            f"did not finish within timeout_s={self.timeout_s:.0f}s; the Job was deleted",
            [p.metadata.name for p in pods if _pod_index(p) == "0"],
        )

    def _wait_for_pod0(self, core: Any, batch: Any, spec: K8sTrainingSpec, started: float) -> tuple[str, str]:
        """Name and uid of pod 0 once it runs (or has already finished)."""
        while True:
            job = self._read_job(batch, spec)
            pods = self._job_pods(core, spec)
            self._check_job_failed(job, pods)
            pod0 = next((p for p in pods if _pod_index(p) == "0" and not p.metadata.deletion_timestamp), None)
            if pod0 is not None:
                if pod0.status and pod0.status.phase in ("Running", "Succeeded", "Failed"):
                    return pod0.metadata.name, pod0.metadata.uid
                fatal = _waiting_reason(pod0)
                if fatal is not None:
                    raise _LaunchError("pod_start_failed", f"could not start pod {pod0.metadata.name}: {fatal[0]} {fatal[1]}")
            elapsed = time.monotonic() - started
            if elapsed > self.timeout_s:
                raise self._deadline_error(spec, pods)
            if elapsed > self.startup_timeout_s:
                detail = _scheduling_message(pod0) if pod0 is not None else "pod 0 was never created"
                raise _LaunchError(
                    "startup_timeout",
                    f"pod 0 did not start within startup_timeout_s={self.startup_timeout_s:.0f}s"
                    + (f" ({detail})" if detail else ""),
                )
            time.sleep(self.poll_interval_s)

    def _wait_for_job(self, core: Any, batch: Any, spec: K8sTrainingSpec, started: float, pod0: str, pod0_uid: str) -> None:
        """Return when the Job succeeded; raise ``_LaunchError`` on failure, pod 0 deletion or deadline."""
        while True:
            job = self._read_job(batch, spec)
            if _condition(job, "Complete", "SuccessCriteriaMet") or (job.status and (job.status.succeeded or 0) >= spec.nodes):
                return
            pods = self._job_pods(core, spec)
            self._check_job_failed(job, pods)
            current = next((p for p in pods if p.metadata.name == pod0), None)
            if current is None or current.metadata.uid != pod0_uid or current.metadata.deletion_timestamp:
                raise _LaunchError(
                    "pod0_deleted",
                    f"lost pod {pod0} (rank 0): it was deleted while the Job was running (evicted, preempted or removed "
                    "by hand); the Job was deleted rather than waiting on a log stream that may never end",
                    [p.metadata.name for p in pods if p.status and p.status.phase == "Failed"],
                )
            if time.monotonic() - started > self.timeout_s:
                raise self._deadline_error(spec, pods)
            time.sleep(self.poll_interval_s)

    # ---- failure evidence and cleanup ----------------------------------------------------------------------
    def _log_excerpt(self, core: Any, namespace: str, pods: Sequence[str]) -> str:
        """The last ``log_tail_lines`` lines of each named pod's log, Pipes protocol lines left out."""
        from kubernetes.client.exceptions import ApiException

        parts = []
        for pod in dict.fromkeys(pods):
            try:
                text = core.read_namespaced_pod_log(pod, namespace, container=CONTAINER_NAME, tail_lines=self.log_tail_lines)
            except ApiException as err:
                parts.append(f"--- {pod}: log unavailable ({err.status} {err.reason})")
                continue
            lines = [line for line in str(text or "").splitlines() if not _PIPES_LINE.match(line)]
            parts.append(f"--- {pod} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    def _cleanup(self, context: Any, core: Any, batch: Any, spec: K8sTrainingSpec) -> None:
        """Delete the Job (its pods follow: Background propagation) and the Service; a 404 means already gone."""
        from kubernetes.client.exceptions import ApiException

        for what, delete in (
            (f"Job {spec.name}", lambda: batch.delete_namespaced_job(spec.name, spec.namespace, propagation_policy="Background")),
            (f"Service {spec.service_name}", lambda: core.delete_namespaced_service(spec.service_name, spec.namespace)),
        ):
            try:
                delete()
            except ApiException as err:
                if err.status != 404:
                    context.log.warning(f"Could not delete {what} in {spec.namespace}: {err.status} {err.reason}")
