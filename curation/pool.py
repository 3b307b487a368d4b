"""A crash-isolating worker pool for per-video curation work: one hostile video costs only itself.

``run_pool(task, items)`` runs ``task(item)`` for every item in long-lived worker processes and returns one
:class:`Outcome` per item, in the order of ``items``. An exception inside the task comes back as data
(:class:`TaskError`). A worker that dies (OOM killer, decoder segfault, ``os._exit``) or that exceeds the per-item time
or memory limit is killed and replaced; its item gets a :class:`WorkerLost` error, an input rejection (the video costs
too much or crashes the decoder), and the other items go on.

Why not ``concurrent.futures.ProcessPoolExecutor``: one dead worker breaks the whole executor and it cannot tell which
item killed it. Here each worker has its own pipe and takes one item at a time, so the parent always knows which item
a worker holds. Workers come from a ``forkserver`` context: the parent may be a Dagster run process with threads, and
forking a threaded process can deadlock the child. Plain pipes (socket pairs) carry items and results, so nothing is
left in ``/dev/shm``. ``workers=1`` runs in-process (no limits enforced) for debugging with a plain traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import reprlib
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import psutil

from curation.errors import InputRejected, is_input_rejection

POLL_S = 0.1  # how often the parent checks time and memory limits of busy workers
SHUTDOWN_S = 5.0  # grace for idle workers to exit after being told to, before they are killed


class TaskError(Exception):
    """What went wrong with one item: ``type_name``, ``message`` and ``traceback`` of the exception in the worker.

    ``TaskError.create`` returns a :class:`RejectedTaskError` when the worker's ``is_input_rejection`` said so, so
    ``curation.errors.is_input_rejection`` classifies a re-raised outcome error exactly as it classified the original.
    ``str(err)`` is the original message; ``err.detail`` reads ``"ValueError: message"``.
    """

    def __init__(self, message: str, type_name: str, traceback: str = "", input_rejection: bool = False):
        super().__init__(message, type_name, traceback, input_rejection)
        self.message, self.type_name, self.traceback, self.input_rejection = message, type_name, traceback, input_rejection

    def __str__(self) -> str:
        return self.message

    @property
    def detail(self) -> str:
        return f"{self.type_name}: {self.message}"

    @staticmethod
    def create(message: str, type_name: str, traceback: str = "", input_rejection: bool = False) -> TaskError:
        cls = RejectedTaskError if input_rejection else TaskError
        return cls(message, type_name, traceback, input_rejection)

    @staticmethod
    def from_exception(err: BaseException) -> TaskError:
        tb = "".join(traceback.format_exception(err))
        return TaskError.create(str(err), type(err).__name__, tb, is_input_rejection(err))


class RejectedTaskError(TaskError, InputRejected):
    """A :class:`TaskError` whose original exception was an input rejection (bad video, not broken code)."""


class WorkerLost(RejectedTaskError):
    """The worker holding the item died or was killed for exceeding a limit; the item is to blame."""

    def __init__(self, message: str, type_name: str = "WorkerLost", traceback: str = "", input_rejection: bool = True):
        super().__init__(message, type_name, traceback, True)


class PoolBroken(RuntimeError):
    """A worker could not even start (the task does not unpickle, a preload fails): a setup error, not bad input."""


@dataclass
class Outcome:
    """The fate of one item: ``result`` when ``error`` is None, else the error (never both)."""

    item: Any
    result: Any = None
    error: TaskError | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> Any:
        """The result, or raise the error (classified by ``is_input_rejection`` like the original exception)."""
        if self.error is not None:
            raise self.error
        return self.result


def usable_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a Kubernetes pod's
    ``limits.cpu``), which affinity does not show."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
    except (OSError, ValueError):
        return count
    if quota == "max":
        return count
    return max(1, min(count, -(-int(quota) // int(period))))


def _forkserver_context(preload: Sequence[str]):
    """The forkserver context the pools fork their workers from, importing ``preload`` once when it starts."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["curation.pool", *preload])
    return ctx


