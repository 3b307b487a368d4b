"""Diffusion schedulers: one object per algorithm that owns training losses and sampling.

- :class:`~models.schedulers.iddpm.IDDPM`: Open-Sora 1.1's Gaussian diffusion (training and 100-step sampling).
- :class:`~models.schedulers.dpm_solver.DPMSolver`: DPM-Solver++ multistep, fast previews of an IDDPM model.
- :class:`~models.schedulers.rectified_flow.RectifiedFlow`: Open-Sora 1.2-style rectified flow.

Every scheduler subclasses :class:`~models.schedulers.guided.GuidedSampler`, so every ``sample`` has one signature:
``sample(model, z, y, y_null, mask=None, model_kwargs=None, masks=None, progress=False, generator=None, noise_fn=None)``.
The classes are imported on first access so that importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from models.schedulers.dpm_solver import DPMSolver
    from models.schedulers.iddpm import IDDPM
    from models.schedulers.rectified_flow import RectifiedFlow

SchedulerName = Literal["iddpm", "dpm-solver", "rflow"]
"""A scheduler's name: the CLI and config choices, the keys of ``SCHEDULERS``."""

SCHEDULERS: dict[SchedulerName, str] = {
    "iddpm": "models.schedulers.iddpm:IDDPM",
    "dpm-solver": "models.schedulers.dpm_solver:DPMSolver",
    "rflow": "models.schedulers.rectified_flow:RectifiedFlow",
}
"""Scheduler names (the keys double as CLI / config choices) and where each class lives."""

assert set(SCHEDULERS) == set(get_args(SchedulerName)), "SchedulerName and SCHEDULERS name the same schedulers"

__all__ = ["IDDPM", "DPMSolver", "RectifiedFlow", "SCHEDULERS", "SchedulerName", "build_scheduler"]


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def build_scheduler(name: SchedulerName, **kwargs: Any) -> IDDPM | DPMSolver | RectifiedFlow:
    """Construct a scheduler by name, e.g. ``build_scheduler("iddpm", num_sampling_steps=100, cfg_scale=7.0)``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    return _load(SCHEDULERS[name])(**kwargs)


def __getattr__(name: str) -> Any:
    by_class = {path.split(":")[1]: path for path in SCHEDULERS.values()}
    if name in by_class:
        return _load(by_class[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
