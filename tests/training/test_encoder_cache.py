"""The encoder cache: round trip, cached batches equal to freshly encoded ones (same loss), clear errors, atomic build."""

from pathlib import Path

import polars as pl
import pytest
import torch

from training.buckets import Bucket, SampleIndex, VariableVideoBatchSampler, assign_rows
from training.encoder_cache import (
    CacheManifest,
    CachedLatentDataset,
    EncoderCacheError,
    build_encoder_cache,
    cached_batch_to_device,
    collate_cached,
)

SEED = 42
FRAME_INTERVAL = 2
# 64px only: 12-frame clips take t=4 (always kept), 24/30-frame clips t=8 with a keep draw of 0.6, so the cached
# samples differ between epochs and some rows sit out an epoch.
BUCKET_CONFIG = {"64px": {4: [1.0, 2], 8: [0.6, 2]}}
MAX_LEN = 16


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> pl.DataFrame:
    from curation.probe import probe_video
    from curation.samples import PALETTE, Shot, write_synthetic_video

    folder = tmp_path_factory.mktemp("cache_clips")
    specs = [  # (kind, frames, height, width); clip 4 repeats clip 0's caption
        ("moving", 24, 64, 64), ("static", 24, 80, 128), ("moving", 12, 64, 64),
        ("text", 12, 80, 128), ("moving", 24, 64, 64), ("static", 30, 80, 128),
    ]
    rows = []
    for i, (kind, frames, height, width) in enumerate(specs):
        shot = Shot(kind, frames, PALETTE[i % len(PALETTE)], text="HI" if kind == "text" else "", speed=3.0 + i)
        video = write_synthetic_video(folder / f"clip{i}.mp4", [shot], width=width, height=height, fps=24)
        info = probe_video(video.path)
        rows.append({"id": f"clip{i}", "path": str(video.path), "text": shot.caption(), "num_frames": info.num_frames,
                     "height": info.height, "width": info.width, "fps": info.fps})
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from models.text_encoder import T5TextEncoder
    from models.tiny import build_tiny_t5, build_tiny_vae
    from models.vae import VideoAutoencoderKL

    folder = tmp_path_factory.mktemp("cache_encoders")
    text_encoder = T5TextEncoder(build_tiny_t5(folder / "t5"), model_max_length=MAX_LEN)
    vae = VideoAutoencoderKL(build_tiny_vae(folder / "vae"), micro_batch_size=None).eval().requires_grad_(False)
    return text_encoder, vae


@pytest.fixture(scope="module")
def bucket() -> Bucket:
    return Bucket(BUCKET_CONFIG)


@pytest.fixture(scope="module")
def cache(clips, encoders, bucket, tmp_path_factory) -> Path:
    text_encoder, vae = encoders
    out = tmp_path_factory.mktemp("caches") / "cache"
    build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, out, epochs=2, batch_size=2,
                        samples_per_shard=3, captions_per_shard=2)
    return out


