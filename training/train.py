"""Train STDiT2 on a dataset version: the torchrun entry point and ``opensora-dag train``.

    opensora-dag train PRESET --dataset VERSION|PATH [--nproc N] [--steps N] [--ckpt-every K] [--outdir DIR] [--resume [RUN]]

Run with ``--nproc N`` (or under ``torchrun`` directly) it trains on N processes through a ColossalAI ``Booster``:
``LowLevelZeroPlugin(stage=2)`` in bf16 on CUDA, ``TorchDDPPlugin`` over gloo on CPU. Every source of randomness in
a step (timesteps, noise, frame masks, caption dropout) comes from a generator seeded by (seed, step, rank), and the
sampler saves its position, so a run killed at any point and resumed from its last checkpoint continues with the
same losses as one that never stopped (bitwise on CPU).

Every run trains in its own folder ``<outdir>/run-NNN`` and holds its lease while it runs (training/checkpoint.py):
without ``--resume`` a new run starts; ``--resume`` continues the newest run (``--resume RUN`` a named one) and is
refused while another live process trains it. A run that cannot start as asked exits with status 2 and says why.

Under Dagster (``DAGSTER_PIPES_CONTEXT`` set by the launcher) rank 0 reports progress and the final
materialization through dagster-pipes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the config needs pydantic and PyYAML; the building blocks here need only torch
    from training.config import TrainConfig

NULL_SEED_OFFSET = 7919  # validation noise: fixed, and different from every training step's seed


# --------------------------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if torch.distributed.is_initialized() and self.world_size > 1:
            torch.distributed.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> Dist:
    """Join the torchrun world (or make a world of one), gloo on CPU and nccl on CUDA."""
    import colossalai

    if "RANK" not in os.environ:  # plain `python -m training.train`: a world of one
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        colossalai.launch_from_torch(backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1))
    return gen


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------
def resolve_dataset(dataset: str, opensora_home: str | None = None) -> tuple[Path, str]:
    """``--dataset`` as a path (``s3://`` too: a cached local copy), or a version id under
    ``$OPENSORA_HOME/lake/datasets``; returns (path, version)."""
    from resources.storage import local_media_path

    path = local_media_path(dataset)  # an s3:// version folder or table: its cached local copy
    if path.exists():
        version = path.name if path.is_dir() else path.stem
        manifest = (path if path.is_dir() else path.parent) / "manifest.json"
        if manifest.is_file():
            version = json.loads(manifest.read_text()).get("version", version)
        return path, version
    home = Path(opensora_home or os.environ.get("OPENSORA_HOME", ".opensora"))
    candidate = home / "lake" / "datasets" / dataset
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
    tiny_root = Path(os.environ.get("OPENSORA_HOME", ".opensora")).resolve() / "models"
    if build:
        import fcntl
        import shutil

        from models.demo_vae import build_demo_vae
        from models.tiny import build_tiny_t5

        tiny_root.mkdir(parents=True, exist_ok=True)
        with open(tiny_root / ".build.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name, builder, wanted in (("tiny-t5", build_tiny_t5, not t5_path), ("demo-vae", build_demo_vae, not vae_path)):
                target = tiny_root / name
                if wanted and not (target / "config.json").is_file():
                    tmp = tiny_root / f".{name}.{os.getpid()}.tmp"
                    shutil.rmtree(tmp, ignore_errors=True)
                    builder(tmp)
                    shutil.rmtree(target, ignore_errors=True)
                    tmp.rename(target)
    return t5_path or str(tiny_root / "tiny-t5"), vae_path or str(tiny_root / "demo-vae")


def load_encoders(cfg: TrainConfig, device: torch.device, dist: "Dist | None" = None):
    """The frozen T5 text encoder and VAE from local folders (tiny random ones only when the demo asks).

    Under torchrun only rank 0 builds missing tiny encoders; the other ranks wait for it at a barrier.
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
    return text_encoder, vae, {"text_encoder": t5_path, "vae": vae_path}


def build_model(cfg: TrainConfig, caption_channels: int):
    from models.stdit2 import STDIT2_PRESETS, STDiT2, STDiT2Config

    if cfg.model.preset not in STDIT2_PRESETS:
        raise ValueError(f"unknown model preset {cfg.model.preset!r}; choose one of {sorted(STDIT2_PRESETS)}")
    base = STDIT2_PRESETS[cfg.model.preset].to_dict()
    base.update(cfg.model.overrides)
    base.update(
        caption_channels=caption_channels,
        model_max_length=cfg.encoders.model_max_length,
        qk_norm_legacy=cfg.model.qk_norm_legacy,
        grad_checkpointing=cfg.model.grad_checkpointing,
    )
    config = STDiT2Config.from_dict(base)
    model = STDiT2(config)
    if cfg.model.from_pretrained:
        from models.checkpoint_io import load_stdit2_weights

        load_stdit2_weights(model, cfg.model.from_pretrained)
    return model, config


def build_scheduler(objective: str, rflow_timestep_shift: bool = True):
    if objective == "iddpm":
        from models.schedulers.iddpm import IDDPM

        return IDDPM(timestep_respacing="")
    from models.schedulers.rectified_flow import RectifiedFlow

    return RectifiedFlow(use_timestep_transform=rflow_timestep_shift)


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
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    source = dict(model.named_parameters())
    for name, param in ema.named_parameters():
        if name in source:
            param.mul_(decay).add_(source[name].detach().float(), alpha=1 - decay)


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


def diffusion_loss(scheduler, objective: str, model, enc: dict[str, Any], x_mask, gen: torch.Generator, drop_ids=None, t=None, noise=None):
    """Per-sample training loss [B] of ``model`` on an encoded batch."""
    x = enc["x"]
    if noise is None:
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    kwargs = dict(enc["model_kwargs"], y=enc["y"], mask=enc["mask"])
    if drop_ids is not None:
        kwargs["force_drop_ids"] = drop_ids
    if objective == "iddpm":
        if t is None:
            t = scheduler.sample_timesteps(x.shape[0], device=x.device, generator=gen)
        return scheduler.training_losses(model, x, t, model_kwargs=kwargs, noise=noise, mask=x_mask)["loss"]
    if t is None:
        t = scheduler.sample_timesteps(x.shape[0], enc["model_kwargs"], device=x.device, generator=gen)
    return scheduler.training_losses(model, x, t, model_kwargs=kwargs, noise=noise, mask=x_mask)["loss"]


def train_step(
    cfg: TrainConfig, dist: Dist, model, booster, optimizer, scheduler, mask_generator, enc: dict[str, Any],
    gen: torch.Generator, step: int, class_dropout_prob: float, use_zero: bool, ema: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, float | None, float]:
    """One optimizer step on an encoded batch: frame masks and caption dropout from ``gen``, the loss under autocast,
    backward through the booster, clipping (ZeRO clips inside its optimizer), warmup lr, step, EMA.

    Returns (loss, grad norm or None under ZeRO, lr). ``step`` counts the steps already taken.
    """
    # MaskGenerator draws on the CPU, which a CUDA generator cannot do: there it gets a CPU one seeded from ``gen``
    mask_gen = gen if gen.device.type == "cpu" else torch.Generator().manual_seed(gen.initial_seed())
    x_mask = mask_generator.get_masks(enc["x"], generator=mask_gen)
    drop = (torch.rand(enc["x"].shape[0], generator=gen, device=dist.device) < class_dropout_prob).long()
    with autocast(cfg, dist):
        loss = diffusion_loss(scheduler, cfg.objective, model, enc, x_mask, gen, drop_ids=drop).mean()
    booster.backward(loss, optimizer)
    grad_norm = None
    if not use_zero:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), cfg.optim.grad_clip))
    lr = cfg.optim.lr * min(1.0, (step + 1) / cfg.optim.warmup_steps) if cfg.optim.warmup_steps else cfg.optim.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad()
    if ema is not None:
        update_ema(ema, unwrap(model), cfg.optim.ema_decay)
    return loss, grad_norm, lr


