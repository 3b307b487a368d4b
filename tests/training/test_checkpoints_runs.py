"""Run folders, leases, checkpoint integrity, safe loading and MLflow outages (issue 12, items 6-10).

Unit tests drive ``training.checkpoint`` / ``training.tracking`` in-process (a plain module and a booster stand-in
instead of STDiT2 under ColossalAI); the end-to-end tests run ``training.train`` on the tiny preset for a few steps.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.training.conftest import REPO, train_command
from training import checkpoint as ckpt, checkpoint_folders as folders, runs


def run_env(home: Path, **extra: str) -> dict:
    return {**os.environ, "OPENSORA_HOME": str(home), "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "", **extra}


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# A checkpoint written in-process: a plain module, AdamW, and a booster stand-in that saves safetensors
# --------------------------------------------------------------------------------------------------------------
class PlainBooster:
    def save_model(self, model, path, shard=True, use_safetensors=True):
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(path) / "model.safetensors"))

    def load_model(self, model, path):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))


def parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    ema = copy.deepcopy(model)
    config = SimpleNamespace(to_dict=lambda: {"hidden_size": 4, "depth": 1})
    return model, optimizer, ema, config


def save(run_dir: Path, step: int, keep_last: int = 2, seed: int = 0) -> Path:
    model, optimizer, ema, config = parts(seed)
    state = {"step": step, "epoch": 0, "sampler": {"seed": 42, "epoch": 0, "consumed_batches": step, "num_replicas": 1,
             "num_rows": 10}, "objective": "iddpm", "model_config": config.to_dict(), "world_size": 1}
    return ckpt.save_checkpoint(outdir=run_dir, step=step, booster=PlainBooster(), model=model, optimizer=optimizer,
                                ema=ema, ema_config=config, state=state, rank=0, barrier=lambda: None,
                                keep_last=keep_last, sharded_optimizer=False)


def load(checkpoint: Path) -> dict:
    model, optimizer, ema, _ = parts(seed=1)
    return ckpt.load_checkpoint(checkpoint=checkpoint, booster=PlainBooster(), model=model, optimizer=optimizer, ema=ema,
                                rank=0, sharded_optimizer=False)


class Payload:
    """Unpickling this runs ``os.mkdir(target)``: what an attacker's file would do."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


# --------------------------------------------------------------------------------------------------------------
# Item 6: every run gets its own folder
# --------------------------------------------------------------------------------------------------------------
def test_every_run_gets_its_own_folder_and_resume_picks_one(tmp_path):
    root = tmp_path / "checkpoints" / "demo-cpu"
    first, lease = runs.open_run(root, None, log=lambda _: None)
    lease.release()
    second, lease = runs.open_run(root, None, log=lambda _: None)
    lease.release()
    assert (first.name, second.name) == ("run-001", "run-002")
    newest, lease = runs.open_run(root, "latest", log=lambda _: None)
    lease.release()
    assert newest == second
    for name in ("run-001", "1", str(first)):
        named, lease = runs.open_run(root, name, log=lambda _: None)
        lease.release()
        assert named == first
    with pytest.raises(runs.ResumeError, match="run-001, run-002"):
        runs.open_run(root, "run-007", log=lambda _: None)
    # the layout before run folders (step-* directly in --outdir) keeps resuming in place
    legacy = tmp_path / "legacy"
    save(legacy, 4)
    resumed, lease = runs.open_run(legacy, "latest", log=lambda _: None)
    lease.release()
    assert resumed == legacy


def test_train_without_resume_never_writes_into_an_older_run(tiny_dataset, tmp_path):
    """A second plain `train` starts run-002: the older run's later steps, metrics and final checkpoint stay its own."""
    env = run_env(tmp_path / "home")
    outdir = tmp_path / "ckpt"
    first = subprocess.run(train_command(tiny_dataset, outdir, 4, 2), env=env, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(train_command(tiny_dataset, outdir, 2, 2, ["keep_last=1"]), env=env, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]

    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["final_checkpoint"] == str(outdir / "run-002" / "step-00000002")
    assert sorted(p.name for p in (outdir / "run-001").glob("step-*")) == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in (outdir / "run-002").glob("step-*")) == ["step-00000002"]
    assert sorted(losses(outdir / "run-001")) == [1, 2, 3, 4]
    assert sorted(losses(outdir / "run-002")) == [1, 2], "metrics.jsonl is per run"
    first_summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert first_summary["mlflow_run_id"] != summary["mlflow_run_id"]


