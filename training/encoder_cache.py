"""Building the encoder cache: precomputed T5 embeddings and VAE latents, so that training can skip both frozen encoders.

The encoders are frozen, so what they produce for a sample is a pure function of the pixels and the caption. The
pixels a training step sees are themselves a pure function of (seed, epoch, row position): the sampler assigns the
row's bucket ``(t, H, W)`` from ``bucket_seed(seed, epoch, row)`` and ``VideoTextDataset`` picks the temporal window
with ``default_rng([seed, epoch, row])``. So the cache is built per *epoch*: for each cached epoch and every row the
sampler would use that epoch, decode the frames exactly as the dataset would (the dataset class itself is reused)
and encode them. Captions are encoded once per unique caption.

What a cache folder holds, which latent it stores (``posterior``) and how training reads it back are in
``training.cached_data``; the caption and latent encoding that fills the folder is ``training.cache_encoding``.
``build_training_cache`` builds the cache of a training run from its config; it is what ``opensora-dag encoder-cache``
(``python -m training.encoder_cache``) runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import polars as pl
import torch

from common.files import atomic_dir
from training.buckets import Bucket, assign_rows
from training.cache_encoding import DTYPES, Plan, Posterior, SampleTable, encode_captions, encode_epoch
from training.cached_data import CACHE_FORMAT_VERSION, SAMPLES, CacheManifest, bucket_config_json, dataset_fingerprint, epochs_needed

__all__ = ["build_encoder_cache", "build_training_cache"]


# ---------------------------------------------------------------------------------------------------------------------
# One cache folder
# ---------------------------------------------------------------------------------------------------------------------


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
        rows: the training table, in the order the sampler gets it (``train_rows`` of ``training.run_setup.prepare_data``).
        bucket, frame_interval, seed: as given to ``VariableVideoBatchSampler`` and ``VideoTextDataset``.
        text_encoder: a ``models.text_encoder.T5TextEncoder`` (anything with ``encode(texts)``, ``output_dim``,
            ``model_max_length``).
        vae: a ``models.vae.VideoAutoencoderKL``.
        out_dir: the cache folder; it must not exist unless ``overwrite``.
        batch_size: videos per VAE call (all of one bucket) and captions per T5 call.
        posterior: ``"mode"`` (store the mean) or ``"sample"`` (store mean and std; sample per step, see
            ``training.cached_data``).
        latent_dtype, text_dtype: storage dtypes, ``fp32`` (exact), ``fp16`` or ``bf16`` (half the disk).
        num_workers: DataLoader workers that decode videos while the VAE runs.
        encoder_paths: recorded in the manifest; by default read from the encoders.
    """
    _check_build_arguments(epochs, batch_size, samples_per_shard, captions_per_shard, posterior, latent_dtype, text_dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to rebuild it")
    say = log or (lambda _msg: None)
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built in a hidden sibling and renamed in at the end: an old cache is moved aside first and deleted after.
    with atomic_dir(out_dir, exists="replace") as tmp:
        # 1. Which rows each epoch uses, and at which (t, H, W): exactly the sampler's assignment.
        plans = [_epoch_plan(rows, bucket, frame_interval, seed, epoch) for epoch in range(epochs)]
        used = sorted({i for plan in plans for members in plan.values() for i in members})

        # 2. Captions: one embedding per unique caption of a used row.
        num_captions, text_shape = encode_captions(rows, used, text_encoder, tmp, batch_size=batch_size,
                                                   captions_per_shard=captions_per_shard, text_dtype=text_dtype)
        say(f"encoder cache: {num_captions} captions encoded")

        # 3. Latents, epoch by epoch, bucket by bucket.
        samples, samples_per_epoch = SampleTable(), []
        for epoch, plan in enumerate(plans):
            count = encode_epoch(rows, plan, epoch, frame_interval, seed, vae, tmp, samples, batch_size=batch_size,
                                 samples_per_shard=samples_per_shard, posterior=posterior, latent_dtype=latent_dtype,
                                 num_workers=num_workers)
            samples_per_epoch.append(count)
            say(f"encoder cache: epoch {epoch}: {count} samples encoded")
        samples.write(tmp / SAMPLES)

        # 4. Manifest last: a folder with a manifest is a complete cache.
        manifest = CacheManifest(
            format_version=CACHE_FORMAT_VERSION, dataset_hash=dataset_fingerprint(rows), num_rows=len(rows), seed=seed,
            frame_interval=frame_interval, epochs=epochs, bucket_config=bucket_config_json(bucket), posterior=posterior,
            latent_dtype=latent_dtype, text_dtype=text_dtype, **_encoder_fields(text_encoder, vae, encoder_paths),
            num_captions=num_captions, captions_per_shard=captions_per_shard, samples_per_epoch=samples_per_epoch,
            shapes=samples.shapes, text_shape=text_shape, build_seconds=round(time.monotonic() - started, 3),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        manifest.save(tmp)
    say(f"encoder cache written to {out_dir} in {manifest.build_seconds:.1f}s")
    return manifest


def _check_build_arguments(epochs: int, batch_size: int, samples_per_shard: int, captions_per_shard: int,
                           posterior: str, latent_dtype: str, text_dtype: str) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1 or samples_per_shard < 1 or captions_per_shard < 1:
        raise ValueError("batch_size, samples_per_shard and captions_per_shard must be >= 1")
    if posterior not in ("mode", "sample"):
        raise ValueError(f"posterior must be 'mode' or 'sample', got {posterior!r}")
    for name, value in (("latent_dtype", latent_dtype), ("text_dtype", text_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}")


def _epoch_plan(rows: pl.DataFrame, bucket: Bucket, frame_interval: int, seed: int, epoch: int) -> Plan:
    """The rows the sampler uses in ``epoch``, grouped by the (t, H, W) it assigns them."""
    plan: Plan = {}
    for i, assignment in enumerate(assign_rows(rows, bucket, frame_interval, seed, epoch)):
        if assignment.bucket_id is not None:
            plan.setdefault(bucket.get_thw(assignment.bucket_id), []).append(i)
    return plan


def _encoder_path(obj: Any) -> str | None:
    path = getattr(obj, "path", None)
    if path is None:
        config = getattr(getattr(obj, "module", None), "config", None)
        path = getattr(config, "_name_or_path", None)
    return str(path) if path else None


def _encoder_fields(text_encoder: Any, vae: Any, encoder_paths: Mapping[str, str | None] | None) -> dict[str, Any]:
    """What the manifest records of the encoders: the shapes and dtype they produce and where they came from."""
    paths = dict(encoder_paths) if encoder_paths is not None else {
        "text_encoder": _encoder_path(text_encoder), "vae": _encoder_path(vae)}
    return {
        "vae_dtype": str(vae.dtype),
        "latent_channels": int(vae.out_channels),
        "scaling_factor": float(vae.scaling_factor),
        "caption_channels": int(text_encoder.output_dim),
        "model_max_length": int(text_encoder.model_max_length),
        "encoders": paths,
    }


# ---------------------------------------------------------------------------------------------------------------------
# A training run's cache: what ``training.train`` would see, from its config
# ---------------------------------------------------------------------------------------------------------------------


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
    from training.bucket_presets import load_bucket_preset
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
