"""Evaluate a training checkpoint: samples from a fixed prompt set, video metrics, held-out validation loss.

    report = evaluate_checkpoint(checkpoint_dir, load_prompt_set("v1"), out_dir, clip_checkpoint=..., aesthetic_mlp=...)
    run_id = log_to_mlflow(report, tracking_uri)              # eval/<metric>, eval.skipped.<metric>, previews
    decision = register_if_best(report, tracking_uri)         # training.registry: a model version when it ranks first

Metrics (Open-Sora 1.1 used human evaluation and VBench; 1.2 added validation loss at fixed timesteps):

- ``val_loss`` and ``val_loss/<T>x<H>x<W>``: the diffusion loss of the checkpoint's EMA weights on the held-out split
  of its own dataset (the hash split of ``training.data.split_rows``), at evenly spaced fixed timesteps with fixed
  noise (``training.validation.validation_losses``). It compares checkpoints of one dataset, preset and objective; the
  registry and the asset check rank by it (lower is better) when neither of the prompt metrics below exists.
- ``temporal_flicker``: VBench's temporal-flickering quantity, the mean absolute difference between consecutive
  frames on 0..255 (0 for a still video). VBench reports ``(255 - x) / 255``; that is ``temporal_flicker_score``.
- ``motion``: mean optical flow (``models.scorers.motion``, OpenCV, no weights) in pixels at 320x576.
- ``clip_score``: 100 x cosine of CLIP image and prompt features, averaged over frames (CLIPSIM). With CLIP weights
  local, the registry ranks by it (higher is better).
- ``prompt_adherence`` (and ``/colour``, ``/shape``, ``/motion``, ``/title``): weight-free adherence to prompts of the
  synthetic world (``models.scorers.adherence``), beside two controls from the same run: ``prompt_adherence_shuffled``
  (each sample scored against another prompt) and ``prompt_adherence_step0`` (the untrained model's samples).
  Without CLIP weights the registry ranks by it (higher is better), within the same prompt set.
- ``aesthetic``: the LAION aesthetic predictor on frames at 10/50/90 % of the video.
- ``vbench``: VBench's own suite, only where the package and its weights are on disk.

A metric whose weights are not on local disk is never computed from random weights: it is recorded as skipped with
the reason (``MetricResult(None, reason)``), logged as the MLflow tag ``eval.skipped.<metric>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

PROMPT_DIR = Path(__file__).parent / "prompts"
CLIP_SCORE_MAX_FRAMES = 8  # frames per video embedded for the CLIP score (evenly spaced)
PREVIEW_SCHEDULERS = {"iddpm": "dpm-solver", "rflow": "rflow"}  # fast samplers per objective (CPU previews)
VBENCH_CUSTOM_DIMENSIONS = (  # the VBench dimensions that accept arbitrary prompts (custom_input mode)
    "subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
    "aesthetic_quality", "imaging_quality", "temporal_flickering",
)


# --------------------------------------------------------------------------------------------------------------
# Prompt sets
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSet:
    """A fixed list of prompts; ``version`` = name + a hash of the prompts, so edited sets never pass as the same."""

    name: str
    version: str
    prompts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and ``#`` comments are dropped (they do not change the version)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def prompt_set_version(name: str, prompts: Sequence[str]) -> str:
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def load_prompt_set(name: str = "v1") -> PromptSet:
    """A packaged set (``training/prompts/eval_prompts_<name>.txt``) or the path of a prompt file."""
    path = Path(name)
    if path.suffix == ".txt" and path.is_file():
        label = path.stem.removeprefix("eval_prompts_")
    else:
        path = PROMPT_DIR / f"eval_prompts_{name}.txt"
        label = name
        if not path.is_file():
            known = sorted(p.stem.removeprefix("eval_prompts_") for p in PROMPT_DIR.glob("eval_prompts_*.txt"))
            raise ValueError(f"unknown prompt set {name!r}; packaged sets: {known}, or pass a .txt path")
    prompts = parse_prompts(path.read_text())
    if not prompts:
        raise ValueError(f"prompt set {path} has no prompts")
    return PromptSet(label, prompt_set_version(label, prompts), tuple(prompts))


# --------------------------------------------------------------------------------------------------------------
# Metrics on one video (uint8 [T, H, W, 3])
# --------------------------------------------------------------------------------------------------------------
@dataclass
class MetricResult:
    """A metric's value, or None with the reason it was skipped; ``values`` holds per-sample numbers if any."""

    value: float | None
    skipped_reason: str | None = None
    values: list[float] | None = None

    @property
    def skipped(self) -> bool:
        return self.value is None


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected a uint8 video [T, H, W, 3], got {video.dtype} {video.shape}")
    return video


