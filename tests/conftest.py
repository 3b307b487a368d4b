"""Shared test fixtures.

The golden tensors of the reference live outside the repository (``../shared/conformance`` by default,
``OPENSORA_CONFORMANCE_DIR`` to point elsewhere). Tests that need them skip with a reason when the folder is
absent, which is what a user's clone sees; CI (``.ci/run``) refuses to start without it, so CI never skips them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def conformance_root() -> Path:
    return Path(os.environ.get("OPENSORA_CONFORMANCE_DIR", REPO_ROOT.parent / "shared" / "conformance"))


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    root = conformance_root()
    if not root.is_dir():
        pytest.skip(f"conformance fixtures not found at {root} (set OPENSORA_CONFORMANCE_DIR)")
    return root
