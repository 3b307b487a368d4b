"""The per-video worker pool inside the curation assets: a worker the kernel kills costs only its video.

A watcher thread finds the worker process that has one chosen source open and sends it SIGKILL, as the OOM killer
would; the ``scenes`` run must quarantine that video with the signal as its reason and keep every other video.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
from dagster import instance_for_test

from curation.samples import Shot, write_synthetic_video
from opensora_dag.instance import materialize_selection
from resources.lakehouse import Lakehouse


def kill_the_worker_reading(needle: str, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first child process of this test that has a file whose path contains ``needle`` open."""
    me = psutil.Process()
    while not stop.is_set() and not killed:
        for child in me.children(recursive=True):
            try:
                if any(needle in f.path for f in child.open_files()):
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.005)


@pytest.mark.timeout(600)
def test_a_worker_killed_on_one_video_quarantines_only_that_video(tmp_path):
    lake = Lakehouse(home=str(tmp_path / "home"))
    batch = lake.batch_dir("k")
    batch.mkdir(parents=True)
    for i in range(3):
        write_synthetic_video(batch / f"ok_{i}.mp4", [Shot("moving", 30, (60 * i + 20, 90, 200)), Shot("static", 30, (200, 40, 40))],
                              width=96, height=64, fps=12)
    # the victim is long enough that its worker is still decoding when the watcher finds it
    write_synthetic_video(batch / "victim.mp4", [Shot("moving", 1800, (240, 200, 20), speed=2.0)], width=320, height=192, fps=24)
    with instance_for_test() as instance:
        assert all(o.success for o in materialize_selection("raw_videos", ["k"], instance, resources={"lakehouse": lake}))
        videos = {r["path"].rsplit("/", 1)[-1]: r for r in lake.read_partition("raw_videos", "k").to_dicts()}
        victim = videos["victim.mp4"]
        stop, killed = threading.Event(), []
        watcher = threading.Thread(target=kill_the_worker_reading, args=(victim["id"], stop, killed), daemon=True)
        watcher.start()
        try:
            outcomes = materialize_selection("scenes", ["k"], instance, resources={"lakehouse": lake},
                                             asset_config={"scenes": {"workers": 2}})
        finally:
            stop.set()
            watcher.join()
    assert killed, "the watcher never saw a worker reading the victim"
    assert all(o.success for o in outcomes), "one lost worker must not fail the stage"
    scenes = lake.read_partition("scenes", "k")
    assert set(scenes["video_id"].to_list()) == {videos[f"ok_{i}.mp4"]["id"] for i in range(3)}
    quarantine = lake.query("SELECT path, stage, reason FROM quarantine WHERE stage = 'scenes'").to_dicts()
    assert len(quarantine) == 1 and quarantine[0]["path"].endswith("victim.mp4")
    assert "signal 9 (SIGKILL)" in quarantine[0]["reason"], quarantine[0]["reason"]


def test_progress_is_logged_for_the_first_and_last_video_and_every_few_seconds_between(monkeypatch):
    """Each log line is an event in the run's event log (~6 ms each in SQLite): one per video cost seconds."""
    from types import SimpleNamespace

    import assets.curation as curation_assets

    lines: list[str] = []
    context = SimpleNamespace(log=SimpleNamespace(info=lines.append))
    clock = iter([0.0, 0.1, 0.2, 2.5, 2.6, 2.7])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    progress = curation_assets.progress_log(context, "scenes", str)
    for done in range(1, 7):
        progress(done, 6, f"v{done}.mp4")
    assert lines == ["scenes: 1/6 v1.mp4", "scenes: 4/6 v4.mp4", "scenes: 6/6 v6.mp4"]
