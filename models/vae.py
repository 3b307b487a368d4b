"""Frame-by-frame video VAE over diffusers' ``AutoencoderKL``.

Open-Sora 1.1 has no video VAE of its own: it runs the image VAE ``stabilityai/sd-vae-ft-ema`` on every frame
(8x spatial compression, none in time) and scales latents by 0.18215. Frames of all videos in the batch are
flattened into one image batch and pushed through in micro-batches of ``micro_batch_size`` to bound memory.

Posterior sampling draws the noise once for the whole latent (not per micro-batch), so a seeded ``generator``
gives the same latents whatever the micro-batch size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.memo import EncoderMemo, content_key

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = ["VideoAutoencoderKL", "load_autoencoder_kl"]


def load_autoencoder_kl(path: str | Path, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` from a local folder (``config.json`` + weights), never downloading."""
    from diffusers import AutoencoderKL

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a local diffusers AutoencoderKL folder")
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    return AutoencoderKL.from_pretrained(folder, local_files_only=True, **kwargs)


class VideoAutoencoderKL(nn.Module):
    """Video [B, 3, T, H, W] in [-1, 1]  <->  scaled latents [B, 4, T, H/8, W/8], one frame at a time.

    Args:
        path_or_model: a local diffusers folder (e.g. ``sd-vae-ft-ema``) or an ``AutoencoderKL`` instance.
        micro_batch_size: frames per encoder/decoder call (reference: 4); None or 0 = all frames at once.
        scaling_factor: latents are multiplied by it after encoding and divided before decoding; None reads the
            folder's ``config.json`` (diffusers' ``scaling_factor``: 0.18215 for the SD VAEs).
        dtype: cast the loaded weights to this dtype (None keeps what is stored).
    """

    def __init__(
        self,
        path_or_model: str | os.PathLike[str] | AutoencoderKL,
        micro_batch_size: int | None = 4,
        scaling_factor: float | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if micro_batch_size is not None and micro_batch_size < 0:
            raise ValueError(f"micro_batch_size must be >= 0 or None, got {micro_batch_size}")
        if isinstance(path_or_model, (str, os.PathLike)):
            self.module = load_autoencoder_kl(path_or_model, dtype=dtype)
        else:
            self.module = path_or_model if dtype is None else path_or_model.to(dtype)
        self.micro_batch_size = micro_batch_size or None
        self.memo: EncoderMemo | None = None
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else getattr(self.module.config, "scaling_factor", None) or 0.18215)
        config = self.module.config
        self.out_channels: int = int(config.latent_channels)
        # Each encoder block but the last halves H and W.
        spatial = 2 ** (len(config.block_out_channels) - 1)
        self.patch_size: tuple[int, int, int] = (1, spatial, spatial)

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def _chunks(self, n: int) -> list[slice]:
        step = self.micro_batch_size or max(n, 1)
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    @staticmethod
    def _to_frames(x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B*T, C, H, W], frames of a video adjacent

    @staticmethod
    def _to_video(frames: torch.Tensor, batch: int) -> torch.Tensor:
        bt, c, h, w = frames.shape
        return frames.reshape(batch, bt // batch, c, h, w).permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]

    def encode(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Video [B, 3, T, H, W] -> scaled latents [B, C, T, H/8, W/8].

        ``sample=True`` (the reference's behaviour) draws from the posterior, with ``generator`` if given;
        ``sample=False`` returns its mode (the mean), which is deterministic.
        """
        if x.ndim != 5:
            raise ValueError(f"expected a video [B, C, T, H, W], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        mean, std = self._posterior(self._to_frames(x.to(self.dtype)))  # each [B*T, C, h, w]
        if sample:
            # Draw where the generator lives (a CPU generator may drive a GPU model), then move.
            noise_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
            latent = mean + std * noise.to(mean.device)
        else:
            latent = mean
        return self._to_video(latent * self.scaling_factor, batch)

    def _posterior(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of every frame [N, 3, H, W], in micro-batches.

        With a ``memo`` (``models.memo.EncoderMemo``, set by a training run on a small dataset) frames it holds are
        not encoded again, and the others are encoded one at a time: a frame's bits then never depend on which
        frames shared its batch, so a resumed run (empty memo) encodes exactly as the run it continues.
        """
        if self.memo is None:
            parts = [self.module.encode(frames[part]).latent_dist for part in self._chunks(frames.shape[0])]
            return torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])
        def encode_one(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            posterior = self.module.encode(frame[None]).latent_dist
            return posterior.mean[0], posterior.std[0]

        entries = [self.memo.get_or_compute(content_key(f), lambda f=f: encode_one(f)) for f in frames]
        return torch.stack([m for m, _ in entries]), torch.stack([s for _, s in entries])

    def encode_mode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic encoding: the posterior mode, scaled."""
        return self.encode(x, sample=False)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, T, h, w] -> video [B, 3, T, 8h, 8w] (roughly in [-1, 1], not clamped)."""
        if z.ndim != 5:
            raise ValueError(f"expected latents [B, C, T, H, W], got shape {tuple(z.shape)}")
        batch = z.shape[0]
        frames = self._to_frames(z.to(self.dtype) / self.scaling_factor)
        decoded = [self.module.decode(frames[part]).sample for part in self._chunks(frames.shape[0])]
        return self._to_video(torch.cat(decoded), batch)

    def get_latent_size(self, input_size: Sequence[int | None]) -> list[int | None]:
        """Latent [T, H, W] for a video [T, H, W]: floor division by ``patch_size``; None passes through."""
        if len(input_size) != 3:
            raise ValueError(f"expected [T, H, W], got {input_size}")
        return [None if s is None else s // p for s, p in zip(input_size, self.patch_size)]
