"""IDDPM: the Gaussian diffusion of Open-Sora 1.1 (improved DDPM with learned-range variance).

One object owns the noise schedule, the training losses and the sampling loop, so scripts never touch betas
(the DiT layout); the stateless math it builds on (betas, respacing, KL and likelihood terms) is in
:mod:`models.schedulers.diffusion_math`. Facts it follows (../shared/conformance/README.md, section D):

- 1000 training steps, linear betas 1e-4..0.02, epsilon prediction, learned-range variance (the model returns
  [eps, v] on the channel axis and ``log_var = frac*log(beta_t) + (1-frac)*posterior_log_var_t``, ``frac=(v+1)/2``),
  no clipping of x0, loss MSE + VB (VB not rescaled).
- Sampling respaces the schedule (``num_sampling_steps=100`` in the v1.1 inference config) and runs classifier-free
  guidance on a doubled batch, guiding only the first ``cfg_channel`` output channels.
- **Precision.** The respaced betas are derived from the float64 1000-step alpha-bar, then stored as float32,
  and every derived coefficient is computed and applied as a float32 value. This is deliberate: it is what the
  reference does, and mirroring it replays the reference exactly (a float64 table differs by up to 1.7e-4
  relative near t=0, from cancellation in sqrt(1/alpha_bar - 1)). Products of a float32 coefficient and a
  float64 tensor run in float64; with the float32 model output they run in float32, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.mask_strategy import edit_ratio_to_step_index
from models.schedulers.diffusion_math import (
    discretized_gaussian_log_likelihood,
    extract,
    linear_betas,
    mean_flat,
    normal_kl,
    space_timesteps,
)
from models.schedulers.guided import GuidedBatch, GuidedSampler

# 1. Sampling records -----------------------------------------------------------------------------------------


@dataclass
class SampleStep:
    """One step of the sampling loop, over the doubled (CFG) batch."""

    t_index: int
    """Index into the respaced schedule (counts down to 0)."""
    timestep: int
    """The original (1000-step) timestep the model saw."""
    x_in: torch.Tensor
    """State entering the step (before any re-noising of condition frames)."""
    sample: torch.Tensor
    """State leaving the step."""
    pred_xstart: torch.Tensor
    """The model's x0 estimate at this step."""


def guided_model_output(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    timestep: torch.Tensor,
    y: torch.Tensor,
    cfg_scale: float,
    cfg_channel: int | None,
    **kwargs: Any,
) -> torch.Tensor:
    """One model call on the doubled batch with classifier-free guidance, as in Open-Sora 1.1.

    The first half of ``x`` is duplicated (``y`` holds [cond; null] captions). Guidance
    ``uncond + s*(cond - uncond)`` is applied to output channels ``[:cfg_channel]`` (default: half the
    channels, i.e. all of eps) and written to both halves; the remaining channels keep each half's own output.
    """
    n = x.shape[0] // 2
    half = x[:n]
    out = model(torch.cat([half, half], dim=0), timestep, y, **kwargs)  # [2n, C_out, T, H, W]
    if cfg_channel is None:
        cfg_channel = out.shape[1] // 2
    guided, rest = out[:, :cfg_channel], out[:, cfg_channel:]
    cond, uncond = guided[:n], guided[n:]
    half_guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_guided, half_guided], dim=0), rest], dim=1)


# 2. The diffusion object --------------------------------------------------------------------------------------