class ModeVAE:
    """The uncached path with the posterior mode: ``encode_batch`` calls ``vae.encode(video)``."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, video):
        return self.vae.encode(video, sample=False)


def test_round_trip(cache, clips, bucket, encoders):
    manifest = CacheManifest.load(cache)
    assert manifest.epochs == 2 and manifest.num_rows == len(clips) and manifest.seed == SEED
    assert manifest.posterior == "mode" and manifest.model_max_length == MAX_LEN
    assert manifest.num_captions == clips["text"].n_unique()  # one embedding per unique caption (clip 4 = clip 0)
    assert manifest.encoders["text_encoder"] and manifest.encoders["vae"]
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    for epoch in range(2):
        kept = [(i, a.bucket_id) for i, a in enumerate(assign_rows(clips, bucket, FRAME_INTERVAL, SEED, epoch)) if a.bucket_id]
        assert manifest.samples_per_epoch[epoch] == len(kept)
        dataset = CachedLatentDataset(clips, cache, epoch)
        for i, bucket_id in kept:
            t, h, w = bucket.get_thw(bucket_id)
            sample = dataset[SampleIndex(i, t, h, w)]
            assert sample["x"].shape == (4, t, h // 8, w // 8) and sample["x"].dtype == torch.float32
            assert sample["y"].shape == (1, MAX_LEN, encoders[0].output_dim) and sample["mask"].shape == (MAX_LEN,)
            assert sample["text"] == clips["text"][i] and sample["id"] == clips["id"][i]
            assert sample["ar"] == w / h and sample["fps"] == pytest.approx(clips["fps"][i])
    kept0 = {i for i, a in enumerate(assign_rows(clips, bucket, FRAME_INTERVAL, SEED, 0)) if a.bucket_id}
    kept1 = {i for i, a in enumerate(assign_rows(clips, bucket, FRAME_INTERVAL, SEED, 1)) if a.bucket_id}
    assert kept0 != kept1, "the fixture should make the keep draws differ between epochs"


def test_cached_batches_equal_fresh_encoding_and_give_the_same_loss(cache, clips, bucket, encoders):
    from models.stdit2 import STDiT2, STDiT2Config
    from training.data import VideoTextDataset, collate
    from training.masks import MaskGenerator
    from training.train import build_scheduler, diffusion_loss, encode_batch, step_generator

    text_encoder, vae = encoders
    torch.manual_seed(0)
    model = STDiT2(STDiT2Config(input_sq_size=64, hidden_size=48, depth=1, num_heads=4, caption_channels=text_encoder.output_dim,
                                model_max_length=MAX_LEN, class_dropout_prob=0.1)).eval()
    scheduler = build_scheduler("iddpm")
    masks = MaskGenerator()
    sampler = VariableVideoBatchSampler(clips, bucket, FRAME_INTERVAL, seed=SEED)
    pixels = VideoTextDataset(clips, FRAME_INTERVAL, SEED)
    latents = CachedLatentDataset(clips, cache)
    step = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        pixels.set_epoch(epoch)
        latents.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(latents, batch_sampler=sampler, collate_fn=collate_cached)
        batches = list(sampler)
        cached_batches = list(loader)
        assert len(batches) == len(cached_batches) > 0
        for indices, cached in zip(batches, cached_batches):
            fresh = encode_batch(collate([pixels[i] for i in indices]), text_encoder, ModeVAE(vae), torch.device("cpu"))
            enc = cached_batch_to_device(cached, "cpu")
            assert set(enc) == set(fresh)
            torch.testing.assert_close(enc["x"], fresh["x"], atol=1e-5, rtol=0)
            torch.testing.assert_close(enc["y"], fresh["y"], atol=1e-5, rtol=0)
            assert torch.equal(enc["mask"], fresh["mask"])
            for key, value in fresh["model_kwargs"].items():
                assert torch.equal(enc["model_kwargs"][key], value), key
            losses = []
            for batch in (fresh, enc):
                gen = step_generator(SEED, step, 0, torch.device("cpu"))
                x_mask = masks.get_masks(batch["x"], generator=gen)
                drop = (torch.rand(batch["x"].shape[0], generator=gen) < 0.1).long()
                with torch.no_grad():
                    losses.append(diffusion_loss(scheduler, "iddpm", model, batch, x_mask, gen, drop_ids=drop))
            torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
            step += 1


def test_errors_name_the_fix(cache, clips, bucket):
    dataset = CachedLatentDataset(clips, cache, epoch=0)
    with pytest.raises(EncoderCacheError, match=r"epoch 2 .*epochs 0\.\.1.*epochs>=3"):
        dataset.set_epoch(2)
    with pytest.raises(EncoderCacheError, match="epochs>=4"):
        CachedLatentDataset(clips, cache, epoch=3)
    assignments = assign_rows(clips, bucket, FRAME_INTERVAL, SEED, 0)
    dropped = next(i for i, a in enumerate(assignments) if a.bucket_id is None)
    with pytest.raises(EncoderCacheError, match=f"row {dropped} is not in the encoder cache for epoch 0"):
        dataset[SampleIndex(dropped, 8, 64, 64)]
    kept = next(i for i, a in enumerate(assignments) if a.bucket_id is not None)
    t, h, w = bucket.get_thw(assignments[kept].bucket_id)
    with pytest.raises(EncoderCacheError, match="the cache holds"):
        dataset[SampleIndex(kept, t, h + 16, w)]
    with pytest.raises(EncoderCacheError, match="not the one the cache"):
        CachedLatentDataset(clips.reverse(), cache)
    with pytest.raises(EncoderCacheError, match="not the one the cache"):
        CachedLatentDataset(clips.head(4), cache)
    manifest = CacheManifest.load(cache)
    manifest.check_compatible(seed=SEED, frame_interval=FRAME_INTERVAL, bucket=bucket, model_max_length=MAX_LEN, epochs=2)
    with pytest.raises(EncoderCacheError, match="seed 7.*epochs=5"):
        manifest.check_compatible(seed=7, bucket=bucket, epochs=5)
    with pytest.raises(EncoderCacheError, match="bucket_config"):
        manifest.check_compatible(bucket=Bucket({"64px": {4: [1.0, 2]}}))
    with pytest.raises(FileNotFoundError, match="not an encoder cache"):
        CachedLatentDataset(clips, cache.parent / "nothing")


class FailingVAE:
    """Encodes once, then fails: a build that dies half-way."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0
        self.out_channels, self.scaling_factor = vae.out_channels, vae.scaling_factor

    def parameters(self):
        return self.vae.parameters()

    def encode(self, video, sample=True, generator=None):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("disk full")
        return self.vae.encode(video, sample=sample, generator=generator)


