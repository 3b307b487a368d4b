"""The Gaussian-diffusion math of IDDPM as plain functions: the beta schedule, respacing, and the loss terms.

These hold no state; :class:`~models.schedulers.iddpm.IDDPM` builds its tables and losses from them, and the
other schedulers reuse the pieces they share with it (the 1000-step betas, the masked mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


# Schedule ----------------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """Ho et al.'s linear schedule, scaled so that any number of steps spans the same noise range (float64)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """The original timesteps kept by respacing, ascending.

    ``section_counts`` is a step count ("5", 5), comma-separated counts per equal section ("10,15,20"), or
    "ddimN" (a fixed stride). Within a section the kept steps are ``start + round(k * stride)`` with Python's
    round (half to even): 5 of 1000 gives [0, 250, 500, 749, 999] (499.5 rounds to 500).
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, taken = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            taken.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(taken))


# Tensor helpers and loss terms -------------------------------------------------------------------------------


def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] as [B, 1, ..., 1] (ndim dims), keeping the table's float32 dtype."""
    return table.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


def mean_flat(x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all but the batch dim; with a [B, T] frame mask, over the True frames of x [B, C, T, H, W] only."""
    if frame_mask is None:
        return x.mean(dim=list(range(1, x.ndim)))
    b, c, t = x.shape[:3]
    per_frame = x.permute(0, 2, 1, 3, 4).reshape(b, t, -1)  # [B, T, C*H*W]
    denom = frame_mask.sum(dim=1) * per_frame.shape[-1]
    return (per_frame * frame_mask.unsqueeze(2)).sum(dim=1).sum(dim=1) / denom


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins under N(means, e^(2 log_scales)), elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
