"""A tiny SD-style VAE that reconstructs the demo's synthetic world, built on CPU in seconds.

The random VAE of ``models.tiny.build_tiny_vae`` keeps the production geometry but its decoder turns no latent back
into a picture, so a diffusion model trained on its latents can never produce a recognisable sample.
:func:`build_demo_vae` writes a diffusers ``AutoencoderKL`` with the same geometry and config keys (4 blocks = 8x
spatial downsampling, 4 latent channels, ``scaling_factor``) whose weights make it an actual autoencoder:
:func:`box_filter_init_` sets them so that latent channels 0-2 hold each 8x8 patch's mean RGB and the decoder
repeats it back (channel 3 starts at zero). On held-out frames of the synthetic generator
(``curation.samples.render_frame``: moving shapes, striped stills, title cards, palette and random colours) that
reaches ~21.6 dB PSNR at 96x160 and ~20.1 dB at 48x80: colours and shapes survive, edges and small text blur.
An optional L1 fine-tuning loop (``steps``) starts from that init; within the ~90 s CPU budget it did not improve it.

``scaling_factor`` is calibrated, as 0.18215 is for SD, so that the scaled latents of synthetic frames have unit
standard deviation. Everything is seeded, so the same call writes the same files. The folder is a plain diffusers
folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that ``models.vae.VideoAutoencoderKL`` opens
unchanged.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEMO_VAE_SIZES",
    "box_filter_init_",
    "build_demo_vae",
    "make_demo_autoencoder",
    "psnr",
    "synthetic_frames",
    "to_tensor",
    "train_demo_autoencoder",
]

# Frame sizes (H, W) the demo trains at (its 64px and 128px buckets come from 96x160 clips) and a few neighbours.
DEMO_VAE_SIZES: tuple[tuple[int, int], ...] = ((96, 160), (48, 80), (64, 112), (64, 64), (80, 128))

_TITLES = ("OPEN SORA 2024", "HELLO DAGSTER", "VIDEO DATA", "BUCKETS")
_ALPHABET = string.ascii_uppercase + string.digits + "  "


def _random_shot(rng: np.random.Generator, num_frames: int = 1000):
    from curation.samples import PALETTE, Shot

    kind = ("moving", "static", "text")[int(rng.choice(3, p=[0.45, 0.3, 0.25]))]
    if rng.random() < 0.5:
        background = tuple(int(c) for c in PALETTE[int(rng.integers(len(PALETTE)))])
    else:
        background = tuple(int(c) for c in rng.integers(0, 256, size=3))
    text = ""
    if kind == "text":
        if rng.random() < 0.3:
            text = _TITLES[int(rng.integers(len(_TITLES)))]
        else:
            text = "".join(rng.choice(list(_ALPHABET), size=int(rng.integers(3, 15)))).strip() or "A"
    return Shot(kind, num_frames, background, text=text, speed=float(rng.uniform(2.0, 8.0)))


def synthetic_frames(
    count: int, seed: int, sizes: Sequence[tuple[int, int]] = DEMO_VAE_SIZES
) -> list[np.ndarray]:
    """``count`` RGB uint8 frames [H, W, 3] of random synthetic shots (kind, colour, text, time), sizes cycling."""
    from curation.samples import render_frame

    rng = np.random.default_rng(seed)
    frames = []
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        shot = _random_shot(rng)
        frames.append(render_frame(shot, int(rng.integers(0, 400)), width, height))
    return frames


def to_tensor(frames: Sequence[np.ndarray]):
    """uint8 [H, W, 3] frames of one size -> float [N, 3, H, W] in [-1, 1]."""
    import torch

    array = np.stack(list(frames)).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def psnr(reference, reconstruction) -> float:
    """PSNR in dB of images in [-1, 1] measured on the [0, 1] scale, over the pooled squared error."""
    import torch

    ref = (reference.float().clamp(-1, 1) + 1) / 2
    rec = (reconstruction.float().clamp(-1, 1) + 1) / 2
    mse = torch.mean((ref - rec) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _random_crops(pool, batch: int, crop: tuple[int, int], rng: np.random.Generator):
    """``batch`` random crops of size ``crop`` from a list of [3, H, W] tensors (H, W >= crop)."""
    import torch

    ch, cw = crop
    out = []
    for k in rng.integers(0, len(pool), size=batch):
        image = pool[int(k)]
        _, h, w = image.shape
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        patch = image[:, y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            patch = patch.flip(-1)
        out.append(patch)
    return torch.stack(out)


def make_demo_autoencoder(
    block_out_channels: Sequence[int] = (16, 32, 32, 32), latent_channels: int = 4, norm_num_groups: int = 8
):
    """An untrained diffusers ``AutoencoderKL`` with the demo's geometry (8x with 4 blocks)."""
    from models.tiny import small_autoencoder_kl

    return small_autoencoder_kl(block_out_channels, latent_channels, norm_num_groups, sample_size=64, scaling_factor=1.0)