def bucket_name(model_kwargs: dict[str, Any]) -> str:
    t, h, w = int(model_kwargs["num_frames"][0]), int(model_kwargs["height"][0]), int(model_kwargs["width"][0])
    return f"{t}x{h}x{w}"


# --------------------------------------------------------------------------------------------------------------
# Validation: held-out clips at fixed timesteps and fixed noise, per bucket
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ValidationSet:
    batches: list[dict[str, Any]]  # encoded, on device

    def __len__(self) -> int:
        return len(self.batches)


def build_validation_set(
    rows, bucket, frame_interval: int, seed: int, text_encoder, vae, dist: Dist, max_samples: int, cache_dir: Path | None = None
) -> ValidationSet:
    """Encoded held-out batches (posterior mode: deterministic), from the encoders or from an encoder cache."""
    from training.buckets import VariableVideoBatchSampler
    from training.data import VideoTextDataset, collate

    if len(rows) == 0:
        return ValidationSet([])
    sampler = VariableVideoBatchSampler(rows, bucket, frame_interval, num_replicas=1, rank=0, seed=seed, shuffle=False)
    if cache_dir is not None:
        from training.encoder_cache import CachedLatentDataset, cached_batch_to_device, collate_cached

        dataset, collate_fn = CachedLatentDataset(rows, cache_dir), collate_cached
        encode = lambda b: cached_batch_to_device(b, dist.device)  # noqa: E731
    else:
        dataset, collate_fn = VideoTextDataset(rows, frame_interval, seed), collate
        encode = lambda b: encode_batch(b, text_encoder, vae, dist.device)  # noqa: E731
    batches, seen = [], 0
    for indices in sampler:
        enc = encode(collate_fn([dataset[i] for i in indices]))
        enc["bucket"] = bucket_name(enc["model_kwargs"])
        batches.append(enc)
        seen += len(indices)
        if seen >= max_samples:
            break
    return ValidationSet(batches)


