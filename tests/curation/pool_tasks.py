"""Task functions for tests/curation/test_pool.py: module-level, so forkserver workers can import them by name."""

from __future__ import annotations

import os
import signal
import time

from curation.errors import InputRejected


def square(item):
    return item * item


def pid_of(item):
    return os.getpid()


def fail_on_bad(item):
    """Item "bad" is an input rejection, "broken" a component error (a bug), anything else succeeds."""
    if item == "bad":
        raise InputRejected(f"cannot decode {item}")
    if item == "broken":
        raise ValueError(f"scorer broke on {item}")
    return item.upper()


def sigkill_on_bad(item):
    if item == "bad":
        os.kill(os.getpid(), signal.SIGKILL)
    return item


def exit_on_bad(item):
    if item == "bad":
        os._exit(3)
    return item


def sleep_on_bad(item):
    if item == "bad":
        time.sleep(60)
    return item


def allocate_on_bad(item):
    if item == "bad":
        hog = bytearray(400 * 2**20)
        hog[::4096] = b"x" * len(hog[::4096])  # touch every page, so it counts in RSS
        time.sleep(60)
    return item


def unpicklable_result(item):
    return lambda: item


def record_start(item):
    """Append the item's value to its file as it starts, then work a little: the order items were handed out."""
    path, value = item
    with open(path, "a") as f:
        f.write(f"{value}\n")
    time.sleep(0.2)
    return value
