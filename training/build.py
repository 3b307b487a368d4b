"""Construction: the dataset a run reads, the frozen encoders, the model, its diffusion objective and the booster
(parallelism plugin + optimizer). ``training.train`` and the encoder cache both build from here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.distributed import Dist

if TYPE_CHECKING:  # the config needs pydantic and PyYAML; building needs only torch
    from training.config import TrainConfig


def resolve_dataset(dataset: str, home: str | None = None) -> tuple[Path, str]:
    """``--dataset`` as a path (``s3://`` too: a cached local copy), or a version id under
    ``$OPENSORA_HOME/lake/datasets``; returns (path, version)."""
    from common.storage import DATASETS, local_media_path, opensora_home

    path = local_media_path(dataset)  # an s3:// version folder or table: its cached local copy
    if path.exists():
        version = path.name if path.is_dir() else path.stem
        manifest = (path if path.is_dir() else path.parent) / "manifest.json"
        if manifest.is_file():
            version = json.loads(manifest.read_text()).get("version", version)
        return path, version
    candidate = opensora_home(home).joinpath(*DATASETS, dataset)
    if candidate.is_dir():
        return candidate, dataset
    raise FileNotFoundError(f"dataset {dataset!r} is neither a path nor a version under {candidate.parent}")


def tiny_encoder_paths(cfg: TrainConfig, build: bool) -> tuple[str | None, str | None]:
    """Encoder folders; when the config asks for tiny ones (demo only), ``build`` makes them if missing: a random
    T5 (``models.tiny``) and the demo VAE (``models.demo_vae``: an autoencoder that reconstructs the synthetic world,
    so that a diffusion model trained on its latents can decode to a picture).

    Building writes into a temporary folder renamed into place, under a file lock, so concurrent runs sharing
    ``OPENSORA_HOME`` never see half a folder; later runs reuse it (built once per home).
    """
    t5_path, vae_path = cfg.encoders.text_encoder, cfg.encoders.vae
    if not cfg.encoders.build_tiny_if_missing:
        return t5_path, vae_path
    from common.storage import opensora_home

    tiny_root = opensora_home() / "models"
    if build:
        import fcntl

        from common.files import atomic_dir
        from models.demo_vae import build_demo_vae
        from models.tiny import build_tiny_t5

        tiny_root.mkdir(parents=True, exist_ok=True)
        with open(tiny_root / ".build.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name, builder, wanted in (("tiny-t5", build_tiny_t5, not t5_path), ("demo-vae", build_demo_vae, not vae_path)):
                target = tiny_root / name
                if wanted and not (target / "config.json").is_file():
                    with atomic_dir(target) as tmp:  # a half-built folder never appears under the real name
                        builder(tmp)
    return t5_path or str(tiny_root / "tiny-t5"), vae_path or str(tiny_root / "demo-vae")


def load_encoders(cfg: TrainConfig, device: torch.device, dist: "Dist | None" = None, memoize: bool = False):
    """The frozen T5 text encoder and VAE from local folders (tiny random ones only when the demo asks).

    Under torchrun only rank 0 builds missing tiny encoders; the other ranks wait for it at a barrier.
    ``memoize``: give both encoders the memo of ``encoders.memo_mb`` (the training loop, which meets the same
    frames every epoch; evaluation and the encoder cache encode each input once and keep batched encoding).
    """
    from models.text_encoder import T5TextEncoder
    from models.vae import VideoAutoencoderKL

    main_rank = dist is None or dist.is_main
    t5_path, vae_path = tiny_encoder_paths(cfg, build=main_rank)
    if dist is not None:
        dist.barrier()
    if not t5_path or not vae_path:
        raise ValueError("encoders.text_encoder and encoders.vae must name local folders (T5 and SD-VAE weights)")
    text_encoder = T5TextEncoder(t5_path, model_max_length=cfg.encoders.model_max_length, device=device)
    vae = VideoAutoencoderKL(vae_path, micro_batch_size=cfg.encoders.vae_micro_batch_size).to(device).eval().requires_grad_(False)
    if memoize and cfg.encoders.memo_mb:
        from models.memo import EncoderMemo

        text_encoder.memo = vae.memo = EncoderMemo(cfg.encoders.memo_mb * 2**20)  # one budget for both
    return text_encoder, vae, {"text_encoder": t5_path, "vae": vae_path}


def build_model(cfg: TrainConfig, caption_channels: int):
    from models.stdit2 import STDiT2
    from models.stdit2_config import stdit2_config

    # The preset, the config's overrides, then what the run fixes (the text encoder's width and length).
    config = stdit2_config(cfg.model.preset, **{
        **cfg.model.overrides,
        "caption_channels": caption_channels,
        "model_max_length": cfg.encoders.model_max_length,
        "qk_norm_legacy": cfg.model.qk_norm_legacy,
        "grad_checkpointing": cfg.model.grad_checkpointing,
    })
    model = STDiT2(config)
    if cfg.model.from_pretrained:
        from models.checkpoint_io import load_stdit2_weights

        load_stdit2_weights(model, cfg.model.from_pretrained)
    return model, config


def build_scheduler(objective: str, rflow_timestep_shift: bool = True):
    """The training objective's scheduler, through the one factory (``models.schedulers.build_scheduler``): IDDPM
    over all 1000 steps, or rectified flow with (by default) its resolution/length-aware timestep shift."""
    from models.schedulers import build_scheduler as scheduler_named

    if objective == "iddpm":
        return scheduler_named("iddpm", timestep_respacing="")
    return scheduler_named("rflow", use_timestep_transform=rflow_timestep_shift)


def build_booster(cfg: TrainConfig, dist: Dist, model: torch.nn.Module):
    """ZeRO-2 + HybridAdam on CUDA; TorchDDP + AdamW on CPU (LowLevelZero asserts CUDA)."""
    from colossalai.booster import Booster
    from colossalai.booster.plugin import LowLevelZeroPlugin, TorchDDPPlugin

    use_zero = cfg.plugin == "zero2" or (cfg.plugin == "auto" and dist.device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    if use_zero:
        from colossalai.nn.optimizer import HybridAdam

        plugin = LowLevelZeroPlugin(stage=2, precision=cfg.precision, initial_scale=2**16, max_norm=cfg.optim.grad_clip)
        optimizer = HybridAdam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas, eps=cfg.optim.eps, adamw_mode=True)
    else:
        plugin = TorchDDPPlugin(find_unused_parameters=True)
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas, eps=cfg.optim.eps)
    booster = Booster(plugin=plugin)
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer, use_zero


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "unwrap") and callable(model.unwrap):
        inner = model.unwrap()
        if inner is model:
            break
        model = inner
    return getattr(model, "module", model)


@torch.no_grad()
def encode_batch(batch: dict[str, Any], text_encoder, vae, device: torch.device, generator: torch.Generator | None = None) -> dict[str, Any]:
    """VAE latents (posterior sample drawn from ``generator``, or the mode without one) and T5 embeddings."""
    video = batch["video"].to(device)
    x = vae.encode(video, generator=generator) if generator is not None else vae.encode_mode(video)
    text = text_encoder.encode(batch["text"])
    return {
        "x": x,
        "y": text["y"].to(device),
        "mask": text["mask"].to(device),
        "model_kwargs": {k: batch[k].to(device) for k in ("num_frames", "height", "width", "ar", "fps")},
    }
