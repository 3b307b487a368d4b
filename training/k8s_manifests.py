"""The Kubernetes objects of one training launch: a headless Service and an Indexed Job.

Pure functions of a ``K8sTrainingSpec``; why the launch has this shape is in ``training/k8s.py``.
``training/k8s_validation.py`` checks what these return; ``resources/launcher_k8s.py`` creates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from training.k8s import (
    CONTAINER_NAME,
    GPU_RESOURCE,
    INDEX_ANNOTATION,
    JOB_LABEL,
    MLFLOW_SECRET_KEYS,
    RANK0_PREFIX,
    K8sTrainingSpec,
    entrypoint_script,
    torchrun_command,
)


def build_headless_service(spec: K8sTrainingSpec) -> dict[str, Any]:
    """The headless Service that gives the Job's pods DNS names (``<job>-<index>.<svc>``).

    ``publishNotReadyAddresses`` publishes a pod as soon as it has an IP: the trainers have no readiness probe
    and must find each other while starting.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.service_name, "namespace": spec.namespace, "labels": spec.common_labels()},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: spec.name},
            "ports": [{"name": "c10d", "port": spec.rdzv_port, "targetPort": spec.rdzv_port, "protocol": "TCP"}],
        },
    }


def _container_env(spec: K8sTrainingSpec, pipes_env: Mapping[str, str]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # Also injected by the Job controller; declared here so `$(JOB_COMPLETION_INDEX)` expands in the args.
        {"name": "JOB_COMPLETION_INDEX",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        # Pipes messages and progress lines must reach the pod log as they happen.
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.mlflow_tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": spec.mlflow_tracking_uri})
    if spec.mlflow_secret:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": spec.mlflow_secret, "key": key, "optional": True}}}
            for key in MLFLOW_SECRET_KEYS
        ]
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    env += [{"name": f"{RANK0_PREFIX}{k}", "value": v} for k, v in sorted(pipes_env.items())]
    return env


def build_indexed_job(spec: K8sTrainingSpec, pipes_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Indexed Job: ``spec.nodes`` pods, each running torchrun with ``spec.workers_per_node`` workers.

    ``pipes_env`` is the Dagster Pipes bootstrap env (``PipesSession.get_bootstrap_env_vars()``); it reaches
    pod index 0 only (see ``entrypoint_script``). Empty for a launch without Dagster.
    """
    pipes_env = dict(pipes_env or {})
    requests: dict[str, str] = {"cpu": spec.cpu, "memory": spec.memory}
    limits: dict[str, str] = {"memory": spec.memory_limit or spec.memory}
    if spec.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(spec.gpus_per_node)

    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if spec.pvc_claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": spec.pvc_claim}})
        mounts.append({"name": "data", "mountPath": spec.pvc_mount_path})

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["/bin/sh", "-c", entrypoint_script(sorted(pipes_env)), "opensora-entrypoint"],
        "args": torchrun_command(spec),
        "env": _container_env(spec, pipes_env),
        "ports": [{"name": "c10d", "containerPort": spec.rdzv_port, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
    }
    if spec.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in spec.env_from_secrets]

    pod_spec: dict[str, Any] = {
        "subdomain": spec.service_name,
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.termination_grace_s,
        "containers": [container],
        "volumes": volumes,
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.to_k8s() for t in spec.tolerations]
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in spec.image_pull_secrets]

    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.nodes,
        "parallelism": spec.nodes,
        "backoffLimit": spec.backoff_limit,
        "template": {"metadata": {"labels": spec.common_labels()}, "spec": pod_spec},
    }
    if spec.active_deadline_s is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_s
    if spec.ttl_after_finished_s is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_after_finished_s

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": spec.common_labels()},
        "spec": job_spec,
    }


def render_manifests(spec: K8sTrainingSpec, pipes_env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Service then Job, in the order they must be created."""
    return [build_headless_service(spec), build_indexed_job(spec, pipes_env)]