# --------------------------------------------------------------------------------------------------------------
# Item 7: one live training per run folder
# --------------------------------------------------------------------------------------------------------------
def test_a_second_live_run_is_refused_or_gets_a_new_folder(tmp_path):
    root = tmp_path / "runs"
    run, holder = runs.open_run(root, None, log=lambda _: None, ttl_s=1.0)
    holder.heartbeat()
    try:
        with pytest.raises(runs.RunBusy, match=f"host {socket.gethostname()} pid {os.getpid()}"):
            runs.open_run(root, "latest", log=lambda _: None)
        with pytest.raises(runs.RunBusy):
            runs.RunLease(run).acquire()
        said = []
        other, lease = runs.open_run(root, "auto", log=said.append)  # what the Dagster asset asks for
        lease.release()
        assert other.name == "run-002" and "starting a new run" in said[-1]
    finally:
        holder.release()
    again, lease = runs.open_run(root, "run-001", log=lambda _: None)
    lease.release()
    assert again == run


def test_only_one_of_many_racing_processes_gets_the_lease(tmp_path):
    run = tmp_path / "run-001"
    run.mkdir()
    # a stale lease from another machine, so every contender also races the takeover
    (run / runs.LEASE_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "pidns": "", "token": "old",
                                                   "renewed": time.time() - 1000, "ttl_s": 5}))
    start, won, refused = threading.Barrier(8), [], []

    def contend():
        lease = runs.RunLease(run, ttl_s=2, log=lambda _: None)
        start.wait()
        try:
            won.append(lease.acquire().heartbeat())  # as train() does: renewed from the moment it is held
        except runs.RunBusy:
            refused.append(lease)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert json.loads((run / runs.LEASE_FILE).read_text())["token"] == won[0].token
    won[0].release()


def test_an_expired_lease_is_taken_over_with_a_warning_and_its_holder_stops(tmp_path):
    run = tmp_path / "run-001"
    stalled = runs.RunLease(run, ttl_s=0.5, log=lambda _: None).acquire()
    data = json.loads((run / runs.LEASE_FILE).read_text())
    data.update(host="node-7", renewed=time.time() - 5)  # as seen from another machine: not renewed for 5 s
    (run / runs.LEASE_FILE).write_text(json.dumps(data))
    said = []
    taker = runs.RunLease(run, ttl_s=30, log=said.append).acquire()
    assert "took over the lease" in said[0] and "node-7" in said[0] and "presumed dead" in said[0]
    assert stalled.renew() is False and "node-7" not in stalled.lost
    with pytest.raises(runs.LeaseLost, match="taken over"):
        stalled.check()
    stalled.release()  # must not remove the new holder's lease
    assert json.loads((run / runs.LEASE_FILE).read_text())["token"] == taker.token
    taker.release()
    assert not (run / runs.LEASE_FILE).exists()


def test_a_sigkilled_holder_on_this_host_is_taken_over_at_once(tmp_path):
    run = tmp_path / "run-001"
    code = f"from training.runs import RunLease; RunLease({str(run)!r}, ttl_s=2).acquire().heartbeat(); print('held', flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(600)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(runs.RunBusy):
        runs.RunLease(run).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    said = []
    lease = runs.RunLease(run, log=said.append).acquire(watch=False)  # at once: the holder's process is gone
    assert f"process {proc.pid} on this host is gone" in said[0]
    lease.release()


