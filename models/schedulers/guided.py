"""What every scheduler's sampling loop shares: the one ``sample`` signature and its checked inputs.

Each scheduler subclasses :class:`GuidedSampler` and writes only its loop, ``_sample(model, batch)``; the
arguments are named, documented and validated once here, so the three schedulers cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

NoiseFn = Callable[[torch.Tensor], torch.Tensor]
"""Returns a standard-normal tensor shaped like its argument (injectable so tests can replay draws)."""


@dataclass(frozen=True)
class GuidedBatch:
    """The inputs of one classifier-free-guided sampling run, checked and ready for a loop."""

    z: torch.Tensor
    """Initial state [n, C, T, H, W] (reference frames already written by apply_mask_strategy)."""
    y_all: torch.Tensor
    """The captions then the null captions, [2n, 1, L, D]: the model sees both halves in one call."""
    kwargs: dict[str, Any]
    """Keyword arguments for every model call: ``model_kwargs`` plus the text mask as ``mask``."""
    model_kwargs: dict[str, Any] | None
    """``model_kwargs`` as given (None when not given)."""
    masks: torch.Tensor | None
    """Per-frame edit ratios [n, T], or None."""
    noise_fn: NoiseFn
    progress: bool

    @property
    def n(self) -> int:
        return self.z.shape[0]

    def steps(self, indices: Iterable[int]) -> Iterable[int]:
        """The loop's indices, with a progress bar when asked for."""
        if not self.progress:
            return indices
        from tqdm.auto import tqdm

        return tqdm(indices)

    @classmethod
    def build(
        cls,
        z: torch.Tensor,
        y: torch.Tensor,
        y_null: torch.Tensor,
        mask: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        masks: torch.Tensor | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
        noise_fn: NoiseFn | None = None,
    ) -> GuidedBatch:
        """Check the shapes and fill in the defaults; arguments as in :meth:`GuidedSampler.sample`."""
        n = z.shape[0]
        if y.shape[0] != n or y_null.shape[0] != n:
            raise ValueError(f"z has {n} rows but y has {y.shape[0]} and y_null {y_null.shape[0]}")
        if masks is not None and masks.shape != (n, z.shape[2]):
            raise ValueError(f"masks must be [B, T] = {(n, z.shape[2])}, got {tuple(masks.shape)}")
        if noise_fn is None:

            def noise_fn(like: torch.Tensor) -> torch.Tensor:
                return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

        kwargs = dict(model_kwargs or {})
        if mask is not None:
            kwargs["mask"] = mask  # [n, L]: the model repeats it for the null half
        y_all = torch.cat([y, y_null], dim=0)
        return cls(z, y_all, kwargs, model_kwargs, masks, noise_fn, progress)


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
        batch = GuidedBatch.build(z, y, y_null, mask, model_kwargs, masks, progress, generator, noise_fn)
        return self._sample(model, batch)

    def _sample(self, model: Callable[..., torch.Tensor], batch: GuidedBatch) -> torch.Tensor:
        raise NotImplementedError