@torch.no_grad()
def validation_losses(model, scheduler, objective: str, val: ValidationSet, num_timesteps: int, seed: int, null_caption: bool = False) -> dict[str, float]:
    """Mean loss per bucket (and ``all``) at ``num_timesteps`` evenly spaced timesteps with fixed noise."""
    if not len(val):
        return {}
    was_training = model.training
    model.eval()
    total = scheduler.num_timesteps
    grid = [int((i + 0.5) * total / num_timesteps) for i in range(num_timesteps)]
    per_bucket: dict[str, list[float]] = {}
    for index, enc in enumerate(val.batches):
        x = enc["x"]
        gen = step_generator(seed + NULL_SEED_OFFSET, index, 0, x.device)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        drop = torch.ones(x.shape[0], dtype=torch.long, device=x.device) if null_caption else None
        for t_value in grid:
            t = torch.full((x.shape[0],), t_value, device=x.device, dtype=torch.long if objective == "iddpm" else x.dtype)
            loss = diffusion_loss(scheduler, objective, model, enc, None, gen, drop_ids=drop, t=t, noise=noise)
            per_bucket.setdefault(enc["bucket"], []).extend(loss.float().tolist())
    model.train(was_training)
    out = {f"val_loss/{b}": sum(v) / len(v) for b, v in per_bucket.items()}
    every = [x for v in per_bucket.values() for x in v]
    out["val_loss"] = sum(every) / len(every)
    return out


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    outdir: str
    """The run folder (``<root>/run-NNN``)."""
    final_checkpoint: str
    steps: int
    mlflow_run_id: str | None
    mlflow_run_url: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    bucket_report: dict[str, Any] = field(default_factory=dict)
    mlflow_not_logged: str | None = None
    """What MLflow did not get (it was failing), in words; None when it got everything."""