def start_forkserver(preload: Sequence[str] = ()) -> None:
    """Start the forkserver the pools fork their workers from, now: it imports ``preload`` (PyAV, OpenCV, ...) in its
    own process while the caller goes on importing (Dagster, the lake), instead of when the first pool starts."""
    _forkserver_context(preload)
    from multiprocessing import forkserver

    forkserver.ensure_running()


def run_pool(task: Callable[[Any], Any], items: Iterable[Any], *, workers: int | None = None,
             time_limit_s: float | None = None, memory_limit_mb: float | None = None,
             progress: Callable[[int, int, Any, Outcome], None] | None = None,
             preload: Sequence[str] = (), cost: Callable[[Any], float] | None = None) -> list[Outcome]:
    """Run ``task(item)`` for each item; one :class:`Outcome` per item, in the order of ``items``.

    ``task`` must be a module-level function and items and results picklable. ``workers``: None = one per usable
    core, 1 = in-process (limits not enforced), never more than there are items. ``preload``: modules the
    forkserver imports once so workers start fast (only effective before the process's forkserver first starts).
    ``progress(done, total, item, outcome)`` is called in the parent as each item finishes. Workers that fill
    the cores decode and encode with one thread each unless ``$OPENSORA_VIDEO_THREADS`` is set. ``cost(item)``: an
    estimate of an item's work; the costliest items are handed out first, so that no worker is left with a long one
    at the end.
    """
    items = list(items)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        return _run_inline(task, items, progress)
    count = min(workers or usable_cpus(), len(items))
    if count == 0:
        return []
    outcomes: list[Outcome | None] = [None] * len(items)
    ctx = _forkserver_context(preload)
    blob = pickle.dumps(task)  # unpickled inside the worker, so an import failure is reported, not a silent exit
    env = _codec_env(count)
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost is not None else range(len(items))
    pending, pool, done = deque(order), [], 0
    try:
        for _ in range(count):
            pool.append(_Worker(ctx, blob, env))
        while done < len(items):
            for slot, worker in enumerate(pool):
                if worker.index is None and pending:
                    if not worker.process.is_alive():  # died after its last result: it must not take an item down
                        worker.stop()
                        pool[slot] = worker = _Worker(ctx, blob, env)
                    worker.assign(pending.popleft(), items)
            busy = [w for w in pool if w.index is not None]
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=POLL_S)
            for worker in busy:
                index = worker.index
                outcome = worker.check(items[index], time_limit_s, memory_limit_mb)
                if outcome is not None:  # a dead or killed worker is replaced when it would take the next item
                    outcomes[index], done = outcome, done + 1
                    if progress is not None:
                        progress(done, len(items), items[index], outcome)
    finally:
        for worker in pool:
            worker.stop()
    return outcomes  # type: ignore[return-value]


def _codec_env(workers: int) -> dict[str, str]:
    """One codec thread per worker when the workers fill the cores (``curation.video_io.video_threads``: a worker
    then has a core to itself, and FFmpeg's frame threads would only add hand-offs), unless the environment says."""
    from curation.video_io import VIDEO_THREADS_ENV

    if os.environ.get(VIDEO_THREADS_ENV, "").strip() or workers < usable_cpus():
        return {}
    return {VIDEO_THREADS_ENV: "1"}


def _run_inline(task, items: list, progress) -> list[Outcome]:
    """The debugging path: the same outcomes for exceptions, no process, no limits."""
    outcomes = []
    for done, item in enumerate(items, start=1):
        start = time.monotonic()
        try:
            outcome = Outcome(item, result=task(item))
        except Exception as err:
            outcome = Outcome(item, error=TaskError.from_exception(err))
        outcome.seconds = time.monotonic() - start
        outcomes.append(outcome)
        if progress is not None:
            progress(done, len(items), item, outcome)
    return outcomes