def temporal_flicker(video: np.ndarray) -> float:
    """VBench temporal flickering: mean over consecutive pairs of mean |frame[t+1] - frame[t]| on 0..255.

    0 for a still video; VBench's score is ``(255 - x) / 255``. A single frame has no pairs and scores 0.
    """
    video = _check_video(video).astype(np.float32)
    if len(video) < 2:
        return 0.0
    per_pair = np.abs(video[1:] - video[:-1]).mean(axis=(1, 2, 3))  # [T-1]
    return float(per_pair.mean())


def flicker_score(flicker: float) -> float:
    """VBench's normalised temporal-flickering score (1 = no flicker)."""
    return (255.0 - flicker) / 255.0


def motion_frame_indices(num_frames: int) -> list[int]:
    """Frames 0/10/20/30 as in the curation scorer where the video has them; short generated videos (fewer than 11
    frames) use up to 4 evenly spaced frames instead, so there is always at least one pair."""
    reference = [i for i in (0, 10, 20, 30) if i < num_frames]
    if len(reference) >= 2:
        return reference
    if num_frames < 2:
        raise ValueError(f"motion needs at least 2 frames, got {num_frames}")
    return sorted({round(x) for x in np.linspace(0, num_frames - 1, min(4, num_frames))})


def motion(video: np.ndarray, backend: str = "dis") -> float:
    """Mean optical flow (pixels at 320x576) between the frames of :func:`motion_frame_indices`."""
    from models.scorers.motion import motion_score

    video = _check_video(video)
    return motion_score([video[i] for i in motion_frame_indices(len(video))], backend=backend)


def _spaced(video: np.ndarray, count: int) -> list[np.ndarray]:
    idx = sorted({round(x) for x in np.linspace(0, len(video) - 1, min(count, len(video)))})
    return [video[i] for i in idx]


def _default_clip_name() -> str:
    from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL

    return DEFAULT_CLIP_MODEL


def _load_clip(clip_checkpoint, clip_model_name: str, device: str | None):
    """A ClipBackbone (passed through when already loaded), or WeightsUnavailable."""
    from models.scorers.clip_backbone import ClipBackbone, load_clip

    if isinstance(clip_checkpoint, ClipBackbone):
        return clip_checkpoint
    return load_clip(clip_checkpoint, clip_model_name, device=device)


def clip_score(videos: Sequence[np.ndarray], prompts: Sequence[str], clip_checkpoint=None, *,
               clip_model_name: str | None = None, device: str | None = None) -> MetricResult:
    """Mean over videos of 100 x cos(CLIP(frame), CLIP(prompt)) averaged over up to 8 evenly spaced frames.

    ``clip_checkpoint``: a local CLIP path (see ``models.scorers.clip_backbone``) or a loaded ``ClipBackbone``.
    """
    from models.scorers import WeightsUnavailable
    from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL
    from models.scorers.clip_match import ClipMatchScorer

    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    try:
        backbone = _load_clip(clip_checkpoint, clip_model_name or DEFAULT_CLIP_MODEL, device)
    except WeightsUnavailable as err:
        return MetricResult(None, f"CLIP score skipped: {err}")
    scorer = ClipMatchScorer(backbone)
    values = []
    for video, prompt in zip(videos, prompts):
        frames = _spaced(_check_video(video), CLIP_SCORE_MAX_FRAMES)
        values.append(float(np.mean(scorer.score(frames, [prompt] * len(frames)))))
    return MetricResult(float(np.mean(values)) if values else None, None if values else "no videos", values)


def aesthetic(videos: Sequence[np.ndarray], clip_checkpoint=None, aesthetic_mlp: str | Path | None = None, *,
              clip_model_name: str | None = None, device: str | None = None) -> MetricResult:
    """Mean LAION aesthetic score (about 4-7) over videos; each video scored on its frames at 10/50/90 %."""
    from models.scorers import WeightsUnavailable
    from models.scorers.aesthetic import AESTHETIC_FRAME_POINTS, AestheticScorer, check_mlp_checkpoint
    from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL

    try:
        check_mlp_checkpoint(aesthetic_mlp)  # before building CLIP: a missing MLP should not cost a ViT-L/14 load
        backbone = _load_clip(clip_checkpoint, clip_model_name or DEFAULT_CLIP_MODEL, device)
        scorer = AestheticScorer(backbone, aesthetic_mlp)
    except WeightsUnavailable as err:
        return MetricResult(None, f"aesthetic score skipped: {err}")
    clips = []
    for video in videos:
        video = _check_video(video)
        clips.append([video[min(int(p * len(video)), len(video) - 1)] for p in AESTHETIC_FRAME_POINTS])
    values = scorer.score_clips(clips) if clips else []
    return MetricResult(float(np.mean(values)) if values else None, None if values else "no videos", values)


