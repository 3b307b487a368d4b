"""The encoder cache's format and its reader: what a training run on precomputed T5 embeddings and VAE latents uses.

``training.encoder_cache`` builds a cache (``opensora-dag encoder-cache``); this module reads it: ``CacheManifest``
(what was cached and with what), ``CachedLatentDataset`` (a drop-in for ``VideoTextDataset``), ``collate_cached`` and
``cached_batch_to_device`` (a batch with the keys of ``encode_batch``'s output).

Which latent is stored (``posterior``):

* ``"mode"`` (default): the posterior mean, deterministic. A step on cached latents gives the same loss as a step
  that encodes with ``encode_batch(..., generator=None)`` (``vae.encode_mode``).
* ``"sample"``: the posterior mean *and* standard deviation (twice the latent storage). ``cached_batch_to_device(
  batch, device, generator=gen)`` then draws the posterior sample at training time exactly as
  ``VideoAutoencoderKL.encode(video, generator=gen)`` does (same noise shape, order, dtype and device, drawn from
  the same generator), so a step gives the same loss as ``encode_batch(..., generator=gen)``, including everything
  the step draws from ``gen`` afterwards (frame masks, caption dropout, timesteps, noise). Like the reference, every
  step sees a fresh posterior sample.

Layout of a cache folder (written to a temporary sibling folder and renamed into place, so a failed or killed build
never leaves a partial cache under the final name)::

    manifest.json                  what was cached and with what (CacheManifest)
    samples.parquet                epoch, row, num_frames, height, width, fps, shard (one line per cached sample)
    texts.parquet                  row, text_index (its caption in the text shards, -1: row never cached), text, id
    latents/e0000-00000.safetensors  per row of the epoch: "<row>" the scaled latent mode [C, t, h, w]
                                     (and "<row>.std" its scaled posterior std with posterior="sample")
    text/00000.safetensors           "y" [n, L, C] and "mask" [n, L] for n consecutive unique captions

A cache is tied to the exact training table (row order included: buckets and windows are seeded by row position),
the seed, the frame interval, the bucket table and the encoders; ``CachedLatentDataset`` checks the table and
``CacheManifest.check_compatible`` the rest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from training.buckets import Bucket
from training.sampler import SampleIndex

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheManifest",
    "CachedLatentDataset",
    "EncoderCacheError",
    "bucket_config_json",
    "cached_batch_to_device",
    "collate_cached",
    "dataset_fingerprint",
    "epochs_needed",
]

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLES = "samples.parquet"
TEXTS = "texts.parquet"
MAX_OPEN_SHARDS = 64  # safetensors handles a dataset keeps open (per process)

# Columns of the training table that decide what a sample decodes to; the fingerprint covers them in row order.
FINGERPRINT_COLUMNS = ("id", "path", "text", "num_frames", "height", "width", "fps")


class EncoderCacheError(LookupError):
    """A request the cache cannot serve (epoch or row not cached, table or settings differ): rebuild it."""


# ---------------------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------------------


def dataset_fingerprint(rows: pl.DataFrame) -> str:
    """sha256 of the columns that decide a sample's pixels and caption, in row order (row position matters)."""
    present = [c for c in FINGERPRINT_COLUMNS if c in rows.columns]
    digest = hashlib.sha256(json.dumps(present).encode())
    digest.update(str(len(rows)).encode())
    for column in present:
        values = rows[column].to_list()
        digest.update(json.dumps(values, default=str).encode())
    return digest.hexdigest()


def bucket_config_json(bucket: Bucket) -> dict[str, dict[str, list[Any]]]:
    """The bucket table as the manifest records it (JSON keys are strings)."""
    return {res: {str(t): [e.keep_prob, e.batch_size] for t, e in entries.items()} for res, entries in bucket.config.items()}