def test_a_holder_that_stops_renewing_is_taken_over_after_one_expiry_time(tmp_path):
    """A relaunched Kubernetes run whose old pod was killed: the lease looks fresh, but nobody renews it."""
    run = tmp_path / "run-001"
    run.mkdir()
    (run / runs.LEASE_FILE).write_text(json.dumps({"host": "old-pod-0", "pid": 1, "pidns": "", "token": "old",
                                                   "renewed": time.time(), "ttl_s": 1.0}))
    said = []
    began = time.monotonic()
    lease = runs.RunLease(run, log=said.append).acquire()
    assert 0.9 < time.monotonic() - began < 10
    assert "watching its lease" in said[0] and "did not renew its lease" in said[1] and "old-pod-0" in said[1]
    lease.release()


def test_the_heartbeat_keeps_a_lease_alive(tmp_path):
    run = tmp_path / "run-001"
    lease = runs.RunLease(run, ttl_s=1.0, log=lambda _: None).acquire().heartbeat()
    time.sleep(2.5)  # over two expiry periods: without renewals it would be free
    with pytest.raises(runs.RunBusy):
        runs.RunLease(run, ttl_s=1.0).acquire()
    lease.check()
    lease.release()
    runs.RunLease(run, ttl_s=1.0).acquire().release()


