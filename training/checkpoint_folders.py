"""The ``step-NNNNNNNN/`` checkpoint folders of a run: their names, the completeness marker, which one to resume
from, which to set aside and which to delete.

A checkpoint is used only when its ``COMPLETE.json`` marker is there and every file it lists has its size;
``keep_last`` counts complete checkpoints only, so the newest complete one is never deleted. Resuming tries the
newest complete checkpoint and falls back to the previous one with a warning. Checkpoints from before format 2 have
no marker (and may sit directly in the output folder): a parsable ``state.json`` is all that is checked for them.

What a checkpoint holds, and how it is written and read, is ``training.checkpoint``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from common.files import fsync_path, write_text_atomic

PREFIX = "step-"
FORMAT = 2
MARKER = "COMPLETE.json"
UNUSABLE_PREFIX = "unusable-"

_STEP_RE = re.compile(rf"^{PREFIX}(\d+)$")


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
