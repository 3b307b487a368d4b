"""Bucket presets: the bucket table of each training stage, read from YAML and validated.

A bucket table maps ``{resolution: {t: (keep_prob, batch_size)}}``; a preset adds the frame interval and the seed
that the assignment depends on. ``training.buckets`` assigns samples to a table's buckets, ``training.bucket_report``
counts where the rows of a training table go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from training.aspect import ASPECT_RATIOS, AspectTable

PRESETS_DIR = Path(__file__).parent / "presets"

# Bucket presets shipped with the repo: name -> YAML file. The names double as CLI / launchpad choices.
BUCKET_PRESETS: dict[str, Path] = {
    "stage1": PRESETS_DIR / "buckets_stage1.yaml",
    "stage2": PRESETS_DIR / "buckets_stage2.yaml",
    "stage3": PRESETS_DIR / "buckets_stage3.yaml",
    "demo_cpu": PRESETS_DIR / "buckets_demo_cpu.yaml",
}


class BucketEntry(NamedTuple):
    """One ``bucket_config[res][t]`` entry. ``batch_size`` is per GPU; ``None`` only where ``keep_prob`` is 0."""

    keep_prob: float
    batch_size: int | None


BucketConfig = dict[str, dict[int, BucketEntry]]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate_bucket_config(
    bucket_config: Mapping[Any, Any], aspect_ratios: Mapping[str, AspectTable] | None = None
) -> BucketConfig:
    """Check a ``{resolution: {t: (keep_prob, batch_size)}}`` mapping and return it normalised.

    Accepts what YAML and JSON give: integer resolution names (``256``) and string frame counts (``"16"``) are
    converted. Raises ``ValueError`` naming the offending entry for anything else.
    """
    tables = ASPECT_RATIOS if aspect_ratios is None else aspect_ratios
    if not isinstance(bucket_config, Mapping) or not bucket_config:
        raise ValueError(f"bucket_config must be a non-empty mapping resolution -> {{t: [keep_prob, batch_size]}}, "
                         f"got {bucket_config!r}")
    out: BucketConfig = {}
    for raw_res, entries in bucket_config.items():
        res = str(raw_res)
        if res in out:
            raise ValueError(f"bucket_config names resolution {res!r} twice")
        if res not in tables:
            raise ValueError(f"bucket_config: unknown resolution {res!r}; known: {', '.join(tables)}")
        if not isinstance(entries, Mapping) or not entries:
            raise ValueError(f"bucket_config[{res!r}] must be a non-empty mapping t -> [keep_prob, batch_size], "
                             f"got {entries!r}")
        out[res] = {}
        for raw_t, value in entries.items():
            where = f"bucket_config[{res!r}][{raw_t!r}]"
            if isinstance(raw_t, str) and raw_t.strip().isdigit():
                t = int(raw_t)
            elif isinstance(raw_t, (int, np.integer)) and not isinstance(raw_t, bool):
                t = int(raw_t)
            else:
                raise ValueError(f"{where}: the frame count must be a positive integer")
            if t < 1:
                raise ValueError(f"{where}: the frame count must be >= 1 (1 = images)")
            if t in out[res]:
                raise ValueError(f"{where}: frame count {t} appears twice")
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
                raise ValueError(f"{where}: expected [keep_prob, batch_size], got {value!r}")
            keep_prob, batch_size = value
            if not _is_number(keep_prob) or not 0.0 <= float(keep_prob) <= 1.0:
                raise ValueError(f"{where}: keep_prob must be a number in [0, 1], got {keep_prob!r}")
            if batch_size is None:
                if float(keep_prob) != 0.0:
                    raise ValueError(f"{where}: keep_prob {keep_prob} needs a batch size (None is only allowed "
                                     f"with keep_prob 0)")
            elif not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
                raise ValueError(f"{where}: batch_size must be a positive integer or null, got {batch_size!r}")
            out[res][t] = BucketEntry(float(keep_prob), None if batch_size is None else int(batch_size))
    return out


@dataclass(frozen=True, kw_only=True)
class BucketPreset:
    """A named bucket setup: the bucket table plus the two numbers the assignment depends on."""

    name: str
    """Preset name (file ``buckets_<name>.yaml``)."""
    bucket_config: BucketConfig
    """resolution -> {t: (keep_prob, per-GPU batch size)}."""
    frame_interval: int = 3
    """Dataset frame interval: a video fits bucket t when it has more than t * frame_interval frames."""
    seed: int = 42
    """Training seed; the keep draws are seeded from it."""
    description: str = ""


_PRESET_KEYS = {"name", "description", "frame_interval", "seed", "bucket_config"}


def shipped_preset(name_or_path: str | Path) -> Path | None:
    """The YAML file of a shipped preset's name (``demo-cpu`` or ``demo_cpu``), else None."""
    return BUCKET_PRESETS.get(str(name_or_path).replace("-", "_"))


def load_bucket_preset(name_or_path: str | Path) -> BucketPreset:
    """Load a preset by name (``stage1``, ``stage2``, ``stage3``, ``demo_cpu``) or from a YAML file path."""
    import yaml

    path = shipped_preset(name_or_path)
    if path is None:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"unknown bucket preset {str(name_or_path)!r}: not one of {', '.join(BUCKET_PRESETS)} "
                             f"and not a YAML file")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(_PRESET_KEYS)}")
    unknown = set(data) - _PRESET_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_PRESET_KEYS)}")
    if "bucket_config" not in data:
        raise ValueError(f"{path}: missing 'bucket_config'")
    frame_interval = data.get("frame_interval", 3)
    if not isinstance(frame_interval, int) or isinstance(frame_interval, bool) or frame_interval < 1:
        raise ValueError(f"{path}: frame_interval must be a positive integer, got {frame_interval!r}")
    seed = data.get("seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{path}: seed must be an integer, got {seed!r}")
    try:
        config = validate_bucket_config(data["bucket_config"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return BucketPreset(
        name=str(data.get("name", path.stem.removeprefix("buckets_"))),
        description=str(data.get("description", "")),
        frame_interval=frame_interval,
        seed=seed,
        bucket_config=config,
    )