def test_resuming_a_run_that_is_training_is_refused(tiny_dataset, tmp_path):
    env = run_env(tmp_path / "home", OPENSORA_LEASE_TTL_S="4")  # renewed every second: seen alive within one
    outdir = tmp_path / "ckpt"
    first = subprocess.Popen(train_command(tiny_dataset, outdir, 1000, 1000), env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (outdir / "run-001" / runs.LEASE_FILE).exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lease"
            time.sleep(0.1)
        second = subprocess.run(train_command(tiny_dataset, outdir, 1000, 1000) + ["--resume"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is being trained by host {socket.gethostname()} pid {first.pid}" in second.stderr
        assert first.poll() is None, "the refused run must leave the live one alone"
        assert not any(p.name.startswith(".tmp-") for p in (outdir / "run-001").iterdir())
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


# --------------------------------------------------------------------------------------------------------------
# Item 8: durable checkpoints, fallback, what a resume may change
# --------------------------------------------------------------------------------------------------------------
def test_a_checkpoint_is_complete_only_with_its_marker_and_sizes(tmp_path):
    run = tmp_path / "run-001"
    good = save(run, 2)
    assert folders.check_complete(good) is None
    marker = json.loads((good / folders.MARKER).read_text())
    assert {"state.json", "optimizer/optimizer.pt", "rng-rank0.json", "ema/model.safetensors"} <= set(marker["files"])
    half = save(run, 4)
    torn = save(run, 6, keep_last=3)
    (half / folders.MARKER).unlink()  # killed after the rename, before the marker
    weights = torn / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a file cut short
    assert "not finished" in folders.check_complete(half)
    assert "model/model.safetensors has" in folders.check_complete(torn)
    said = []
    assert folders.resume_candidates(run, said.append) == [good]
    assert len(said) == 2 and all(line.startswith("warning: skipping checkpoint") for line in said)
    assert folders.latest_checkpoint(run) == good


def test_keep_last_never_deletes_the_last_complete_checkpoint(tmp_path):
    run = tmp_path / "run-001"
    save(run, 2)
    save(run, 4)
    newest = save(run, 6, keep_last=2)
    (newest / folders.MARKER).unlink()
    folders.prune(run, keep_last=1)
    assert [p.name for p in folders.list_checkpoints(run)] == ["step-00000004", "step-00000006"]
    assert folders.latest_checkpoint(run).name == "step-00000004"


def test_a_changed_model_config_names_the_differing_keys():
    saved = {"hidden_size": 48, "depth": 1, "patch_size": [1, 2, 2], "grad_checkpointing": False}
    with pytest.raises(runs.ResumeError, match=r"depth: 1 -> 2; hidden_size: 48 -> 96"):
        ckpt.check_model_config(Path("step-4"), saved, {**saved, "depth": 2, "hidden_size": 96})
    ckpt.check_model_config(Path("step-4"), saved, {**saved, "patch_size": (1, 2, 2), "grad_checkpointing": True})


def test_another_world_size_re_shards_the_data_position_and_says_so():
    state = {"seed": 42, "epoch": 3, "consumed_batches": 6, "num_replicas": 2, "num_rows": 10}
    assert ckpt.resume_position(state, 2) == (3, None)
    steps, message = ckpt.resume_position(state, 3)
    assert steps == 2 and "trained on 2 process(es) with 3" in message and "re-sharded" in message
    steps, message = ckpt.resume_position(state, 4)
    assert steps == 1 and "the last 2 consumed batch(es) are trained on again" in message


def test_a_corrupt_last_checkpoint_falls_back_and_other_changes_are_handled(tiny_dataset, tmp_path):
    """The newest checkpoint fails to load: resume warns, continues from the one before with the same losses, and
    sets the bad one aside. A changed model is refused with its keys; another world size re-shards and says so."""
    env = run_env(tmp_path / "home")
    outdir = tmp_path / "ckpt"
    run = outdir / "run-001"
    first = subprocess.run(train_command(tiny_dataset, outdir, 4, 2), env=env, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    want = losses(run)

    changed = ["model.overrides={input_sq_size: 64, hidden_size: 48, depth: 2, num_heads: 4, class_dropout_prob: 0.1}"]
    refused = subprocess.run(train_command(tiny_dataset, outdir, 4, 2, changed) + ["--resume"], env=env, cwd=REPO,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "depth: 1 -> 2" in refused.stderr, refused.stderr[-3000:]

    weights = next((run / "step-00000004" / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # damaged in place: same size, unreadable header
    weights.write_bytes(bytes(data))
    resumed = subprocess.run(train_command(tiny_dataset, outdir, 4, 2) + ["--resume"], env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert "could not load checkpoint" in said and "step-00000004" in said
    assert f"resumed from {run / 'step-00000002'} at step 2" in said
    assert losses(run) == want, "steps 3-4 trained again from step 2 give the same losses"
    assert (run / "unusable-step-00000004").is_dir()
    assert folders.latest_checkpoint(run).name == "step-00000004"

    wider = subprocess.run(train_command(tiny_dataset, outdir, 5, 5) + ["--nproc", "2", "--resume"], env=env, cwd=REPO,
                           capture_output=True, text=True)
    assert wider.returncode == 0, wider.stderr[-3000:]
    assert "trained on 1 process(es) with 2: the data position is re-sharded" in wider.stdout + wider.stderr
    state = json.loads((run / "step-00000005" / "state.json").read_text())
    assert state["world_size"] == 2 and state["sampler"]["num_replicas"] == 2


# --------------------------------------------------------------------------------------------------------------
# Item 9: nothing in a checkpoint folder runs code
# --------------------------------------------------------------------------------------------------------------
def test_rng_state_round_trips_through_json(tmp_path):
    import random

    import numpy as np

    saved = save(tmp_path / "run-001", 2)
    record = json.loads((saved / "rng-rank0.json").read_text())
    assert set(record) >= {"python", "numpy", "torch"}
    ckpt.set_rng_state(record)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(record)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


@pytest.mark.parametrize("target", ["optimizer/optimizer.pt", "rng-rank0.pt"])
def test_a_pickled_payload_in_a_checkpoint_is_refused_not_run(tmp_path, target):
    saved = save(tmp_path / "run-001", 2)
    pwned = tmp_path / "pwned"
    if target == "rng-rank0.pt":  # the pre-format-2 RNG file, still read for old checkpoints
        (saved / "rng-rank0.json").unlink()
    torch.save({"state": Payload(pwned), "param_groups": []}, saved / target)
    with pytest.raises(ckpt.UnsafeCheckpointFile, match="refusing to load"):
        load(saved)
    assert not pwned.exists(), "the payload ran"


def test_loads_inside_the_booster_are_forced_to_weights_only(tmp_path):
    evil = tmp_path / "evil.bin"
    torch.save(Payload(tmp_path / "pwned"), evil)
    with ckpt.weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(evil, weights_only=False)  # what a library call that asks for pickles would do
    assert not (tmp_path / "pwned").exists()


def test_checkpoints_from_before_format_2_still_load(tmp_path):
    """A checkpoint as the previous version wrote it: pickled RNG tuples in rng-rank0.pt, no marker, no format."""
    import random

    import numpy as np

    legacy = tmp_path / "ckpt"
    saved = save(legacy, 4)
    (saved / folders.MARKER).unlink()
    state = json.loads((saved / "state.json").read_text())
    del state["format"]
    (saved / "state.json").write_text(json.dumps(state))
    (saved / "rng-rank0.json").unlink()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, saved / "rng-rank0.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert folders.resume_candidates(legacy) == [saved]
    assert load(saved)["step"] == 4
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# --------------------------------------------------------------------------------------------------------------
# Item 10: MLflow failures never stop a training
# --------------------------------------------------------------------------------------------------------------
def test_mlflow_errors_are_buffered_and_retried(tmp_path, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = mlflow.MlflowClient.log_batch
    failures = {"left": 3}

    def flaky(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics and failures["left"] > 0:
            failures["left"] -= 1
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")
        return real(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky)
    said = []
    tracker = ckpt_tracker(uri, said, retry_min_s=0.05)
    tracker.start(system_metrics=False)
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step}, step)  # never raises, never blocks
    assert tracker.flush(30)
    assert tracker.end() is None
    history = mlflow.MlflowClient(uri).get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert any("database is locked" in line and "buffered and retried" in line for line in said)
    assert any("reachable again" in line for line in said)


def test_what_mlflow_did_not_get_is_said_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    said = []
    tracker = ckpt_tracker(f"http://127.0.0.1:{closed_port()}", said, retry_min_s=0.05, flush_timeout_s=1.0,
                           not_logged_path=tmp_path / "not_logged.jsonl")
    assert tracker.start(system_metrics=False, wait_s=20) is None
    tracker.log_params({"lr": 1e-4})
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 0.5, "lr": 1e-4}, step)
    summary = tracker.end()
    assert "6 metric values of 3 step(s) (1..3)" in summary and "params" in summary
    kept = [json.loads(line) for line in (tmp_path / "not_logged.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept if r["kind"] == "metrics"] == [1, 2, 3]


def test_creating_the_experiment_is_safe_when_two_runs_start_at_once(tmp_path, monkeypatch):
    import mlflow

    from training.tracking import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    winner = mlflow.MlflowClient(uri).create_experiment("race")
    real = mlflow.MlflowClient.get_experiment_by_name
    looks = {"n": 0}

    def not_yet(self, name):  # the other process creates it between our look and our create
        looks["n"] += 1
        return None if looks["n"] == 1 else real(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", not_yet)
    assert ensure_experiment(uri, "race") == winner


def test_a_training_goes_on_when_mlflow_is_down(tiny_dataset, tmp_path):
    env = run_env(tmp_path / "home", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", OPENSORA_MLFLOW_FLUSH_TIMEOUT_S="2")
    outdir = tmp_path / "ckpt"
    cmd = train_command(tiny_dataset, outdir, 2, 2) + ["--tracking-uri", f"http://127.0.0.1:{closed_port()}"]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["final_checkpoint"] == str(outdir / "run-001" / "step-00000002")
    assert "metric values of 3 step(s) (0..2)" in summary["mlflow_not_logged"], "steps 1-2 and the validation at step 0"
    assert "the run itself (it never started)" in summary["mlflow_not_logged"]
    assert "buffered and retried, training goes on" in out.stdout
    assert (outdir / "run-001" / "mlflow_not_logged.jsonl").is_file()


def ckpt_tracker(uri: str, said: list, **kwargs):
    from training.tracking import RunTracker

    return RunTracker(uri, run_name="test", enabled=True, log=said.append, **kwargs)
