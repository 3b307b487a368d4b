"""MLflow tracking for training runs: one MLflow run per training run, logged from rank 0 only.

The tracking URI comes from the caller (the Dagster ``Tracking`` resource, the CLI) or ``MLFLOW_TRACKING_URI``;
the embedded default is a sqlite store under ``$OPENSORA_HOME/mlruns``. Credentials for a tracking server come
from the environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``), never from code.

MLflow never stops a training: ``RunTracker`` hands every call to one background thread, which logs in order and,
when MLflow fails (a locked sqlite store, a tracking server restarting), keeps the calls buffered and retries them
with backoff while training goes on. ``end()`` waits a bounded time for the buffer to drain; whatever is still not
logged then is written to a JSON-lines file and summarised by ``not_logged()``.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from common.storage import opensora_home as home_dir

EXPERIMENT = "opensora-dag"
# Errors that retrying the same call will not fix: such a call is dropped (and reported) after a few tries.
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"})
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
MAX_BUFFERED_CALLS = 100_000  # beyond this, the oldest buffered metrics go straight to the not-logged file


def default_tracking_uri(opensora_home: str | Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = home_dir(opensora_home)
    (home / "mlruns").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts beside a sqlite store (``mlruns/artifacts``); a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3 opens an experiment without this tag in its GenAI view (traces, tokens, cost); this is model training."""


