"""Claim: caching the frozen encoders' outputs (``training.encoder_cache``) multiplies training samples/s, because
with realistic encoders the T5 and VAE forward passes cost far more than a small STDiT2's training step.

Encoders of realistic size, random weights, nothing downloaded:

* text: a T5-base-sized ``T5EncoderModel`` (d_model 768, 12 layers, 12 heads, d_ff 3072, ReLU FFN, vocab 32128,
  ~110M parameters), saved to a temporary folder and loaded through ``models.text_encoder.T5TextEncoder`` (caption
  cleaning included); its tokenizer is a small sentencepiece model built offline as ``models/tiny.py`` does (the
  vocabulary only changes which ids are looked up, not the cost: every prompt is padded to ``--max-len`` tokens);
* video: an SD-VAE-sized ``AutoencoderKL`` (block_out_channels (128, 256, 512, 512), layers_per_block 2, 4 latent
  channels, 32 norm groups: the ``sd-vae-ft-ema`` layout, ~84M parameters) through ``models.vae.VideoAutoencoderKL``
  (frame by frame, micro-batches of 4 frames);
* model: STDiT2-S/2 (hidden 192, depth 4, 4 heads, patch 1x2x2) with 768 caption channels, trained with AdamW on the
  IDDPM loss, frame masks and caption dropout, as ``training.train`` does.

Data: synthetic 128x128 clips, one bucket ``(t=--frames, 128x128)`` with batches of ``--batch``. Both paths go
through a DataLoader: uncached = ``VideoTextDataset`` (decode + resize) -> ``encode_batch(..., generator=gen)`` (VAE
posterior sample + T5, what ``training.train`` runs) -> step; cached = ``CachedLatentDataset`` over a
``posterior="sample"`` cache (safetensors reads; the posterior sample drawn from the same step generator) -> step. The
encoders are warm from building the cache, and each path's fresh model first takes ``--warmup`` untimed steps;
then ``--steps`` (uncached) or ``--cached-steps`` timed steps. Printed: samples/s of both, the ratio, the uncached
step's time split (data / VAE / T5 / model step), and the cache build cost. With CUDA present the same runs again
on the GPU (model step under bf16 autocast, encoders in fp32, ``--gpu-steps`` for both paths).

CPU threads default to 1: on the shared 2-core development machine two torch threads contending with other
processes ran the model step 2-4x slower than one (the load average is printed); ``--threads 0`` keeps torch's
default. Measured there (load ~3.5): 1 thread 0.12 vs 4.6 samples/s (39x), 2 threads 0.08 vs 1.2 samples/s (16x).

    .venv/bin/python benchmarks/bench_encoder_cache.py [--steps 2] [--cached-steps 10] [--batch 2] [--frames 8]
                                                        [--max-len 200] [--threads N] [--devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FRAME_INTERVAL = 2
SEED = 42


# ---------------------------------------------------------------------------------------------------------------------
# Setup: clips, encoders, model
# ---------------------------------------------------------------------------------------------------------------------


def write_clips(folder: Path, count: int, frames: int, size: int) -> pl.DataFrame:
    from curation.samples import PALETTE, Shot, write_synthetic_video

    num_frames = frames * FRAME_INTERVAL + 4  # a video fits bucket t when it has more than t * frame_interval frames
    rows = []
    kinds = ("moving", "static", "text")
    for i in range(count):
        kind = kinds[i % 3]
        shot = Shot(kind, num_frames, PALETTE[i % len(PALETTE)], text="OPEN SORA" if kind == "text" else "", speed=3.0 + i)
        video = write_synthetic_video(folder / f"clip{i:02d}.mp4", [shot], width=size, height=size, fps=24)
        rows.append({"id": f"clip{i:02d}", "path": str(video.path), "text": f"{shot.caption()}, take {i}",
                     "num_frames": num_frames, "height": size, "width": size, "fps": 24.0})
    return pl.DataFrame(rows)


def build_t5_base(dest: Path) -> Path:
    """A random T5-base-sized encoder folder (t5-base's config: 768/12/12/3072, ReLU, vocab 32128)."""
    from transformers import T5Config, T5EncoderModel

    from models.text_encoder import t5_tokenizer_from_spiece
    from models.tiny import train_tiny_sentencepiece

    dest.mkdir(parents=True, exist_ok=True)
    spiece = dest / "spiece.model"
    spiece.write_bytes(train_tiny_sentencepiece(vocab_size=512))
    t5_tokenizer_from_spiece(spiece, extra_ids=0).save_pretrained(dest)
    spiece.unlink()
    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                      feed_forward_proj="relu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5EncoderModel(config).eval().save_pretrained(dest)
    return dest


def build_sd_vae():
    """A random AutoencoderKL with the layout of stabilityai/sd-vae-ft-ema."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            norm_num_groups=32, sample_size=256, scaling_factor=0.18215,
        ).eval()


def build_stdit2(caption_channels: int, max_len: int):
    from models.stdit2 import build_stdit2 as build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build("STDiT2-S/2", caption_channels=caption_channels, model_max_length=max_len, input_sq_size=128,
                     class_dropout_prob=0.1)


def params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Timings:
    samples: int = 0
    seconds: float = 0.0
    data: float = 0.0
    vae: float = 0.0
    t5: float = 0.0
    step: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """The step of ``training.train`` without the booster: mask, caption dropout, IDDPM loss, backward, clip, AdamW."""

    def __init__(self, model, device: torch.device):
        from training.masks import MaskGenerator
        from training.build import build_scheduler

        self.model = model.to(device).train()
        self.device = device
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scheduler = build_scheduler("iddpm")
        self.masks = MaskGenerator()
        self.step_index = 0

    def generator(self) -> torch.Generator:
        """This step's generator: it draws the VAE posterior sample (both paths), then masks, dropout, t, noise."""
        from training.steps import step_generator

        return step_generator(SEED, self.step_index, 0, self.device)

    def step(self, enc, gen: torch.Generator) -> float:
        from training.steps import diffusion_loss

        x_mask = self.masks.get_masks(enc["x"], generator=gen)
        drop = (torch.rand(enc["x"].shape[0], generator=gen, device=self.device) < 0.1).long()
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with amp:
            loss = diffusion_loss(self.scheduler, "iddpm", self.model, enc, x_mask, gen, drop_ids=drop).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return float(loss.detach())


def batches_forever(make_loader):
    while True:
        yield from make_loader()


def run_uncached(rows, bucket, text_encoder, vae, trainer: Trainer, steps: int) -> Timings:
    from training.sampler import VariableVideoBatchSampler
    from training.data import VideoTextDataset, collate

    device = trainer.device
    sampler = VariableVideoBatchSampler(rows, bucket, FRAME_INTERVAL, seed=SEED)
    dataset = VideoTextDataset(rows, FRAME_INTERVAL, SEED)
    it = batches_forever(lambda: torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    out = Timings()
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        gen = trainer.generator()
        with torch.no_grad():  # encode_batch(..., generator=gen) of training.train, split in its two halves to time them
            x = vae.encode(batch["video"].to(device), generator=gen)
            sync(device)
            t2 = time.perf_counter()
            text = text_encoder.encode(batch["text"])
            sync(device)
        t3 = time.perf_counter()
        enc = {"x": x, "y": text["y"].to(device), "mask": text["mask"].to(device),
               "model_kwargs": {key: batch[key].to(device) for key in ("num_frames", "height", "width", "ar", "fps")}}
        trainer.step(enc, gen)
        sync(device)
        t4 = time.perf_counter()
        out.samples += x.shape[0]
        out.seconds += t4 - t0
        out.data, out.vae, out.t5, out.step = out.data + t1 - t0, out.vae + t2 - t1, out.t5 + t3 - t2, out.step + t4 - t3
    return out


def run_cached(rows, bucket, cache_dir: Path, trainer: Trainer, steps: int) -> Timings:
    from training.sampler import VariableVideoBatchSampler
    from training.cached_data import CachedLatentDataset, cached_batch_to_device, collate_cached

    device = trainer.device
    sampler = VariableVideoBatchSampler(rows, bucket, FRAME_INTERVAL, seed=SEED)
    dataset = CachedLatentDataset(rows, cache_dir, epoch=0)
    noise_dtype = dataset.manifest.noise_dtype
    it = batches_forever(lambda: torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_cached))
    out = Timings()
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        gen = trainer.generator()
        enc = cached_batch_to_device(next(it), device, generator=gen, vae_dtype=noise_dtype)  # posterior sample from gen
        t1 = time.perf_counter()
        trainer.step(enc, gen)
        sync(device)
        t2 = time.perf_counter()
        out.samples += enc["x"].shape[0]
        out.seconds += t2 - t0
        out.data, out.step = out.data + t1 - t0, out.step + t2 - t1
    return out


def warm_trainer(model, device: torch.device, rows, bucket, cache_dir: Path, steps: int) -> Trainer:
    """A trainer that has taken ``steps`` untimed steps on cached batches (allocator, AdamW state, kernels)."""
    trainer = Trainer(model, device)
    if steps:
        run_cached(rows, bucket, cache_dir, trainer, steps)
    return trainer


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def bench_device(device: torch.device, args, rows, bucket, t5_path: Path, work: Path) -> None:
    from models.text_encoder import T5TextEncoder
    from models.vae import VideoAutoencoderKL
    from training.encoder_cache import build_encoder_cache

    steps = args.steps if device.type == "cpu" else args.gpu_steps
    cached_steps = args.cached_steps if device.type == "cpu" else args.gpu_steps
    text_encoder = T5TextEncoder(t5_path, model_max_length=args.max_len, device=device)
    vae = VideoAutoencoderKL(build_sd_vae(), micro_batch_size=4).to(device).eval().requires_grad_(False)
    print(f"\n## {device.type}: T5 {params(text_encoder.model):.1f}M params, VAE {params(vae):.1f}M "
          f"(encoder half {params(vae.module.encoder) + params(vae.module.quant_conv):.1f}M)", flush=True)

    cache_dir = work / f"cache-{device.type}"
    t0 = time.perf_counter()
    manifest = build_encoder_cache(rows, bucket, FRAME_INTERVAL, SEED, text_encoder, vae, cache_dir, batch_size=args.batch,
                                   posterior="sample")
    build_s = time.perf_counter() - t0
    n = manifest.samples_per_epoch[0]
    print(f"cache build: {n} clips + {manifest.num_captions} captions in {build_s:.1f} s ({n / build_s:.2f} samples/s), "
          f"{folder_mb(cache_dir):.1f} MiB on disk ({folder_mb(cache_dir / 'latents') / n * 1024:.0f} KiB latents/sample, "
          f"{folder_mb(cache_dir / 'text') / manifest.num_captions * 1024:.0f} KiB text/caption)", flush=True)

    model = build_stdit2(text_encoder.output_dim, args.max_len)
    print(f"model: STDiT2-S/2, {params(model):.2f}M params; batch {args.batch} x {args.frames} frames x "
          f"{args.size}x{args.size} px (latent {args.frames}x{args.size // 8}x{args.size // 8}), captions of {args.max_len} tokens",
          flush=True)
    # Warm-up: the encoders are warm from the cache build; each model takes untimed steps on cached batches.
    trainer = warm_trainer(model, device, rows, bucket, cache_dir, args.warmup)
    uncached = run_uncached(rows, bucket, text_encoder, vae, trainer, steps)
    trainer = warm_trainer(build_stdit2(text_encoder.output_dim, args.max_len), device, rows, bucket, cache_dir, args.warmup)
    cached = run_cached(rows, bucket, cache_dir, trainer, cached_steps)

    def per_step(t: Timings, value: float) -> str:
        return f"{value / (t.samples / args.batch) * 1000:.0f} ms"

    print(f"uncached (encoders in the loop): {uncached.samples_per_s:8.2f} samples/s over {steps} steps "
          f"[per step: data {per_step(uncached, uncached.data)}, VAE {per_step(uncached, uncached.vae)}, "
          f"T5 {per_step(uncached, uncached.t5)}, model step {per_step(uncached, uncached.step)}]")
    print(f"cached   (latents from disk):    {cached.samples_per_s:8.2f} samples/s over {cached_steps} steps "
          f"[per step: data {per_step(cached, cached.data)}, model step {per_step(cached, cached.step)}]")
    print(f"ratio cached / uncached: {cached.samples_per_s / uncached.samples_per_s:.1f}x", flush=True)
    del text_encoder, vae


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed uncached steps on CPU")
    parser.add_argument("--cached-steps", type=int, default=10, help="timed cached steps on CPU")
    parser.add_argument("--gpu-steps", type=int, default=20, help="timed steps of each path on CUDA")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, choices=[128], help="pixels (the demo 128px bucket, 1:1)")
    parser.add_argument("--max-len", type=int, default=200, help="T5 tokens per caption (the reference's 200)")
    parser.add_argument("--clips", type=int, default=4, help="clips in the table (batches cycle through them)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed model steps before each timed run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when absent")
    args = parser.parse_args(argv)

    from training.buckets import Bucket

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# encoder cache benchmark: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"load average {load:.1f}", flush=True)
    bucket = Bucket({f"{args.size}px": {args.frames: [1.0, args.batch]}})
    with tempfile.TemporaryDirectory(prefix="bench_encoder_cache_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        rows = write_clips(work / "clips", args.clips, args.frames, args.size)
        t5_path = build_t5_base(work / "t5-base-random")
        print(f"setup (clips, T5 folder): {time.perf_counter() - t0:.1f} s", flush=True)
        for name in [d.strip() for d in args.devices.split(",") if d.strip()]:
            if name == "cuda" and not torch.cuda.is_available():
                print("\n## cuda: not available, skipped")
                continue
            bench_device(torch.device(name), args, rows, bucket, t5_path, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
