"""One training step and what it draws on: the per-step random generator, the diffusion loss, mixed precision and
the EMA update. Every source of randomness in a step comes from ``step_generator(seed, step, rank)``, which is what
makes a resumed run continue with the same losses."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from training.build import unwrap
from training.distributed import Dist

if TYPE_CHECKING:
    from training.config import TrainConfig


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1))
    return gen


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    source = dict(model.named_parameters())
    for name, param in ema.named_parameters():
        if name in source:
            param.mul_(decay).add_(source[name].detach().float(), alpha=1 - decay)


def diffusion_loss(scheduler, objective: str, model, enc: dict[str, Any], x_mask, gen: torch.Generator, drop_ids=None, t=None, noise=None):
    """Per-sample training loss [B] of ``model`` on an encoded batch."""
    x = enc["x"]
    if noise is None:
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    kwargs = dict(enc["model_kwargs"], y=enc["y"], mask=enc["mask"])
    if drop_ids is not None:
        kwargs["force_drop_ids"] = drop_ids
    if objective == "iddpm":
        if t is None:
            t = scheduler.sample_timesteps(x.shape[0], device=x.device, generator=gen)
        return scheduler.training_losses(model, x, t, model_kwargs=kwargs, noise=noise, mask=x_mask)["loss"]
    if t is None:
        t = scheduler.sample_timesteps(x.shape[0], enc["model_kwargs"], device=x.device, generator=gen)
    return scheduler.training_losses(model, x, t, model_kwargs=kwargs, noise=noise, mask=x_mask)["loss"]


def train_step(
    cfg: TrainConfig, dist: Dist, model, booster, optimizer, scheduler, mask_generator, enc: dict[str, Any],
    gen: torch.Generator, step: int, class_dropout_prob: float, use_zero: bool, ema: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, float | None, float]:
    """One optimizer step on an encoded batch: frame masks and caption dropout from ``gen``, the loss under autocast,
    backward through the booster, clipping (ZeRO clips inside its optimizer), warmup lr, step, EMA.

    Returns (loss, grad norm or None under ZeRO, lr). ``step`` counts the steps already taken.
    """
    # MaskGenerator draws on the CPU, which a CUDA generator cannot do: there it gets a CPU one seeded from ``gen``
    mask_gen = gen if gen.device.type == "cpu" else torch.Generator().manual_seed(gen.initial_seed())
    x_mask = mask_generator.get_masks(enc["x"], generator=mask_gen)
    drop = (torch.rand(enc["x"].shape[0], generator=gen, device=dist.device) < class_dropout_prob).long()
    with autocast(cfg, dist):
        loss = diffusion_loss(scheduler, cfg.objective, model, enc, x_mask, gen, drop_ids=drop).mean()
    booster.backward(loss, optimizer)
    grad_norm = None
    if not use_zero:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), cfg.optim.grad_clip))
    lr = learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad()
    if ema is not None:
        update_ema(ema, unwrap(model), cfg.optim.ema_decay)
    return loss, grad_norm, lr


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The lr of the step after ``step`` steps: linear warmup over ``warmup_steps``, then constant, then (with
    ``decay_fraction``) a linear decay over the run's last steps that reaches zero after its last step. A fraction
    rather than a step count, so that a shorter run (``--steps``) keeps the same shape."""
    lr = cfg.optim.lr
    if cfg.optim.warmup_steps:
        lr *= min(1.0, (step + 1) / cfg.optim.warmup_steps)
    decay_steps = cfg.optim.decay_fraction * cfg.steps
    if decay_steps > 0:
        lr *= min(1.0, max(0, cfg.steps - step) / decay_steps)
    return lr


def autocast(cfg: TrainConfig, dist: Dist):
    if dist.device.type == "cuda" and cfg.precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
    return contextlib.nullcontext()