def ensure_experiment(tracking_uri: str, name: str = EXPERIMENT) -> str:
    """The experiment's id, created if missing; safe when several processes start at once (whoever loses the race
    to create it uses the one the winner created)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    existing = client.get_experiment_by_name(name)
    if existing is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root(tracking_uri), tags=EXPERIMENT_TAGS)
        except Exception:
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise
    for key, value in EXPERIMENT_TAGS.items():  # experiments made by earlier versions open in the right view too
        if existing.tags.get(key) != value:
            client.set_experiment_tag(existing.experiment_id, key, value)
    return existing.experiment_id


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


def _error_code(err: BaseException) -> str | None:
    code = getattr(err, "error_code", None)
    return str(code) if code is not None else None


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


class RunTracker:
    """One MLflow run, logged from a background thread; every method is a no-op when ``enabled`` is False (ranks > 0).

    ``log`` receives the warnings (MLflow failing, back again, what was not logged). ``not_logged_path``: where
    calls that could not be logged are written at ``end()`` (default: none are written, only counted).
    """

    def __init__(
        self,
        tracking_uri: str,
        run_name: str,
        enabled: bool,
        run_id: str | None = None,
        experiment: str = EXPERIMENT,
        *,
        log: Callable[[str], Any] = print,
        not_logged_path: str | Path | None = None,
        retry_min_s: float = 1.0,
        retry_max_s: float = 60.0,
        flush_timeout_s: float | None = None,
    ):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id: str | None = None
        self._run_name = run_name
        self._experiment = experiment
        self._log = log
        self.not_logged_path = Path(not_logged_path) if not_logged_path else None
        self._retry_min_s, self._retry_max_s = retry_min_s, retry_max_s
        self._flush_timeout_s = float(flush_timeout_s if flush_timeout_s is not None else os.environ.get("OPENSORA_MLFLOW_FLUSH_TIMEOUT_S", 60))
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._wakeup = threading.Event()
        self._closing_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()  # the start call succeeded or failed once
        self._run_active = False
        self._failing_since: float | None = None
        self.last_error: str | None = None
        self.dropped: list[dict[str, Any]] = []  # calls given up on (permanent errors, overflow, end of run)

    # ---- the calls -------------------------------------------------------------------------------------------
    def start(self, system_metrics: bool = True, wait_s: float = 30.0) -> str | None:
        """Start (or, with ``run_id``, continue) the MLflow run. Waits up to ``wait_s`` for it; when MLflow fails,
        returns None at once and keeps trying in the background."""
        if not self.enabled:
            return None
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # we retry ourselves, without blocking training
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._put(("start", system_metrics))
        self._started.wait(wait_s)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self._put(("params", flatten(params)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled and metrics:
            values = {metric_key(k): float(v) for k, v in metrics.items() if v is not None}
            if values:
                self._put(("metrics", int(step), values, int(time.time() * 1000)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self._put(("artifact", str(path), artifact_path))

    def log_dataset(self, frame, name: str, version: str, source: str) -> None:
        """Record the training table as an MLflow dataset input, tagged with its version."""
        if not self.enabled:
            return
        import mlflow

        dataset = mlflow.data.from_pandas(frame.to_pandas(), source=source, name=f"{name}@{version}", digest=version[:36])
        self._put(("dataset", dataset, version))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._put(("tags", {k: str(v) for k, v in tags.items()}))

    def end(self, status: str = "FINISHED") -> str | None:
        """Finish the run: wait up to the flush timeout for the buffer, then report what was not logged."""
        if not self.enabled or self._thread is None:
            return None
        self._put(("end", status))
        with self._cond:
            self._closing_deadline = time.monotonic() + self._flush_timeout_s
            self._cond.notify_all()
        self._wakeup.set()
        self._thread.join(self._flush_timeout_s + 10)
        with self._cond:
            left = [call for call in self._queue if call[0] != "end"]
            self._queue.clear()
        for call in left:
            self._drop(call, "MLflow was still failing when the run ended")
        summary = self.not_logged()
        if self.dropped and self.not_logged_path is not None:
            with self.not_logged_path.open("a") as f:
                for record in self.dropped:
                    f.write(json.dumps(record, default=str) + "\n")
        if summary:
            self._log(f"warning: {summary}")
        return summary

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every call so far is logged (or given up on); False on timeout."""
        if not self.enabled or self._thread is None:
            return True
        deadline = time.monotonic() + timeout_s
        self._wakeup.set()
        with self._cond:
            while self._queue and time.monotonic() < deadline:
                self._cond.wait(0.05)
            return not self._queue

    def not_logged(self) -> str | None:
        """What was not logged, in words (None when everything was)."""
        if not self.dropped:
            return None
        metrics = [r for r in self.dropped if r["kind"] == "metrics"]
        parts = []
        if metrics:
            steps = sorted({r["step"] for r in metrics})
            values = sum(len(r["metrics"]) for r in metrics)
            parts.append(f"{values} metric values of {len(steps)} step(s) ({steps[0]}..{steps[-1]})")
        words = {"start": "the run itself (it never started)", "params": "params", "tags": "tags", "dataset": "the dataset input"}
        for kind in ("start", "params", "tags", "dataset", "artifact"):
            items = [r for r in self.dropped if r["kind"] == kind]
            if items:
                parts.append(words.get(kind) or "artifacts " + ", ".join(Path(r["path"]).name for r in items))
        where = f"; they are in {self.not_logged_path}" if self.not_logged_path is not None else ""
        return f"MLflow ({self.tracking_uri}) did not get: {', '.join(parts)} (last error: {self.last_error}){where}"

    @property
    def run_url(self) -> str | None:
        if not self.run_id:
            return None
        if self.tracking_uri.startswith(("http://", "https://")) and self.experiment_id:
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"{self.tracking_uri} run {self.run_id}"

    # ---- the worker ------------------------------------------------------------------------------------------
    def _put(self, call: tuple) -> None:
        with self._cond:
            self._queue.append(call)
            if len(self._queue) > MAX_BUFFERED_CALLS:
                for index, old in enumerate(self._queue):
                    if old[0] == "metrics" and index > 0:
                        del self._queue[index]
                        self._drop(old, "too many calls buffered while MLflow was failing")
                        break
            self._cond.notify_all()

    def _drop(self, call: tuple, why: str) -> None:
        kind = call[0]
        record: dict[str, Any] = {"kind": kind, "why": why}
        if kind == "metrics":
            record.update(step=call[1], metrics=call[2], timestamp=call[3])
        elif kind in ("params", "tags"):
            record[kind] = call[1]
        elif kind == "artifact":
            record.update(path=call[1], artifact_path=call[2])
        elif kind == "dataset":
            record.update(name=call[1].name, version=call[2])
        elif kind == "end":
            return
        self.dropped.append(record)

    def _next(self) -> list[tuple] | None:
        """The head call, or a run of metrics calls (one log_batch); None when closing and done."""
        with self._cond:
            while not self._queue:
                if self._closing_deadline is not None:
                    return None
                self._cond.wait()
            head = self._queue[0]
            if head[0] != "metrics":
                return [head]
            calls, count = [], 0
            for call in self._queue:
                if call[0] != "metrics" or count + len(call[2]) > MAX_BATCH_METRICS and calls:
                    break
                calls.append(call)
                count += len(call[2])
            return calls

    def _work(self) -> None:
        backoff, tries = self._retry_min_s, 0
        while True:
            calls = self._next()
            if calls is None:
                return
            try:
                self._do(calls)
            except Exception as err:  # noqa: BLE001  (any MLflow failure: buffered, retried, reported)
                self.last_error = _short(err)
                tries += 1
                if calls[0][0] == "start":
                    self._started.set()
                if _error_code(err) in PERMANENT_ERRORS and tries >= 3:
                    self._pop(calls, dropped=f"MLflow refused it: {self.last_error}")
                    tries = 0
                    continue
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    self._log(f"warning: MLflow failed ({self.last_error}); metrics are buffered and retried, "
                              "training goes on")
                if self._closing_deadline is not None and time.monotonic() >= self._closing_deadline:
                    return
                wait = backoff
                if self._closing_deadline is not None:
                    wait = min(wait, max(0.0, self._closing_deadline - time.monotonic()))
                self._wakeup.wait(wait)
                self._wakeup.clear()
                backoff = min(backoff * 2, self._retry_max_s)
                continue
            self._pop(calls)
            backoff, tries = self._retry_min_s, 0
            if self._failing_since is not None:
                self._log(f"MLflow is reachable again after {time.monotonic() - self._failing_since:.0f} s: "
                          "the buffered metrics are being logged")
                self._failing_since = None
            if calls[0][0] == "end":
                return

    def _pop(self, calls: list[tuple], dropped: str | None = None) -> None:
        with self._cond:
            for call in calls:
                if self._queue and self._queue[0] is call:
                    self._queue.popleft()
                if dropped:
                    self._drop(call, dropped)
            self._cond.notify_all()

    def _do(self, calls: list[tuple]) -> None:
        import mlflow
        from mlflow.entities import Metric, Param, RunTag

        kind = calls[0][0]
        client = mlflow.MlflowClient(self.tracking_uri)
        if kind == "start":
            self._do_start(calls[0][1])
            return
        if kind == "end":
            if self._run_active:
                mlflow.end_run(status=calls[0][1])
                self._run_active = False
            return
        if self.run_id is None:
            raise RuntimeError("the MLflow run has not started")
        if kind == "metrics":
            metrics = [Metric(key, value, stamp, step) for _, step, values, stamp in calls for key, value in values.items()]
            client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        elif kind == "params":
            existing = client.get_run(self.run_id).data.params
            fresh = [Param(k, v) for k, v in calls[0][1].items() if k not in existing]
            for i in range(0, len(fresh), 100):
                client.log_batch(self.run_id, params=fresh[i:i + 100], synchronous=True)
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in calls[0][1].items()], synchronous=True)
        elif kind == "artifact":
            path, artifact_path = calls[0][1], calls[0][2]
            if Path(path).is_dir():
                client.log_artifacts(self.run_id, path, artifact_path)
            elif Path(path).exists():
                client.log_artifact(self.run_id, path, artifact_path)
        elif kind == "dataset":
            mlflow.log_input(calls[0][1], context="training", tags={"version": calls[0][2]})

    def _do_start(self, system_metrics: bool) -> None:
        import mlflow

        self.experiment_id = ensure_experiment(self.tracking_uri, self._experiment)
        try:
            run = mlflow.start_run(run_id=self.run_id, run_name=None if self.run_id else self._run_name,
                                   experiment_id=self.experiment_id, log_system_metrics=system_metrics)
        except Exception as err:
            if self.run_id is None or _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
                raise
            self._log(f"warning: MLflow run {self.run_id} does not exist in {self.tracking_uri}: starting a new one")
            self.run_id = None
            run = mlflow.start_run(run_name=self._run_name, experiment_id=self.experiment_id, log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        self._run_active = True
        self._started.set()


def git_commit() -> str:
    """The commit of the code that runs (logged with every run), or "unknown" outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
