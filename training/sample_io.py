"""What a sample is made from and written to: the request, the checkpoint, the reference frames, the saved files.

:class:`SampleRequest` is everything that decides a sample besides the checkpoint; :func:`prompt_conditions` reads
each prompt's per-loop texts, references and mask strategy from it. :func:`resolve_checkpoint` finds the weights of
any checkpoint path and what its training recorded. :func:`load_reference_video` turns a reference image or video
into the pixels the VAE encodes, and :func:`save_sample` writes a decoded sample as mp4/png plus a GIF preview.
:class:`training.inference.Sampler` runs the model on all of this.

Heavy imports (torch, av, PIL) happen inside functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.mask_strategy import extract_json_from_prompts, parse_mask_entries, split_prompt_per_loop
from models.schedulers import SchedulerName

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_SAMPLING_STEPS",
    "SCHEDULERS_BY_OBJECTIVE",
    "choose_scheduler",
    "sampling_scheduler",
    "ResolvedCheckpoint",
    "SampleRequest",
    "encoder_path",
    "load_reference_video",
    "prompt_conditions",
    "reference_frames_needed",
    "resolve_checkpoint",
    "save_sample",
    "to_uint8_video",
]

DEFAULT_SAMPLING_STEPS: dict[SchedulerName, int] = {"iddpm": 100, "dpm-solver": 20, "rflow": 30}
"""Steps when a request gives none: the v1.1 inference config (IDDPM), DPM-Solver previews, the v1.2 config (rflow)."""

SCHEDULERS_BY_OBJECTIVE: dict[str, tuple[SchedulerName, ...]] = {"iddpm": ("iddpm", "dpm-solver"), "rflow": ("rflow",)}
"""Which samplers fit a training objective; the first is the default. A sampler solves the process its model was
trained on: an epsilon model has no velocity field to integrate and vice versa."""


def choose_scheduler(objective: str, requested: str | None) -> str:
    """The scheduler that samples a model trained with ``objective``: ``requested`` if it fits, else a clear error;
    None picks the objective's default."""
    allowed = SCHEDULERS_BY_OBJECTIVE[objective]
    if requested is None:
        return allowed[0]
    if requested not in DEFAULT_SAMPLING_STEPS:
        raise ValueError(f"unknown scheduler {requested!r}; choose from {sorted(DEFAULT_SAMPLING_STEPS)}")
    if requested not in allowed:
        raise ValueError(
            f"scheduler {requested!r} cannot sample this checkpoint: it was trained with the {objective!r} "
            f"objective, which samples with {' or '.join(repr(a) for a in allowed)}"
        )
    return requested


def sampling_scheduler(name: str, num_sampling_steps: int, cfg_scale: float, *, cfg_channel: int | None,
                       learn_sigma: bool, rflow_timestep_shift: bool) -> Any:
    """The scheduler ``name`` set up to sample a checkpoint, through the one factory (``models.schedulers``).

    IDDPM guides ``cfg_channel`` channels of a model that learns sigma or not; DPM-Solver steps uniformly in
    log-SNR (see the inference module); rflow shifts timesteps as the run's training did
    (``TrainConfig.rflow_timestep_shift``: the demo's tiny sizes would shift towards low noise).
    """
    from models.schedulers import build_scheduler

    if name == "iddpm":
        return build_scheduler(name, num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale,
                               cfg_channel=cfg_channel, learn_sigma=learn_sigma)
    if name == "dpm-solver":
        return build_scheduler(name, num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale, skip_type="logSNR")
    return build_scheduler(name, num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale,
                           use_timestep_transform=rflow_timestep_shift)


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


