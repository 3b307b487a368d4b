"""What every scheduler's sampling loop shares: the one ``sample`` signature and its checked inputs.

Each scheduler subclasses :class:`GuidedSampler` and writes only its loop, ``_sample(model, batch)``; the
arguments are named, documented and validated once here, so the three schedulers cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

NoiseFn = Callable[[torch.Tensor], torch.Tensor]
"""Returns a standard-normal tensor shaped like its argument (injectable so tests can replay draws)."""


def gaussian_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """Standard-normal draws from ``generator`` (the global one when None)."""

    def noise_fn(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    return noise_fn


@dataclass(frozen=True, eq=False)
class GuidedBatch:
    """The inputs of one classifier-free-guided sampling run (see :meth:`GuidedSampler.sample`), checked."""

    z: torch.Tensor
    y: torch.Tensor
    y_null: torch.Tensor
    mask: torch.Tensor | None = None
    model_kwargs: dict[str, Any] | None = None
    masks: torch.Tensor | None = None
    progress: bool = False
    noise_fn: NoiseFn = field(default_factory=gaussian_noise)

    def __post_init__(self) -> None:
        n = self.n
        if self.y.shape[0] != n or self.y_null.shape[0] != n:
            raise ValueError(f"z has {n} rows but y has {self.y.shape[0]} and y_null {self.y_null.shape[0]}")
        if self.masks is not None and self.masks.shape != (n, self.z.shape[2]):
            raise ValueError(f"masks must be [B, T] = {(n, self.z.shape[2])}, got {tuple(self.masks.shape)}")

    @property
    def n(self) -> int:
        return self.z.shape[0]

    @cached_property
    def y_all(self) -> torch.Tensor:
        """The captions then the null captions, [2n, 1, L, D]: the model sees both halves in one call."""
        return torch.cat([self.y, self.y_null], dim=0)

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every model call: ``model_kwargs`` plus the text mask as ``mask``; a new dict each
        time, which the loop may add ``x_mask`` to."""
        kwargs = dict(self.model_kwargs or {})
        if self.mask is not None:
            kwargs["mask"] = self.mask  # [n, L]: the model repeats it for the null half
        return kwargs

    def steps(self, indices: Iterable[int]) -> Iterable[int]:
        """The loop's indices, with a progress bar when asked for."""
        if not self.progress:
            return indices
        from tqdm.auto import tqdm

        return tqdm(indices)


class GuidedSampler:
    """Base of the schedulers: the public ``sample``; subclasses implement ``_sample(model, batch)``."""

    @torch.no_grad()
    def sample(
        self,
        model: Callable[..., torch.Tensor],
        z: torch.Tensor,
        y: torch.Tensor,
        y_null: torch.Tensor,
        mask: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        masks: torch.Tensor | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> torch.Tensor:
        """Sample with classifier-free guidance; returns [n, C, T, H, W].

        Args:
            model: ``model(x, timestep, y, mask=..., x_mask=..., **model_kwargs)`` over the doubled batch
                [2n, ...], returning [2n, C or 2C, T, H, W].
            z: initial noise [n, C, T, H, W] (with reference frames already written by apply_mask_strategy).
            y, y_null: caption embeddings [n, 1, L, D] and the null caption; the model sees [y; y_null].
            mask: text-token mask [n, L] (kept at n rows: the model repeats it, so the null caption uses the
                prompt's lengths).
            model_kwargs: height, width, num_frames, ar, fps ([n] each), passed through unchanged.
            masks: per-frame edit ratios [n, T] from apply_mask_strategy, or None.
            progress: show a progress bar over the steps.
            generator / noise_fn: source of the Gaussian draws the scheduler takes (each scheduler's
                docstring says which); deterministic solvers take none.
        """
        batch = GuidedBatch(z, y, y_null, mask, model_kwargs, masks, progress, noise_fn or gaussian_noise(generator))
        return self._sample(model, batch)

    def _sample(self, model: Callable[..., torch.Tensor], batch: GuidedBatch) -> torch.Tensor:
        raise NotImplementedError
