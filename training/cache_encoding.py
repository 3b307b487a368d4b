"""Encoding one cache folder's contents: T5 embeddings of the captions and VAE latents of the samples, in shards.

``training.encoder_cache`` decides which rows and captions a cache holds and calls these; the folder layout they
write (``text/``, ``texts.parquet``, ``latents/``, ``samples.parquet``) is described in ``training.cached_data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

from training.cached_data import TEXTS
from training.sampler import SampleIndex

__all__ = ["DTYPES", "Plan", "Posterior", "SampleTable", "encode_captions", "encode_epoch"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The storage dtypes of latents and embeddings, by their name in the manifest."""

Posterior = Literal["mode", "sample"]

Plan = dict[tuple[int, int, int], list[int]]
"""One epoch's samples: (t, H, W) -> the rows the sampler puts in that bucket."""


# ---------------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------------


def encode_captions(rows: pl.DataFrame, used: list[int], text_encoder: Any, folder: Path, *, batch_size: int,
                    captions_per_shard: int, text_dtype: str) -> tuple[int, list[int]]:
    """Write the caption shards and ``texts.parquet``; return the number of unique captions and [L, C] of one."""
    texts = rows["text"].to_list()
    captions, row_caption = _unique_captions(texts, used, len(rows))
    text_shape = _write_caption_shards(captions, text_encoder, folder / "text", batch_size=batch_size,
                                       captions_per_shard=captions_per_shard, text_dtype=text_dtype)
    ids = (rows["id"] if "id" in rows.columns else rows["path"]).cast(pl.String).to_list()
    pl.DataFrame({"row": np.arange(len(rows), dtype=np.int64), "text_index": row_caption, "text": [str(t) for t in texts],
                  "id": ids}).write_parquet(folder / TEXTS)
    return len(captions), text_shape


def _unique_captions(texts: list[str], used: list[int], num_rows: int) -> tuple[list[str], np.ndarray]:
    """The used rows' captions, each once in first-use order, and each row's index among them (-1: row unused)."""
    caption_index: dict[str, int] = {}
    for i in used:
        caption_index.setdefault(texts[i], len(caption_index))
    row_caption = np.full(num_rows, -1, dtype=np.int64)
    for i in used:
        row_caption[i] = caption_index[texts[i]]
    return list(caption_index), row_caption


def _write_caption_shards(captions: list[str], text_encoder: Any, folder: Path, *, batch_size: int,
                          captions_per_shard: int, text_dtype: str) -> list[int]:
    """T5 embeddings ``y`` [n, L, C] and masks [n, L] of ``captions``, ``captions_per_shard`` to a file; return [L, C]."""
    from safetensors.torch import save_file

    text_shape: list[int] = []
    for start in range(0, len(captions), captions_per_shard):
        chunk = captions[start : start + captions_per_shard]
        ys, masks = [], []
        for k in range(0, len(chunk), batch_size):
            with torch.no_grad():
                out = text_encoder.encode(chunk[k : k + batch_size])
            ys.append(out["y"][:, 0].to("cpu", DTYPES[text_dtype]))  # [n, L, C]
            masks.append(out["mask"].to("cpu", torch.int64))  # [n, L]
        y, mask = torch.cat(ys), torch.cat(masks)
        text_shape = list(y.shape[1:])
        folder.mkdir(exist_ok=True)
        save_file({"y": y.contiguous(), "mask": mask.contiguous()}, str(folder / f"{start // captions_per_shard:05d}.safetensors"))
    return text_shape


# ---------------------------------------------------------------------------------------------------------------------
# Latents
# ---------------------------------------------------------------------------------------------------------------------


class SampleTable:
    """The lines of ``samples.parquet`` and the manifest's count per shape, collected as latents are queued."""

    SCHEMA = {"epoch": pl.Int64, "row": pl.Int64, "num_frames": pl.Int64, "height": pl.Int64, "width": pl.Int64,
              "fps": pl.Float64, "shard": pl.String}

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {k: [] for k in self.SCHEMA}
        self.shapes: dict[str, dict[str, Any]] = {}

    def add(self, epoch: int, index: SampleIndex, fps: float, shard: str, latent_shape: list[int]) -> None:
        values = (epoch, index.index, index.num_frames, index.height, index.width, fps, shard)
        for column, value in zip(self.SCHEMA, values):
            self.columns[column].append(value)
        key = f"{index.num_frames}x{index.height}x{index.width}"
        entry = self.shapes.setdefault(key, {"latent": latent_shape, "samples": 0})
        entry["samples"] += 1

    def write(self, path: Path) -> None:
        pl.DataFrame(self.columns, schema=self.SCHEMA).write_parquet(path)


