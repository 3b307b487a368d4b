"""Evaluate a training checkpoint: samples from a fixed prompt set, video metrics, held-out validation loss.

    report = evaluate_checkpoint(checkpoint_dir, load_prompt_set("v1"), out_dir, clip_checkpoint=..., aesthetic_mlp=...)
    run_id = log_to_mlflow(report, tracking_uri)              # training.eval_report: eval/<metric>, previews
    decision = register_if_best(report, tracking_uri)         # training.registry: a model version when it ranks first

The prompt sets are ``training.prompt_sets``; the metrics of the samples (flicker, motion, prompt adherence with
its controls, CLIP score, aesthetic, VBench) are ``training.video_metrics``. This module adds Open-Sora 1.2's
validation loss at fixed timesteps:

- ``val_loss`` and ``val_loss/<T>x<H>x<W>``: the diffusion loss of the checkpoint's EMA weights on the held-out split
  of its own dataset (the hash split of ``training.data.split_rows``), at evenly spaced fixed timesteps with fixed
  noise (``training.validation.validation_losses``). It compares checkpoints of one dataset, preset and objective; the
  registry and the asset check rank by it (lower is better) when neither CLIP score nor prompt adherence exists.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.eval_report import EvaluationReport, SampleRecord
from training.prompt_sets import PromptSet
from training.video_metrics import (
    MetricResult,
    aesthetic,
    clip_score,
    flicker_score,
    motion,
    prompt_adherence,
    run_vbench,
    shared_clip,
    temporal_flicker,
)

if TYPE_CHECKING:
    import torch

PREVIEW_SCHEDULERS = {"iddpm": "dpm-solver", "rflow": "rflow"}  # fast samplers per objective (CPU previews)
# Per-sample metrics whose mean over the samples is the report's number
SAMPLE_MEANS = ("temporal_flicker", "temporal_flicker_score", "motion", "clip_score", "aesthetic")


# --------------------------------------------------------------------------------------------------------------
# Which checkpoint, at which shape
# --------------------------------------------------------------------------------------------------------------
def checkpoint_to_evaluate(path: str | Path) -> Path:
    """A checkpoint folder (``step-*``, with ``state.json``) as given, or a run folder's newest complete checkpoint."""
    from training.checkpoint_folders import latest_checkpoint

    path = Path(path)
    if not (path / "state.json").is_file():
        path = latest_checkpoint(path) or path
    return path


def checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``state.json``; FileNotFoundError when the folder is not a training checkpoint."""
    from training.checkpoint import read_state

    if not (checkpoint / "state.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no state.json)")
    return read_state(checkpoint)


def evaluation_shape(train_config: dict[str, Any]) -> tuple[int, tuple[int, int]]:
    """(num_frames, (height, width)) to sample a checkpoint at: its bucket preset's largest video resolution, at
    the most frames trained there, in the aspect ratio closest to 9:16 landscape (the reference's 240x426)."""
    from training.aspect import ASPECT_RATIOS
    from training.bucket_presets import load_bucket_preset

    preset = load_bucket_preset((train_config.get("data") or {}).get("bucket_preset") or "stage1")
    videos = {res: [t for t, e in frames.items() if t > 1 and e.keep_prob > 0 and e.batch_size]
              for res, frames in preset.bucket_config.items() if res in ASPECT_RATIOS}
    videos = {res: ts for res, ts in videos.items() if ts}
    if not videos:
        raise ValueError(f"bucket preset {preset.name!r} trains no video bucket: give num_frames/height/width")
    resolution = max(videos, key=lambda r: ASPECT_RATIOS[r][0])
    sizes = ASPECT_RATIOS[resolution][1]
    ratio = min(sizes, key=lambda key: abs(float(key) - 9 / 16))
    return max(videos[resolution]), tuple(sizes[ratio])


def sampling_settings(state: dict[str, Any], *, num_frames: int | None = None, height: int | None = None,
                      width: int | None = None, scheduler: str | None = None) -> tuple[int, tuple[int, int], str]:
    """(num_frames, (height, width), scheduler) to sample a checkpoint with: the values given, else the trained
    preset's shape (:func:`evaluation_shape`) and the fast sampler of its objective (:data:`PREVIEW_SCHEDULERS`)."""
    scheduler = scheduler or PREVIEW_SCHEDULERS[state["objective"]]
    default_frames, (default_height, default_width) = evaluation_shape(state.get("config") or {})
    return num_frames or default_frames, (height or default_height, width or default_width), scheduler


# --------------------------------------------------------------------------------------------------------------
# The models evaluated: the checkpoint's EMA, and the step-0 baseline
# --------------------------------------------------------------------------------------------------------------
def load_ema_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
    """The checkpoint's EMA STDiT2 (``ema/``: config.json + model.safetensors), fp32, in eval mode."""
    from models.checkpoint_io import config_from_hf_dir, load_stdit2_weights
    from models.stdit2 import STDiT2

    ema_dir = Path(checkpoint_dir) / "ema"
    model = STDiT2(config_from_hf_dir(ema_dir))
    load_stdit2_weights(model, ema_dir)
    return model.to(device).float().eval().requires_grad_(False)


def untrained_model(checkpoint_dir: str | Path, like):
    """The checkpoint's architecture with the weights its training run started from: a fresh STDiT2 initialised
    under the run's seed (``TrainConfig.seed``), in ``like``'s dtype and device. The step-0 baseline: what the
    evaluation's numbers would be had training taught nothing."""
    import torch

    from models.stdit2 import STDiT2
    from training.checkpoint import read_state

    seed = int((read_state(checkpoint_dir).get("config") or {}).get("seed", 0))
    param = next(like.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = STDiT2(like.config)
    return model.to(device=param.device, dtype=param.dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Validation loss on the held-out split
# --------------------------------------------------------------------------------------------------------------
def checkpoint_train_config(state: dict[str, Any]):
    """The TrainConfig the checkpoint was trained with, with its encoders pinned to the folders it used."""
    from training.config import TrainConfig

    data = json.loads(json.dumps(state["config"]))
    data.setdefault("encoders", {}).update({k: v for k, v in (state.get("encoders") or {}).items() if v})
    return TrainConfig.model_validate(data)


def validation_loss(checkpoint_dir: str | Path, device: str | torch.device = "cpu", *, model=None,
                    text_encoder=None, vae=None, max_samples: int | None = None) -> MetricResult | dict[str, float]:
    """``{"val_loss": .., "val_loss/<bucket>": ..}`` of the EMA weights on the checkpoint's held-out split, or a
    skipped MetricResult (dataset gone, nothing held out, nothing fits a bucket).

    Uses the training run's own split (``data.val_fraction``), bucket preset, seed and ``val_timesteps``, so the
    numbers line up with every other checkpoint of any run trained on the same dataset version. ``model``,
    ``text_encoder`` and ``vae`` may be passed in to share them with the sampler.
    """
    import torch

    from training.bucket_presets import load_bucket_preset
    from training.buckets import Bucket
    from training.build import build_scheduler, load_encoders
    from training.checkpoint import read_state
    from training.data import load_rows, split_rows
    from training.distributed import Dist
    from training.validation import build_validation_set, validation_losses

    device = torch.device(device)
    state = read_state(checkpoint_dir)
    cfg = checkpoint_train_config(state)
    dataset_path = Path(state.get("dataset_path") or "")
    if not state.get("dataset_path") or not dataset_path.exists():
        return MetricResult(None, f"validation loss skipped: the checkpoint's dataset is not found at {dataset_path}")
    _, val_rows = split_rows(load_rows(dataset_path), cfg.data.val_fraction)
    if len(val_rows) == 0:
        return MetricResult(None, f"validation loss skipped: no held-out rows at val_fraction={cfg.data.val_fraction}")
    if text_encoder is None or vae is None:
        text_encoder, vae, _ = load_encoders(cfg, device)
    preset = load_bucket_preset(cfg.data.bucket_preset)
    dist = Dist(rank=0, world_size=1, local_rank=0, device=device)
    val = build_validation_set(val_rows, Bucket(preset.bucket_config), preset.frame_interval, cfg.seed, text_encoder,
                               vae, dist, max_samples or cfg.val_max_samples)
    if not len(val):
        return MetricResult(None, f"validation loss skipped: none of {len(val_rows)} held-out rows fits a bucket "
                                  f"of preset {cfg.data.bucket_preset!r}")
    model = model if model is not None else load_ema_model(checkpoint_dir, device)
    objective = state["objective"]
    return validation_losses(model, build_scheduler(objective, cfg.rflow_timestep_shift), objective, val,
                             cfg.val_timesteps, cfg.seed)


# --------------------------------------------------------------------------------------------------------------
# One checkpoint, end to end
# --------------------------------------------------------------------------------------------------------------
def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    prompt_set: PromptSet,
    out_dir: str | Path,
    *,
    clip_checkpoint: str | Path | None = None,
    clip_model_name: str | None = None,
    aesthetic_mlp: str | Path | None = None,
    num_frames: int = 16,
    image_size: tuple[int, int] = (240, 426),
    steps: int | None = None,
    scheduler: str | None = None,
    cfg_scale: float = 7.0,
    fps: int = 24,
    frame_interval: int = 3,
    seed: int = 42,
    device: str | None = None,
    flow_backend: str = "dis",
    vbench_dir: str | Path | None = None,
    val_max_samples: int | None = None,
    baseline_step0: bool = True,
    log: Callable[[str], None] = print,
) -> EvaluationReport:
    """Sample every prompt once from the checkpoint's EMA weights, score the samples, and compute the validation loss.

    ``scheduler`` defaults to the checkpoint objective's sampler (fast ones: :data:`PREVIEW_SCHEDULERS`), ``steps`` to
    its default; prompt ``i`` uses seed ``seed + i``. Previews (mp4 + gif, at ``fps / frame_interval``) and
    ``report.json`` go under ``out_dir``. ``baseline_step0`` also samples the untrained model (:func:`untrained_model`)
    if the set has measurable prompts and reports its adherence as ``prompt_adherence_step0`` (sampling the set twice).
    """
    import torch

    from training.inference import Sampler

    started = time.monotonic()
    checkpoint_dir, out_dir = Path(checkpoint_dir).resolve(), Path(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = list(prompt_set.prompts)
    report = new_report(checkpoint_dir, prompt_set, out_dir, settings={
        "num_frames": num_frames, "image_size": list(image_size), "steps": steps, "scheduler": scheduler,
        "cfg_scale": cfg_scale, "fps": fps, "frame_interval": frame_interval, "seed": seed, "device": device,
        "flow_backend": flow_backend, "num_prompts": len(prompt_set)})

    # 1. Sample the trained model: one video per prompt, fixed seeds, saved as mp4 + gif previews
    log(f"sampling {len(prompt_set)} prompts from {checkpoint_dir} ({num_frames}x{image_size[0]}x{image_size[1]})")
    sampler = Sampler.from_checkpoint(checkpoint_dir, device=device)
    request = sample_request(sampler, prompts, report.settings)
    videos = sampler.generate(request, progress=lambda done, total: None)
    save_samples(report, prompts, videos, request.output_fps)

    # 2. Score the samples without weights: flicker, motion, and prompt adherence with its shuffled-prompt control
    score_flicker_and_motion(report, videos, flow_backend)
    adherence = score_adherence(report, videos, prompts, seed)

    # 3. Sample the step-0 baseline: the same prompts, seeds and sampler through the untrained model. Trained minus
    #    step-0 is what training taught; trained minus shuffled is how much of it follows the text.
    if baseline_step0 and adherence.mean is not None:
        log("sampling the same prompts from the untrained (step-0) model")
        score_step0_adherence(report, sampler, request, checkpoint_dir, prompts, seed)

    # 4. Score with weights, only from local ones (else skipped with the reason); then the means over samples
    score_with_weights(report, videos, prompts, clip_checkpoint=clip_checkpoint, clip_model_name=clip_model_name,
                       aesthetic_mlp=aesthetic_mlp, vbench_dir=vbench_dir, device=device)
    average_over_samples(report)

    # 5. Validation loss of the fp32 EMA weights on the held-out split, whatever device sampled: an fp32 (CPU)
    #    sampler's model and encoders are reused; a bf16 (CUDA) sampler is released first and fp32 copies loaded.
    log("validation loss on the held-out split")
    shared = (sampler.model, sampler.text_encoder, sampler.vae) if sampler.dtype == torch.float32 else (None, None, None)
    del sampler
    if shared[0] is None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    score_validation_loss(report, checkpoint_dir, device, shared, val_max_samples)

    # 6. Report
    report.seconds = time.monotonic() - started
    report.save()
    log(f"evaluated {checkpoint_dir.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.metrics.items())))
    return report


def new_report(checkpoint_dir: Path, prompt_set: PromptSet, out_dir: Path, settings: dict[str, Any]) -> EvaluationReport:
    """An empty report of the checkpoint, with what its ``state.json`` says about the run that trained it."""
    from training.checkpoint import read_state

    state = read_state(checkpoint_dir)
    return EvaluationReport(
        checkpoint=str(checkpoint_dir), step=int(state.get("step", 0)), objective=state["objective"],
        dataset_version=state.get("dataset_version"), mlflow_run_id=state.get("mlflow_run_id"),
        prompt_set=prompt_set.version, out_dir=str(out_dir), preset=state.get("config", {}).get("name"),
        settings=settings,
    )


def sample_request(sampler, prompts: list[str], settings: dict[str, Any]):
    """The SampleRequest of the evaluation settings; the scheduler and steps they leave unset are resolved (the
    checkpoint objective's sampler, its default steps) and written back into ``settings``."""
    from training.sample_io import DEFAULT_SAMPLING_STEPS, SampleRequest

    scheduler = sampler.scheduler_name(settings["scheduler"])
    steps = settings["steps"] or DEFAULT_SAMPLING_STEPS[scheduler]
    settings.update(scheduler=scheduler, steps=steps)
    return SampleRequest(prompts=prompts, num_frames=settings["num_frames"], image_size=tuple(settings["image_size"]),
                         fps=settings["fps"], frame_interval=settings["frame_interval"], num_sampling_steps=steps,
                         cfg_scale=settings["cfg_scale"], seed=settings["seed"], scheduler=scheduler)


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].rstrip("-") or "sample"


def save_samples(report: EvaluationReport, prompts: Sequence[str], videos: Sequence[np.ndarray], fps: float) -> None:
    """Each video as ``samples/<index>-<prompt slug>.mp4`` + ``.gif``, recorded in the report."""
    from training.sample_io import save_sample

    (Path(report.out_dir) / "samples").mkdir(parents=True, exist_ok=True)
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        files = save_sample(video, Path(report.out_dir) / "samples", f"{i:02d}-{slug(prompt)}", fps)
        report.samples.append(SampleRecord(i, prompt, {k: str(v) for k, v in files.items()}))


def score_flicker_and_motion(report: EvaluationReport, videos: Sequence[np.ndarray], flow_backend: str) -> None:
    for record, video in zip(report.samples, videos):
        flicker = temporal_flicker(video)
        record.metrics.update({"temporal_flicker": flicker, "temporal_flicker_score": flicker_score(flicker),
                               "motion": motion(video, flow_backend) if len(video) > 1 else None})


def score_adherence(report: EvaluationReport, videos: Sequence[np.ndarray], prompts: list[str], seed: int):
    """Prompt adherence in the synthetic world (no weights: colour blobs, shapes, motion, OCR of titles), each sample
    against its own prompt and, as the "follows text" control, against another prompt."""
    adherence = prompt_adherence(videos, prompts, seed=seed)
    for record, result in zip(report.samples, adherence.per_prompt):
        record.metrics["prompt_adherence"] = result.score
        record.adherence = result.reason
    if adherence.mean is None:
        report.skipped["prompt_adherence"] = "no prompt of the set names a colour, shape, motion or title"
    else:
        report.metrics.update(adherence.metrics())
    return adherence


def score_step0_adherence(report: EvaluationReport, sampler, request, checkpoint_dir: Path, prompts: list[str],
                          seed: int) -> None:
    """Prompt adherence of the untrained model's samples (the sampler's own model is put back afterwards)."""
    trained_model = sampler.model
    sampler.model = untrained_model(checkpoint_dir, trained_model)
    try:
        step0 = prompt_adherence(sampler.generate(request, progress=lambda done, total: None), prompts, seed=seed)
    finally:
        sampler.model = trained_model
    report.metrics.update(step0.metrics(suffix="_step0"))
    for record, result in zip(report.samples, step0.per_prompt):
        record.metrics["prompt_adherence_step0"] = result.score


def score_with_weights(report: EvaluationReport, videos: Sequence[np.ndarray], prompts: list[str], *,
                       clip_checkpoint, clip_model_name: str | None, aesthetic_mlp: str | Path | None,
                       vbench_dir: str | Path | None, device: str) -> None:
    """CLIP score and aesthetic (sharing one CLIP) and VBench; per-sample values go to the samples, a metric with
    none to the report, a skipped one to ``report.skipped``."""
    clip = shared_clip(clip_checkpoint, clip_model_name, device)
    results = {
        "clip_score": clip_score(videos, prompts, clip, clip_model_name=clip_model_name, device=device),
        "aesthetic": aesthetic(videos, clip, aesthetic_mlp, clip_model_name=clip_model_name, device=device),
    }
    results.update(run_vbench({r.files["mp4"]: r.prompt for r in report.samples if "mp4" in r.files},
                              Path(report.out_dir) / "vbench", weights_dir=vbench_dir, device=device))
    for name, result in results.items():
        if result.skipped:
            report.skipped[name] = result.skipped_reason or "skipped"
            continue
        for record, value in zip(report.samples, result.values or []):
            record.metrics[name] = value
        if not result.values:
            report.metrics[name] = result.value


def average_over_samples(report: EvaluationReport) -> None:
    for name in SAMPLE_MEANS:
        values = [r.metrics[name] for r in report.samples if r.metrics.get(name) is not None]
        if values:
            report.metrics[name] = float(np.mean(values))


def score_validation_loss(report: EvaluationReport, checkpoint_dir: Path, device: str, shared: tuple,
                          max_samples: int | None) -> None:
    """``val_loss`` and ``val_loss/<bucket>``, reusing ``shared`` = (model, text_encoder, vae) where not None."""
    model, text_encoder, vae = shared
    val = validation_loss(checkpoint_dir, device, model=model, text_encoder=text_encoder, vae=vae,
                          max_samples=max_samples)
    if isinstance(val, MetricResult):
        report.skipped["val_loss"] = val.skipped_reason or "skipped"
    else:
        report.metrics.update({k: float(v) for k, v in val.items() if math.isfinite(v)})
