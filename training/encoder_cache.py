"""Precomputed T5 embeddings and VAE latents, so that training can skip both frozen encoders.

The encoders are frozen, so what they produce for a sample is a pure function of the pixels and the caption. The
pixels a training step sees are themselves a pure function of (seed, epoch, row position): the sampler assigns the
row's bucket ``(t, H, W)`` from ``bucket_seed(seed, epoch, row)`` and ``VideoTextDataset`` picks the temporal window
with ``default_rng([seed, epoch, row])``. So the cache is built per *epoch*: for each cached epoch and every row the
sampler would use that epoch, decode the frames exactly as the dataset would (the dataset class itself is reused)
and encode them. Captions are encoded once per unique caption.

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
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

from common.files import atomic_dir
from training.buckets import Bucket, assign_rows
from training.sampler import SampleIndex

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheManifest",
    "CachedLatentDataset",
    "EncoderCacheError",
    "build_encoder_cache",
    "build_training_cache",
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

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Posterior = Literal["mode", "sample"]


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


def _bucket_config_json(bucket: Bucket) -> dict[str, dict[str, list[Any]]]:
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
        if bucket is not None and _bucket_config_json(bucket) != self.bucket_config:
            problems.append(f"bucket_config {_bucket_config_json(bucket)} (cache: {self.bucket_config})")
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
# Build
# ---------------------------------------------------------------------------------------------------------------------


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


def _module_device(module: Any) -> torch.device:
    return next(module.parameters()).device


def _encoder_path(obj: Any) -> str | None:
    path = getattr(obj, "path", None)
    if path is None:
        config = getattr(getattr(obj, "module", None), "config", None)
        path = getattr(config, "_name_or_path", None)
    return str(path) if path else None


def build_encoder_cache(
    rows: pl.DataFrame,
    bucket: Bucket,
    frame_interval: int,
    seed: int,
    text_encoder: Any,
    vae: Any,
    out_dir: str | Path,
    *,
    epochs: int = 1,
    batch_size: int = 8,
    posterior: Posterior = "mode",
    latent_dtype: str = "fp32",
    text_dtype: str = "fp32",
    samples_per_shard: int = 256,
    captions_per_shard: int = 64,
    num_workers: int = 0,
    overwrite: bool = False,
    encoder_paths: Mapping[str, str | None] | None = None,
    log: Callable[[str], None] | None = None,
) -> CacheManifest:
    """Encode every sample the sampler would use in epochs ``0 .. epochs-1`` and every caption; return the manifest.

    Args:
        rows: the training table, in the order the sampler gets it (``train_rows`` in ``training.train``).
        bucket, frame_interval, seed: as given to ``VariableVideoBatchSampler`` and ``VideoTextDataset``.
        text_encoder: a ``models.text_encoder.T5TextEncoder`` (anything with ``encode(texts)``, ``output_dim``,
            ``model_max_length``).
        vae: a ``models.vae.VideoAutoencoderKL``.
        out_dir: the cache folder; it must not exist unless ``overwrite``.
        batch_size: videos per VAE call (all of one bucket) and captions per T5 call.
        posterior: ``"mode"`` (store the mean) or ``"sample"`` (store mean and std; sample per step, see the module doc).
        latent_dtype, text_dtype: storage dtypes, ``fp32`` (exact), ``fp16`` or ``bf16`` (half the disk).
        num_workers: DataLoader workers that decode videos while the VAE runs.
        encoder_paths: recorded in the manifest; by default read from the encoders.
    """
    from safetensors.torch import save_file

    from training.data import VideoTextDataset, collate

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1 or samples_per_shard < 1 or captions_per_shard < 1:
        raise ValueError("batch_size, samples_per_shard and captions_per_shard must be >= 1")
    if posterior not in ("mode", "sample"):
        raise ValueError(f"posterior must be 'mode' or 'sample', got {posterior!r}")
    for name, value in (("latent_dtype", latent_dtype), ("text_dtype", text_dtype)):
        if value not in _DTYPES:
            raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {value!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to rebuild it")
    say = log or (lambda _msg: None)
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built in a hidden sibling and renamed in at the end: an old cache is moved aside first and deleted after.
    with atomic_dir(out_dir, exists="replace") as tmp:
        # 1. Which rows each epoch uses, and at which (t, H, W): exactly the sampler's assignment.
        plans: list[dict[tuple[int, int, int], list[int]]] = []
        for epoch in range(epochs):
            groups: dict[tuple[int, int, int], list[int]] = {}
            for i, assignment in enumerate(assign_rows(rows, bucket, frame_interval, seed, epoch)):
                if assignment.bucket_id is not None:
                    groups.setdefault(bucket.get_thw(assignment.bucket_id), []).append(i)
            plans.append(groups)
        used = sorted({i for groups in plans for members in groups.values() for i in members})

        # 2. Captions: one embedding per unique caption of a used row.
        texts = rows["text"].to_list()
        caption_index: dict[str, int] = {}
        for i in used:
            caption_index.setdefault(texts[i], len(caption_index))
        row_caption = np.full(len(rows), -1, dtype=np.int64)
        for i in used:
            row_caption[i] = caption_index[texts[i]]
        unique = list(caption_index)
        text_shape: list[int] = []
        for start in range(0, len(unique), captions_per_shard):
            chunk = unique[start : start + captions_per_shard]
            ys, masks = [], []
            for k in range(0, len(chunk), batch_size):
                with torch.no_grad():
                    out = text_encoder.encode(chunk[k : k + batch_size])
                ys.append(out["y"][:, 0].to("cpu", _DTYPES[text_dtype]))  # [n, L, C]
                masks.append(out["mask"].to("cpu", torch.int64))  # [n, L]
            y, mask = torch.cat(ys), torch.cat(masks)
            text_shape = list(y.shape[1:])
            (tmp / "text").mkdir(exist_ok=True)
            shard = tmp / "text" / f"{start // captions_per_shard:05d}.safetensors"
            save_file({"y": y.contiguous(), "mask": mask.contiguous()}, str(shard))
        ids = (rows["id"] if "id" in rows.columns else rows["path"]).cast(pl.String).to_list()
        pl.DataFrame({"row": np.arange(len(rows), dtype=np.int64), "text_index": row_caption, "text": [str(t) for t in texts],
                      "id": ids}).write_parquet(tmp / TEXTS)
        say(f"encoder cache: {len(unique)} captions encoded")

        # 3. Latents, epoch by epoch, bucket by bucket.
        records: dict[str, list[Any]] = {k: [] for k in ("epoch", "row", "num_frames", "height", "width", "fps", "shard")}
        shapes: dict[str, dict[str, Any]] = {}
        samples_per_epoch = []
        device = _module_device(vae)
        for epoch, groups in enumerate(plans):
            dataset = VideoTextDataset(rows, frame_interval, seed)
            dataset.set_epoch(epoch)
            batches = [
                [SampleIndex(i, t, h, w) for i in members[k : k + batch_size]]
                for (t, h, w), members in groups.items()
                for k in range(0, len(members), batch_size)
            ]
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                                 num_workers=num_workers)
            writer = _ShardWriter(tmp / "latents", f"e{epoch:04d}-", samples_per_shard)
            count = 0
            for indices, batch in zip(batches, loader):
                video = batch["video"].to(device)  # [B, 3, t, H, W]
                with torch.no_grad():
                    if posterior == "mode":
                        latents, stds = vae.encode(video, sample=False), None  # [B, C, t, h, w]
                    else:
                        latents, stds = _posterior(vae, video)
                latents = latents.to(_DTYPES[latent_dtype])
                for k, index in enumerate(indices):
                    if stds is not None:
                        writer.add(f"{index.index}.std", stds[k].to(_DTYPES[latent_dtype]), count=False)
                    shard = writer.add(str(index.index), latents[k])
                    records["epoch"].append(epoch)
                    records["row"].append(index.index)
                    records["num_frames"].append(index.num_frames)
                    records["height"].append(index.height)
                    records["width"].append(index.width)
                    records["fps"].append(float(batch["fps"][k]))
                    records["shard"].append(shard)
                    key = f"{index.num_frames}x{index.height}x{index.width}"
                    entry = shapes.setdefault(key, {"latent": list(latents.shape[1:]), "samples": 0})
                    entry["samples"] += 1
                count += len(indices)
            writer.close()
            samples_per_epoch.append(count)
            say(f"encoder cache: epoch {epoch}: {count} samples encoded")
        pl.DataFrame(records, schema={"epoch": pl.Int64, "row": pl.Int64, "num_frames": pl.Int64, "height": pl.Int64,
                                      "width": pl.Int64, "fps": pl.Float64, "shard": pl.String}).write_parquet(tmp / SAMPLES)

        # 4. Manifest last: a folder with a manifest is a complete cache.
        paths = dict(encoder_paths) if encoder_paths is not None else {
            "text_encoder": _encoder_path(text_encoder), "vae": _encoder_path(vae)}
        manifest = CacheManifest(
            format_version=CACHE_FORMAT_VERSION,
            dataset_hash=dataset_fingerprint(rows),
            num_rows=len(rows),
            seed=seed,
            frame_interval=frame_interval,
            epochs=epochs,
            bucket_config=_bucket_config_json(bucket),
            posterior=posterior,
            vae_dtype=str(vae.dtype),
            latent_dtype=latent_dtype,
            text_dtype=text_dtype,
            latent_channels=int(vae.out_channels),
            scaling_factor=float(vae.scaling_factor),
            caption_channels=int(text_encoder.output_dim),
            model_max_length=int(text_encoder.model_max_length),
            encoders=paths,
            num_captions=len(unique),
            captions_per_shard=captions_per_shard,
            samples_per_epoch=samples_per_epoch,
            shapes=shapes,
            text_shape=text_shape,
            build_seconds=round(time.monotonic() - started, 3),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        manifest.save(tmp)
    say(f"encoder cache written to {out_dir} in {manifest.build_seconds:.1f}s")
    return manifest


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
# A training run's cache: what ``training.train`` would see, from its config
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


def build_training_cache(
    cfg: Any,
    dataset: str,
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    num_replicas: int = 1,
    posterior: Posterior = "sample",
    device: torch.device | str | None = None,
    overwrite: bool = False,
    num_workers: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, CacheManifest]:
    """The cache of a training run: ``out_dir/train`` (the run's epochs) and ``out_dir/val`` (epoch 0, validation).

    Uses the run's own pieces (``resolve_dataset``, ``split_rows``, the bucket preset, ``load_encoders``) so the
    rows, buckets and encoders are exactly the ones ``training.train`` would use. ``epochs`` defaults to what
    ``cfg.steps`` needs on ``num_replicas`` ranks. ``posterior`` applies to train/: "sample" (default) because the
    training loop draws the posterior sample from each step's generator; val/ is always "mode" (validation encodes
    without a generator). Both halves land together: built in a temporary folder, then renamed.
    """
    from training.buckets import load_bucket_preset
    from training.data import load_rows, split_rows
    from training.build import load_encoders, resolve_dataset

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to rebuild it")
    dataset_path, version = resolve_dataset(dataset)
    rows = load_rows(dataset_path)
    train_rows, val_rows = split_rows(rows, cfg.data.val_fraction)
    preset = load_bucket_preset(cfg.data.bucket_preset)
    bucket = Bucket(preset.bucket_config)
    if epochs is None:
        epochs = epochs_needed(train_rows, bucket, preset.frame_interval, cfg.seed, cfg.steps, num_replicas)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    text_encoder, vae, paths = load_encoders(cfg, device)
    common = dict(batch_size=cfg.encoders.vae_micro_batch_size, encoder_paths=paths, log=log,
                  num_workers=cfg.data.num_workers if num_workers is None else num_workers)
    log(f"encoder cache for dataset {version}: {len(train_rows)} train rows x {epochs} epochs, {len(val_rows)} held out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir, exists="replace") as tmp:  # as build_encoder_cache: hidden sibling, then renamed in
        manifests = {
            "train": build_encoder_cache(train_rows, bucket, preset.frame_interval, cfg.seed, text_encoder, vae, tmp / "train",
                                         epochs=epochs, posterior=posterior, **common),
            "val": build_encoder_cache(val_rows, bucket, preset.frame_interval, cfg.seed, text_encoder, vae, tmp / "val",
                                       epochs=1, **common),
        }
    log(f"encoder cache of the run: {out_dir} (train/: {epochs} epochs, val/)")
    return manifests


def main(argv: list[str] | None = None) -> int:
    """``python -m training.encoder_cache``: the arguments of ``opensora-dag encoder-cache``."""
    import argparse

    from training.arguments import ENCODER_CACHE_DESCRIPTION, add_encoder_cache_arguments

    parser = argparse.ArgumentParser(prog="opensora-dag encoder-cache", description=ENCODER_CACHE_DESCRIPTION)
    add_encoder_cache_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    """``opensora-dag encoder-cache PRESET --dataset D --out DIR [--epochs N] [--nproc N] [--set k=v]``."""
    from training.config import load_train_config

    cfg = load_train_config(args.preset, args.overrides)
    manifests = build_training_cache(cfg, args.dataset, args.out, epochs=args.epochs, num_replicas=args.nproc,
                                     posterior=args.posterior, overwrite=args.overwrite)
    print(json.dumps({name: {"samples_per_epoch": m.samples_per_epoch, "captions": m.num_captions} for name, m in manifests.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