# Convolution taps that average: the centre of a 3x3 kernel (a copy), and a 2x2 window.
_CENTER_TAP = ((1, 1),)
_AVERAGE_2X2 = ((0, 0), (0, 1), (1, 0), (1, 1))


def box_filter_init_(model, bias: float = 10.0, shift: float = 12.0) -> None:
    """Set ``model``'s weights so that it is an 8x box-filter autoencoder: a warm start that training then sharpens.

    The encoder averages each 8x8 patch into latent channels 0-2 (RGB), the decoder repeats it back (nearest).
    Every residual branch and attention output starts at zero (identity blocks); down-samplers average 2x2, up-samplers
    copy. The only non-linear parts on the path are the output GroupNorm + SiLU of encoder and decoder: a GroupNorm
    over a flat picture would erase its colour, so the signal rides in the group with +-``bias`` constant channels
    (whose statistics dominate and never change) and its negation (so it shifts no mean), and enters the SiLU at
    +``shift``, where SiLU is the identity to 1e-4. Requires ``norm_num_groups == 1``.
    """
    import torch

    cfg = model.config
    if cfg.norm_num_groups != 1:
        raise ValueError("box_filter_init_ needs norm_num_groups=1")
    rgb = cfg.in_channels
    latent = cfg.latent_channels

    enc, dec = model.encoder, model.decoder
    with torch.no_grad():
        # Encoder: RGB in, each 8x8 patch's mean out in latent channels 0-2; down-sampler pad is bottom/right.
        _box_filter_coder_(enc, enc.down_blocks, "downsamplers", _AVERAGE_2X2, rgb, rgb, bias, shift)
        enc.conv_out.bias[latent:] = -10.0  # log-variance: a nearly deterministic posterior, as a trained SD VAE's
        _embed_(model.quant_conv)
        _embed_(model.post_quant_conv)

        # Decoder: latent in, up-samplers copy (nearest), RGB out of channels 0-2.
        _box_filter_coder_(dec, dec.up_blocks, "upsamplers", _CENTER_TAP, latent, rgb, bias, shift)


def _box_filter_coder_(coder, blocks, resamplers: str, taps, n_signal: int, n_out: int, bias: float, shift: float):
    """One half (encoder or decoder) of :func:`box_filter_init_`: carry ``n_signal`` channels through unchanged.

    ``conv_in`` writes the signal, its negation and +-``bias`` constants; every resnet and attention is an identity;
    each block's ``resamplers`` convolution averages ``taps``; the output GroupNorm is undone and ``conv_out`` reads
    the first ``n_out`` signal channels back from +``shift``.
    """
    _signal_in_(coder.conv_in, n_signal, bias)
    carried = coder.conv_in.out_channels
    _mid_identity_(coder.mid_block)
    for block in blocks:
        for res in block.resnets:
            _resnet_identity_(res)
            carried = min(carried, res.out_channels)
        for resampler in getattr(block, resamplers) or []:
            _embed_(resampler.conv, taps=taps)
    _norm_out_(coder.conv_norm_out, carried, n_signal, bias, shift)
    _zero_(coder.conv_out)
    for i in range(n_out):
        coder.conv_out.weight[i, i, 1, 1] = 1.0
        coder.conv_out.bias[i] = -shift


def _zero_(module) -> None:
    from torch import nn

    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _embed_(conv, taps=_CENTER_TAP) -> None:
    """Identity on the channels ``conv`` shares between input and output (per tap weight 1/len(taps))."""
    _zero_(conv)
    n = min(conv.in_channels, conv.out_channels)
    for i in range(n):
        for ky, kx in taps:
            if conv.kernel_size == (1, 1):
                conv.weight[i, i, 0, 0] = 1.0
            else:
                conv.weight[i, i, ky, kx] = 1.0 / len(taps)


