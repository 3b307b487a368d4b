"""Setting up a training run, the blocks before the first step of ``training/train.py``'s loop: the data (rows,
held-out split, buckets, sampler), the parts (frozen encoders, model, EMA, optimizer through the booster), the
position to resume from, and the MLflow run.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config needs pydantic and PyYAML
    from training.config import TrainConfig

from training.build import build_booster, build_model, build_scheduler, load_encoders, resolve_dataset
from training.distributed import Dist, all_ranks, broadcast_object


@dataclass
class RunData:
    """What block 2 prepares: the dataset's rows and held-out split, the buckets, the sampler, and what batches come from."""

    path: Path
    version: str
    rows: list
    train_rows: list
    val_rows: list
    preset: Any
    bucket: Any
    report: Any
    sampler: Any
    mask_generator: Any
    cache_dir: Path | None
    manifest: Any
    """The encoder cache's manifest; None without a cache."""
    train_set: Any
    collate_fn: Any


@dataclass
class RunParts:
    """What block 3 builds: the frozen encoders (None with an encoder cache), the model under the booster, its EMA."""

    text_encoder: Any
    vae: Any
    encoder_paths: Any
    model: Any
    model_config: Any
    ema: Any
    booster: Any
    optimizer: Any
    use_zero: bool
    scheduler: Any


