"""Run folders and their lease: which ``run-NNN`` a ``train`` writes into, and which process holds it now.

Layout::

    <root>/                      --outdir (default $OPENSORA_HOME/checkpoints/<name>), or the asset's <preset>/<version>
        run-001/                 one folder per training run; `train` without --resume always starts the next one
            lease.json           who trains this run now (host, pid, token), renewed by a heartbeat thread
            step-00000500/       one checkpoint (training.checkpoint_folders, training.checkpoint)
            metrics.jsonl, config.yaml, bucket_report.*, final_metrics.json, loss_curve.png
        run-002/ ...

Lease: a run folder is trained by one process tree at a time, also across machines sharing a volume (NFS, a PVC):
``lease.json`` is created with O_EXCL, renewed every quarter of its expiry time by rewriting a temporary file and
renaming it over, and taken over (with a warning) only when its holder's process is gone from this host, it expired
long ago, or it was watched for one expiry time without being renewed. No flock: it does not work across NFS clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.files import write_text_atomic
from training.checkpoint_folders import list_checkpoints

RUN_PREFIX = "run-"
LEASE_FILE = "lease.json"
DEFAULT_LEASE_TTL_S = 60.0

_RUN_RE = re.compile(rf"^{RUN_PREFIX}(\d+)$")


class ResumeError(ValueError):
    """A run cannot be started or resumed as asked; the message says why and what to do."""


class RunBusy(ResumeError):
    """Another live process holds the run folder's lease."""


class LeaseLost(RuntimeError):
    """This process's lease was taken over: it must stop writing into the run folder."""


# --------------------------------------------------------------------------------------------------------------
# Lease: one live trainer per run folder, on a shared volume
# --------------------------------------------------------------------------------------------------------------
def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def lease_ttl_s() -> float:
    return float(os.environ.get("OPENSORA_LEASE_TTL_S", DEFAULT_LEASE_TTL_S))


@dataclass
class LeaseHolder:
    host: str
    pid: int
    pidns: str
    token: str | None
    renewed: float
    ttl_s: float

    @classmethod
    def read(cls, path: Path) -> "LeaseHolder | None":
        try:
            text = Path(path).read_text()
            mtime = Path(path).stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), str(data.get("pidns", "")), str(data["token"]),
                       float(data["renewed"]), float(data.get("ttl_s", lease_ttl_s())))
        except (ValueError, KeyError, TypeError):  # being written, or damaged: judged by its age alone
            return cls("?", -1, "", None, mtime, lease_ttl_s())

    def alive(self, now: float | None = None) -> tuple[bool, str]:
        """(whether the holder must be presumed alive, why)."""
        now = time.time() if now is None else now
        age = now - self.renewed
        if self.host == socket.gethostname() and self.pidns == _pid_namespace() and self.pid > 0 and not _pid_alive(self.pid):
            return False, f"its process {self.pid} on this host is gone"
        if age > self.ttl_s:
            return False, f"it was last renewed {age:.0f} s ago (expiry {self.ttl_s:.0f} s)"
        return True, f"renewed {max(age, 0):.0f} s ago"

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid}"


