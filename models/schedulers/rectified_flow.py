"""Rectified flow in the style of Open-Sora 1.2, for STDiT2 latents.

Facts followed (Open-Sora v1.2 ``rflow`` scheduler):

- Time runs from t=0 (data) to t=T=1000 (noise): ``x_t = (1 - t/T) * x0 + (t/T) * noise``. The model predicts
  the velocity ``v = x0 - noise`` (pointing from noise to data) and is trained with the MSE to it.
- Training timesteps: logit-normal, ``t = sigmoid(N(loc, scale)) * T`` (loc 0, scale 1), or uniform.
- Resolution/length-aware shift (``use_timestep_transform``): with s = t/T,
  ``ratio = sqrt(H*W / base_resolution) * sqrt(frames / base_num_frames) * transform_scale`` and
  ``s' = ratio*s / (1 + (ratio - 1)*s)``; base_resolution 512*512, base_num_frames 1, H and W in pixels.
  Larger or longer videos spend more of the schedule at high noise. The shift is applied to training timesteps
  and to every sampling timestep (t=T stays T).
- Frames entering the shift: v1.2's VAE compresses time, and it counts latent frames as
  ``1`` for an image, else ``num_frames // 17 * 5``. Open-Sora 1.1's SD VAE has no temporal compression, so the
  default here, ``frames_rule="latent"``, uses ``num_frames`` as given (latent = video frames);
  ``frames_rule="opensora_v1_2"`` reproduces the v1.2 rule.
- Sampling: Euler on ``[(1 - i/N) * T for i in range(N)]`` (shifted per sample), ``z += v * dt`` with
  ``dt = (t_i - t_{i+1}) / T`` and, for the last step, ``t_last / T`` (it ends at t=0). Classifier-free guidance
  on the doubled batch over all velocity channels (30 steps, cfg 7.0 in the v1.2 inference config).
- Frame masks (v1.2): a frame with edit ratio m is a condition while ``m*T < t``: it is kept at its value
  entering the step (the reference) and the model sees ``x_mask`` False for it. At the first step with
  ``m*T >= t`` it is re-noised from the reference to that level, then generated freely. Ratio 1 frames start as
  noise and are never re-noised. In training, condition frames (mask False) stay clean (``x_t`` at t=0 is x0)
  and the loss averages over the True frames only.

A model that returns 2C channels (STDiT2 with ``pred_sigma``) has its first C channels read as the velocity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from models.schedulers.diffusion_math import mean_flat
from models.schedulers.guided import GuidedBatch, GuidedSampler


@dataclass(eq=False)  # schedulers compare by identity, as IDDPM does
class RectifiedFlow(GuidedSampler):
    """Rectified-flow training and Euler sampling with timestep shift and frame masks."""

    num_sampling_steps: int = 30
    """Euler steps (v1.2: 30)."""
    cfg_scale: float = 7.0
    """Classifier-free guidance scale (v1.2: 7.0)."""
    num_timesteps: int = 1000
    """The time scale T (timesteps handed to the model are floats in [0, T])."""
    use_timestep_transform: bool = True
    """Apply the resolution/length-aware shift."""
    sample_method: Literal["logit-normal", "uniform"] = "logit-normal"
    """Training timesteps, "logit-normal" (v1.2) or "uniform"."""
    loc: float = 0.0
    """The logit-normal's normal mean."""
    scale: float = 1.0
    """The logit-normal's normal standard deviation."""
    transform_scale: float = 1.0
    """Extra factor on the shift ratio."""
    base_resolution: int = 512 * 512
    """The size (pixels) at which the shift is 1."""
    base_num_frames: int = 1
    """The length at which the shift is 1."""
    frames_rule: Literal["latent", "opensora_v1_2"] = "latent"
    """How ``num_frames`` counts in the shift, "latent" (as given) or "opensora_v1_2"."""
    use_discrete_timesteps: bool = False
    """Round sampling timesteps to integers before the shift."""

    def __post_init__(self) -> None:
        if self.sample_method not in ("logit-normal", "uniform"):
            raise ValueError(f"unknown sample_method {self.sample_method!r}")
        if self.frames_rule not in ("latent", "opensora_v1_2"):
            raise ValueError(f"unknown frames_rule {self.frames_rule!r}")

    # -- time --

    def timestep_transform(self, t: torch.Tensor, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """Shift timesteps t [B] (in [0, T]) by each sample's resolution and length (module docstring)."""
        height = torch.as_tensor(model_kwargs["height"], device=t.device).to(torch.float64)
        width = torch.as_tensor(model_kwargs["width"], device=t.device).to(torch.float64)
        frames = torch.as_tensor(model_kwargs["num_frames"], device=t.device).to(torch.float64)
        if self.frames_rule == "opensora_v1_2":
            frames = torch.where(frames == 1, torch.ones_like(frames), torch.div(frames, 17, rounding_mode="floor") * 5)
        ratio_space = (height * width / self.base_resolution).sqrt()
        ratio_time = (frames / self.base_num_frames).sqrt()
        ratio = (ratio_space * ratio_time * self.transform_scale).to(t.dtype)
        s = t / self.num_timesteps
        return ratio * s / (1 + (ratio - 1) * s) * self.num_timesteps

    def sample_timesteps(
        self,
        batch_size: int,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training timesteps [B] in [0, T]: logit-normal or uniform, then shifted if enabled."""
        if self.sample_method == "logit-normal":
            normal = torch.randn(batch_size, generator=generator, device=device) * self.scale + self.loc
            t = torch.sigmoid(normal) * self.num_timesteps
        else:
            t = torch.rand(batch_size, generator=generator, device=device) * self.num_timesteps
        if self.use_timestep_transform:
            if model_kwargs is None:
                raise ValueError("the timestep shift needs height, width and num_frames in model_kwargs")
            t = self.timestep_transform(t, model_kwargs)
        return t

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t/T) x0 + (t/T) noise, t [B]."""
        s = (t / self.num_timesteps).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - s) * x0 + s * noise

    # -- training --

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample velocity MSE ``{"loss"}`` [B]; ``t`` defaults to :meth:`sample_timesteps`.

        ``mask`` [B, T] bool: False frames stay clean and are left out of the loss; it is also passed to the
        model as ``x_mask`` unless ``model_kwargs`` already has one.
        """
        model_kwargs = dict(model_kwargs or {})
        if t is None:
            t = self.sample_timesteps(x_start.shape[0], model_kwargs, x_start.device, generator)
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype, device=x_start.device)
        x_t = self.add_noise(x_start, noise, t)
        if mask is not None:
            x_t = torch.where(mask[:, None, :, None, None], x_t, x_start)  # t=0 is exactly x0
            model_kwargs.setdefault("x_mask", mask)
        out = model(x_t, t, **model_kwargs)
        v_pred = out[:, : x_start.shape[1]]
        loss = mean_flat((v_pred - (x_start - noise)) ** 2, mask)
        return {"loss": loss}

    # -- sampling --

    def sampling_timesteps(self, model_kwargs: dict[str, Any] | None, batch_size: int, device, dtype) -> list[torch.Tensor]:
        """The N timesteps (each [B]) of the Euler loop, shifted per sample if enabled."""
        base = [(1.0 - i / self.num_sampling_steps) * self.num_timesteps for i in range(self.num_sampling_steps)]
        if self.use_discrete_timesteps:
            base = [float(round(t)) for t in base]
        ts = [torch.full((batch_size,), t, device=device, dtype=dtype) for t in base]
        if self.use_timestep_transform:
            if model_kwargs is None:
                raise ValueError("the timestep shift needs height, width and num_frames in model_kwargs")
            ts = [self.timestep_transform(t, model_kwargs) for t in ts]
        return ts

    def _sample(self, model: Callable[..., torch.Tensor], batch: GuidedBatch) -> torch.Tensor:
        """Euler sampling from z (t=T) to t=0 with guidance (see :meth:`GuidedSampler.sample`).

        With ``masks`` (edit ratios [n, T]) one Gaussian draw shaped like z is taken per step for re-noising.
        """
        n, z, masks, kwargs, y_all = batch.n, batch.z, batch.masks, batch.kwargs, batch.y_all
        # Timesteps in float32 (float64 for float64 states): in bf16 the small dt of late steps would be lost.
        t_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        timesteps = self.sampling_timesteps(batch.model_kwargs, n, z.device, t_dtype)
        if masks is not None:
            noise_added = masks == 1  # fully generated frames already are noise

        for i in batch.steps(range(len(timesteps))):
            t = timesteps[i]
            if masks is not None:
                x0 = z
                mask_t_upper = masks * self.num_timesteps >= t[:, None]  # [n, T]: True = generated now
                renoise = mask_t_upper & ~noise_added
                z = torch.where(renoise[:, None, :, None, None], self.add_noise(x0, batch.noise_fn(x0), t), x0)
                noise_added = mask_t_upper
                kwargs["x_mask"] = torch.cat([mask_t_upper, mask_t_upper], dim=0)
            out = model(torch.cat([z, z], dim=0), torch.cat([t, t], dim=0), y_all, **kwargs)
            v = out[:, : z.shape[1]]
            v = v[n:] + self.cfg_scale * (v[:n] - v[n:])
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(t)
            dt = ((t - t_next) / self.num_timesteps).to(z.dtype).reshape(-1, *([1] * (z.ndim - 1)))
            z = z + v * dt
            if masks is not None:
                z = torch.where(mask_t_upper[:, None, :, None, None], z, x0)
        return z