class IDDPM(GuidedSampler):
    """Gaussian diffusion with respacing, learned-range variance and epsilon prediction.

    Args:
        num_sampling_steps: respace to this many steps (inference). Exclusive with ``timestep_respacing``.
        timestep_respacing: a :func:`space_timesteps` spec; ``None`` or ``""`` keeps all steps (training).
        cfg_scale: classifier-free guidance scale (Open-Sora 1.1 inference config: 7.0).
        cfg_channel: guide only output channels [:cfg_channel] (v1.1 config: 3, a quirk inherited from DiT);
            None guides half of the output channels (all of eps).
        learn_sigma: the model returns [eps, v] (2C channels) and the variance is learned; False uses a fixed
            variance (``sigma_small`` picks the posterior variance, else beta) and an eps-only model.
        sigma_small: fixed small variance when ``learn_sigma`` is False.
        num_timesteps: length of the base schedule (1000).
    """

    def __init__(
        self,
        num_sampling_steps: int | None = None,
        timestep_respacing: str | Sequence[int] | None = None,
        cfg_scale: float = 4.0,
        cfg_channel: int | None = 3,
        learn_sigma: bool = True,
        sigma_small: bool = False,
        num_timesteps: int = 1000,
    ) -> None:
        if num_sampling_steps is not None:
            if timestep_respacing:
                raise ValueError("give num_sampling_steps or timestep_respacing, not both")
            timestep_respacing = str(num_sampling_steps)
        if timestep_respacing is None or timestep_respacing == "":
            timestep_respacing = [num_timesteps]
        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.num_base_timesteps = num_timesteps

        # Respaced betas from the float64 base alpha-bar, then stored as float32 (see module docstring).
        base_alphas_cumprod = np.cumprod(1.0 - linear_betas(num_timesteps))
        use = set(space_timesteps(num_timesteps, timestep_respacing))
        last, betas, timestep_map = 1.0, [], []
        for i, ab in enumerate(base_alphas_cumprod):
            if i in use:
                betas.append(1.0 - ab / last)
                last = ab
                timestep_map.append(i)
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.int64)
        self.num_timesteps = len(betas)

        f32 = torch.float32
        self.betas = torch.tensor(betas, dtype=f32)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=f32), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; its log is clipped to the t=1 value.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = torch.log(
                torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
            )
        else:
            self.posterior_log_variance_clipped = torch.log(self.betas)
        self.posterior_mean_coef1 = self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(self.betas)

    # -- forward process --

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, t indexing this (possibly respaced) schedule."""
        nd = x_start.ndim
        return extract(self.sqrt_alphas_cumprod, t, nd) * x_start + extract(
            self.sqrt_one_minus_alphas_cumprod, t, nd
        ) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        nd = x_t.ndim
        mean = extract(self.posterior_mean_coef1, t, nd) * x_start + extract(self.posterior_mean_coef2, t, nd) * x_t
        return mean, extract(self.posterior_variance, t, nd), extract(self.posterior_log_variance_clipped, t, nd)

    # -- reverse process --

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reverse-step mean and log-variance from a raw model output ([eps, v] or eps)."""
        nd = x.ndim
        c = x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learn_sigma expects {2 * c} output channels, got {model_output.shape[1]}")
            eps, var_values = model_output[:, :c], model_output[:, c:]
            min_log = extract(self.posterior_log_variance_clipped, t, nd)
            max_log = extract(self.log_betas, t, nd)
            frac = (var_values + 1) / 2  # v in [-1, 1] interpolates between the two log-variances
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :c]
            if self.sigma_small:
                table = self.posterior_log_variance_clipped
            else:  # beta, with the t=0 entry set to the posterior variance at t=1
                table = torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))
            log_variance = extract(table, t, nd)
        pred_xstart = extract(self.sqrt_recip_alphas_cumprod, t, nd) * x - extract(
            self.sqrt_recipm1_alphas_cumprod, t, nd
        ) * eps
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    # -- training --

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform training timesteps in [0, num_timesteps)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses ``{"loss", "mse", "vb"}`` (each [B]) for ``model(x_t, t, **model_kwargs)``.

        ``mask`` [B, T] bool is the training frame mask: False frames are condition frames that take the t=0
        noised value (not the clean x0), and every loss averages over the True frames only. If
        ``model_kwargs`` has no ``x_mask`` it is set to ``mask`` so the model treats those frames as clean.
        ``vb`` is KL(posterior || model) in bits with the model mean detached (only the variance learns from
        it), or the discretised decoder NLL in bits at t=0.
        """
        model_kwargs = dict(model_kwargs or {})
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        if mask is not None:
            x_t0 = self.q_sample(x_start, torch.zeros_like(t), noise)
            x_t = torch.where(mask[:, None, :, None, None], x_t, x_t0)
            model_kwargs.setdefault("x_mask", mask)
        model_output = model(x_t, self.timestep_map.to(t.device)[t], **model_kwargs)

        c = x_t.shape[1]
        terms: dict[str, torch.Tensor] = {}
        eps = model_output[:, :c]
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), model_output[:, c:]], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t, mask)
        terms["mse"] = mean_flat((noise - eps) ** 2, mask)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, mask) -> torch.Tensor:
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl, mask) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll, mask) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- sampling --

    def sample_steps(self, model: Callable[..., torch.Tensor], batch: GuidedBatch) -> Iterator[SampleStep]:
        """The sampling loop, one :class:`SampleStep` per step over the doubled batch (see :meth:`sample`)."""
        n, z = batch.n, batch.z
        x = torch.cat([z, z], dim=0)  # [2n, C, T, H, W]
        kwargs, y_all = batch.kwargs, batch.y_all
        mask_t = None
        if batch.masks is not None:
            mask_t = edit_ratio_to_step_index(batch.masks, self.num_timesteps).to(z.device)
            mask_t = torch.cat([mask_t, mask_t], dim=0)  # [2n, T]

        for i in batch.steps(list(range(self.num_timesteps))[::-1]):
            t = torch.full((2 * n,), i, dtype=torch.int64, device=z.device)
            x_in = x
            if mask_t is not None:
                # Frames released at this step are re-noised from the reference to this step's level.
                x_noise = self.q_sample(x, t, batch.noise_fn(x))
                x = torch.where((mask_t == i)[:, None, :, None, None], x_noise, x)
                kwargs["x_mask"] = mask_t > i
            timestep = self.timestep_map.to(z.device)[t]
            out = guided_model_output(model, x, timestep, y_all, self.cfg_scale, self.cfg_channel, **kwargs)
            pmv = self.p_mean_variance(out, x, t)
            nonzero = float(i != 0)
            sample = pmv["mean"] + nonzero * torch.exp(0.5 * pmv["log_variance"]) * batch.noise_fn(x)
            if mask_t is not None:
                # Frames not yet released go back to the reference.
                sample = torch.where((mask_t < i)[:, None, :, None, None], x_in, sample)
            yield SampleStep(i, int(self.timestep_map[i]), x_in, sample, pmv["pred_xstart"])
            x = sample

    def _sample(self, model: Callable[..., torch.Tensor], batch: GuidedBatch) -> torch.Tensor:
        """Ancestral sampling (see :meth:`GuidedSampler.sample`).

        Draws, each shaped like the doubled state: one per step for the posterior noise, plus one before it for
        the re-noising when ``masks`` is given.
        """
        x = batch.z
        for step in self.sample_steps(model, batch):
            x = step.sample
        return x[: batch.n]
