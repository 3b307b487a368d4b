"""Run folders, their lease, and checkpoints: every stateful part of a run in ``step-NNNNNNNN/``.

Layout::

    <root>/                      --outdir (default $OPENSORA_HOME/checkpoints/<name>), or the asset's <preset>/<version>
        run-001/                 one folder per training run; `train` without --resume always starts the next one
            lease.json           who trains this run now (host, pid, token), renewed by a heartbeat thread
            step-00000500/       one checkpoint
            metrics.jsonl, config.yaml, bucket_report.*, final_metrics.json, loss_curve.png
        run-002/ ...

One checkpoint (format 2)::

    model/           model weights, sharded by the booster (ColossalAI checkpoint IO, safetensors)
    optimizer/       optimizer state: sharded by the booster under ZeRO; under DDP every rank holds the same state,
                     which rank 0 saves whole as ``optimizer.pt`` (tensors and plain containers only)
    ema/             fp32 EMA weights as a Hugging Face-style folder (config.json + model.safetensors)
    rng-rank{r}.json python / numpy / torch RNG states of every rank, as JSON
    state.json       step, epoch, sampler position, objective, dataset version, MLflow run id, config, world size
    COMPLETE.json    written last: the format, the step and the size of every file above

Writing: all ranks write into ``.tmp-step-N/`` and fsync what they wrote; after a barrier rank 0 renames it to
``step-N/``, fsyncs the run folder, then writes ``COMPLETE.json``. A checkpoint is used only when its marker is there
and every file it lists has its size; ``keep_last`` counts complete checkpoints only, so the newest complete one is
never deleted. Resuming tries the newest complete checkpoint and falls back to the previous one with a warning.

Reading never unpickles code: ``torch.load(weights_only=True)`` everywhere (the booster's loads included), RNG states
and the sampler position are JSON. Checkpoints from before format 2 (``rng-rank{r}.pt``, no marker, ``step-*``
directly in the output folder) still resume; their RNG files are read with only numpy's array types allowed.

Lease: a run folder is trained by one process tree at a time, also across machines sharing a volume (NFS, a PVC):
``lease.json`` is created with O_EXCL, renewed every quarter of its expiry time by rewriting a temporary file and
renaming it over, and taken over (with a warning) only when its holder's process is gone from this host, it expired
long ago, or it was watched for one expiry time without being renewed. No flock: it does not work across NFS clients.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from common.files import fsync_path, fsync_tree, publish, write_text_atomic

PREFIX = "step-"
RUN_PREFIX = "run-"
FORMAT = 2
MARKER = "COMPLETE.json"
LEASE_FILE = "lease.json"
UNUSABLE_PREFIX = "unusable-"
DEFAULT_LEASE_TTL_S = 60.0
# STDiT2Config fields that change how a model runs, not what its weights are: a resume may change them.
RUNTIME_ONLY_MODEL_KEYS = frozenset({"grad_checkpointing", "enable_flash_attn", "enable_layernorm_kernel", "input_size"})

_STEP_RE = re.compile(rf"^{PREFIX}(\d+)$")
_RUN_RE = re.compile(rf"^{RUN_PREFIX}(\d+)$")


class ResumeError(ValueError):
    """A run cannot be started or resumed as asked; the message says why and what to do."""


class RunBusy(ResumeError):
    """Another live process holds the run folder's lease."""


class LeaseLost(RuntimeError):
    """This process's lease was taken over: it must stop writing into the run folder."""


class UnsafeCheckpointFile(ResumeError):
    """A checkpoint file holds pickled objects other than tensors and plain containers."""


# --------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------------------------------
def step_dir(outdir: Path, step: int) -> Path:
    return Path(outdir) / f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    match = _STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(outdir: Path) -> list[Path]:
    """Every ``step-N`` folder with a ``state.json``, complete or not, by step."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        return []
    found = [p for p in outdir.iterdir() if p.is_dir() and step_of(p) is not None and (p / "state.json").is_file()]
    return sorted(found, key=step_of)


def check_complete(checkpoint: Path) -> str | None:
    """None when ``checkpoint`` is complete, else why not.

    Format 2: the marker is there and every file it lists exists with its size, and ``state.json`` parses. Older
    checkpoints have no marker: their folder was renamed into place once written, so a parsable ``state.json``
    is all that can be checked (loading them is the rest of the check).
    """
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError) as err:
        return f"state.json unreadable ({err})"
    marker = checkpoint / MARKER
    if not marker.is_file():
        if int(state.get("format", 1)) < FORMAT:
            return None
        return f"no {MARKER}: it was not finished (killed while being written, or copied in part)"
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        return f"{MARKER} unreadable ({err})"
    for rel, size in manifest.get("files", {}).items():
        path = checkpoint / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} were written"
    return None


def complete_checkpoints(outdir: Path) -> list[Path]:
    return [p for p in list_checkpoints(outdir) if check_complete(p) is None]


def latest_checkpoint(outdir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder."""
    found = complete_checkpoints(outdir)
    return found[-1] if found else None