def vbench_weights_dir(weights_dir: str | Path | None = None) -> Path:
    """Where VBench keeps its weights: the argument, else ``$VBENCH_CACHE_DIR``, else ``~/.cache/vbench``."""
    return Path(weights_dir or os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench").expanduser()


def run_vbench(videos: dict[str, str], out_dir: str | Path, *, weights_dir: str | Path | None = None,
               device: str | None = None, dimensions: Sequence[str] = VBENCH_CUSTOM_DIMENSIONS) -> dict[str, MetricResult]:
    """The hook for VBench's full suite (custom-prompt mode), run only when the package and its weights are local.

    ``videos`` maps each mp4 path to its prompt. Returns ``vbench/<dimension>`` results,
    or ``{"vbench": skipped}`` saying what is missing. VBench would download missing weights itself, which must not
    happen here, so an absent or empty weights folder skips before VBench is imported. Not exercised by the tests
    (neither VBench nor its weights are installed on the development machines).
    """
    folder = vbench_weights_dir(weights_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        return {"vbench": MetricResult(None, f"skipped: weights not found at {folder}")}
    try:
        import vbench  # noqa: F401  (optional dependency)
    except ImportError:
        return {"vbench": MetricResult(None, f"skipped: the vbench package is not installed (weights are at {folder})")}
    import importlib.resources

    import torch
    from vbench import VBench

    os.environ["VBENCH_CACHE_DIR"] = str(folder)
    out_dir = Path(out_dir)
    videos_dir = out_dir / "videos"  # VBench reads every file of a folder: give it only the mp4s
    videos_dir.mkdir(parents=True, exist_ok=True)
    prompts = {}
    for path, prompt in videos.items():
        link = videos_dir / Path(path).name
        if not link.exists():
            link.symlink_to(Path(path).resolve())
        prompts[link.name] = prompt
    full_info = importlib.resources.files("vbench") / "VBench_full_info.json"
    bench = VBench(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), str(full_info), str(out_dir))
    bench.evaluate(videos_path=str(videos_dir), name="opensora_dag", prompt_list=prompts,
                   dimension_list=list(dimensions), local=True, mode="custom_input")
    results = json.loads((out_dir / "opensora_dag_eval_results.json").read_text())
    return {f"vbench/{dim}": MetricResult(float(value[0])) for dim, value in results.items()}


# --------------------------------------------------------------------------------------------------------------
# Validation loss on the held-out split
# --------------------------------------------------------------------------------------------------------------
def load_ema_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
    """The checkpoint's EMA STDiT2 (``ema/``: config.json + model.safetensors), fp32, in eval mode."""
    from models.checkpoint_io import config_from_hf_dir, load_stdit2_weights
    from models.stdit2 import STDiT2

    ema_dir = Path(checkpoint_dir) / "ema"
    model = STDiT2(config_from_hf_dir(ema_dir))
    load_stdit2_weights(model, ema_dir)
    return model.to(device).float().eval().requires_grad_(False)


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

    from training.buckets import Bucket, load_bucket_preset
    from training.checkpoint import read_state
    from training.data import load_rows, split_rows
    from training.build import build_scheduler, load_encoders
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
@dataclass
class SampleRecord:
    index: int
    prompt: str
    files: dict[str, str]  # "mp4" (or "png" for one frame) and "gif" -> path
    metrics: dict[str, float | None] = field(default_factory=dict)
    adherence: str = ""  # why the sample scored what it did against its prompt ("red: blob in 7/8 frames, ...")


ADHERENCE_CRITERIA = ("colour", "shape", "motion", "title")


def criterion_means(results: Sequence[Any]) -> dict[str, float]:
    """Mean score per criterion (colour, shape, motion, title) over the results that measured it.

    The overall mean mixes criteria a model learns at very different speeds (colour long before shape), so the
    per-criterion means are what say *what* a model follows."""
    means = {}
    for name in ADHERENCE_CRITERIA:
        values = [r.criteria[name].score for r in results if name in getattr(r, "criteria", {})]
        if values:
            means[name] = float(np.mean(values))
    return means


@dataclass
class AdherenceSummary:
    per_prompt: list  # models.scorers.adherence.AdherenceResult, one per video
    mean: float | None
    shuffled_mean: float | None  # each video scored against another prompt: what ignoring the text would give
    by_criterion: dict[str, float] = field(default_factory=dict)
    shuffled_by_criterion: dict[str, float] = field(default_factory=dict)

    def metrics(self, suffix: str = "") -> dict[str, float]:
        """``prompt_adherence{suffix}``, ``prompt_adherence{suffix}/<criterion>`` and, for the trained model, the
        shuffled control the same way (``prompt_adherence_shuffled``)."""
        out: dict[str, float] = {}
        for name, mean, by in (("prompt_adherence", self.mean, self.by_criterion),
                               ("prompt_adherence_shuffled", self.shuffled_mean, self.shuffled_by_criterion)):
            if mean is None or (suffix and name.endswith("_shuffled")):
                continue  # the shuffled control is reported for the trained model only
            out[f"{name}{suffix}"] = mean
            out.update({f"{name}{suffix}/{k}": v for k, v in by.items()})
        return out


def prompt_adherence(videos: Sequence[np.ndarray], prompts: Sequence[str], seed: int = 0) -> AdherenceSummary:
    """Weight-free prompt adherence for the synthetic world, with the shuffled-prompt control."""
    from models.scorers.adherence import score_prompts, shuffled_control

    results, mean = score_prompts(list(videos), list(prompts))
    shuffled, shuffled_mean = shuffled_control(list(videos), list(prompts), seed) if len(prompts) > 1 else ([], None)
    return AdherenceSummary(results, mean, shuffled_mean, criterion_means(results), criterion_means(shuffled))


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


@dataclass
class EvaluationReport:
    checkpoint: str
    step: int
    objective: str
    dataset_version: str | None
    mlflow_run_id: str | None
    prompt_set: str  # PromptSet.version
    settings: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)  # means over samples, val_loss, val_loss/<bucket>
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> reason
    samples: list[SampleRecord] = field(default_factory=list)
    out_dir: str = ""
    seconds: float = 0.0
    preset: str | None = None  # the training preset's name (TrainConfig.name)

    @property
    def val_loss(self) -> float | None:
        return self.metrics.get("val_loss")

    @property
    def ranked_by(self) -> str:
        """The metric the registry ranks this checkpoint by (:data:`training.registry.RANKING_METRICS`): the CLIP
        score when CLIP weights were local, else weight-free prompt adherence when the prompt set names anything it
        can measure, else the held-out validation loss."""
        if "clip_score" in self.metrics:
            return "clip_score"
        if "prompt_adherence" in self.metrics:
            return "prompt_adherence"
        return "val_loss"

    @property
    def ranking_value(self) -> float | None:
        return self.metrics.get(self.ranked_by)

    @property
    def cohort(self) -> dict[str, str]:
        """What makes two checkpoints comparable: same dataset version, preset and objective (validation losses of
        other data or objectives mean other things), ranked by the same metric, and for the prompt metrics the same
        prompt set (a score on other prompts is another exam)."""
        cohort = {"dataset_version": str(self.dataset_version), "preset": str(self.preset), "objective": self.objective}
        if self.ranked_by != "val_loss":
            cohort.update(ranked_by=self.ranked_by, prompt_set=self.prompt_set)
        return cohort

    @property
    def ema_dir(self) -> Path:
        return Path(self.checkpoint) / "ema"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or Path(self.out_dir) / "report.json")
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].rstrip("-") or "sample"


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

    ``scheduler`` defaults to the checkpoint objective's sampler (:data:`PREVIEW_SCHEDULERS` gives the fast ones),
    ``steps`` to that sampler's default. Prompt ``i`` is sampled with seed ``seed + i``. Previews (mp4 + gif, at
    ``fps / frame_interval``) and ``report.json`` are written under ``out_dir``. ``baseline_step0`` also samples
    the untrained model (:func:`untrained_model`) when the prompt set has measurable prompts, and reports its
    adherence as ``prompt_adherence_step0`` (the cost: sampling the set twice).
    """
    import torch

    from training.checkpoint import read_state
    from training.sample import DEFAULT_SAMPLING_STEPS, SampleRequest, Sampler, save_sample

    started = time.monotonic()
    checkpoint_dir = Path(checkpoint_dir).resolve()
    out_dir = Path(out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    state = read_state(checkpoint_dir)
    report = EvaluationReport(
        checkpoint=str(checkpoint_dir), step=int(state.get("step", 0)), objective=state["objective"],
        dataset_version=state.get("dataset_version"), mlflow_run_id=state.get("mlflow_run_id"),
        prompt_set=prompt_set.version, out_dir=str(out_dir), preset=state.get("config", {}).get("name"),
        settings={"num_frames": num_frames, "image_size": list(image_size), "steps": steps, "scheduler": scheduler,
                  "cfg_scale": cfg_scale, "fps": fps, "frame_interval": frame_interval, "seed": seed,
                  "device": device, "flow_backend": flow_backend, "num_prompts": len(prompt_set)},
    )

    # 1. Samples: one per prompt, fixed seed, saved as mp4 + gif previews
    log(f"sampling {len(prompt_set)} prompts from {checkpoint_dir} ({num_frames}x{image_size[0]}x{image_size[1]})")
    sampler = Sampler.from_checkpoint(checkpoint_dir, device=device)
    scheduler = sampler.scheduler_name(scheduler)
    steps = steps or DEFAULT_SAMPLING_STEPS[scheduler]
    report.settings.update(scheduler=scheduler, steps=steps)
    request = SampleRequest(prompts=list(prompt_set.prompts), num_frames=num_frames, image_size=tuple(image_size),
                            fps=fps, frame_interval=frame_interval, num_sampling_steps=steps, cfg_scale=cfg_scale,
                            seed=seed, scheduler=scheduler)
    videos = sampler.generate(request, progress=lambda done, total: None)
    for i, (prompt, video) in enumerate(zip(prompt_set.prompts, videos)):
        files = save_sample(video, out_dir / "samples", f"{i:02d}-{slug(prompt)}", request.output_fps)
        report.samples.append(SampleRecord(i, prompt, {k: str(v) for k, v in files.items()}))

    # 2. Weight-free metrics on every sample
    for record, video in zip(report.samples, videos):
        flicker = temporal_flicker(video)
        record.metrics.update({"temporal_flicker": flicker, "temporal_flicker_score": flicker_score(flicker),
                               "motion": motion(video, flow_backend) if len(video) > 1 else None})

    # 2b. Prompt adherence in the synthetic world (no weights: colour blobs, shapes, motion, OCR of titles), each
    #     sample against its own prompt and, as the "follows text" control, against another prompt.
    prompts = list(prompt_set.prompts)
    adherence = prompt_adherence(videos, prompts, seed=seed)
    for record, result in zip(report.samples, adherence.per_prompt):
        record.metrics["prompt_adherence"] = result.score
        record.adherence = result.reason
    if adherence.mean is None:
        report.skipped["prompt_adherence"] = "no prompt of the set names a colour, shape, motion or title"
    else:
        report.metrics.update(adherence.metrics())

        # 2c. The step-0 baseline: the same prompts, seeds and sampler through the untrained model (the weights the
        #     run started from). Trained minus step-0 is what training taught; trained minus shuffled is how much
        #     of it follows the text.
        if baseline_step0:
            log("sampling the same prompts from the untrained (step-0) model")
            trained_model = sampler.model
            sampler.model = untrained_model(checkpoint_dir, trained_model)
            try:
                step0 = prompt_adherence(sampler.generate(request, progress=lambda done, total: None), prompts, seed=seed)
            finally:
                sampler.model = trained_model
            report.metrics.update(step0.metrics(suffix="_step0"))
            for record, result in zip(report.samples, step0.per_prompt):
                record.metrics["prompt_adherence_step0"] = result.score

    # 3. Metrics that need weights: computed only from local weights, else skipped with the reason
    clip = clip_checkpoint
    if clip_checkpoint is not None:
        from models.scorers import WeightsUnavailable

        try:  # one CLIP for both metrics; when it cannot load, each metric records the reason itself
            clip = _load_clip(clip_checkpoint, clip_model_name or _default_clip_name(), device)
        except WeightsUnavailable:
            clip = clip_checkpoint
    results = {
        "clip_score": clip_score(videos, prompts, clip, clip_model_name=clip_model_name, device=device),
        "aesthetic": aesthetic(videos, clip, aesthetic_mlp, clip_model_name=clip_model_name, device=device),
    }
    results.update(run_vbench({r.files["mp4"]: r.prompt for r in report.samples if "mp4" in r.files},
                              out_dir / "vbench", weights_dir=vbench_dir, device=device))
    for name, result in results.items():
        if result.skipped:
            report.skipped[name] = result.skipped_reason or "skipped"
            continue
        for record, value in zip(report.samples, result.values or []):
            record.metrics[name] = value
        if not result.values:
            report.metrics[name] = result.value
    for name in ("temporal_flicker", "temporal_flicker_score", "motion", "clip_score", "aesthetic"):
        values = [r.metrics[name] for r in report.samples if r.metrics.get(name) is not None]
        if values:
            report.metrics[name] = float(np.mean(values))

    # 4. Validation loss of the fp32 EMA weights on the held-out split. The sampler's model and encoders are reused
    #    when they are fp32 (CPU); a bf16 sampler (CUDA) is released first and fp32 copies are loaded, so the number
    #    does not depend on the device that sampled.
    log("validation loss on the held-out split")
    shared = (sampler.model, sampler.text_encoder, sampler.vae) if sampler.dtype == torch.float32 else (None, None, None)
    del sampler
    if shared[0] is None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    val = validation_loss(checkpoint_dir, device, model=shared[0], text_encoder=shared[1], vae=shared[2],
                          max_samples=val_max_samples)
    if isinstance(val, MetricResult):
        report.skipped["val_loss"] = val.skipped_reason or "skipped"
    else:
        report.metrics.update({k: float(v) for k, v in val.items() if math.isfinite(v)})

    report.seconds = time.monotonic() - started
    report.save()
    log(f"evaluated {checkpoint_dir.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.metrics.items())))
    return report


# --------------------------------------------------------------------------------------------------------------
# MLflow: metrics on the training run (the registry of the best checkpoint is training.registry)
# --------------------------------------------------------------------------------------------------------------
def mlflow_client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri)


def ensure_run(client, tracking_uri: str, run_id: str | None, report: EvaluationReport) -> str:
    """The training run (``report.mlflow_run_id``) if there is one, else a fresh evaluation run."""
    from training.tracking import ensure_experiment

    run_id = run_id or report.mlflow_run_id
    if run_id:
        return run_id
    experiment_id = ensure_experiment(tracking_uri)
    run = client.create_run(experiment_id, run_name=f"eval-{Path(report.checkpoint).name}",
                            tags={"checkpoint": report.checkpoint})
    client.set_terminated(run.info.run_id)
    report.mlflow_run_id = run.info.run_id  # later calls (log, register) use the same run
    return run.info.run_id


def log_to_mlflow(report: EvaluationReport, tracking_uri: str, run_id: str | None = None) -> str:
    """Metrics as ``eval/<name>`` at the checkpoint's step, skipped metrics as tags ``eval.skipped.<name>``,
    previews and the report as artifacts under ``eval/step-NNNNNNNN/``. Returns the run id used."""
    from mlflow.entities import Metric, RunTag

    from training.tracking import metric_key

    client = mlflow_client(tracking_uri)
    run_id = ensure_run(client, tracking_uri, run_id, report)
    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(f"eval/{k}"), float(v), now, report.step) for k, v in sorted(report.metrics.items())]
    tags = [RunTag(f"eval.skipped.{metric_key(k).replace('/', '.')}", reason[:5000]) for k, reason in sorted(report.skipped.items())]
    tags += [RunTag("eval.prompt_set", report.prompt_set), RunTag("eval.last_checkpoint", report.checkpoint)]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    where = f"eval/{Path(report.checkpoint).name}"
    if (Path(report.out_dir) / "samples").is_dir():
        client.log_artifacts(run_id, str(Path(report.out_dir) / "samples"), f"{where}/samples")
    report_path = Path(report.out_dir) / "report.json"
    if report_path.is_file():
        client.log_artifact(run_id, str(report_path), where)
    return run_id


def evaluation_shape(train_config: dict[str, Any]) -> tuple[int, tuple[int, int]]:
    """(num_frames, (height, width)) to sample a checkpoint at: its bucket preset's largest video resolution, at
    the most frames trained there, in the aspect ratio closest to 9:16 landscape (the reference's 240x426)."""
    from training.aspect import ASPECT_RATIOS
    from training.buckets import load_bucket_preset

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