def _signal_in_(conv, n_in: int, bias: float) -> None:
    """Channel i = x_i, channel n_in+i = -x_i, the rest alternate +-``bias`` (center tap)."""
    _zero_(conv)
    for i in range(n_in):
        conv.weight[i, i, 1, 1] = 1.0
        conv.weight[n_in + i, i, 1, 1] = -1.0
    for k, c in enumerate(range(2 * n_in, conv.out_channels)):
        conv.bias[c] = bias if k % 2 == 0 else -bias


def _norm_out_(norm, carried: int, n_sig: int, bias: float, shift: float) -> None:
    """Undo the GroupNorm on the signal channels and add +``shift``."""
    n_const = carried - 2 * n_sig
    n_const -= n_const % 2  # only balanced pairs were written
    sigma = bias * (n_const / norm.num_channels) ** 0.5
    _zero_(norm)
    norm.weight[:n_sig] = sigma
    norm.bias[:n_sig] = shift


def _resnet_identity_(block) -> None:
    _zero_(block.conv2)
    if block.conv_shortcut is not None:
        _embed_(block.conv_shortcut)


def _mid_identity_(mid) -> None:
    for block in mid.resnets:
        _resnet_identity_(block)
    for attn in mid.attentions:
        _zero_(attn.to_out[0])


def train_demo_autoencoder(
    steps: int = 0,
    batch_size: int = 8,
    crop: tuple[int, int] = (32, 32),
    lr: float = 5e-5,
    kl_weight: float = 1e-6,
    num_train_frames: int = 480,
    block_out_channels: Sequence[int] = (16, 32, 32, 32),
    seed: int = 0,
    num_threads: int = 2,
    log_every: int = 0,
):
    """The demo autoencoder, in memory: box-filter init, ``steps`` of fine-tuning, ``scaling_factor`` calibrated.

    ``steps=0`` (the default) skips fine-tuning: on this project's 2-core CPU budget (~90 s, a few hundred steps) the
    L1 fine-tuning measured no gain over the box-filter start (21.6 dB -> 21.6 dB at lr 5e-5; larger learning rates
    first lose quality), so the demo ships the exact init. The loop stays for longer runs (e.g. on a GPU).
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            model = make_demo_autoencoder(block_out_channels, norm_num_groups=1)
            box_filter_init_(model)  # start from an 8x box-filter autoencoder (~21 dB), which training sharpens
            model = model.to(memory_format=torch.channels_last).train()

            frames = synthetic_frames(num_train_frames if steps else 16 * len(DEMO_VAE_SIZES), seed=seed)
            pool = [to_tensor([f])[0] for f in frames]
            optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
            warmup = max(1, steps // 20)

            def lr_factor(s: int) -> float:  # linear warm-up, then cosine down to 5%
                cosine = 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
                return min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * cosine)

            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
            for step in range(steps):
                x = _random_crops(pool, batch_size, crop, rng).contiguous(memory_format=torch.channels_last)
                posterior = model.encode(x).latent_dist
                z = posterior.sample()
                y = model.decode(z).sample
                rec = (y - x).abs().mean()
                loss = rec + kl_weight * posterior.kl().mean() / (crop[0] * crop[1])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                if log_every and (step % log_every == 0 or step == steps - 1):
                    print(f"step {step} l1 {rec.item():.4f}", flush=True)
            model = model.to(memory_format=torch.contiguous_format).eval()

            # Calibrate the scaling factor (cf. 0.18215 for SD) so scaled latents have unit std on the training frames.
            with torch.no_grad():
                latents = []
                for size in DEMO_VAE_SIZES:
                    group = [f for f in frames if f.shape[:2] == size][:16]
                    if group:
                        latents.append(model.encode(to_tensor(group)).latent_dist.mean.flatten())
                std = torch.cat(latents).std().item()
            model.register_to_config(scaling_factor=round(1.0 / std, 5))
            return model
    finally:
        torch.set_num_threads(previous_threads)


def build_demo_vae(dest_dir: str | Path, seed: int = 0, **train_kwargs) -> Path:
    """Train the demo VAE (see :func:`train_demo_autoencoder`) and save it as a diffusers folder at ``dest_dir``.

    Writes into ``dest_dir`` directly; callers that share a cache (``training.build.tiny_encoder_paths``) build into a
    temporary folder and rename it into place.
    """
    model = train_demo_autoencoder(seed=seed, **train_kwargs)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    return dest
