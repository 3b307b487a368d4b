"""Validation: held-out clips at fixed timesteps and fixed noise, per bucket, with the true or the null caption.
The same numbers for every checkpoint of a dataset, so the evaluation compares checkpoints with them too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.build import encode_batch
from training.distributed import Dist
from training.steps import diffusion_loss, step_generator

NULL_SEED_OFFSET = 7919  # validation noise: fixed, and different from every training step's seed


@dataclass
class ValidationSet:
    batches: list[dict[str, Any]]  # encoded, on device

    def __len__(self) -> int:
        return len(self.batches)


def build_validation_set(
    rows, bucket, frame_interval: int, seed: int, text_encoder, vae, dist: Dist, max_samples: int, cache_dir: Path | None = None
) -> ValidationSet:
    """Encoded held-out batches (posterior mode: deterministic), from the encoders or from an encoder cache."""
    from training.sampler import VariableVideoBatchSampler
    from training.data import VideoTextDataset, collate

    if len(rows) == 0:
        return ValidationSet([])
    sampler = VariableVideoBatchSampler(rows, bucket, frame_interval, num_replicas=1, rank=0, seed=seed, shuffle=False)
    if cache_dir is not None:
        from training.cached_data import CachedLatentDataset, cached_batch_to_device, collate_cached

        dataset, collate_fn = CachedLatentDataset(rows, cache_dir), collate_cached
        encode = lambda b: cached_batch_to_device(b, dist.device)  # noqa: E731
    else:
        dataset, collate_fn = VideoTextDataset(rows, frame_interval, seed), collate
        encode = lambda b: encode_batch(b, text_encoder, vae, dist.device)  # noqa: E731
    batches, seen = [], 0
    for indices in sampler:
        enc = encode(collate_fn([dataset[i] for i in indices]))
        enc["bucket"] = bucket_name(enc["model_kwargs"])
        batches.append(enc)
        seen += len(indices)
        if seen >= max_samples:
            break
    return ValidationSet(batches)


@torch.no_grad()
def validation_losses(model, scheduler, objective: str, val: ValidationSet, num_timesteps: int, seed: int, null_caption: bool = False) -> dict[str, float]:
    """Mean loss per bucket (and ``all``) at ``num_timesteps`` evenly spaced timesteps with fixed noise."""
    if not len(val):
        return {}
    was_training = model.training
    model.eval()
    total = scheduler.num_timesteps
    grid = [int((i + 0.5) * total / num_timesteps) for i in range(num_timesteps)]
    per_bucket: dict[str, list[float]] = {}
    for index, enc in enumerate(val.batches):
        x = enc["x"]
        gen = step_generator(seed + NULL_SEED_OFFSET, index, 0, x.device)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        drop = torch.ones(x.shape[0], dtype=torch.long, device=x.device) if null_caption else None
        for t_value in grid:
            t = torch.full((x.shape[0],), t_value, device=x.device, dtype=torch.long if objective == "iddpm" else x.dtype)
            loss = diffusion_loss(scheduler, objective, model, enc, None, gen, drop_ids=drop, t=t, noise=noise)
            per_bucket.setdefault(enc["bucket"], []).extend(loss.float().tolist())
    model.train(was_training)
    out = {f"val_loss/{b}": sum(v) / len(v) for b, v in per_bucket.items()}
    every = [x for v in per_bucket.values() for x in v]
    out["val_loss"] = sum(every) / len(every)
    return out


def bucket_name(model_kwargs: dict[str, Any]) -> str:
    t, h, w = int(model_kwargs["num_frames"][0]), int(model_kwargs["height"][0]), int(model_kwargs["width"][0])
    return f"{t}x{h}x{w}"
