"""The curation worker pool: order, exceptions as data, a dead or runaway worker costs only its item, clean exit."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from curation.errors import InputRejected, is_input_rejection
from curation.pool import Outcome, RejectedTaskError, TaskError, WorkerLost, run_pool
from tests.curation import pool_tasks

ITEMS = ["a", "b", "bad", "c", "d"]


def _pool_infrastructure() -> set[int]:
    """The process's forkserver and resource tracker: long-lived by design, shared by every pool of the process.

    Only direct children count: workers are forked by the forkserver (grandchildren) and share its command line.
    """
    pids = set()
    for proc in psutil.Process().children():
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "forkserver" in cmdline or "resource_tracker" in cmdline:
            pids.add(proc.pid)
    return pids


def _leftovers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in _pool_infrastructure()]


@pytest.fixture(autouse=True)
def no_leftover_workers():
    shm_before = set(os.listdir("/dev/shm"))
    before = {p.pid for p in _leftovers()}  # children other tests of this session left running are not ours
    yield
    deadline = time.monotonic() + 2
    while (left := [p for p in _leftovers() if p.pid not in before]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes left behind: {[(p.pid, p.status()) for p in left]}"
    assert set(os.listdir("/dev/shm")) <= shm_before


def _only_bad_lost(outcomes: list[Outcome], reason: str) -> None:
    assert [o.item for o in outcomes] == ITEMS
    for o in outcomes:
        if o.item == "bad":
            assert isinstance(o.error, WorkerLost) and reason in str(o.error) and "'bad'" in str(o.error)
            assert is_input_rejection(o.error)
            with pytest.raises(InputRejected):
                o.unwrap()
        else:
            assert o.ok and o.result == o.item


def test_results_in_order_with_two_workers():
    outcomes = run_pool(pool_tasks.square, range(20), workers=2)
    assert [o.result for o in outcomes] == [i * i for i in range(20)]
    assert [o.item for o in outcomes] == list(range(20)) and all(o.ok for o in outcomes)
    pids = {o.result for o in run_pool(pool_tasks.pid_of, range(6), workers=2)}
    assert len(pids) <= 2 and os.getpid() not in pids  # long-lived workers, not one per item, not the parent


@pytest.mark.parametrize("workers", [2, 1])
def test_exceptions_come_back_as_classified_errors(workers):
    outcomes = run_pool(pool_tasks.fail_on_bad, ["x", "bad", "broken", "y"], workers=workers)
    assert [o.result for o in outcomes] == ["X", None, None, "Y"]
    bad, broken = outcomes[1].error, outcomes[2].error
    assert isinstance(bad, RejectedTaskError) and bad.input_rejection and is_input_rejection(bad)
    assert bad.type_name == "InputRejected" and str(bad) == "cannot decode bad"
    assert isinstance(broken, TaskError) and not broken.input_rejection and not is_input_rejection(broken)
    assert broken.detail == "ValueError: scorer broke on broken"
    assert "fail_on_bad" in broken.traceback and "ValueError" in broken.traceback
    with pytest.raises(TaskError) as raised:
        outcomes[2].unwrap()
    assert not is_input_rejection(raised.value)


def test_worker_killed_by_sigkill_costs_only_its_item():
    _only_bad_lost(run_pool(pool_tasks.sigkill_on_bad, ITEMS, workers=2), "worker killed by signal 9 (SIGKILL)")


def test_worker_exit_costs_only_its_item():
    _only_bad_lost(run_pool(pool_tasks.exit_on_bad, ITEMS, workers=2), "worker exited with code 3")


def test_time_limit():
    start = time.monotonic()
    outcomes = run_pool(pool_tasks.sleep_on_bad, ITEMS, workers=2, time_limit_s=1)
    _only_bad_lost(outcomes, "exceeded the per-video time limit of 1 s")
    assert time.monotonic() - start < 10


def test_memory_limit():
    outcomes = run_pool(pool_tasks.allocate_on_bad, ITEMS, workers=2, memory_limit_mb=150, time_limit_s=20)
    _only_bad_lost(outcomes, "exceeded the per-video memory limit of 150 MiB (RSS ")


def test_unpicklable_result_is_a_component_error():
    [outcome] = run_pool(pool_tasks.unpicklable_result, [1], workers=2)
    assert not outcome.ok and not is_input_rejection(outcome.error)
    assert "could not be sent back" in str(outcome.error)


def test_the_costliest_items_are_handed_out_first(tmp_path):
    log = tmp_path / "starts.txt"
    items = [(str(log), v) for v in (1, 5, 2, 9, 3)]
    outcomes = run_pool(pool_tasks.record_start, items, workers=2, cost=lambda item: item[1])
    assert [o.result for o in outcomes] == [1, 5, 2, 9, 3]  # outcomes stay in the order of the items
    started = [int(line) for line in log.read_text().split()]
    assert sorted(started[:2]) == [5, 9] and sorted(started) == [1, 2, 3, 5, 9]


@pytest.mark.parametrize("workers", [2, 1])
def test_progress_called_once_per_item(workers):
    calls = []
    run_pool(pool_tasks.fail_on_bad, ["x", "bad", "broken", "y"], workers=workers,
             progress=lambda done, total, item, outcome: calls.append((done, total, item, outcome.ok)))
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert sorted(c[2] for c in calls) == ["bad", "broken", "x", "y"]


def test_exception_in_parent_stops_workers():
    def explode(done, total, item, outcome):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pool(pool_tasks.sleep_on_bad, ["a", "bad", "b"], workers=2, progress=explode)


def test_no_items_and_more_workers_than_items():
    assert run_pool(pool_tasks.square, [], workers=4) == []
    assert [o.result for o in run_pool(pool_tasks.square, [3], workers=8)] == [9]


def test_error_pickles_and_keeps_its_class():
    import pickle

    for err in (WorkerLost("worker exited with code 3"), TaskError.create("m", "ValueError", "tb", True)):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and is_input_rejection(back)
