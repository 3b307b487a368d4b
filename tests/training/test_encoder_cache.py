"""The encoder cache: round trip, cached batches equal to freshly encoded ones (same loss), clear errors, atomic build."""

from pathlib import Path

import polars as pl
import pytest
import torch

from training.buckets import Bucket, assign_rows
from training.sampler import SampleIndex, VariableVideoBatchSampler
from training.cached_data import (
    CacheManifest,
    CachedLatentDataset,
    EncoderCacheError,
    cached_batch_to_device,
    collate_cached,
)
from training.encoder_cache import build_encoder_cache

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
    specs = [  # (kind, frames, height, width); clip 3 repeats clip 2's caption (both always kept: t=4, keep_prob 1)
        ("moving", 24, 64, 64), ("static", 24, 80, 128), ("moving", 12, 64, 64),
        ("text", 12, 80, 128), ("moving", 24, 64, 64), ("static", 30, 80, 128),
    ]
    rows = []
    for i, (kind, frames, height, width) in enumerate(specs):
        shot = Shot(kind, frames, PALETTE[i % len(PALETTE)], text="HI" if kind == "text" else "", speed=3.0 + i)
        video = write_synthetic_video(folder / f"clip{i}.mp4", [shot], width=width, height=height, fps=24)
        info = probe_video(video.path)
        text = rows[2]["text"] if i == 3 else shot.caption()
        rows.append({"id": f"clip{i}", "path": str(video.path), "text": text, "num_frames": info.num_frames,
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


def test_round_trip(cache, clips, bucket, encoders):
    manifest = CacheManifest.load(cache)
    assert manifest.epochs == 2 and manifest.num_rows == len(clips) and manifest.seed == SEED
    assert manifest.posterior == "mode" and manifest.model_max_length == MAX_LEN
    used = {i for epoch in range(2) for i, a in enumerate(assign_rows(clips, bucket, FRAME_INTERVAL, SEED, epoch)) if a.bucket_id}
    assert manifest.num_captions == len({clips["text"][i] for i in used}) < len(used)  # one per unique caption
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


def tiny_model(caption_channels: int):
    from models.stdit2 import STDiT2
    from models.stdit2_config import STDiT2Config

    torch.manual_seed(0)
    return STDiT2(STDiT2Config(input_sq_size=64, hidden_size=48, depth=1, num_heads=4, caption_channels=caption_channels,
                               model_max_length=MAX_LEN, class_dropout_prob=0.1)).eval()


def step_loss(model, scheduler, enc, gen):
    """What a training step of ``training.train`` draws from its generator after encoding, and the loss."""
    from training.masks import MaskGenerator
    from training.steps import diffusion_loss

    x_mask = MaskGenerator().get_masks(enc["x"], generator=gen)
    drop = (torch.rand(enc["x"].shape[0], generator=gen) < 0.1).long()
    with torch.no_grad():
        return diffusion_loss(scheduler, "iddpm", model, enc, x_mask, gen, drop_ids=drop)


def assert_same_encoding(enc, fresh):
    assert set(enc) == set(fresh)
    torch.testing.assert_close(enc["x"], fresh["x"], atol=1e-5, rtol=0)
    torch.testing.assert_close(enc["y"], fresh["y"], atol=1e-5, rtol=0)
    assert torch.equal(enc["mask"], fresh["mask"])
    for key, value in fresh["model_kwargs"].items():
        assert torch.equal(enc["model_kwargs"][key], value), key


def test_cached_batches_equal_fresh_encoding_and_give_the_same_loss(cache, clips, bucket, encoders):
    """Mode cache == ``encode_batch(..., generator=None)`` (the VAE mode), batch by batch over two epochs."""
    from training.data import VideoTextDataset, collate
    from training.build import build_scheduler, encode_batch
    from training.steps import step_generator

    text_encoder, vae = encoders
    model, scheduler = tiny_model(text_encoder.output_dim), build_scheduler("iddpm")
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
            fresh = encode_batch(collate([pixels[i] for i in indices]), text_encoder, vae, torch.device("cpu"))
            enc = cached_batch_to_device(cached, "cpu")
            assert_same_encoding(enc, fresh)
            losses = [step_loss(model, scheduler, e, step_generator(SEED, step, 0, torch.device("cpu"))) for e in (fresh, enc)]
            torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
            step += 1


def test_sample_cache_draws_the_posterior_like_the_vae(clips, bucket, encoders, cache, tmp_path):
    """posterior="sample": the step's generator draws the same latent sample as ``encode_batch(generator=gen)``, and
    leaves the generator in the same state, so masks, timesteps, noise and the loss match too."""
    from training.data import VideoTextDataset, collate
    from training.build import build_scheduler, encode_batch
    from training.steps import step_generator

    text_encoder, vae = encoders
    manifest = build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, tmp_path / "s", posterior="sample")
    assert manifest.posterior == "sample" and manifest.noise_dtype == torch.float32
    model, scheduler = tiny_model(text_encoder.output_dim), build_scheduler("iddpm")
    sampler = VariableVideoBatchSampler(clips, bucket, FRAME_INTERVAL, seed=SEED)
    pixels = VideoTextDataset(clips, FRAME_INTERVAL, SEED)
    sampled, mode = CachedLatentDataset(clips, tmp_path / "s"), CachedLatentDataset(clips, cache)
    for step, indices in enumerate(sampler):
        cached = collate_cached([sampled[i] for i in indices])
        torch.testing.assert_close(cached["x"], collate_cached([mode[i] for i in indices])["x"], atol=1e-5, rtol=0)
        assert cached["x_std"].shape == cached["x"].shape and bool((cached["x_std"] > 0).all())
        gen_fresh, gen_cached = (step_generator(SEED, step, 0, torch.device("cpu")) for _ in range(2))
        fresh = encode_batch(collate([pixels[i] for i in indices]), text_encoder, vae, torch.device("cpu"), generator=gen_fresh)
        enc = cached_batch_to_device(cached, "cpu", generator=gen_cached, vae_dtype=manifest.noise_dtype)
        assert not torch.allclose(enc["x"], cached["x"], atol=1e-4), "a sample, not the mode"
        assert_same_encoding(enc, fresh)
        torch.testing.assert_close(step_loss(model, scheduler, enc, gen_cached), step_loss(model, scheduler, fresh, gen_fresh),
                                   atol=1e-5, rtol=1e-5)
    assert cached_batch_to_device(cached, "cpu")["x"].equal(cached["x"]), "no generator: the mode"


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
        self.out_channels, self.scaling_factor, self.dtype = vae.out_channels, vae.scaling_factor, vae.dtype

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
    build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, out, batch_size=4,
                        latent_dtype="fp16", text_dtype="bf16")
    before = CacheManifest.load(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, out)
    with pytest.raises(RuntimeError, match="disk full"):
        build_encoder_cache(clips, bucket, FRAME_INTERVAL, SEED, text_encoder, FailingVAE(vae), out, batch_size=1, overwrite=True)
    assert CacheManifest.load(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]

    # Other batch size and shard size, half-precision storage: the same latents and embeddings to fp16/bf16 precision,
    # served as fp32.
    a, b = CachedLatentDataset(clips, out), CachedLatentDataset(clips, cache)
    for i, assignment in enumerate(assign_rows(clips, bucket, FRAME_INTERVAL, SEED, 0)):
        if assignment.bucket_id is not None:
            index = SampleIndex(i, *bucket.get_thw(assignment.bucket_id))
            assert a[index]["x"].dtype == a[index]["y"].dtype == torch.float32
            torch.testing.assert_close(a[index]["x"], b[index]["x"], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(a[index]["y"], b[index]["y"], atol=2e-2, rtol=1e-2)


def test_build_training_cache_from_a_run_config(tiny_dataset, tmp_path, monkeypatch):
    """The run-level builder: train/ holds every epoch the run's steps reach, val/ the held-out rows at epoch 0."""
    from tests.training.conftest import TINY_OVERRIDES
    from training.bucket_presets import load_bucket_preset
    from training.config import load_train_config
    from training.data import load_rows, split_rows
    from training.cached_data import epochs_needed
    from training.encoder_cache import build_training_cache

    monkeypatch.setenv("OPENSORA_HOME", str(tmp_path / "home"))  # where the demo's tiny encoders are built
    cfg = load_train_config("demo-cpu", [*TINY_OVERRIDES, "steps=12"])
    train_rows, val_rows = split_rows(load_rows(tiny_dataset), cfg.data.val_fraction)
    preset = load_bucket_preset(cfg.data.bucket_preset)
    bucket = Bucket(preset.bucket_config)
    need = epochs_needed(train_rows, bucket, preset.frame_interval, cfg.seed, cfg.steps)
    sampler = VariableVideoBatchSampler(train_rows, bucket, preset.frame_interval, seed=cfg.seed)
    assert len(sampler) < cfg.steps <= 2 * len(sampler) and need == 2

    manifests = build_training_cache(cfg, str(tiny_dataset), tmp_path / "cache", num_workers=0, log=lambda _: None)
    assert manifests["train"].epochs == need and manifests["val"].epochs == 1
    assert manifests["train"].posterior == "sample" and manifests["val"].posterior == "mode"
    assert manifests["train"].model_max_length == cfg.encoders.model_max_length
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train", "val"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    CacheManifest.load(tmp_path / "cache" / "train").check_compatible(
        seed=cfg.seed, frame_interval=preset.frame_interval, bucket=bucket, model_max_length=cfg.encoders.model_max_length, epochs=need)
    train = CachedLatentDataset(train_rows, tmp_path / "cache" / "train")
    for epoch in range(need):
        sampler.set_epoch(epoch)
        train.set_epoch(epoch)
        batch = collate_cached([train[i] for i in next(iter(sampler))])
        assert batch["x"].shape[1:3] == (4, int(batch["model_kwargs"]["num_frames"][0]))
    val = CachedLatentDataset(None, tmp_path / "cache" / "val")  # captions and ids come from the cache itself
    val_sampler = VariableVideoBatchSampler(val_rows, bucket, preset.frame_interval, seed=cfg.seed, shuffle=False)
    for indices in val_sampler:
        assert [val[i]["id"] for i in indices] == [val_rows["id"][i.index] for i in indices]


