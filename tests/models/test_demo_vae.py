"""The demo VAE: a tiny diffusers AutoencoderKL that reconstructs synthetic frames, cached per OPENSORA_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.demo_vae import build_demo_vae, psnr, synthetic_frames, to_tensor
from models.vae import VideoAutoencoderKL

HELD_OUT_SEED = 12345  # the build renders its calibration frames from seed 0


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_vae(tmp_path_factory.mktemp("demo-vae"))


@pytest.fixture(scope="module")
def vae(demo_dir: Path) -> VideoAutoencoderKL:
    return VideoAutoencoderKL(demo_dir, micro_batch_size=8).eval().requires_grad_(False)


@pytest.mark.parametrize(("size", "floor"), [((96, 160), 21.0), ((48, 80), 19.5)])
def test_held_out_frames_reconstruct(vae: VideoAutoencoderKL, size: tuple[int, int], floor: float) -> None:
    # Measured: 21.6 dB at 96x160, 20.1 dB at 48x80 (an 8x box-filter autoencoder; the target is 25 dB).
    frames = to_tensor(synthetic_frames(24, seed=HELD_OUT_SEED, sizes=[size]))
    with torch.no_grad():
        module = vae.module
        recon = module.decode(module.encode(frames).latent_dist.mode()).sample
    assert psnr(frames, recon) >= floor


def test_random_tiny_vae_does_not_reconstruct(tmp_path: Path) -> None:
    from models.tiny import build_tiny_vae

    random_vae = VideoAutoencoderKL(build_tiny_vae(tmp_path / "random"), micro_batch_size=None).eval()
    frames = to_tensor(synthetic_frames(8, seed=HELD_OUT_SEED, sizes=[(48, 80)]))
    with torch.no_grad():
        recon = random_vae.module.decode(random_vae.module.encode(frames).latent_dist.mode()).sample
    assert psnr(frames, recon) < 15.0


def test_video_round_trip_through_the_project_loader(vae: VideoAutoencoderKL) -> None:
    frames = synthetic_frames(6, seed=HELD_OUT_SEED + 1, sizes=[(48, 80)])
    video = to_tensor(frames).reshape(2, 3, 3, 48, 80).permute(0, 2, 1, 3, 4)  # [B=2, C, T=3, H, W]
    assert vae.patch_size == (1, 8, 8) and vae.out_channels == 4
    with torch.no_grad():
        latents = vae.encode(video, generator=torch.Generator().manual_seed(0))
        assert latents.shape == (2, 4, 3, 6, 10)
        recon = vae.decode(latents)
    assert recon.shape == video.shape
    assert psnr(video, recon) >= 19.0
    # scaling_factor is calibrated so that scaled latents have (about) unit std, as 0.18215 does for SD.
    assert 0.6 < vae.encode_mode(video).std().item() < 1.6


def test_build_is_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    assert set(_files(demo_dir)) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert _files(build_demo_vae(tmp_path / "again")) == _files(demo_dir)
    # The optional fine-tuning loop is seeded too.
    a = _files(build_demo_vae(tmp_path / "a", steps=2, num_train_frames=10))
    assert a == _files(build_demo_vae(tmp_path / "b", steps=2, num_train_frames=10))
    assert a["diffusion_pytorch_model.safetensors"] != _files(demo_dir)["diffusion_pytorch_model.safetensors"]
