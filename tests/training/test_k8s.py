"""training/k8s.py: the rendered Service and Indexed Job, their validation, rank-0-only Pipes, and the commands."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes_validate.utils import latest_version

from training.k8s import (
    GPU_RESOURCE,
    JOB_LABEL,
    RANK0_PREFIX,
    K8sTrainingSpec,
    entrypoint_script,
    simulate_torchrun_command,
    torchrun_command,
)
from training.k8s_manifests import build_headless_service, build_indexed_job, render_manifests
from training.k8s_validation import DEFAULT_K8S_VERSION, ManifestError, model_problems, schema_problems, validate_manifest

TRAIN_ARGS = ["stage1", "--dataset", "v3", "--steps", "100", "--outdir", "/data/checkpoints/run1"]
PIPES_ENV = {"DAGSTER_PIPES_CONTEXT": "ctx-blob", "DAGSTER_PIPES_MESSAGES": "msg-blob"}


def make_spec(**overrides) -> K8sTrainingSpec:
    fields = dict(
        name="ostrain-0123abcd-a1b2c3",
        run_id="0123abcd-0000-4000-8000-000000000000",
        image="registry.example.com/opensora:1.0",
        namespace="opensora",
        train_args=TRAIN_ARGS,
        pvc_claim="opensora-data",
        mlflow_tracking_uri="http://mlflow.opensora.svc.cluster.local:5000",
        mlflow_secret="mlflow-credentials",
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        env={"NCCL_DEBUG": "WARN"},
        env_from_secrets=["opensora-object-store"],
        service_account="opensora-trainer",
    )
    fields.update(overrides)
    return K8sTrainingSpec(**fields)


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def plain_env(job: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(job)["env"] if "value" in e}


# ---- rendering and validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes", [1, 4])
def test_manifests_pass_both_validators(nodes):
    spec = make_spec(nodes=nodes)
    service, job = render_manifests(spec, PIPES_ENV)
    for manifest in (service, job):
        assert model_problems(manifest) == []
        for version in (DEFAULT_K8S_VERSION, latest_version()):
            assert schema_problems(manifest, version) == []
        validate_manifest(manifest)

    # Indexed Job, one pod per node, addressable through the headless Service.
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == spec.service_name
    assert pod["restartPolicy"] == "Never"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == {JOB_LABEL: spec.name}

    # GPUs, /dev/shm in memory, the shared claim, placement.
    c = container(job)
    assert c["resources"]["limits"][GPU_RESOURCE] == "8" and c["resources"]["requests"][GPU_RESOURCE] == "8"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "opensora-data"}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm", "/data"}
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["serviceAccountName"] == "opensora-trainer"

    # The node rank is the completion index, declared first so `$(JOB_COMPLETION_INDEX)` expands in args.
    first = c["env"][0]
    assert first["name"] == "JOB_COMPLETION_INDEX"
    assert first["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_torchrun_command_points_every_pod_at_pod_zero():
    spec = make_spec(nodes=4)
    argv = container(build_indexed_job(spec))["args"]
    assert argv == torchrun_command(spec)
    assert argv[:9] == ["torchrun", "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "ostrain-0123abcd-a1b2c3-0.ostrain-0123abcd-a1b2c3-rdzv.opensora.svc.cluster.local:29400"]
    assert argv[argv.index("--rdzv-id") + 1] == spec.name
    assert argv[argv.index("--local-addr") + 1] == (
        "ostrain-0123abcd-a1b2c3-$(JOB_COMPLETION_INDEX).ostrain-0123abcd-a1b2c3-rdzv.opensora.svc.cluster.local"
    )
    assert argv[argv.index("-m") + 1:] == ["training.train", *TRAIN_ARGS]
    assert spec.world_size == 32
    # A literal "$(" in the training arguments must not be expanded by the kubelet.
    odd = make_spec(train_args=["stage1", "--outdir", "/data/$(HOME)"])
    assert torchrun_command(odd)[-1] == "/data/$$(HOME)"


def test_cpu_only_spec_has_no_gpu_resources():
    job = build_indexed_job(make_spec(gpus_per_node=0, tolerations=[]))
    c = container(job)
    assert GPU_RESOURCE not in c["resources"]["limits"] and GPU_RESOURCE not in c["resources"]["requests"]
    assert "tolerations" not in job["spec"]["template"]["spec"]
    assert c["args"][c["args"].index("--nproc-per-node") + 1] == "1"
    validate_manifest(job)


def test_broken_manifests_fail_with_clear_messages():
    job = build_indexed_job(make_spec(nodes=2), PIPES_ENV)

    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["completions"] = "2"
    assert any("spec.completions" in p and "'2'" in p for p in model_problems(wrong_type))
    assert any(p.startswith("spec.completions:") and "integer" in p for p in schema_problems(wrong_type))
    with pytest.raises(ManifestError) as err:
        validate_manifest(wrong_type)
    assert "Job 'ostrain-0123abcd-a1b2c3' is not a valid Kubernetes manifest" in str(err.value)
    assert len(err.value.problems) == 2  # one from each validator

    unknown_field = copy.deepcopy(job)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    assert model_problems(unknown_field) == ["spec.template.spec.containers[0].gpus: unknown field (dropped by the client model)"]
    assert "'gpus' was unexpected" in schema_problems(unknown_field)[0]

    no_name = copy.deepcopy(job)
    del no_name["spec"]["template"]["spec"]["containers"][0]["name"]
    assert "`name`, must not be `None`" in model_problems(no_name)[0]
    with pytest.raises(ManifestError, match="name"):
        validate_manifest(no_name)

    # A quantity given as a number slips through the client model (coerced to "8") but not the round trip.
    int_quantity = copy.deepcopy(job)
    int_quantity["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][GPU_RESOURCE] = 8
    assert any("nvidia.com/gpu: 8 (int)" in p for p in model_problems(int_quantity))

    service = build_headless_service(make_spec())
    service["spec"]["ports"][0]["port"] = "29400"
    with pytest.raises(ManifestError, match=r"spec\.ports\[0\]\.port"):
        validate_manifest(service)


# ---- secrets ---------------------------------------------------------------------------------------------
FAKE_SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pw-7c1e",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-93ab",
    "MLFLOW_TRACKING_USERNAME": "fake-mlflow-user-55d0",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-0f4d",
    "DAGSTER_PG_PASSWORD": "fake-pg-pw-1a2b",
}


def test_no_secret_value_reaches_a_manifest(monkeypatch):
    for key, value in FAKE_SECRETS.items():
        monkeypatch.setenv(key, value)
    from resources.launcher_k8s import KubernetesLauncher

    launcher = KubernetesLauncher(
        image="registry.example.com/opensora:1.0", namespace="opensora", nodes=2, pvc_claim="opensora-data",
        mlflow_tracking_uri="http://mlflow:5000", mlflow_secret="mlflow-credentials",
        env_from_secrets=["opensora-object-store"],
    )
    spec = launcher.build_spec("0123abcd-0000-4000-8000-000000000000", TRAIN_ARGS)
    rendered = json.dumps(render_manifests(spec, PIPES_ENV))
    for value in FAKE_SECRETS.values():
        assert value not in rendered
    env = container(build_indexed_job(spec))["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {
        key: {"name": "mlflow-credentials", "key": key, "optional": True}
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    }
    assert container(build_indexed_job(spec))["envFrom"] == [{"secretRef": {"name": "opensora-object-store"}}]


@pytest.mark.parametrize("env", [{"HF_TOKEN": "x"}, {"AWS_SECRET_ACCESS_KEY": "x"}, {"DB_PASSWORD": "x"}])
def test_plain_env_refuses_credentials(env):
    with pytest.raises(ValueError, match="Kubernetes Secret"):
        make_spec(env=env)


def test_spec_refuses_bad_names_and_uris():
    with pytest.raises(ValueError, match="DNS-1123"):
        make_spec(name="OsTrain")
    with pytest.raises(ValueError, match="DNS-1123"):
        make_spec(name="a" * 53)
    with pytest.raises(ValueError, match="embed a password"):
        make_spec(mlflow_tracking_uri="https://user:hunter2@mlflow.example.com")
    with pytest.raises(ValueError, match="set by the launcher"):
        make_spec(env={"DAGSTER_PIPES_CONTEXT": "x"})


# ---- only pod 0 reports to Dagster -----------------------------------------------------------------------
def run_entrypoint(job: dict, index: str) -> dict[str, str]:
    """Run the pod's real entrypoint script with the manifest's plain env and a probe instead of torchrun."""
    c = container(job)
    assert c["command"][:2] == ["/bin/sh", "-c"]
    probe = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
    env = {"PATH": os.environ["PATH"], **plain_env(job), "JOB_COMPLETION_INDEX": index}
    out = subprocess.run([*c["command"], *probe], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_only_pod_zero_gets_the_pipes_bootstrap_env():
    job = build_indexed_job(make_spec(nodes=4), PIPES_ENV)
    names = [e["name"] for e in container(job)["env"]]
    # The manifest never carries DAGSTER_PIPES_* itself: only the renamed carriers.
    assert not any(n.startswith("DAGSTER_PIPES_") for n in names)
    assert {f"{RANK0_PREFIX}DAGSTER_PIPES_CONTEXT", f"{RANK0_PREFIX}DAGSTER_PIPES_MESSAGES"} <= set(names)

    pod0 = run_entrypoint(job, "0")
    assert pod0["DAGSTER_PIPES_CONTEXT"] == "ctx-blob" and pod0["DAGSTER_PIPES_MESSAGES"] == "msg-blob"
    for index in ("1", "3"):
        other = run_entrypoint(job, index)
        assert not [k for k in other if "PIPES" in k], f"pod {index} must not see any Pipes variable"
    assert not [k for k in pod0 if k.startswith(RANK0_PREFIX)]


def test_entrypoint_without_pipes_just_execs():
    assert entrypoint_script([]) == 'set -eu\nexec "$@"\n'
    job = build_indexed_job(make_spec())
    assert not [k for k in run_entrypoint(job, "0") if "PIPES" in k]
    with pytest.raises(ValueError):
        entrypoint_script(["BAD NAME"])


# ---- the local rehearsal -----------------------------------------------------------------------------------
def test_simulated_agents_match_the_cluster_command():
    spec = make_spec(nodes=4)
    cluster = torchrun_command(spec)
    agents = simulate_torchrun_command(spec, nnodes=2, master_port=29555)
    assert len(agents) == 2
    for i, argv in enumerate(agents):
        assert argv[argv.index("--nnodes") + 1] == "2"
        assert argv[argv.index("--nproc-per-node") + 1] == "1"
        assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
        assert argv[argv.index("--rdzv-endpoint") + 1] == "127.0.0.1:29555"
        assert argv[argv.index("--local-addr") + 1] == f"127.0.0.{i + 1}"
        # Everything else is the cluster command, flag for flag.
        varying = {"--nnodes", "--nproc-per-node", "--rdzv-endpoint", "--local-addr"}
        strip = lambda a: [x for j, x in enumerate(a) if x not in varying and (j == 0 or a[j - 1] not in varying)]  # noqa: E731
        assert strip(argv) == strip(cluster)


PROBE = """\
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
print(f"agent={sys.argv[1]} rank={os.environ['RANK']} world={os.environ['WORLD_SIZE']} sum={total.item()}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_simulated_agents_rendezvous_for_real(tmp_path: Path):
    """Two torchrun agents from simulate_torchrun_command meet over c10d on CPU; agent 0 holds global rank 0."""
    (tmp_path / "rankprobe.py").write_text(PROBE)
    spec = make_spec(train_module="rankprobe", train_args=[], rdzv_join_timeout_s=120)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = simulate_torchrun_command(spec, 2, port, launcher=[sys.executable, "-m", "torch.distributed.run"])
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    # Start agent 1 first: the rank order must not depend on who arrives first.
    procs = {i: subprocess.Popen([*argv, str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, argv in reversed(list(enumerate(agents)))}
    outputs = {}
    for i, proc in procs.items():
        out, err = proc.communicate(timeout=200)
        assert proc.returncode == 0, err[-2000:]
        outputs[i] = out.strip()
    assert outputs[0] == "agent=0 rank=0 world=2 sum=3.0"
    assert outputs[1] == "agent=1 rank=1 world=2 sum=3.0"