@dataclass
class CacheManifest:
    """``manifest.json`` of a cache: the inputs it was built from and the shapes it holds."""

    format_version: int
    dataset_hash: str
    num_rows: int
    seed: int
    frame_interval: int
    epochs: int
    bucket_config: dict[str, dict[str, list[Any]]]
    posterior: str
    vae_dtype: str
    """dtype the VAE ran in (``torch.float32`` ...): the posterior noise is drawn in it, as the VAE draws it."""
    latent_dtype: str
    text_dtype: str
    latent_channels: int
    scaling_factor: float
    caption_channels: int
    model_max_length: int
    encoders: dict[str, str | None]
    num_captions: int
    captions_per_shard: int
    samples_per_epoch: list[int]
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``"<t>x<H>x<W>"`` -> {"latent": [C, t, h, w], "samples": count over all cached epochs}."""
    text_shape: list[int] = field(default_factory=list)
    """[L, C] of one caption embedding."""
    build_seconds: float = 0.0
    created: str = ""

    @property
    def noise_dtype(self) -> torch.dtype:
        """The VAE's dtype as a ``torch.dtype``: pass it to ``cached_batch_to_device(vae_dtype=...)``."""
        return getattr(torch, self.vae_dtype.removeprefix("torch."))

    @classmethod
    def load(cls, cache_dir: str | Path) -> CacheManifest:
        path = Path(cache_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{cache_dir} is not an encoder cache: no {MANIFEST} (build it with build_encoder_cache)")
        data = json.loads(path.read_text())
        if data.get("format_version") != CACHE_FORMAT_VERSION:
            raise EncoderCacheError(f"{cache_dir}: cache format {data.get('format_version')}, this code reads "
                                    f"{CACHE_FORMAT_VERSION}; rebuild the cache")
        return cls(**data)

    def save(self, cache_dir: str | Path) -> None:
        (Path(cache_dir) / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def check_compatible(
        self,
        *,
        seed: int | None = None,
        frame_interval: int | None = None,
        bucket: Bucket | None = None,
        model_max_length: int | None = None,
        caption_channels: int | None = None,
        epochs: int | None = None,
    ) -> None:
        """Raise ``EncoderCacheError`` listing every setting the training run has and the cache was not built with.

        ``epochs``: the number of epochs the run will go through (every one must be cached).
        """
        problems = []
        if seed is not None and seed != self.seed:
            problems.append(f"seed {seed} (cache: {self.seed})")
        if frame_interval is not None and frame_interval != self.frame_interval:
            problems.append(f"frame_interval {frame_interval} (cache: {self.frame_interval})")
        if bucket is not None and bucket_config_json(bucket) != self.bucket_config:
            problems.append(f"bucket_config {bucket_config_json(bucket)} (cache: {self.bucket_config})")
        if model_max_length is not None and model_max_length != self.model_max_length:
            problems.append(f"model_max_length {model_max_length} (cache: {self.model_max_length})")
        if caption_channels is not None and caption_channels != self.caption_channels:
            problems.append(f"caption_channels {caption_channels} (cache: {self.caption_channels})")
        if epochs is not None and epochs > self.epochs:
            problems.append(f"{epochs} epochs (cache holds {self.epochs}: rebuild with epochs={epochs})")
        if problems:
            raise EncoderCacheError("encoder cache does not match the training run: " + "; ".join(problems)
                                    + ". Rebuild it with build_encoder_cache using the run's settings.")



# ---------------------------------------------------------------------------------------------------------------------
# Read
# ---------------------------------------------------------------------------------------------------------------------


class CachedLatentDataset(torch.utils.data.Dataset):
    """Drop-in for ``VideoTextDataset`` on a cache: indexed by ``SampleIndex``, returns latents instead of pixels.

    Each item: ``x`` [C, t, h, w] (the latent mode), ``y`` [1, L, C], ``mask`` [L] (int64), plus ``text``, ``id``,
    ``num_frames``, ``height``, ``width``, ``ar`` (W / H, as the dataset), ``fps``; and ``x_std`` [C, t, h, w] when
    the cache was built with ``posterior="sample"``. Tensors come back as ``dtype`` (fp32 by default,
    what the uncached path gives). Safetensors files are opened lazily, per process, so DataLoader workers work.

    Args:
        rows: the training table the cache was built from (checked against the manifest's fingerprint; None skips
            the check: captions and ids are stored in the cache too).
        cache_dir: a folder written by ``build_encoder_cache``.
        epoch: the epoch to serve; ``set_epoch`` changes it.
    """

    def __init__(self, rows: pl.DataFrame | None, cache_dir: str | Path, epoch: int = 0, dtype: torch.dtype = torch.float32):
        self.cache_dir = Path(cache_dir)
        self.manifest = CacheManifest.load(self.cache_dir)
        if rows is not None and (len(rows) != self.manifest.num_rows or dataset_fingerprint(rows) != self.manifest.dataset_hash):
            raise EncoderCacheError(
                f"the training table ({len(rows)} rows) is not the one the cache at {self.cache_dir} was built from "
                f"({self.manifest.num_rows} rows, hash {self.manifest.dataset_hash[:12]}); row order counts: rebuild the cache")
        self.dtype = dtype
        texts = pl.read_parquet(self.cache_dir / TEXTS)
        self._text_index = texts["text_index"].to_numpy()
        self.texts: list[str] = texts["text"].to_list()
        self.ids: list[str] = texts["id"].to_list()
        samples = pl.read_parquet(self.cache_dir / SAMPLES)
        self._shards = sorted(set(samples["shard"].to_list()))
        shard_id = {name: k for k, name in enumerate(self._shards)}
        n, epochs = self.manifest.num_rows, self.manifest.epochs
        # Per epoch and row: position in ``samples`` (-1 = not cached that epoch).
        self._position = np.full((epochs, n), -1, dtype=np.int32 if len(samples) < 2**31 else np.int64)
        self._position[samples["epoch"].to_numpy(), samples["row"].to_numpy()] = np.arange(len(samples))
        self._thw = samples.select("num_frames", "height", "width").to_numpy()
        self._fps = samples["fps"].to_numpy()
        self._shard = np.array([shard_id[s] for s in samples["shard"].to_list()], dtype=np.int32)
        self._handles: dict[str, Any] = {}
        self.epoch = 0
        self.set_epoch(epoch)

    def __len__(self) -> int:
        return self.manifest.num_rows

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # open files do not cross process boundaries
        return state

    def set_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < self.manifest.epochs:
            raise EncoderCacheError(
                f"epoch {epoch} is not in the encoder cache at {self.cache_dir}: it holds epochs 0..{self.manifest.epochs - 1} "
                f"(built with epochs={self.manifest.epochs}); rebuild it with epochs>={epoch + 1}")
        self.epoch = epoch

    def _open(self, relative: str) -> Any:
        from safetensors import safe_open

        handle = self._handles.pop(relative, None)
        if handle is None:
            if len(self._handles) >= MAX_OPEN_SHARDS:  # least recently used first: dicts keep insertion order
                del self._handles[next(iter(self._handles))]
            handle = safe_open(str(self.cache_dir / relative), framework="pt")
        self._handles[relative] = handle
        return handle

    def text_embedding(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [1, L, C], mask [L]) of a row's caption."""
        k = int(self._text_index[row])
        if k < 0:
            raise EncoderCacheError(f"row {row} has no caption in the encoder cache at {self.cache_dir} (it was in no cached epoch)")
        shard, j = divmod(k, self.manifest.captions_per_shard)
        handle = self._open(f"text/{shard:05d}.safetensors")
        y = handle.get_slice("y")[j : j + 1]  # [1, L, C]
        mask = handle.get_slice("mask")[j : j + 1][0]  # [L]
        return y.to(self.dtype), mask

    def __getitem__(self, index: SampleIndex) -> dict[str, Any]:
        row, t, h, w = index
        if not 0 <= row < self.manifest.num_rows:
            raise EncoderCacheError(f"row {row} is outside the cached table of {self.manifest.num_rows} rows")
        position = int(self._position[self.epoch, row])
        if position < 0:
            raise EncoderCacheError(
                f"row {row} is not in the encoder cache for epoch {self.epoch} (the cache's bucket assignment dropped it); "
                f"the sampler and the cache disagree: rebuild the cache with this run's seed, buckets and table")
        cached_thw = tuple(int(v) for v in self._thw[position])
        if cached_thw != (t, h, w):
            raise EncoderCacheError(
                f"row {row}, epoch {self.epoch}: the sampler asks for t x H x W = {t}x{h}x{w}, the cache holds "
                f"{'x'.join(map(str, cached_thw))}; rebuild the cache with this run's seed, buckets and frame interval")
        shard = self._open(self._shards[self._shard[position]])
        x = shard.get_tensor(str(row)).to(self.dtype)  # [C, t, h, w]
        y, mask = self.text_embedding(row)
        extra = {"x_std": shard.get_tensor(f"{row}.std").to(self.dtype)} if self.manifest.posterior == "sample" else {}
        return {
            **extra,
            "x": x,
            "y": y,
            "mask": mask,
            "text": self.texts[row],
            "id": self.ids[row],
            "num_frames": t,
            "height": h,
            "width": w,
            "ar": w / h,
            "fps": float(self._fps[position]),
        }


def collate_cached(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached samples: ``x`` [B, C, t, h, w], ``y`` [B, 1, L, C], ``mask`` [B, L], ``model_kwargs`` as
    ``training.build.encode_batch`` builds them (float32 [B] tensors), plus ``text`` and ``id`` lists (and ``x_std``
    from a ``posterior="sample"`` cache)."""
    extra = {"x_std": torch.stack([s["x_std"] for s in samples])} if "x_std" in samples[0] else {}
    return {
        **extra,
        "x": torch.stack([s["x"] for s in samples]),
        "y": torch.stack([s["y"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "model_kwargs": {
            key: torch.tensor([float(s[key]) for s in samples], dtype=torch.float32)
            for key in ("num_frames", "height", "width", "ar", "fps")
        },
        "text": [s["text"] for s in samples],
        "id": [s["id"] for s in samples],
    }


def cached_batch_to_device(
    batch: dict[str, Any],
    device: torch.device | str,
    generator: torch.Generator | None = None,
    vae_dtype: torch.dtype = torch.float32,
    non_blocking: bool = False,
) -> dict[str, Any]:
    """A collated cached batch on ``device``, with exactly the keys of ``encode_batch``'s output.

    With ``generator`` and a ``posterior="sample"`` cache, ``x`` is a posterior sample drawn as
    ``VideoAutoencoderKL.encode(video, generator=generator)`` draws it: noise [B*T, C, h, w] (frames of a video
    adjacent) in ``vae_dtype`` (the manifest's ``vae_dtype``) on the generator's device, then
    ``mean + std * noise``. Otherwise (no generator, or a mode cache) ``x`` is the mode.
    """
    x = batch["x"].to(device, non_blocking=non_blocking)
    if generator is not None and "x_std" in batch:
        b, c, t, h, w = x.shape
        noise = torch.randn((b * t, c, h, w), generator=generator, device=generator.device, dtype=vae_dtype)
        noise = noise.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4).to(device=x.device, dtype=x.dtype)  # [B, C, T, h, w]
        x = x + batch["x_std"].to(device, non_blocking=non_blocking) * noise
    return {
        "x": x,
        "y": batch["y"].to(device, non_blocking=non_blocking),
        "mask": batch["mask"].to(device, non_blocking=non_blocking),
        "model_kwargs": {k: v.to(device, non_blocking=non_blocking) for k, v in batch["model_kwargs"].items()},
    }


# ---------------------------------------------------------------------------------------------------------------------
# How many epochs a run needs cached
# ---------------------------------------------------------------------------------------------------------------------


def epochs_needed(rows: pl.DataFrame, bucket: Bucket, frame_interval: int, seed: int, steps: int, num_replicas: int = 1) -> int:
    """Epochs a run of ``steps`` optimizer steps on ``num_replicas`` ranks goes through (each must be cached)."""
    from training.sampler import VariableVideoBatchSampler

    sampler = VariableVideoBatchSampler(rows, bucket, frame_interval, num_replicas=num_replicas, rank=0, seed=seed)
    epochs, left = 0, steps
    while left > 0:
        sampler.set_epoch(epochs)
        per_epoch = len(sampler)
        if per_epoch == 0:
            raise ValueError(f"epoch {epochs} has no batch: no row fits a bucket (see `opensora-dag buckets`)")
        left -= per_epoch
        epochs += 1
    return epochs
