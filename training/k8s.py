"""Multi-node torchrun training on Kubernetes: the launch spec and the torchrun command every pod runs.

``training/k8s_manifests.py`` renders a ``K8sTrainingSpec`` as one Indexed Job plus one headless Service;
``training/k8s_validation.py`` checks the rendered objects against the client models and the OpenAPI schema.

Why this shape (no operator, no CRD, plain ``batch/v1``):

- An Indexed Job with ``completions == parallelism == nodes`` starts one pod per node; each pod's hostname is
  ``<job>-<index>`` and, with ``subdomain`` set to a headless Service, its DNS name is
  ``<job>-<index>.<svc>.<namespace>.svc.<cluster domain>``. That gives every pod a stable address before any of
  them runs, which is all torchrun's c10d rendezvous needs.
- The rendezvous endpoint is pod 0's fully qualified name. On pod 0 itself the kubelet writes that name into
  ``/etc/hosts``, so torchrun recognises "the endpoint is me" and hosts the rendezvous store without waiting on
  cluster DNS; the other pods reach it through the headless Service.
- ``--local-addr`` is each pod's own DNS name. The c10d handler assigns node ranks by sorting node addresses,
  and ``<job>-0.<svc>...`` sorts before every other index, so global rank 0 lives on pod 0: the pod whose log
  Dagster reads.
- Only pod 0 receives the Dagster Pipes bootstrap variables. Every pod shares one template, so the manifest
  carries them under ``OPENSORA_RANK0_*`` names and a tiny ``/bin/sh`` entrypoint exports them as
  ``DAGSTER_PIPES_*`` only when ``JOB_COMPLETION_INDEX == 0``. torchrun then hands them to the G workers of
  pod 0, so the training script must still report from ``RANK == 0`` only (see ``ENTRYPOINT_DOC``).
- Secrets never appear in a manifest: MLflow credentials are ``secretKeyRef``s (optional keys, so a Secret may
  hold a username/password pair or a token), object-store credentials come through ``envFrom`` Secrets, and
  plain ``env`` refuses names that look like credentials.

This module is plain library code: no Dagster import. ``resources/launcher_k8s.py`` wraps it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GPU_RESOURCE = "nvidia.com/gpu"
# The label our pod template and Service selector share; the Job controller adds its own `job-name` labels too.
JOB_LABEL = "opensora-dag/train-job"
RUN_ID_LABEL = "dagster/run-id"
# The Job controller sets this annotation (and, from 1.28, a label of the same name) on every pod it creates.
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
CONTAINER_NAME = "trainer"
# Keys read from the MLflow Secret. Each is optional: a Secret holds either username + password or a token.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# Pipes variables travel under this prefix and are renamed on pod 0 only.
RANK0_PREFIX = "OPENSORA_RANK0_"

ENTRYPOINT_DOC = """\
Only rank 0 reports to Dagster, enforced at two levels:
1. pod level (this module): the Pipes bootstrap variables are exported as DAGSTER_PIPES_* by the entrypoint
   only when JOB_COMPLETION_INDEX == 0; the other pods never see them (and their logs are never read).
2. process level (training/train.py): torchrun starts G workers on pod 0 that all inherit those variables, so the
   script opens Dagster Pipes only when int(os.environ.get("RANK", "0")) == 0 and uses a no-op otherwise.
   Several workers writing Pipes messages to one log would report the materialization G times.
"""

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Plain env values land in the manifest (and in `kubectl get -o yaml`): names like these belong in a Secret.
_SECRET_LIKE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY", re.IGNORECASE)
# Env names the builder sets itself; user env may not shadow them.
_RESERVED_ENV = {"JOB_COMPLETION_INDEX", "PYTHONUNBUFFERED", "MLFLOW_TRACKING_URI", *MLFLOW_SECRET_KEYS}
# Longest job name that keeps `<job>-<index>` a valid 63-character hostname for thousands of nodes
# (the same cap Kubernetes puts on CronJob names).
MAX_NAME_LENGTH = 52


class Toleration(BaseModel):
    """One pod toleration (Kubernetes field names; snake_case accepted too)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, alias="tolerationSeconds")

    def to_k8s(self) -> dict[str, Any]:
        out: dict[str, Any] = {"operator": self.operator}
        for field, key in (("key", "key"), ("value", "value"), ("effect", "effect"), ("toleration_seconds", "tolerationSeconds")):
            if getattr(self, field) is not None:
                out[key] = getattr(self, field)
        return out


# GPU node pools are usually tainted `nvidia.com/gpu:NoSchedule` (GKE, EKS, AKS GPU pools, the GPU operator).
GPU_TOLERATION = Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")