def test_build_is_atomic(clips, bucket, encoders, cache, tmp_path):
    text_encoder, vae = encoders
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, FailingVAE(vae), out, batch_size=1)
    assert list(tmp_path.iterdir()) == [], "a failed build leaves neither the cache nor its temporary folder"

    # A failed rebuild keeps the previous cache intact; an existing cache is never overwritten by accident.
    build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, out, batch_size=4)
    before = CacheManifest.load(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, out)
    with pytest.raises(RuntimeError, match="disk full"):
        build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, FailingVAE(vae), out, batch_size=1, overwrite=True)
    assert CacheManifest.load(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]

    # The cache of a batch size 4 build holds the same latents as the module's (batch size 2, smaller shards).
    a, b = CachedLatentDataset(clips, out), CachedLatentDataset(clips, cache)
    for i, assignment in enumerate(assign_rows(clips, bucket, FRAME_INTERVAL, SEED, 0)):
        if assignment.bucket_id is not None:
            index = SampleIndex(i, *bucket.get_thw(assignment.bucket_id))
            torch.testing.assert_close(a[index]["x"], b[index]["x"], atol=1e-5, rtol=0)
            assert torch.equal(a[index]["y"], b[index]["y"])


def test_sampled_posterior_is_seeded_and_half_precision_storage(clips, bucket, encoders, cache, tmp_path):
    text_encoder, vae = encoders
    first = build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, tmp_path / "a", posterior="sample",
                                latent_dtype="fp16", text_dtype="bf16")
    build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, tmp_path / "b", posterior="sample", batch_size=1,
                        latent_dtype="fp16", text_dtype="bf16")
    assert first.posterior == "sample" and first.latent_dtype == "fp16"
    a, b, mode = (CachedLatentDataset(clips, p) for p in (tmp_path / "a", tmp_path / "b", cache))
    i, assignment = next((i, a) for i, a in enumerate(assign_rows(clips, bucket, FRAME_INTERVAL, SEED, 0)) if a.bucket_id)
    index = SampleIndex(i, *bucket.get_thw(assignment.bucket_id))
    assert a[index]["x"].dtype == torch.float32  # served as fp32 whatever the storage
    assert torch.equal(a[index]["x"], b[index]["x"]), "one seeded draw per (epoch, row), whatever the batch size"
    assert not torch.allclose(a[index]["x"], mode[index]["x"], atol=1e-3), "a sample is not the mode"
    torch.testing.assert_close(a[index]["y"], mode[index]["y"], atol=0.05, rtol=0.02)  # bf16 text embeddings