def broadcast_object(obj: Any, dist: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if dist.world_size > 1:
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj


def all_ranks(ok: bool, dist: Dist) -> bool:
    """True when ``ok`` holds on every rank."""
    if dist.world_size > 1:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
    return ok


def train(
    cfg: TrainConfig,
    dataset: str,
    outdir: str | Path,
    resume: bool | str | None = None,
    tracking_uri: str | None = None,
    log=print,
) -> TrainResult:
    """Train in a run folder under ``outdir``: a new ``run-NNN`` unless ``resume`` says which run to continue
    (True or "latest": the newest; "auto": the newest if unfinished and not held, else a new one; a name or path).

    Raises :class:`training.checkpoint.ResumeError` (on every rank) when the run cannot be started as asked.
    """
    from training import checkpoint as ckpt

    # 1. Processes, seeds, the run folder and its lease (rank 0 decides and holds the lease; every rank follows)
    dist = setup_distributed()
    torch.manual_seed(cfg.seed)
    say = log if dist.is_main else (lambda *_: None)
    lease, decision = None, {}
    if dist.is_main:
        try:
            run_dir, lease = ckpt.open_run(Path(outdir), resume, log=say)
            lease.heartbeat()
            ckpt.clean_stale(run_dir)
            decision = {"run_dir": str(run_dir)}
        except ckpt.ResumeError as err:
            decision = {"error": str(err), "busy": isinstance(err, ckpt.RunBusy)}
    decision = broadcast_object(decision, dist)
    if "error" in decision:
        raise (ckpt.RunBusy if decision["busy"] else ckpt.ResumeError)(decision["error"])
    run_dir = Path(decision["run_dir"])
    say(f"run folder {run_dir}")
    try:
        return _train_in_run(cfg, dataset, run_dir, tracking_uri, dist, say, lease)
    finally:
        if lease is not None:
            lease.release()


def _train_in_run(cfg: TrainConfig, dataset: str, run_dir: Path, tracking_uri: str | None, dist: Dist, say, lease) -> TrainResult:
    from training import checkpoint as ckpt
    from training.buckets import Bucket, VariableVideoBatchSampler, bucket_report, load_bucket_preset
    from training.data import VideoTextDataset, collate, load_rows, split_rows
    from training.masks import MaskGenerator
    from training.throughput import ThroughputWindow, device_peak_tflops
    from training.tracking import RunTracker, default_tracking_uri

    # 2. Data: rows, held-out split, buckets, sampler
    dataset_path, dataset_version = resolve_dataset(dataset)
    rows = load_rows(dataset_path)
    train_rows, val_rows = split_rows(rows, cfg.data.val_fraction)
    preset = load_bucket_preset(cfg.data.bucket_preset)
    bucket = Bucket(preset.bucket_config)
    report = bucket_report(train_rows, bucket, preset.frame_interval, cfg.seed)
    if report.num_kept == 0:
        raise ValueError(f"no training sample fits a bucket of preset {cfg.data.bucket_preset!r}:\n{report.to_markdown()}")
    say(f"dataset {dataset_version}: {len(train_rows)} train rows, {len(val_rows)} held out; {report.num_kept} bucketed")
    sampler = VariableVideoBatchSampler(train_rows, bucket, preset.frame_interval, num_replicas=dist.world_size, rank=dist.rank, seed=cfg.seed)
    mask_generator = MaskGenerator(cfg.data.mask_ratios)
    cache_dir = Path(cfg.data.encoder_cache) if cfg.data.encoder_cache else None
    if cache_dir is not None:  # precomputed latents and embeddings: the encoders never load
        from training.encoder_cache import CacheManifest, CachedLatentDataset, cached_batch_to_device, collate_cached, epochs_needed

        manifest = CacheManifest.load(cache_dir / "train")
        manifest.check_compatible(
            seed=cfg.seed, frame_interval=preset.frame_interval, bucket=bucket, model_max_length=cfg.encoders.model_max_length,
            epochs=epochs_needed(train_rows, bucket, preset.frame_interval, cfg.seed, cfg.steps, dist.world_size),
        )
        train_set, collate_fn = CachedLatentDataset(train_rows, cache_dir / "train"), collate_cached
    else:
        train_set, collate_fn = VideoTextDataset(train_rows, preset.frame_interval, cfg.seed), collate

    # 3. Frozen encoders, model, EMA, optimizer through the booster
    if cache_dir is not None:
        text_encoder = vae = None
        encoder_paths, caption_channels = manifest.encoders, manifest.caption_channels
    else:
        text_encoder, vae, encoder_paths = load_encoders(cfg, dist.device, dist)
        caption_channels = text_encoder.output_dim
    model, model_config = build_model(cfg, caption_channels)
    model.to(dist.device)
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    booster, model, optimizer, use_zero = build_booster(cfg, dist, model)
    scheduler = build_scheduler(cfg.objective, cfg.rflow_timestep_shift)
    model.train()

    # 4. Resume: the newest complete checkpoint that loads on every rank, else the one before it
    step, epoch, epoch_step, mlflow_run_id, latest = 0, 0, 0, None, None
    candidates = broadcast_object(ckpt.resume_candidates(run_dir, say) if dist.is_main else None, dist)
    if candidates:
        saved = ckpt.read_state(candidates[0])
        if saved["objective"] != cfg.objective:
            raise ckpt.ResumeError(f"cannot resume from {candidates[0]}: it was trained with {saved['objective']}, the "
                                   f"config says {cfg.objective}; resume with --objective {saved['objective']} or start a new run")
        ckpt.check_model_config(candidates[0], saved.get("model_config"), model_config.to_dict())
    for candidate in candidates:
        why = ""
        try:
            state = ckpt.load_checkpoint(checkpoint=candidate, booster=booster, model=model, optimizer=optimizer, ema=ema,
                                         rank=dist.rank, sharded_optimizer=use_zero)
        except Exception as err:  # noqa: BLE001  (a damaged or refused file: try the previous checkpoint)
            why = f"{type(err).__name__}: {err}"
        if all_ranks(not why, dist):
            latest = candidate
            break
        say(f"warning: could not load checkpoint {candidate} ({why or 'failed on another rank'}); trying the previous one")
    if candidates and latest is None:
        raise ckpt.ResumeError(f"no checkpoint of {run_dir} can be loaded (tried {', '.join(p.name for p in candidates)}); "
                               "start a new run without --resume")
    metrics_path = run_dir / "metrics.jsonl"
    if latest is not None:
        step, epoch, mlflow_run_id = state["step"], state["epoch"], state.get("mlflow_run_id")
        epoch_step, reshard = ckpt.resume_position(state["sampler"], dist.world_size)
        if reshard:
            say(f"warning: {reshard}")
        sampler.load_state_dict(state["sampler"])
        if dist.is_main:
            ckpt.set_aside([p for p in ckpt.list_checkpoints(run_dir) if ckpt.step_of(p) > step], say)
        say(f"resumed from {latest} at step {step}")
    if dist.is_main and metrics_path.is_file():  # steps after the checkpoint are trained again: drop their records
        metrics_path.write_text("".join(f"{line}\n" for line in metrics_path.read_text().splitlines() if _step_of_record(line, step)))

    # 5. Tracking (rank 0 only; MLflow failures are buffered and retried, never fatal)
    tracking_uri = tracking_uri or default_tracking_uri()
    tracker = RunTracker(tracking_uri, run_name=cfg.name, enabled=dist.is_main, run_id=mlflow_run_id, log=say,
                         not_logged_path=run_dir / "mlflow_not_logged.jsonl")
    tracker.start()
    tracker.log_params({"config": cfg.model_dump(mode="json"), "dataset_version": dataset_version, "git_commit": git_commit(), "world_size": dist.world_size, "encoders": encoder_paths})
    tracker.set_tags({"objective": cfg.objective, "dataset_version": dataset_version, "run_folder": str(run_dir)})
    if dist.is_main and latest is None:
        tracker.log_dataset(rows, "curated_dataset", dataset_version, str(dataset_path))
        (run_dir / "bucket_report.md").write_text(report.to_markdown())
        (run_dir / "bucket_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        (run_dir / "config.yaml").write_text(_yaml(cfg.model_dump(mode="json")))
        for name in ("bucket_report.md", "bucket_report.json", "config.yaml"):
            tracker.log_artifact(run_dir / name)

    val = build_validation_set(val_rows, bucket, preset.frame_interval, cfg.seed, text_encoder, vae, dist, cfg.val_max_samples,
                               cache_dir=cache_dir / "val" if cache_dir is not None else None)

    def validate(at_step: int) -> dict[str, float]:
        scores = validation_losses(unwrap(model), scheduler, cfg.objective, val, cfg.val_timesteps, cfg.seed)
        if scores:
            null = validation_losses(unwrap(model), scheduler, cfg.objective, val, cfg.val_timesteps, cfg.seed, null_caption=True)
            scores["val_loss_null_caption"] = null["val_loss"]
            tracker.log_metrics(scores, at_step)
            say(f"step {at_step}: val_loss {scores['val_loss']:.4f} (null caption {scores['val_loss_null_caption']:.4f})")
        return scores

    first_val = validate(step) if latest is None else {}

    def save(at_step: int) -> Path:
        lost = None
        if lease is not None:
            try:
                lease.check()
            except ckpt.LeaseLost as err:
                lost = str(err)
        state = {
            "step": at_step, "epoch": epoch, "sampler": sampler.state_dict(num_steps=epoch_step),
            "objective": cfg.objective, "dataset_version": dataset_version, "dataset_path": str(dataset_path),
            "mlflow_run_id": tracker.run_id, "model_config": model_config.to_dict(), "config": cfg.model_dump(mode="json"),
            "encoders": encoder_paths, "world_size": dist.world_size, "lease_lost": lost,
        }
        state = broadcast_object(state, dist)  # every rank needs the same state; rank 0's run id is the one that counts
        lost = state.pop("lease_lost")
        if lost:
            raise ckpt.LeaseLost(f"{lost}: stopping before writing step {at_step}, so that two trainings never write "
                                 "one run folder")
        return ckpt.save_checkpoint(
            outdir=run_dir, step=at_step, booster=booster, model=model, optimizer=optimizer, ema=ema,
            ema_config=model_config, state=state, rank=dist.rank, barrier=dist.barrier, keep_last=cfg.keep_last, sharded_optimizer=use_zero,
        )

    # 6. Steps
    peak_tflops, peak_source = device_peak_tflops(dist.device)
    say(f"MFU against {peak_tflops} TFLOP/s bf16 ({peak_source})" if peak_tflops else f"MFU not logged: {peak_source}")
    window = ThroughputWindow(peak_tflops=peak_tflops, num_devices=dist.world_size)
    final_metrics: dict[str, float] = {}
    while step < cfg.steps:
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn, num_workers=cfg.data.num_workers)
        for batch in loader:
            gen = step_generator(cfg.seed, step, dist.rank, dist.device)
            if cache_dir is not None:
                enc = cached_batch_to_device(batch, dist.device, generator=gen, vae_dtype=manifest.noise_dtype)
            else:
                enc = encode_batch(batch, text_encoder, vae, dist.device, generator=gen)
            loss, grad_norm, lr = train_step(cfg, dist, model, booster, optimizer, scheduler, mask_generator, enc, gen, step,
                                             model_config.class_dropout_prob, use_zero, ema)
            step += 1
            epoch_step += 1

            # Metrics: the loss averaged over ranks, per bucket, throughput (samples, tokens, model FLOPs, MFU)
            reduced = loss.detach().float().clone()
            if dist.world_size > 1:
                torch.distributed.all_reduce(reduced)
                reduced /= dist.world_size
            text_tokens = float(enc["mask"].sum()) / enc["mask"].shape[0] if enc.get("mask") is not None else None
            window.add(model_config, tuple(enc["x"].shape), text_tokens, replicas=dist.world_size)
            metrics = {"loss": float(reduced), f"loss/{bucket_name(enc['model_kwargs'])}": float(loss.detach()), "lr": lr, "epoch": epoch}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if dist.is_main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"step": step, "loss": float(reduced), "rank0_loss": float(loss.detach()), "bucket": bucket_name(enc["model_kwargs"])}) + "\n")
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics.update(window.report())
                say(f"step {step}/{cfg.steps} loss {float(reduced):.4f} ({bucket_name(enc['model_kwargs'])})")
                report_progress(step, cfg.steps, float(reduced))
            tracker.log_metrics(metrics, step)
            final_metrics["loss"] = float(reduced)

            if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
                validate(step)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save(step)
            if step >= cfg.steps:
                break
        else:
            epoch += 1
            epoch_step = 0

    # 7. Final validation, artifacts, summary
    last_val = validate(step)
    final_metrics.update(last_val)
    if first_val:
        final_metrics["val_loss_start"] = first_val["val_loss"]
    final = ckpt.latest_checkpoint(run_dir)
    if dist.is_main:
        plot_loss_curve(metrics_path, run_dir / "loss_curve.png")
        tracker.log_artifact(run_dir / "loss_curve.png")
        (run_dir / "final_metrics.json").write_text(json.dumps(final_metrics, indent=2))
    not_logged = tracker.end()
    result = TrainResult(
        outdir=str(run_dir), final_checkpoint=str(final), steps=step, mlflow_run_id=tracker.run_id,
        mlflow_run_url=tracker.run_url, metrics=final_metrics, bucket_report=report.to_dict(), mlflow_not_logged=not_logged,
    )
    dist.barrier()
    return result