class K8sTrainingSpec(BaseModel):
    """Everything one multi-node training launch needs; the builders below are pure functions of it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Job name (DNS-1123 label, <= 52 chars); also the rendezvous id. Unique per launch.")
    image: str = Field(description="Training image: holds this repository, torch and torchrun.")
    train_args: list[str] = Field(description="Arguments after `python -m training.train`: PRESET --dataset V --steps N --outdir DIR ...")
    run_id: str | None = Field(default=None, description="Dagster run id, stored as a label for `kubectl get -l`.")
    namespace: str = "default"
    nodes: int = Field(default=1, ge=1, description="Pods (one per node); torchrun --nnodes.")
    gpus_per_node: int = Field(default=8, ge=0, description="`nvidia.com/gpu` per pod; 0 makes a CPU-only job.")
    nproc_per_node: int | None = Field(default=None, ge=1, description="Workers per pod; defaults to gpus_per_node (1 when 0).")
    cpu: str = Field(default="16", description="CPU request per pod (no CPU limit: limits throttle data loaders).")
    memory: str = Field(default="200Gi", description="Memory request per pod.")
    memory_limit: str | None = Field(default=None, description="Memory limit per pod; defaults to the request.")
    shm_size: str = Field(default="64Gi", description="Size of the in-memory /dev/shm (DataLoader workers, NCCL).")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=lambda: [GPU_TOLERATION])
    pvc_claim: str | None = Field(default=None, description="ReadWriteMany claim holding datasets and checkpoints. None: the "
                                  "train_args point at an object store (credentials via env_from_secrets).")
    pvc_mount_path: str = "/data"
    env: dict[str, str] = Field(default_factory=dict, description="Plain, non-secret environment variables.")
    env_from_secrets: list[str] = Field(default_factory=list, description="Secrets loaded whole with envFrom (e.g. S3 keys).")
    mlflow_tracking_uri: str | None = None
    mlflow_secret: str | None = Field(default=None, description="Secret with MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN keys.")
    service_account: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    backoff_limit: int = Field(default=0, ge=0, description="0: any pod failure fails the whole job (torchrun cannot "
                               "re-join a half-dead world anyway; resume with --resume instead).")
    active_deadline_s: int | None = Field(default=86_400, ge=1, description="Server-side wall-clock cap for the Job.")
    ttl_after_finished_s: int | None = Field(default=3_600, ge=0, description="Garbage-collect the Job if the launcher died.")
    termination_grace_s: int = Field(default=60, ge=0, description="Time to flush a checkpoint after SIGTERM.")
    rdzv_port: int = Field(default=29400, ge=1, le=65535)
    rdzv_join_timeout_s: int = Field(default=1800, ge=1, description="Nodes pulling a large image can start minutes apart.")
    cluster_domain: str = "cluster.local"
    torchrun: str = "torchrun"
    train_module: str = "training.train"
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > MAX_NAME_LENGTH:
            raise ValueError(f"name {v!r} must be a DNS-1123 label starting with a letter, at most {MAX_NAME_LENGTH} chars")
        return v

    @field_validator("namespace", "pvc_claim", "mlflow_secret", "service_account")
    @classmethod
    def _check_dns_name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", v):
            raise ValueError(f"{v!r} is not a valid Kubernetes object name")
        return v

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not _ENV_NAME.match(key):
                raise ValueError(f"env name {key!r} is not a valid variable name")
            if key in _RESERVED_ENV or key.startswith(RANK0_PREFIX) or key.startswith("DAGSTER_PIPES_"):
                raise ValueError(f"env name {key!r} is set by the launcher itself")
            if _SECRET_LIKE.search(key):
                raise ValueError(f"env {key!r} looks like a credential: put it in a Kubernetes Secret and list the Secret "
                                 "in env_from_secrets (plain env values are stored in the manifest)")
        return env

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _check_uri(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).password is not None:
            raise ValueError("mlflow_tracking_uri must not embed a password; use mlflow_secret")
        return v

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if len(value) > 63 or not _LABEL_VALUE.match(value):
                raise ValueError(f"label {key}={value!r} is not a valid label value")
        return labels

    @model_validator(mode="after")
    def _check_run_id(self) -> K8sTrainingSpec:
        if self.run_id is not None and (len(self.run_id) > 63 or not _LABEL_VALUE.match(self.run_id)):
            raise ValueError(f"run_id {self.run_id!r} cannot be a label value")
        return self

    # ---- derived names -------------------------------------------------------------------------------------
    @property
    def service_name(self) -> str:
        return f"{self.name}-rdzv"

    @property
    def workers_per_node(self) -> int:
        return self.nproc_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.workers_per_node

    def pod_dns_name(self, index: int | str) -> str:
        """Fully qualified name of pod ``index``: resolvable cluster-wide, and from /etc/hosts on the pod itself."""
        return f"{self.name}-{index}.{self.service_name}.{self.namespace}.svc.{self.cluster_domain}"

    @property
    def rdzv_endpoint(self) -> str:
        return f"{self.pod_dns_name(0)}:{self.rdzv_port}"

    def common_labels(self) -> dict[str, str]:
        labels = {
            "app.kubernetes.io/name": "opensora-dag",
            "app.kubernetes.io/component": "training",
            **self.labels,
            JOB_LABEL: self.name,
        }
        if self.run_id:
            labels[RUN_ID_LABEL] = self.run_id
        return labels


# ---- commands ------------------------------------------------------------------------------------------------
def _torchrun_argv(spec: K8sTrainingSpec, *, launcher: Sequence[str], nnodes: int, nproc: int, endpoint: str,
                   local_addr: str, train_args: Sequence[str]) -> list[str]:
    return [
        *launcher,
        "--nnodes", str(nnodes),
        "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", endpoint,
        "--rdzv-id", spec.name,
        "--rdzv-conf", f"join_timeout={spec.rdzv_join_timeout_s}",
        "--local-addr", local_addr,
        # A dead worker fails the pod and therefore the Job; resuming is a new launch with --resume.
        "--max-restarts", "0",
        "-m", spec.train_module,
        *train_args,
    ]


def torchrun_command(spec: K8sTrainingSpec) -> list[str]:
    """The torchrun command line every pod runs (the container ``args``).

    ``$(JOB_COMPLETION_INDEX)`` in ``--local-addr`` is expanded by the kubelet from the container env, so one
    template gives each pod its own address. A literal ``$(`` in the training arguments is escaped as ``$$(``
    for the same reason.
    """
    return _torchrun_argv(
        spec,
        launcher=[spec.torchrun],
        nnodes=spec.nodes,
        nproc=spec.workers_per_node,
        endpoint=spec.rdzv_endpoint,
        local_addr=spec.pod_dns_name("$(JOB_COMPLETION_INDEX)"),
        train_args=[a.replace("$(", "$$(") for a in spec.train_args],
    )


def simulate_torchrun_command(spec: K8sTrainingSpec, nnodes: int = 2, master_port: int = 29400, *,
                              nproc_per_node: int = 1, launcher: Sequence[str] | None = None) -> list[list[str]]:
    """The same launch as ``torchrun_command(spec)`` as ``nnodes`` local torchrun agents on 127.0.0.1.

    Start every returned command line (in any order) on one machine to exercise the real c10d rendezvous across
    agents on CPU. Agent ``i`` uses ``127.0.0.{i+1}`` as its node address; like the pod names on the cluster,
    these sort in agent order, so agent 0 holds global rank 0 (the only Linux loopback address ever bound is
    agent 0's 127.0.0.1; the others only name their node).
    """
    if nnodes < 1:
        raise ValueError("nnodes must be >= 1")
    return [
        _torchrun_argv(
            spec,
            launcher=list(launcher) if launcher is not None else [spec.torchrun],
            nnodes=nnodes,
            nproc=nproc_per_node,
            endpoint=f"127.0.0.1:{master_port}",
            local_addr=f"127.0.0.{i + 1}",
            train_args=spec.train_args,
        )
        for i in range(nnodes)
    ]


def entrypoint_script(pipes_keys: Sequence[str]) -> str:
    """The ``/bin/sh -c`` script every pod runs before ``exec``-ing torchrun (its arguments are ``"$@"``).

    For each Pipes variable ``K`` the manifest carries ``OPENSORA_RANK0_K``; the script exports ``K`` only on
    pod index 0 and removes the carrier everywhere, so no process on another pod can open a Pipes channel.
    """
    lines = ["set -eu"]
    for key in pipes_keys:
        if not _ENV_NAME.match(key):
            raise ValueError(f"Pipes variable name {key!r} is not a valid variable name")
    if pipes_keys:
        lines.append('if [ "${JOB_COMPLETION_INDEX:-}" = "0" ]; then')
        lines += [f'  export {key}="${{{RANK0_PREFIX}{key}}}"' for key in pipes_keys]
        lines.append("fi")
        lines.append("unset " + " ".join(f"{RANK0_PREFIX}{key}" for key in pipes_keys))
    lines.append('exec "$@"')
    return "\n".join(lines) + "\n"
