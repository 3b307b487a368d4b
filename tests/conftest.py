"""Shared test fixtures.

The golden tensors of the reference live outside the repository (``../shared/conformance`` by default,
``OPENSORA_CONFORMANCE_DIR`` to point elsewhere). Tests that need them skip with a reason when the folder is
absent, which is what a user's clone sees; CI (``.ci/run``) refuses to start without it, so CI never skips them.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from tests.services import postgres_db, postgres_server, s3_bucket, s3_server  # noqa: F401  (real services)

REPO_ROOT = Path(__file__).resolve().parents[1]


def conformance_root() -> Path:
    return Path(os.environ.get("OPENSORA_CONFORMANCE_DIR", REPO_ROOT.parent / "shared" / "conformance"))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh OPENSORA_HOME with its own DAGSTER_HOME."""
    root = tmp_path / "home"
    monkeypatch.setenv("OPENSORA_HOME", str(root))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    yield root
    os.environ.pop("DAGSTER_HOME", None)


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    root = conformance_root()
    if not root.is_dir():
        pytest.skip(f"conformance fixtures not found at {root} (set OPENSORA_CONFORMANCE_DIR)")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 clips (moving / static / text shots in several colours) at 128x80, 40 frames each, as a Parquet table."""
    from curation.probe import probe_video
    from curation.samples import PALETTE, Shot, write_synthetic_video

    folder = tmp_path_factory.mktemp("tiny_dataset")
    rows = []
    kinds = [("moving", ""), ("static", ""), ("text", "OPEN SORA"), ("text", "HELLO")]
    for i in range(12):
        kind, text = kinds[i % len(kinds)]
        shot = Shot(kind, 40, PALETTE[i % len(PALETTE)], text=text, speed=3.0 + i % 3)
        video = write_synthetic_video(folder / f"clip_{i:02d}.mp4", [shot], width=128, height=80, fps=24)
        info = probe_video(video.path)
        rows.append({"id": f"clip{i:02d}", "path": str(video.path), "text": shot.caption(), "num_frames": info.num_frames,
                     "height": info.height, "width": info.width, "fps": info.fps, "aspect_ratio": info.aspect_ratio})
    path = folder / "data.parquet"
    pl.DataFrame(rows).write_parquet(path)
    return path