def _step_of_record(line: str, up_to: int) -> bool:
    """Whether a ``metrics.jsonl`` line is a whole record of a step <= ``up_to`` (a kill can cut the last line)."""
    try:
        return int(json.loads(line)["step"]) <= up_to
    except (ValueError, KeyError, TypeError):
        return False


def autocast(cfg: TrainConfig, dist: Dist):
    if dist.device.type == "cuda" and cfg.precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Dagster Pipes (rank 0 only) and the command line
# --------------------------------------------------------------------------------------------------------------
_PIPES = None


def report_progress(step: int, total: int, loss: float) -> None:
    if _PIPES is not None:
        _PIPES.log.info(f"step {step}/{total} loss {loss:.4f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from training.config import TRAIN_PRESETS

    parser = argparse.ArgumentParser(prog="opensora-dag train", description="Train STDiT2 on a dataset version.")
    parser.add_argument("preset", help=f"training preset ({', '.join(TRAIN_PRESETS)}) or a YAML path")
    parser.add_argument("--dataset", required=True, help="dataset version id (lake/datasets/<id>) or a .parquet/.csv path")
    parser.add_argument("--nproc", type=int, help="processes on this machine (runs torchrun for you)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--ckpt-every", type=int)
    parser.add_argument("--outdir", help="folder of this config's runs; each run gets its own run-NNN inside "
                        "(default: $OPENSORA_HOME/checkpoints/<name>)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN",
                        help="continue the newest run under --outdir, or RUN (run-003, 3 or a path), from its newest "
                        "complete checkpoint; 'auto': the newest run if unfinished and idle, else a new run. Without "
                        "--resume every call starts a new run")
    parser.add_argument("--objective", choices=["iddpm", "rflow"])
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global _PIPES
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.nproc and "LOCAL_RANK" not in os.environ:
        rest = _without_option(argv, "--nproc")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "training.train", *rest]
        return subprocess.call(cmd)

    from training.config import load_train_config

    overrides = list(args.overrides)
    for flag, key in (("steps", "steps"), ("ckpt_every", "ckpt_every"), ("objective", "objective")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = load_train_config(args.preset, overrides)
    outdir = args.outdir or str(Path(os.environ.get("OPENSORA_HOME", ".opensora")) / "checkpoints" / cfg.name)

    rank = int(os.environ.get("RANK", "0"))
    pipes_cm = contextlib.nullcontext()
    if rank == 0 and os.environ.get("DAGSTER_PIPES_CONTEXT"):
        from dagster_pipes import open_dagster_pipes

        pipes_cm = open_dagster_pipes()
    from training.checkpoint import LeaseLost, ResumeError

    try:
        with pipes_cm as pipes:  # an error inside reaches Dagster through pipes too
            _PIPES = pipes
            result = train(cfg, args.dataset, outdir, resume=args.resume, tracking_uri=args.tracking_uri)
            if pipes is not None:
                _report_materialization(pipes, result, cfg.objective)
    except (ResumeError, LeaseLost) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 2
    if rank == 0:
        print(json.dumps({"final_checkpoint": result.final_checkpoint, "run_dir": result.outdir,
                          "mlflow_run_id": result.mlflow_run_id, "mlflow_not_logged": result.mlflow_not_logged,
                          "metrics": result.metrics}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _report_materialization(pipes, result: TrainResult, objective: str) -> None:
    """Rank 0's materialization of ``trained_model``: the checkpoint, its run folder, MLflow, the metrics."""
    metadata = {
        "final_checkpoint": {"raw_value": result.final_checkpoint, "type": "path"},
        "run_dir": {"raw_value": result.outdir, "type": "path"},
        "mlflow_run_id": result.mlflow_run_id or "",
        "mlflow_run_url": result.mlflow_run_url or "",
        "steps": result.steps,
        "objective": objective,
        **{k.replace("/", "."): {"raw_value": v, "type": "float"} for k, v in result.metrics.items()},
    }
    if result.mlflow_not_logged:
        metadata["mlflow_not_logged"] = result.mlflow_not_logged
    pipes.report_asset_materialization(
        metadata=metadata, data_version=f"{Path(result.outdir).name}/{Path(result.final_checkpoint).name}",
    )


def _without_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == name:
            skip = True
            continue
        if token.startswith(name + "="):
            continue
        out.append(token)
    return out


if __name__ == "__main__":
    sys.exit(main())