class _Worker:
    """The parent's handle on one worker process: its pipe, the item index it holds and since when."""

    def __init__(self, ctx, blob: bytes, env: dict[str, str]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, blob, env), name="curation-pool-worker",
                                   daemon=True)
        self.process.start()
        child.close()  # so the parent sees EOF on its end once the worker is gone
        self.ready, self.index, self.started, self._ps, self.stopped = False, None, None, None, False

    def assign(self, index: int, items: list) -> None:
        self.index, self.started = index, (time.monotonic() if self.ready else None)
        try:
            self.conn.send((index, items[index]))
        except OSError:
            pass  # the worker is already dead: check() reports it against this item

    def check(self, item, time_limit_s, memory_limit_mb) -> Outcome | None:
        """The item's outcome when it is finished (result, error, death or limit), else None."""
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if message[0] == "ready":
                    self.ready, self.started = True, time.monotonic()
                elif message[0] == "startup":
                    raise PoolBroken(f"a pool worker failed to start:\n{message[1]}")
                else:
                    _, ok, payload = message
                    outcome = Outcome(item, result=payload) if ok else Outcome(item, error=payload)
                    outcome.seconds, self.index = time.monotonic() - self.started, None
                    return outcome
        except (EOFError, OSError):  # the worker is gone: wait for the forkserver to report its exit status
            self.process.join(SHUTDOWN_S)
        if not self.process.is_alive():
            self.process.join()
            if not self.ready:
                raise PoolBroken(f"a pool worker died before it started (exit code {self.process.exitcode})")
            return self._lost(item, _exit_reason(self.process.exitcode))
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        if time_limit_s is not None and elapsed > time_limit_s:
            return self._lost(item, f"exceeded the per-video time limit of {time_limit_s:g} s", kill=True)
        rss_mb = self._rss_mb() if memory_limit_mb is not None else 0.0
        if memory_limit_mb is not None and rss_mb > memory_limit_mb:  # polled: a spike shorter than POLL_S can slip by
            return self._lost(item, f"exceeded the per-video memory limit of {memory_limit_mb:g} MiB "
                                    f"(RSS {rss_mb:.0f} MiB)", kill=True)
        return None

    def _lost(self, item, reason: str, kill: bool = False) -> Outcome:
        if kill:
            self._kill()
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        self.index = None
        return Outcome(item, error=WorkerLost(f"{reason} while processing {reprlib.repr(item)}"), seconds=elapsed)

    def _rss_mb(self) -> float:
        try:
            self._ps = self._ps or psutil.Process(self.process.pid)
            return self._ps.memory_info().rss / 2**20
        except psutil.Error:
            return 0.0  # gone between polls: the next check sees the exit

    def _kill(self) -> None:
        # The worker leads its own process group, so this also takes down ffmpeg or other children it started.
        for kill in (lambda: os.killpg(self.process.pid, signal.SIGKILL), self.process.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        self.process.join()

    def stop(self) -> None:
        """Ask an idle worker to exit, kill a busy or stuck one; always joined and closed afterwards."""
        if self.stopped:
            return
        self.stopped = True
        if self.process.is_alive() and self.index is None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(SHUTDOWN_S)
        if self.process.is_alive() or self.process.exitcode not in (0, None):
            self._kill()  # also sweeps what a crashed worker left in its process group
        self.conn.close()
        self.process.close()


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"worker killed by signal {-code} ({name})"
    return f"worker exited with code {code}"


def _worker_main(conn, blob: bytes, env: dict[str, str]) -> None:
    """Worker loop: receive (index, item), send back ("done", ok, result or TaskError); None stops it."""
    # Own process group: Ctrl-C in a terminal reaches only the parent, which decides how to stop, and the parent can
    # kill this worker together with any subprocess it runs.
    os.setpgid(0, 0)
    os.environ.update(env)
    try:
        task = pickle.loads(blob)
    except BaseException:
        conn.send(("startup", traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # the parent is gone
        if message is None:
            return
        try:
            reply = ("done", True, task(message[1]))
        except Exception as err:  # classified here, where the original exception and its type are at hand
            reply = ("done", False, TaskError.from_exception(err))
        try:
            conn.send(reply)  # pickles fully before writing, so a failure here leaves the pipe clean
        except OSError:
            return  # the parent is gone
        except Exception as err:  # the result does not pickle: a bug in the task, not in the input
            conn.send(("done", False, TaskError(f"result could not be sent back: {err}", type(err).__name__,
                                                traceback.format_exc())))


__all__ = ["Outcome", "PoolBroken", "RejectedTaskError", "TaskError", "WorkerLost", "run_pool", "start_forkserver"]