class RunLease:
    """The exclusive lease on one run folder (see the module docstring); ``heartbeat()`` keeps it renewed."""

    def __init__(self, run_dir: Path, ttl_s: float | None = None, log: Callable[[str], Any] = print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEASE_FILE
        self.ttl_s = float(ttl_s if ttl_s is not None else lease_ttl_s())
        self.token = uuid.uuid4().hex
        self.log = log
        self.lost: str | None = None
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _content(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(), "token": self.token,
                "renewed": time.time(), "ttl_s": self.ttl_s}

    def _create(self, path: Path) -> bool:
        """Create ``path`` holding our content; False when it exists (O_EXCL, atomic also on NFS v3+)."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._content()))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _replace(self) -> None:
        # a hidden .lease.json.*.tmp sibling, which clean_stale recognises should a process die mid-write
        write_text_atomic(self.path, json.dumps(self._content()), fsync=True)

    def acquire(self, watch: bool = True) -> "RunLease":
        """Take the lease, taking over an expired one with a warning; :class:`RunBusy` when a live process holds it.

        ``watch``: a lease that looks alive is watched for up to its expiry time. A live holder renews it every
        quarter of that, so a renewal proves it alive (refused at once); no renewal means its holder died (a
        SIGKILLed pod on another node), and the lease is taken over. Judged on this host's clock alone.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            if self._create(self.path):
                self._held = True
                return self
            holder = LeaseHolder.read(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            alive, why = holder.alive()
            if alive and watch:
                alive, why = self._watch(holder)
                if alive is None:
                    continue  # released while watched
            if alive:
                raise RunBusy(
                    f"run folder {self.run_dir} is being trained by {holder.describe()} ({why}; its lease expires "
                    f"{holder.ttl_s:.0f} s after the last renewal). Wait for that run, stop it, or start a new run "
                    "(without --resume)"
                )
            # Takeover: one contender per stale lease gets the takeover marker, checks that the lease is still the
            # stale one, and renames its own over it.
            marker = self.run_dir / f"{LEASE_FILE}.takeover-{holder.token or 'unreadable'}"
            if not self._create(marker):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - marker.stat().st_mtime > self.ttl_s:  # a contender died mid-takeover
                        marker.unlink()
                time.sleep(0.2)
                continue
            try:
                again = LeaseHolder.read(self.path)
                if again is None or again.token != holder.token:
                    continue
                self._replace()
                self._held = True
                self.log(f"warning: took over the lease of {self.run_dir} from {holder.describe()}: {why}, so that run "
                         "is presumed dead")
                return self
            finally:
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
        raise RunBusy(f"could not take the lease of {self.run_dir}: other processes keep competing for it")

    def _watch(self, holder: LeaseHolder) -> tuple[bool | None, str]:
        """(alive, why) after watching ``holder``'s lease; alive is None when it was released meanwhile."""
        self.log(f"{self.run_dir} is held by {holder.describe()}: watching its lease for up to {holder.ttl_s:.0f} s "
                 "to see whether that process is alive")
        deadline = time.monotonic() + holder.ttl_s + 1.0
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(holder.ttl_s / 8, 0.02)))
            now = LeaseHolder.read(self.path)
            if now is None:
                return None, "released"
            if now.token != holder.token or now.renewed != holder.renewed:
                return True, "it renewed its lease while we watched"
            alive, why = holder.alive()
            if not alive and "gone" in why:
                return False, why
        return False, f"it did not renew its lease for {holder.ttl_s:.0f} s while we watched"

    def renew(self) -> bool:
        """Rewrite the lease if it is still ours; False (and ``lost`` says why) when someone took it over."""
        with self._lock:
            if not self._held:
                return False
            holder = LeaseHolder.read(self.path)
            if holder is None or holder.token != self.token:
                self.lost = (f"the lease of {self.run_dir} was taken over by {holder.describe()}" if holder is not None
                             else f"the lease file {self.path} was removed")
                self._held = False
                return False
            self._replace()
            return True

    def heartbeat(self) -> "RunLease":
        """Renew every ttl/4 seconds in a daemon thread."""
        interval = max(self.ttl_s / 4, 0.05)

        def beat() -> None:
            failing_since = None
            while not self._stop.wait(interval):
                try:
                    if not self.renew():
                        self.log(f"warning: {self.lost}: this run stops writing checkpoints")
                        return
                    failing_since = None
                except OSError as err:
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.ttl_s:
                        self.lost = f"the lease of {self.run_dir} could not be renewed for {self.ttl_s:.0f} s ({err})"
                        self._held = False
                        self.log(f"warning: {self.lost}")
                        return

        self._thread = threading.Thread(target=beat, name=f"lease-{self.run_dir.name}", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease is no longer ours (checked from the file, not only the thread)."""
        if self.lost is None and self._held:
            holder = LeaseHolder.read(self.path)
            if holder is None or holder.token != self.token:
                self.lost = f"the lease of {self.run_dir} was taken over by {holder.describe() if holder else 'nobody (removed)'}"
        if self.lost is not None or not self._held:
            raise LeaseLost(self.lost or f"the lease of {self.run_dir} is not held")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._held:
                holder = LeaseHolder.read(self.path)
                if holder is not None and holder.token == self.token:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
            self._held = False

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------------------------
def run_number(path: Path) -> int | None:
    match = _RUN_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_runs(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and run_number(p) is not None), key=run_number)


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "final_metrics.json").is_file()


def newest_run(root: Path) -> Path | None:
    """The newest ``run-NNN``; a folder holding ``step-*`` directly (the layout before run folders) is a run too."""
    runs = list_runs(root)
    if runs:
        return runs[-1]
    if list_checkpoints(root):
        return Path(root)
    return None


def named_run(root: Path, name: str) -> Path:
    """``run-NNN`` (or ``NNN``) under ``root``, or a path to a run folder."""
    root = Path(root)
    candidates = [root / name]
    if name.isdigit():
        candidates.append(root / f"{RUN_PREFIX}{int(name):03d}")
    candidates.append(Path(name).expanduser())
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    runs = ", ".join(p.name for p in list_runs(root)) or "none"
    raise ResumeError(f"no run {name!r} to resume: it is neither a folder under {root} (runs there: {runs}) nor a path")


def open_run(root: Path, resume: str | bool | None, log: Callable[[str], Any] = print, ttl_s: float | None = None) -> tuple[Path, RunLease]:
    """Pick the run folder for ``train`` and take its lease.

    ``resume``: None/False starts the next ``run-NNN``; True/"latest" continues the newest run (starts one when
    there is none); "auto" continues the newest run if it is unfinished and no live process holds it, and starts
    the next one otherwise (what the Dagster asset asks for); any other value names a run (``run-003``, ``3`` or a
    path). Continuing a run that a live process holds is refused (:class:`RunBusy`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if resume in (None, False):
        return _start_new_run(root, log, ttl_s)
    if resume in (True, "latest", "auto"):
        target = newest_run(root)
        if target is None:
            log(f"no run under {root} to resume: starting a new one")
            return _start_new_run(root, log, ttl_s)
        if resume == "auto":
            if is_finished(target):
                return _start_new_run(root, log, ttl_s)
            try:
                return target, RunLease(target, ttl_s, log).acquire()
            except RunBusy as busy:
                log(f"warning: not resuming {target.name}: {busy}; starting a new run instead")
                return _start_new_run(root, log, ttl_s)
    else:
        target = named_run(root, str(resume))
    if target == root:
        log(f"note: {root} holds checkpoints directly (the layout before run folders): resuming them in place")
    return target, RunLease(target, ttl_s, log).acquire()


def _start_new_run(root: Path, log: Callable[[str], Any], ttl_s: float | None) -> tuple[Path, RunLease]:
    number = max((run_number(p) for p in list_runs(root)), default=0) + 1
    for _ in range(1000):
        run_dir = root / f"{RUN_PREFIX}{number:03d}"
        try:
            run_dir.mkdir()  # atomic: two runs starting at once get different folders
        except FileExistsError:
            number += 1
            continue
        try:
            return run_dir, RunLease(run_dir, ttl_s, log).acquire(watch=False)
        except RunBusy:  # a --resume of "the newest run" got it first
            number += 1
    raise ResumeError(f"could not create a new run folder under {root}")


def clean_stale(run_dir: Path) -> None:
    """Remove half-written checkpoints of a dead holder (the caller holds the lease)."""
    for path in Path(run_dir).glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(run_dir).glob(f".{LEASE_FILE}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