def encode_epoch(rows: pl.DataFrame, plan: Plan, epoch: int, frame_interval: int, seed: int, vae: Any, folder: Path,
                 samples: SampleTable, *, batch_size: int, samples_per_shard: int, posterior: Posterior,
                 latent_dtype: str, num_workers: int) -> int:
    """Decode the epoch's samples as ``VideoTextDataset`` does, bucket by bucket, write their latents; return how many."""
    from training.data import VideoTextDataset, collate

    dataset = VideoTextDataset(rows, frame_interval, seed)
    dataset.set_epoch(epoch)
    batches = [
        [SampleIndex(i, t, h, w) for i in members[k : k + batch_size]]
        for (t, h, w), members in plan.items()
        for k in range(0, len(members), batch_size)
    ]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
    writer = _ShardWriter(folder / "latents", f"e{epoch:04d}-", samples_per_shard)
    device, dtype = next(vae.parameters()).device, DTYPES[latent_dtype]
    count = 0
    for indices, batch in zip(batches, loader):
        latents, stds = _encode_videos(vae, batch["video"].to(device), posterior)  # [B, 3, t, H, W] -> [B, C, t, h, w]
        latents = latents.to(dtype)
        for k, index in enumerate(indices):
            if stds is not None:
                writer.add(f"{index.index}.std", stds[k].to(dtype), count=False)
            shard = writer.add(str(index.index), latents[k])
            samples.add(epoch, index, float(batch["fps"][k]), shard, list(latents.shape[1:]))
        count += len(indices)
    writer.close()
    return count


def _encode_videos(vae: Any, video: torch.Tensor, posterior: Posterior) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latent mode, posterior std or None for a mode cache) of ``video``, each [B, C, t, h, w]."""
    with torch.no_grad():
        if posterior == "mode":
            return vae.encode(video, sample=False), None
        return _posterior(vae, video)


class _ShardWriter:
    """Collects named tensors and writes a safetensors file every ``per_shard`` entries."""

    def __init__(self, folder: Path, prefix: str, per_shard: int):
        self.folder, self.prefix, self.per_shard = folder, prefix, per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.count = 0

    @property
    def current(self) -> str:
        return f"{self.prefix}{self.count // self.per_shard:05d}.safetensors"

    def add(self, key: str, tensor: torch.Tensor, count: bool = True) -> str:
        """Queue ``tensor``; return the shard file name (relative to the cache root) it will land in.

        ``count=False`` adds a companion tensor to the current entry (it never closes a shard on its own).
        """
        name = self.current
        self.pending[key] = tensor.detach().to("cpu").contiguous()
        if count:
            self.count += 1
            if self.count % self.per_shard == 0:
                self._flush(name)
        return f"{self.folder.name}/{name}"

    def _flush(self, name: str) -> None:
        from safetensors.torch import save_file

        if self.pending:
            save_file(self.pending, str(self.folder / name))
            self.pending = {}

    def close(self) -> None:
        if self.pending:
            self._flush(self.current)


def _posterior(vae: Any, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior mean and std of ``VideoAutoencoderKL.encode``, each [B, C, T, h, w].

    The same frame layout and micro-batches as ``encode``, so the mean is bitwise its mode.
    """
    b, c, t, h, w = video.shape
    frames = video.to(vae.dtype).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B*T, 3, H, W], a video's frames adjacent
    step = vae.micro_batch_size or max(b * t, 1)
    means, stds = [], []
    for start in range(0, b * t, step):
        posterior = vae.module.encode(frames[start : start + step]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)

    def to_video(z: torch.Tensor) -> torch.Tensor:  # [B*T, C, h, w] -> [B, C, T, h, w]
        return z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4)

    return to_video(torch.cat(means) * vae.scaling_factor), to_video(torch.cat(stds) * vae.scaling_factor)