def resume_candidates(outdir: Path, log: Callable[[str], Any] = print) -> list[Path]:
    """Complete checkpoints, newest first; says which newer ones are skipped and why."""
    out = []
    for path in reversed(list_checkpoints(outdir)):
        why = check_complete(path)
        if why is None:
            out.append(path)
        else:
            log(f"warning: skipping checkpoint {path}: {why}")
    return out


def set_aside(paths: list[Path], log: Callable[[str], Any] = print) -> None:
    """Rename unusable checkpoints newer than the one resumed so that they are never listed again (kept for a look)."""
    for path in paths:
        target = path.parent / f"{UNUSABLE_PREFIX}{path.name}"
        n = 1
        while target.exists():
            n += 1
            target = path.parent / f"{UNUSABLE_PREFIX}{path.name}.{n}"
        path.rename(target)
        log(f"warning: moved the unusable checkpoint {path.name} aside to {target.name} (delete it when done with it)")


def prune(outdir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than the newest
    complete one. The newest complete checkpoint is never deleted. Returns what was deleted."""
    checkpoints = list_checkpoints(outdir)
    complete = [p for p in checkpoints if check_complete(p) is None]
    if not complete:
        return []
    keep = set(complete[-max(1, keep_last):])
    newest = step_of(complete[-1])
    deleted = []
    for path in checkpoints:
        if path in keep or step_of(path) > newest:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


# --------------------------------------------------------------------------------------------------------------
# Durable writes
# --------------------------------------------------------------------------------------------------------------
def write_json_durably(path: Path, data: Any) -> None:
    """Write to a temporary sibling, fsync, rename over ``path``, fsync the folder (so the rename survives too)."""
    path = Path(path)
    write_text_atomic(path, json.dumps(data, indent=2, default=str), fsync=True)
    fsync_path(path.parent, directory=True)


def manifest(folder: Path) -> dict[str, int]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


# --------------------------------------------------------------------------------------------------------------
# RNG states as JSON, and loads that never run code
# --------------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (and CUDA) RNG states as JSON-ready data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output (JSON) or a pre-format-2 state (tuples, numpy arrays, a ByteTensor)."""
    python = state["python"]
    random.setstate((int(python[0]), tuple(int(x) for x in python[1]), None if python[2] is None else float(python[2])))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(tuple(numpy_state))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def _byte_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(torch.uint8)
    return torch.frombuffer(bytearray(base64.b64decode(value)), dtype=torch.uint8).clone()


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs: only array reconstruction and dtypes, never a callable of the file's choice."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(path: Path, *, allow_numpy: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, a clear error for anything else."""
    path = Path(path)
    context = torch.serialization.safe_globals(_numpy_array_globals()) if allow_numpy else contextlib.nullcontext()
    try:
        with context, weights_only_loads():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what the weights-only unpickler raises for anything not allowed
        raise UnsafeCheckpointFile(
            f"refusing to load {path}: it holds pickled objects that are not tensors or plain containers, and "
            "loading it would run code of the file's choice. Checkpoints written by opensora-dag never contain "
            "such objects: do not resume from this folder unless you know where the file came from"
        ) from err


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force ``torch.load(weights_only=True)`` for code we do not control (the booster's checkpoint IO)."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------------------------
def save_checkpoint(
    *,
    outdir: Path,
    step: int,
    booster,
    model,
    optimizer,
    ema: torch.nn.Module,
    ema_config: Any,
    state: dict[str, Any],
    rank: int,
    barrier,
    keep_last: int,
    sharded_optimizer: bool,
) -> Path:
    """Save on every rank (the booster gathers shards); returns the final checkpoint folder."""
    from models.checkpoint_io import save_stdit2_hf_dir

    outdir = Path(outdir)
    final = step_dir(outdir, step)
    # A fixed name, not common.files.temporary_sibling: every rank must find the same folder, and clean_stale
    # removes a dead holder's leftovers by it.
    tmp = outdir / f".tmp-{final.name}"
    # 1. A fresh temporary folder
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    # 2. Every rank writes its part, then makes it durable
    booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=True)
    if sharded_optimizer:
        booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
    elif rank == 0:
        (tmp / "optimizer").mkdir()
        torch.save(optimizer.state_dict(), tmp / "optimizer" / "optimizer.pt")
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        save_stdit2_hf_dir(ema, ema_config, tmp / "ema")
        (tmp / "state.json").write_text(json.dumps({**state, "format": FORMAT}, indent=2, default=str))
    fsync_tree(tmp)
    barrier()
    # 3. Rank 0: rename into place, mark complete, prune
    if rank == 0:
        files = manifest(tmp)
        publish(tmp, final, exists="replace")
        fsync_path(outdir, directory=True)
        write_json_durably(final / MARKER, {"format": FORMAT, "step": step, "files": files})
        prune(outdir, keep_last)
    barrier()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "state.json").read_text())