# ---------------------------------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SampleRequest:
    """Everything that decides a sample besides the checkpoint. Defaults are the v1.1 inference config."""

    prompts: list[str]
    num_frames: int = 16
    image_size: tuple[int, int] = (240, 426)
    """Pixels (H, W). The VAE floors to multiples of 8, so 426 decodes to 424."""
    fps: int = 24
    """Frame rate fed to the model's fps embedder."""
    frame_interval: int = 3
    """Output video fps = fps / frame_interval (the reference saves 8 fps)."""
    num_sampling_steps: int | None = None
    """None: DEFAULT_SAMPLING_STEPS of the scheduler."""
    cfg_scale: float = 7.0
    seed: int = 42
    """Prompt i draws its noise from seed + i."""
    batch_size: int = 1
    scheduler: SchedulerName | None = None
    """"iddpm", "dpm-solver" or "rflow"; None = the checkpoint's objective."""
    reference_paths: list[str] | None = None
    """Per prompt: ";"-separated image/video paths ("" = none)."""
    mask_strategy: list[str] | None = None
    """Per prompt: a mask-strategy string ("" = none; "0" is used when the prompt has references)."""
    loop: int = 1
    condition_frame_length: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.prompts = list(self.prompts)
        if not self.prompts:
            raise ValueError("a sample request needs at least one prompt")
        if len(self.image_size) != 2:
            raise ValueError(f"image_size is (H, W), got {self.image_size}")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if min(self.image_size) < 8:
            raise ValueError(f"image_size {self.image_size} is smaller than one VAE latent pixel (8)")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps <= 0 or self.frame_interval < 1:
            raise ValueError(f"fps must be > 0 and frame_interval >= 1, got {self.fps}, {self.frame_interval}")
        if self.num_sampling_steps is not None and self.num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be >= 1, got {self.num_sampling_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.loop < 1:
            raise ValueError(f"loop must be >= 1, got {self.loop}")
        if self.loop > 1 and not 0 < self.condition_frame_length < self.num_frames:
            raise ValueError(
                f"loop generation needs 0 < condition_frame_length < num_frames, got "
                f"{self.condition_frame_length} and {self.num_frames}"
            )
        for name in ("reference_paths", "mask_strategy"):
            value = getattr(self, name)
            if value is not None:
                value = ["" if v is None else str(v) for v in value]
                if len(value) != len(self.prompts):
                    raise ValueError(f"{name} has {len(value)} entries for {len(self.prompts)} prompts")
                setattr(self, name, value)

    @property
    def total_frames(self) -> int:
        """Frames of each output: ``loop*(T-K)+K`` (T with one loop)."""
        if self.loop == 1:
            return self.num_frames
        k = self.condition_frame_length
        return self.loop * (self.num_frames - k) + k

    @property
    def output_fps(self) -> float:
        return self.fps / self.frame_interval


def prompt_conditions(request: SampleRequest) -> tuple[list[list[str]], list[str], list[str | None]]:
    """Per prompt: its text per loop, its reference paths and its mask strategy."""
    texts, infos = extract_json_from_prompts(request.prompts)
    per_loop = split_prompt_per_loop(texts, request.loop)
    paths, strategies = [], []
    for i, info in enumerate(infos):
        ref = (request.reference_paths[i] if request.reference_paths else "") or info.get("reference_path") or ""
        if isinstance(ref, (list, tuple)):
            ref = ";".join(str(r) for r in ref)
        strategy = (request.mask_strategy[i] if request.mask_strategy else "") or info.get("mask_strategy") or ""
        if ref and not strategy:
            strategy = "0"  # references without a strategy: condition the first frame on reference 0
        if strategy and not ref:
            if any(e.loop_id == 0 or request.loop == 1 for e in parse_mask_entries(strategy)):
                raise ValueError(f"prompt {i}: mask strategy {strategy!r} but no reference path")
        paths.append(ref)
        strategies.append(strategy or None)
    return per_loop, paths, strategies


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ResolvedCheckpoint:
    """Where the weights of a checkpoint path live and what its training recorded."""

    weights_dir: Path
    """Hugging Face-format STDiT2 folder (config.json + model.safetensors)."""
    state: dict[str, Any] | None = None
    """The training checkpoint's state.json; None for an official folder."""
    step_dir: Path | None = None

    @property
    def objective(self) -> str:
        return str((self.state or {}).get("objective", "iddpm"))

    @property
    def encoder_paths(self) -> dict[str, str]:
        return dict((self.state or {}).get("encoders") or {})


def resolve_checkpoint(path: str | Path) -> ResolvedCheckpoint:
    """Accept a training output folder (its newest ``run-NNN`` that has a complete checkpoint), a run folder (its
    newest complete ``step-*``), a ``step-*`` folder, its ``ema/`` folder, or an official Hugging Face-format STDiT2
    folder."""
    from training.checkpoint_folders import latest_checkpoint
    from training.runs import list_runs

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.is_dir() and (p / "state.json").is_file():
        if not (p / "ema" / "config.json").is_file():
            raise FileNotFoundError(f"{p} has a state.json but no ema/ weights folder (ema/config.json)")
        return ResolvedCheckpoint(p / "ema", json.loads((p / "state.json").read_text()), p)
    if p.is_dir() and (p / "config.json").is_file():
        if (p.parent / "state.json").is_file():
            return ResolvedCheckpoint(p, json.loads((p.parent / "state.json").read_text()), p.parent)
        return ResolvedCheckpoint(p)
    if p.is_dir():
        newest = latest_checkpoint(p)  # complete checkpoints only: a half-written one is never sampled from
        if newest is not None:
            return resolve_checkpoint(newest)
        for run in reversed(list_runs(p)):
            if latest_checkpoint(run) is not None:
                return resolve_checkpoint(latest_checkpoint(run))
    raise FileNotFoundError(
        f"{p} is not a checkpoint: expected a training output folder (run-NNN/), a run folder with complete step-* "
        "checkpoints, a step-* folder (state.json + "
        "ema/), or a Hugging Face-format STDiT2 folder (config.json + model.safetensors)"
    )


def encoder_path(given: str | Path | None, recorded: str | None, what: str, flag: str) -> Path:
    path = given or recorded
    if not path:
        raise ValueError(f"no {what} path: the checkpoint records none, pass {flag}")
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {path} has no config.json (pass {flag} to point elsewhere)")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# References and outputs
# ---------------------------------------------------------------------------------------------------------------------


def load_reference_video(path: str | Path, image_size: tuple[int, int], max_frames: int | None = None) -> torch.Tensor:
    """An image or video as [3, T, H, W] float in [-1, 1], resized to fill ``image_size`` and centre-cropped
    (the training transform). ``max_frames`` stops decoding a video early."""
    import torch

    from training.data import resize_fill_crop

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference {path} does not exist")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        from PIL import Image

        with Image.open(path) as image:
            frames = np.array(image.convert("RGB"))[None]  # [1, h, w, 3]
    else:
        from curation.video_io import iter_frames

        frames = np.stack([f for _, _, f in iter_frames(path, stop=max_frames)])  # [T, h, w, 3]
        if len(frames) == 0:
            raise ValueError(f"reference video {path} has no frames")
    video = resize_fill_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), *image_size)  # [T, 3, H, W] in 0..255
    return (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # [3, T, H, W]


def reference_frames_needed(strategy: str, ref_id: int) -> int | None:
    """Leading frames of reference ``ref_id`` the strategy reads; None when it counts from the end (all needed)."""
    entries = [e for e in parse_mask_entries(strategy) if e.ref_id == ref_id]
    if not entries:
        return 1
    if any(e.ref_start < 0 for e in entries):
        return None
    return max(e.ref_start + e.length for e in entries)


def to_uint8_video(x: torch.Tensor) -> np.ndarray:
    """Decoded video [3, T, H, W] (about [-1, 1]) -> uint8 [T, H, W, 3], rounding as the reference's save."""
    import torch

    x = ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def save_sample(
    video: np.ndarray, save_dir: str | Path, name: str, fps: float, *, gif: bool = True, gif_max_side: int = 512
) -> dict[str, Path]:
    """Write ``{save_dir}/{name}.mp4`` (H.264 yuv420p; a png for one frame) and a GIF preview ``{name}.gif``.

    ``video`` is uint8 [T, H, W, 3]. H.264 in yuv420p needs even sizes: an odd last row/column is cropped from the
    mp4. The GIF is scaled down so its longer side is at most ``gif_max_side`` (previews stay small).
    """
    from PIL import Image

    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected a uint8 video [T, H, W, 3], got {video.dtype} {video.shape}")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if video.shape[0] == 1:
        out["png"] = save_dir / f"{name}.png"
        Image.fromarray(video[0]).save(out["png"])
    else:
        from curation.video_writer import open_writer

        h, w = video.shape[1] // 2 * 2, video.shape[2] // 2 * 2
        if h == 0 or w == 0:
            raise ValueError(f"video {video.shape[2]}x{video.shape[1]} is too small for H.264")
        out["mp4"] = save_dir / f"{name}.mp4"
        with open_writer(out["mp4"], fps, w, h) as writer:
            for frame in video[:, :h, :w]:
                writer.write(frame)
    if gif:
        frames = [Image.fromarray(f) for f in video]
        scale = gif_max_side / max(video.shape[1], video.shape[2])
        if scale < 1:
            size = (max(1, round(video.shape[2] * scale)), max(1, round(video.shape[1] * scale)))
            frames = [f.resize(size, Image.BICUBIC) for f in frames]
        out["gif"] = save_dir / f"{name}.gif"
        frames[0].save(
            out["gif"], save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0
        )
    return out
