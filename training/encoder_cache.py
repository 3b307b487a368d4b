"""Precomputed T5 embeddings and VAE latents, so that training can skip both frozen encoders.

The encoders are frozen, so what they produce for a sample is a pure function of the pixels and the caption. The
pixels a training step sees are themselves a pure function of (seed, epoch, row position): the sampler assigns the
row's bucket ``(t, H, W)`` from ``bucket_seed(seed, epoch, row)`` and ``VideoTextDataset`` picks the temporal window
with ``default_rng([seed, epoch, row])``. So the cache is built per *epoch*: for each cached epoch and every row the
sampler would use that epoch, decode the frames exactly as the dataset would (the dataset class itself is reused)
and encode them. Captions are encoded once per unique caption.

Which latent is stored (``posterior``):

* ``"mode"`` (default): the posterior mean, deterministic. A training step on cached latents then gives the same
  loss as a step that encodes with ``vae.encode(video, sample=False)``.
* ``"sample"``: one posterior sample per (epoch, row), drawn with a CPU generator seeded by (seed, epoch, row), so
  the cache is reproducible. The reference samples afresh at every step; a cached sample is fixed per epoch.

Layout of a cache folder (written to a temporary sibling folder and renamed into place, so a failed or killed build
never leaves a partial cache under the final name)::

    manifest.json                  what was cached and with what (CacheManifest)
    samples.parquet                epoch, row, num_frames, height, width, fps, shard (one line per cached sample)
    texts.parquet                  row -> index of its caption in the text shards (-1: row never cached)
    latents/e0000-00000.safetensors  one tensor per row of the epoch, key "<row>", [C, t, h, w]
    text/00000.safetensors           "y" [n, L, C] and "mask" [n, L] for n consecutive unique captions

A cache is tied to the exact training table (row order included: buckets and windows are seeded by row position),
the seed, the frame interval, the bucket table and the encoders; ``CachedLatentDataset`` checks the table and
``CacheManifest.check_compatible`` the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

from training.buckets import Bucket, SampleIndex, assign_rows

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheManifest",
    "CachedLatentDataset",
    "EncoderCacheError",
    "build_encoder_cache",
    "cached_batch_to_device",
    "collate_cached",
    "dataset_fingerprint",
]

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLES = "samples.parquet"
TEXTS = "texts.parquet"

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

    def add(self, key: str, tensor: torch.Tensor) -> str:
        """Queue ``tensor``; return the shard file name (relative to the cache root) it will land in."""
        name = self.current
        self.pending[key] = tensor.detach().to("cpu").contiguous()
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


def _latent_seed(seed: int, epoch: int, row: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + row) % (2**63 - 1)


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
        posterior: ``"mode"`` (deterministic mean) or ``"sample"`` (one seeded draw per epoch and row).
        latent_dtype, text_dtype: storage dtypes, ``fp32`` (exact), ``fp16`` or ``bf16`` (half the disk).
        num_workers: DataLoader workers that decode videos while the VAE runs.
        encoder_paths: recorded in the manifest; by default read from the encoders.
    """
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
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old: Path | None = None
    try:
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
                out = text_encoder.encode(chunk[k : k + batch_size])
                ys.append(out["y"][:, 0].to("cpu", _DTYPES[text_dtype]))  # [n, L, C]
                masks.append(out["mask"].to("cpu", torch.int64))  # [n, L]
            y, mask = torch.cat(ys), torch.cat(masks)
            text_shape = list(y.shape[1:])
            from safetensors.torch import save_file

            (tmp / "text").mkdir(exist_ok=True)
            save_file({"y": y.contiguous(), "mask": mask.contiguous()}, str(tmp / "text" / f"{start // captions_per_shard:05d}.safetensors"))
        pl.DataFrame({"row": np.arange(len(rows), dtype=np.int64), "text_index": row_caption}).write_parquet(tmp / TEXTS)
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
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
            writer = _ShardWriter(tmp / "latents", f"e{epoch:04d}-", samples_per_shard)
            count = 0
            for indices, batch in zip(batches, loader):
                video = batch["video"].to(device)  # [B, 3, t, H, W]
                if posterior == "mode":
                    latents = vae.encode(video, sample=False)
                else:
                    draws = []
                    for k, index in enumerate(indices):
                        gen = torch.Generator().manual_seed(_latent_seed(seed, epoch, index.index))
                        draws.append(vae.encode(video[k : k + 1], sample=True, generator=gen))
                    latents = torch.cat(draws)
                latents = latents.to(_DTYPES[latent_dtype])  # [B, C, t, h, w]
                for k, index in enumerate(indices):
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

        # 5. Into place: rename is atomic; an old cache is moved aside first and deleted after.
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    say(f"encoder cache written to {out_dir} in {manifest.build_seconds:.1f}s")
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Read
# ---------------------------------------------------------------------------------------------------------------------


