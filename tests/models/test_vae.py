"""VideoAutoencoderKL on a tiny random 8x AutoencoderKL: layout, scaling, micro-batching, posterior sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.tiny import build_tiny_vae
from models.vae import VideoAutoencoderKL

SCALE = 0.18215  # passed explicitly below: the tiny VAE's own config carries a calibrated factor


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def vae(vae_dir: Path) -> VideoAutoencoderKL:
    return VideoAutoencoderKL(vae_dir, micro_batch_size=4, scaling_factor=SCALE).eval()


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 3, 32, 48, generator=generator) * 2 - 1  # [B, 3, T, H, W] in [-1, 1]


@torch.no_grad()
def test_shapes_and_latent_size(vae: VideoAutoencoderKL, video: torch.Tensor) -> None:
    assert vae.patch_size == (1, 8, 8) and vae.out_channels == 4
    z = vae.encode(video)
    assert z.shape == (2, 4, 3, 4, 6)
    assert vae.decode(z).shape == video.shape
    assert vae.get_latent_size([3, 32, 48]) == list(z.shape[2:])
    assert vae.get_latent_size([16, 240, 426]) == [16, 30, 53]
    assert vae.get_latent_size([None, 64, 64]) == [None, 8, 8]


@torch.no_grad()
def test_frames_are_encoded_independently_and_scaled(vae: VideoAutoencoderKL, video: torch.Tensor) -> None:
    """Latent frame (b, t) is the image VAE's posterior mode of pixel frame (b, t), times 0.18215."""
    z = vae.encode_mode(video)
    for b, t in [(0, 0), (1, 1), (1, 2)]:
        expected = vae.module.encode(video[b : b + 1, :, t]).latent_dist.mode() * SCALE
        torch.testing.assert_close(z[b : b + 1, :, t], expected, atol=1e-5, rtol=1e-5)
    decoded = vae.decode(z)
    expected = vae.module.decode(z[1:2, :, 2] / SCALE).sample
    torch.testing.assert_close(decoded[1:2, :, 2], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_micro_batch_sizes_agree(vae_dir: Path, video: torch.Tensor) -> None:
    """1, 4 (chunks of 4 + 2) and all 6 frames per call give the same latents and reconstructions."""
    results = []
    for micro_batch_size in (1, 4, None):
        model = VideoAutoencoderKL(vae_dir, micro_batch_size=micro_batch_size, scaling_factor=SCALE).eval()
        z = model.encode_mode(video)
        results.append((z, model.decode(z)))
    for z, x in results[1:]:
        torch.testing.assert_close(z, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x, results[0][1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mode_round_trip_is_deterministic(vae: VideoAutoencoderKL, video: torch.Tensor) -> None:
    first = vae.decode(vae.encode_mode(video))
    second = vae.decode(vae.encode_mode(video))
    assert torch.equal(first, second)
    assert torch.isfinite(first).all()


@torch.no_grad()
def test_posterior_sampling(vae_dir: Path, video: torch.Tensor) -> None:
    """Samples are mean + std * noise with one noise draw over all frames: seeded, micro-batch independent."""
    samples = []
    for micro_batch_size in (1, 4, None):
        model = VideoAutoencoderKL(vae_dir, micro_batch_size=micro_batch_size, scaling_factor=SCALE).eval()
        samples.append(model.encode(video, sample=True, generator=torch.Generator().manual_seed(7)))
    for z in samples[1:]:
        torch.testing.assert_close(z, samples[0], atol=1e-5, rtol=1e-5)

    model = VideoAutoencoderKL(vae_dir, micro_batch_size=None).eval()
    frames = video.permute(0, 2, 1, 3, 4).reshape(6, 3, 32, 48)
    posterior = model.module.encode(frames).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    expected = ((posterior.mean + posterior.std * noise) * SCALE).reshape(2, 3, 4, 4, 6).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(samples[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(samples[0], model.encode_mode(video))


@torch.no_grad()
def test_model_instance_and_folder_agree(vae_dir: Path, vae: VideoAutoencoderKL, video: torch.Tensor) -> None:
    from diffusers import AutoencoderKL

    wrapped = VideoAutoencoderKL(AutoencoderKL.from_pretrained(vae_dir), micro_batch_size=2, scaling_factor=SCALE).eval()
    torch.testing.assert_close(wrapped.encode_mode(video), vae.encode_mode(video), atol=1e-5, rtol=1e-5)


def test_bad_inputs(vae_dir: Path, vae: VideoAutoencoderKL) -> None:
    with pytest.raises(ValueError, match="video"):
        vae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="micro_batch_size"):
        VideoAutoencoderKL(vae_dir, micro_batch_size=-1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        VideoAutoencoderKL(vae_dir / "missing")