def load_checkpoint(
    *, checkpoint: Path, booster, model, optimizer, ema: torch.nn.Module, rank: int, sharded_optimizer: bool
) -> dict[str, Any]:
    """Restore model, optimizer, EMA and this rank's RNG; returns ``state.json``. Nothing is unpickled but tensors
    and plain containers (:class:`UnsafeCheckpointFile` otherwise)."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    with weights_only_loads():
        booster.load_model(model, str(checkpoint / "model"))
        if sharded_optimizer:
            booster.load_optimizer(optimizer, str(checkpoint / "optimizer"))
    if not sharded_optimizer:
        optimizer.load_state_dict(safe_torch_load(checkpoint / "optimizer" / "optimizer.pt"))
    ema.load_state_dict(load_file(checkpoint / "ema" / "model.safetensors"), strict=True)
    rng_json, rng_legacy = checkpoint / f"rng-rank{rank}.json", checkpoint / f"rng-rank{rank}.pt"
    if rng_json.is_file():
        set_rng_state(json.loads(rng_json.read_text()))
    elif rng_legacy.is_file():
        set_rng_state(safe_torch_load(rng_legacy, allow_numpy=True))
    # a rank beyond the saved world size keeps its seeded RNG (every step draws from its own generator anyway)
    return state


# --------------------------------------------------------------------------------------------------------------
# What a resume may change
# --------------------------------------------------------------------------------------------------------------
def model_config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every STDiT2Config field that differs (runtime-only switches excepted)."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RUNTIME_ONLY_MODEL_KEYS:
            continue
        if saved.get(key) != current.get(key):
            out.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
    return out


def check_model_config(checkpoint: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    if saved is None:
        return
    diff = model_config_differences(saved, current)
    if diff:
        raise ResumeError(
            f"cannot resume from {checkpoint}: the model config differs from the one it was trained with "
            f"({'; '.join(diff)}). Resume with the same model settings (--set model.* / encoders.model_max_length), "
            "or start a new run without --resume"
        )


def resume_position(sampler_state: dict[str, Any], world_size: int) -> tuple[int, str | None]:
    """(training steps already taken in the saved epoch on ``world_size`` ranks, a message when the world changed).

    The sampler's position is global (batches of the epoch's access order consumed by all ranks together), so it
    re-shards onto any number of ranks: the next step starts at the first whole step not yet consumed.
    """
    consumed = int(sampler_state["consumed_batches"])
    saved = int(sampler_state.get("num_replicas", world_size))
    steps = consumed // world_size
    if saved == world_size:
        return steps, None
    message = (
        f"resuming a run trained on {saved} process(es) with {world_size}: the data position is re-sharded "
        f"({consumed} batches of epoch {sampler_state.get('epoch', 0)} consumed = step {steps} of that epoch on "
        f"{world_size} ranks); each step now takes {world_size} batches instead of {saved}, so the global batch "
        "changes while the learning rate does not"
    )
    repeated = consumed - steps * world_size
    if repeated:
        message += f"; the last {repeated} consumed batch(es) are trained on again"
    return steps, message


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