class CachedLatentDataset(torch.utils.data.Dataset):
    """Drop-in for ``VideoTextDataset`` on a cache: indexed by ``SampleIndex``, returns latents instead of pixels.

    Each item: ``x`` [C, t, h, w], ``y`` [1, L, C], ``mask`` [L] (int64), plus ``text``, ``id``, ``num_frames``,
    ``height``, ``width``, ``ar`` (W / H, as the dataset), ``fps``. Tensors come back as ``dtype`` (fp32 by default,
    what the uncached path gives). Safetensors files are opened lazily, per process, so DataLoader workers work.

    Args:
        rows: the training table the cache was built from (checked against the manifest's fingerprint; pass None to
            skip the check, e.g. when the table is not at hand).
        cache_dir: a folder written by ``build_encoder_cache``.
        epoch: the epoch to serve; ``set_epoch`` changes it.
    """

    def __init__(self, rows: pl.DataFrame | None, cache_dir: str | Path, epoch: int = 0, dtype: torch.dtype = torch.float32):
        self.cache_dir = Path(cache_dir)
        self.manifest = CacheManifest.load(self.cache_dir)
        if rows is not None:
            if len(rows) != self.manifest.num_rows or dataset_fingerprint(rows) != self.manifest.dataset_hash:
                raise EncoderCacheError(
                    f"the training table ({len(rows)} rows) is not the one the cache at {self.cache_dir} was built from "
                    f"({self.manifest.num_rows} rows, hash {self.manifest.dataset_hash[:12]}); row order counts: rebuild the cache")
            self.texts = [str(t) for t in rows["text"].to_list()]
            self.ids = [str(i) for i in (rows["id"] if "id" in rows.columns else rows["path"]).to_list()]
        else:
            self.texts = self.ids = None
        self.dtype = dtype
        samples = pl.read_parquet(self.cache_dir / SAMPLES)
        self._shards = sorted(set(samples["shard"].to_list()))
        shard_id = {name: k for k, name in enumerate(self._shards)}
        n, epochs = self.manifest.num_rows, self.manifest.epochs
        # Per epoch and row: position in ``samples`` (-1 = not cached that epoch).
        self._position = np.full((epochs, n), -1, dtype=np.int64)
        self._position[samples["epoch"].to_numpy(), samples["row"].to_numpy()] = np.arange(len(samples))
        self._thw = samples.select("num_frames", "height", "width").to_numpy()
        self._fps = samples["fps"].to_numpy()
        self._shard = np.array([shard_id[s] for s in samples["shard"].to_list()], dtype=np.int64)
        self._text_index = pl.read_parquet(self.cache_dir / TEXTS)["text_index"].to_numpy()
        self._captions: list[str] | None = None
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

        handle = self._handles.get(relative)
        if handle is None:
            handle = self._handles[relative] = safe_open(str(self.cache_dir / relative), framework="pt")
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
        x = self._open(self._shards[self._shard[position]]).get_tensor(str(row)).to(self.dtype)  # [C, t, h, w]
        y, mask = self.text_embedding(row)
        return {
            "x": x,
            "y": y,
            "mask": mask,
            "text": self.texts[row] if self.texts is not None else "",
            "id": self.ids[row] if self.ids is not None else str(row),
            "num_frames": t,
            "height": h,
            "width": w,
            "ar": w / h,
            "fps": float(self._fps[position]),
        }


def collate_cached(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached samples: ``x`` [B, C, t, h, w], ``y`` [B, 1, L, C], ``mask`` [B, L], ``model_kwargs`` as
    ``training.train.encode_batch`` builds them (float32 [B] tensors), plus ``text`` and ``id`` lists."""
    return {
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


def cached_batch_to_device(batch: dict[str, Any], device: torch.device | str, non_blocking: bool = False) -> dict[str, Any]:
    """A collated cached batch on ``device``, with exactly the keys of ``encode_batch``'s output."""
    return {
        "x": batch["x"].to(device, non_blocking=non_blocking),
        "y": batch["y"].to(device, non_blocking=non_blocking),
        "mask": batch["mask"].to(device, non_blocking=non_blocking),
        "model_kwargs": {k: v.to(device, non_blocking=non_blocking) for k, v in batch["model_kwargs"].items()},
    }