def test_virtual_clips_give_the_samples_and_latents_of_their_files(encoders, bucket, tmp_path):
    """Training and the encoder cache read a virtual clip (a frame range of its source) as they read its file."""
    from curation.clip_plan import CutConfig
    from curation.cutting import cut_clips, keep_virtual_frames
    from curation.samples import PALETTE, Shot, write_synthetic_video
    from training.data import VideoTextDataset

    source = write_synthetic_video(tmp_path / "source.mp4", [Shot("moving", 40, PALETTE[0], speed=4.0),
                                                              Shot("static", 30, PALETTE[2]), Shot("moving", 36, PALETTE[4], speed=6.0)],
                                   width=128, height=80, fps=24)
    from curation.shots import Scene

    scenes = [Scene("src", k, a, b, a / 24, b / 24, 24.0) for k, (a, b) in enumerate(source.shot_ranges())]
    cfg = CutConfig(min_seconds=None, short_side=None)
    virtual = keep_virtual_frames(source.path, "src", scenes, tmp_path / "frames", cfg).clips
    files = cut_clips(source.path, "src", scenes, tmp_path / "clips", cfg, frames_root=tmp_path / "cut-frames").clips
    assert len(virtual) == len(files) == 3 and all(c.virtual for c in virtual)

    def table(clips) -> pl.DataFrame:  # same ids and captions, so both draw the same buckets and windows
        return pl.DataFrame([{**c.to_row(), "id": f"clip{k}", "text": f"shot {k}"} for k, c in enumerate(clips)])

    rows_v, rows_f = table(virtual), table(files)
    sampler = VariableVideoBatchSampler(rows_v, bucket, FRAME_INTERVAL, seed=SEED)
    assert [b for b in sampler] == [b for b in VariableVideoBatchSampler(rows_f, bucket, FRAME_INTERVAL, seed=SEED)]
    data_v, data_f = VideoTextDataset(rows_v, FRAME_INTERVAL, SEED), VideoTextDataset(rows_f, FRAME_INTERVAL, SEED)
    for batch in sampler:
        for index in batch:
            a, b = data_v[index]["video"], data_f[index]["video"]
            assert a.shape == b.shape and (a - b).abs().mean() < 0.02  # one crf-18 generation apart, in [-1, 1]

    text_encoder, vae = encoders
    caches = {}
    for name, rows in (("virtual", rows_v), ("files", rows_f)):
        caches[name] = tmp_path / f"cache-{name}"
        build_encoder_cache(rows, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, caches[name], epochs=1, batch_size=2)
    latents_v, latents_f = CachedLatentDataset(rows_v, caches["virtual"]), CachedLatentDataset(rows_f, caches["files"])
    for batch in sampler:
        for index in batch:
            a, b = latents_v[index]["x"], latents_f[index]["x"]
            assert a.shape == b.shape and (a - b).abs().mean() < 0.1 * b.abs().mean() + 1e-3