@dataclass
class Position:
    """Where the loop is: the global step, the epoch, and the batches of this epoch trained (the sampler's position)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


def prepare_data(cfg: TrainConfig, dataset: str, dist: Dist, say) -> RunData:
    from training.bucket_presets import load_bucket_preset
    from training.bucket_report import bucket_report
    from training.buckets import Bucket
    from training.data import VideoTextDataset, collate, load_rows, split_rows
    from training.masks import MaskGenerator
    from training.sampler import VariableVideoBatchSampler

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
    manifest = None
    if cache_dir is not None:  # precomputed latents and embeddings: the encoders never load
        from training.cached_data import CacheManifest, CachedLatentDataset, collate_cached, epochs_needed

        manifest = CacheManifest.load(cache_dir / "train")
        manifest.check_compatible(
            seed=cfg.seed, frame_interval=preset.frame_interval, bucket=bucket, model_max_length=cfg.encoders.model_max_length,
            epochs=epochs_needed(train_rows, bucket, preset.frame_interval, cfg.seed, cfg.steps, dist.world_size),
        )
        train_set, collate_fn = CachedLatentDataset(train_rows, cache_dir / "train"), collate_cached
    else:
        train_set, collate_fn = VideoTextDataset(train_rows, preset.frame_interval, cfg.seed), collate
    return RunData(path=dataset_path, version=dataset_version, rows=rows, train_rows=train_rows, val_rows=val_rows, preset=preset,
                 bucket=bucket, report=report, sampler=sampler, mask_generator=mask_generator, cache_dir=cache_dir,
                 manifest=manifest, train_set=train_set, collate_fn=collate_fn)


def build_parts(cfg: TrainConfig, dist: Dist, data: RunData) -> RunParts:
    if data.cache_dir is not None:
        text_encoder = vae = None
        encoder_paths, caption_channels = data.manifest.encoders, data.manifest.caption_channels
    else:
        text_encoder, vae, encoder_paths = load_encoders(cfg, dist.device, dist, memoize=True)
        caption_channels = text_encoder.output_dim
    model, model_config = build_model(cfg, caption_channels)
    model.to(dist.device)
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    booster, model, optimizer, use_zero = build_booster(cfg, dist, model)
    scheduler = build_scheduler(cfg.objective, cfg.rflow_timestep_shift)
    model.train()
    return RunParts(text_encoder=text_encoder, vae=vae, encoder_paths=encoder_paths, model=model, model_config=model_config, ema=ema,
                  booster=booster, optimizer=optimizer, use_zero=use_zero, scheduler=scheduler)


def resume_run(cfg: TrainConfig, run_dir: Path, dist: Dist, say, parts: RunParts, sampler) -> tuple[Position, str | None, Path | None]:
    """Load the newest checkpoint of ``run_dir`` that loads on every rank, else the one before it, and restore the sampler.

    Returns where to continue, the MLflow run to continue, and the checkpoint loaded (None: the run starts at step 0).
    """
    from training import checkpoint as ckpt, checkpoint_folders as folders, runs

    pos, mlflow_run_id, latest = Position(), None, None
    candidates = broadcast_object(folders.resume_candidates(run_dir, say) if dist.is_main else None, dist)
    if candidates:
        saved = ckpt.read_state(candidates[0])
        if saved["objective"] != cfg.objective:
            raise runs.ResumeError(f"cannot resume from {candidates[0]}: it was trained with {saved['objective']}, the "
                                   f"config says {cfg.objective}; resume with --objective {saved['objective']} or start a new run")
        ckpt.check_model_config(candidates[0], saved.get("model_config"), parts.model_config.to_dict())
    for candidate in candidates:
        why = ""
        try:
            state = ckpt.load_checkpoint(checkpoint=candidate, booster=parts.booster, model=parts.model, optimizer=parts.optimizer,
                                         ema=parts.ema, rank=dist.rank, sharded_optimizer=parts.use_zero)
        except Exception as err:  # noqa: BLE001  (a damaged or refused file: try the previous checkpoint)
            why = f"{type(err).__name__}: {err}"
        if all_ranks(not why, dist):
            latest = candidate
            break
        say(f"warning: could not load checkpoint {candidate} ({why or 'failed on another rank'}); trying the previous one")
    if candidates and latest is None:
        raise runs.ResumeError(f"no checkpoint of {run_dir} can be loaded (tried {', '.join(p.name for p in candidates)}); "
                               "start a new run without --resume")
    if latest is not None:
        pos.step, pos.epoch, mlflow_run_id = state["step"], state["epoch"], state.get("mlflow_run_id")
        pos.epoch_step, reshard = ckpt.resume_position(state["sampler"], dist.world_size)
        if reshard:
            say(f"warning: {reshard}")
        sampler.load_state_dict(state["sampler"])
        if dist.is_main:
            folders.set_aside([p for p in folders.list_checkpoints(run_dir) if folders.step_of(p) > pos.step], say)
        say(f"resumed from {latest} at step {pos.step}")
    return pos, mlflow_run_id, latest


def start_tracking(cfg: TrainConfig, run_dir: Path, tracking_uri: str | None, dist: Dist, say, data: RunData, encoder_paths,
                    mlflow_run_id: str | None, new_run: bool):
    """The MLflow run (continued when resuming); a new run also logs its dataset, bucket report and config."""
    from training.tracking import RunTracker, default_tracking_uri, git_commit

    tracking_uri = tracking_uri or default_tracking_uri()
    tracker = RunTracker(tracking_uri, run_name=cfg.name, enabled=dist.is_main, run_id=mlflow_run_id, log=say,
                         not_logged_path=run_dir / "mlflow_not_logged.jsonl")
    tracker.start()
    tracker.log_params({"config": cfg.model_dump(mode="json"), "dataset_version": data.version, "git_commit": git_commit(), "world_size": dist.world_size, "encoders": encoder_paths})
    tracker.set_tags({"objective": cfg.objective, "dataset_version": data.version, "run_folder": str(run_dir)})
    if dist.is_main and new_run:
        tracker.log_dataset(data.rows, "curated_dataset", data.version, str(data.path))
        (run_dir / "bucket_report.md").write_text(data.report.to_markdown())
        (run_dir / "bucket_report.json").write_text(json.dumps(data.report.to_dict(), indent=2))
        (run_dir / "config.yaml").write_text(_yaml(cfg.model_dump(mode="json")))
        for name in ("bucket_report.md", "bucket_report.json", "config.yaml"):
            tracker.log_artifact(run_dir / name)
    return tracker


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
