"""Sampling from a trained STDiT2: text to image and video, reference-frame conditioning, loop generation.

What one :meth:`Sampler.generate` call does (the behaviour of Open-Sora 1.1's ``scripts/inference-long.py``, the
script with ``--reference-path``, ``--mask-strategy`` and ``--loop``):

1. Prompts: an optional trailing JSON object per prompt (``{"reference_path": ..., "mask_strategy": ...}``) is split
   off, then per-loop prompts ``|0|text|2|text`` are expanded to one text per loop.
2. References: each prompt's ``;``-separated image/video paths are resized to fill ``H x W``, centre-cropped (the
   training transform) and VAE-encoded (posterior mode, deterministic). Latent frames equal video frames (the SD
   VAE has no temporal compression).
3. Per batch and loop: Gaussian latents ``[B, 4, T, H/8, W/8]``, reference frames written in by the mask strategy
   (which also yields per-frame edit ratios), captions encoded by T5, then the scheduler samples with
   classifier-free guidance against the model's learned null caption.
4. Loop ``i > 0`` is conditioned on the last ``K = condition_frame_length`` frames of loop ``i - 1`` (the entry
   ``"i,last_ref,-K,0,K"`` appended to the strategy); the output is loop 0 followed by every later loop without its
   first K frames: ``N*(T-K)+K`` frames in all.
5. The latents are decoded (micro-batched by the VAE wrapper) to uint8 ``[T, H, W, 3]`` per prompt.

Deliberate differences from the reference, all documented here:

- Seeds are per prompt: prompt ``i`` of a request draws all its noise from ``torch.Generator().manual_seed(seed+i)``
  on the CPU. A prompt's sample then depends on neither the batch size nor the device's RNG; the reference seeds
  one global RNG, so its samples change with the batch size.
- Loop conditioning uses the previous loop's latents directly; the reference decodes each loop to pixels and
  re-encodes it (a VAE round trip with posterior sampling), which only adds reconstruction error.
- A prompt that has references but no mask strategy gets ``"0"`` (image to video); the reference silently ignores
  such references.
- The latent state is float32 whatever the model dtype (the model casts its input; its output is float32).
- DPM-Solver previews use ``skip_type="logSNR"`` (uniform in log-SNR): at 10-20 steps it is far more accurate than
  the reference's time-uniform grid (see models/schedulers/dpm_solver.py).

Reference quirks kept: the model gets ``ar = H/W`` at inference (training passes W/H), ``fps`` as given (also for a
single frame), IDDPM guides only the first ``cfg_channel=3`` output channels.

Rectified-flow sampling applies only to checkpoints trained with that objective and IDDPM / DPM-Solver only to
IDDPM checkpoints; the checkpoint's ``state.json`` says which. Official Hugging Face-format STDiT2 folders
(no ``state.json``) are IDDPM.

Heavy imports (torch, diffusers, transformers, av, PIL) happen inside functions, so importing this module is cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.mask_strategy import (
    append_loop_condition,
    extract_json_from_prompts,
    parse_mask_entries,
    split_prompt_per_loop,
)

if TYPE_CHECKING:
    import torch

    from models.stdit2 import STDiT2
    from models.text_encoder import T5TextEncoder
    from models.vae import VideoAutoencoderKL

__all__ = [
    "DEFAULT_SAMPLING_STEPS",
    "SCHEDULERS_BY_OBJECTIVE",
    "ResolvedCheckpoint",
    "SampleRequest",
    "Sampler",
    "add_arguments",
    "add_checkpoint_arguments",
    "load_reference_video",
    "main",
    "resolve_checkpoint",
    "run",
    "save_sample",
    "to_uint8_video",
]

DEFAULT_SAMPLING_STEPS: dict[str, int] = {"iddpm": 100, "dpm-solver": 20, "rflow": 30}
"""Steps when a request gives none: the v1.1 inference config (IDDPM), DPM-Solver previews, the v1.2 config (rflow)."""

SCHEDULERS_BY_OBJECTIVE: dict[str, tuple[str, ...]] = {"iddpm": ("iddpm", "dpm-solver"), "rflow": ("rflow",)}
"""Which samplers fit a training objective; the first is the default. A sampler solves the process its model was
trained on: an epsilon model has no velocity field to integrate and vice versa."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)`` after every model evaluation (one per sampling step)."""


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
    scheduler: str | None = None
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
    from training.checkpoint import latest_checkpoint, list_runs

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


def _encoder_path(given: str | Path | None, recorded: str | None, what: str, flag: str) -> Path:
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


def _frames_needed(strategy: str, ref_id: int) -> int | None:
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
        from curation.video_io import open_writer

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


# ---------------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------------


class _CountingModel:
    """Calls the model and reports each call: every scheduler evaluates the model once per sampling step."""

    def __init__(self, model: Callable[..., torch.Tensor], on_call: Callable[[], None]) -> None:
        self.model = model
        self.on_call = on_call

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.model(*args, **kwargs)
        self.on_call()
        return out


@dataclass
class _Batch:
    """One batch of prompts on its way through the loops."""

    rows: list[int]
    texts: list[list[str]]  # per row, per loop
    refs: list[list[torch.Tensor]]  # per row, reference latents [C, T_ref, h, w]
    strategies: list[str | None]  # per row
    generators: list[torch.Generator] = field(default_factory=list)


class Sampler:
    """A loaded STDiT2 with its text encoder and VAE, ready to sample.

    Args:
        model: the diffusion model (eval mode, on ``device`` in ``dtype``).
        text_encoder: T5 whose ``model_max_length`` equals the model's.
        vae: the video VAE.
        objective: what the model was trained for, "iddpm" or "rflow".
        device, dtype: where and in which precision the model and VAE run.
        checkpoint: where the weights came from (for reports).
        cfg_channel: IDDPM guides output channels [:cfg_channel] (v1.1 inference config: 3).
    """

    def __init__(
        self,
        model: STDiT2,
        text_encoder: T5TextEncoder,
        vae: VideoAutoencoderKL,
        objective: str,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        checkpoint: ResolvedCheckpoint | None = None,
        cfg_channel: int | None = 3,
    ) -> None:
        import torch

        if objective not in SCHEDULERS_BY_OBJECTIVE:
            raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(SCHEDULERS_BY_OBJECTIVE)}")
        length = model.config.model_max_length
        if text_encoder.model_max_length != length:
            raise ValueError(f"text encoder pads to {text_encoder.model_max_length} tokens, the model expects {length}")
        if text_encoder.output_dim != model.config.caption_channels:
            raise ValueError(
                f"text encoder width {text_encoder.output_dim} != model caption_channels {model.config.caption_channels}"
            )
        if vae.out_channels != model.config.in_channels:
            raise ValueError(f"VAE has {vae.out_channels} latent channels, the model {model.config.in_channels}")
        self.model = model
        self.text_encoder = text_encoder
        self.vae = vae
        self.objective = objective
        self.device = torch.device(device)
        self.dtype = dtype
        self.checkpoint = checkpoint
        self.cfg_channel = cfg_channel

    # -- loading --

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        text_encoder: str | Path | T5TextEncoder | None = None,
        vae: str | Path | VideoAutoencoderKL | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        objective: str | None = None,
        vae_micro_batch_size: int = 4,
    ) -> Sampler:
        """Load the EMA weights of a training checkpoint (or an official HF-format folder) plus its encoders.

        ``path``: a run folder (newest ``step-*``), a ``step-*`` folder, its ``ema/`` folder, or an official
        HF-format STDiT2 folder (then ``text_encoder`` and ``vae`` must be given). Encoder paths default to the
        ones recorded in ``state.json``; loaded encoder objects may be passed to share them between samplers.
        ``objective`` overrides the recorded one (official folders are IDDPM). Default device: CUDA when
        available; default dtype: bf16 on CUDA, fp32 on CPU (the text encoder always runs in fp32).
        """
        import dataclasses

        import torch

        from models.checkpoint_io import config_from_hf_dir, load_stdit2_weights
        from models.stdit2 import STDiT2
        from models.text_encoder import T5TextEncoder
        from models.vae import VideoAutoencoderKL

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if isinstance(dtype, str):
            dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
            if dtype not in dtypes:
                raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(dtypes)}")
            dtype = dtypes[dtype]
        ckpt = resolve_checkpoint(path)
        objective = objective or ckpt.objective

        config = dataclasses.replace(config_from_hf_dir(ckpt.weights_dir), grad_checkpointing=False, freeze=None)
        model = STDiT2(config)
        load_stdit2_weights(model, ckpt.weights_dir)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

        recorded = ckpt.encoder_paths
        if not isinstance(text_encoder, T5TextEncoder):
            t5_path = _encoder_path(text_encoder, recorded.get("text_encoder"), "text encoder", "--text-encoder")
            text_encoder = T5TextEncoder(t5_path, model_max_length=config.model_max_length, device=device)
        else:
            text_encoder.to(device)
        if not isinstance(vae, VideoAutoencoderKL):
            vae_path = _encoder_path(vae, recorded.get("vae"), "VAE", "--vae")
            vae = VideoAutoencoderKL(vae_path, micro_batch_size=vae_micro_batch_size)
        vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(model, text_encoder, vae, objective, device=device, dtype=dtype, checkpoint=ckpt)

    # -- schedulers --

    def scheduler_name(self, requested: str | None) -> str:
        """The scheduler to use: ``requested`` if it fits the checkpoint's objective, else a clear error."""
        allowed = SCHEDULERS_BY_OBJECTIVE[self.objective]
        if requested is None:
            return allowed[0]
        if requested not in DEFAULT_SAMPLING_STEPS:
            raise ValueError(f"unknown scheduler {requested!r}; choose from {sorted(DEFAULT_SAMPLING_STEPS)}")
        if requested not in allowed:
            raise ValueError(
                f"scheduler {requested!r} cannot sample this checkpoint: it was trained with the {self.objective!r} "
                f"objective, which samples with {' or '.join(repr(a) for a in allowed)}"
            )
        return requested

    def build_scheduler(self, name: str, num_sampling_steps: int, cfg_scale: float) -> Any:
        from models.schedulers import build_scheduler

        if name == "iddpm":
            return build_scheduler(
                name,
                num_sampling_steps=num_sampling_steps,
                cfg_scale=cfg_scale,
                cfg_channel=self.cfg_channel,
                learn_sigma=self.model.config.pred_sigma,
            )
        if name == "dpm-solver":
            return build_scheduler(name, num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale, skip_type="logSNR")
        # As in training (training/train.py): the resolution/length-aware timestep shift, unless the run turned it off
        # (config rflow_timestep_shift: the demo's tiny sizes would shift towards low noise, see train_demo_cpu.yaml).
        return build_scheduler(name, num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale,
                               use_timestep_transform=self.rflow_timestep_shift)

    @property
    def rflow_timestep_shift(self) -> bool:
        """Whether the checkpoint's training shifted rflow timesteps (``TrainConfig.rflow_timestep_shift``; True for
        official folders and checkpoints that predate the setting)."""
        state = (self.checkpoint.state if self.checkpoint is not None else None) or {}
        return bool((state.get("config") or {}).get("rflow_timestep_shift", True))

    # -- encoders --

    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> y [B, 1, L, C] (float32, on the model's device) and the token mask [B, L]."""
        import torch

        enc = self.text_encoder.encode(list(texts))
        return enc["y"].to(self.device, torch.float32), enc["mask"].to(self.device)

    def null_caption(self, n: int) -> torch.Tensor:
        """The learned null caption as [n, 1, L, C]: what guidance contrasts the prompt against."""
        import torch

        y = self.model.y_embedder.y_embedding.to(torch.float32)  # [L, C]
        return y[None, None].expand(n, 1, *y.shape)

    def encode_reference(
        self, path: str | Path, image_size: tuple[int, int], max_frames: int | None = None
    ) -> torch.Tensor:
        """An image or video file -> latent [C, T, h, w] float32 (posterior mode: deterministic)."""
        import torch

        video = load_reference_video(path, image_size, max_frames)  # [3, T, H, W]
        with torch.no_grad():
            z = self.vae.encode(video[None].to(self.device, self.vae.dtype), sample=False)
        return z[0].to(torch.float32)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, h, w] -> video [B, 3, T, 8h, 8w] float32 (micro-batched by the VAE wrapper)."""
        import torch

        with torch.no_grad():
            return self.vae.decode(z.to(self.device, self.vae.dtype)).to(torch.float32)

    # -- sampling --

    def _prepare(self, request: SampleRequest) -> tuple[list[list[str]], list[str], list[str | None]]:
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

    def sample_latents(
        self, request: SampleRequest, progress: ProgressFn | None = None
    ) -> list[torch.Tensor]:
        """Sample without decoding: per batch, latents [B, C, total_frames, h, w] (float32)."""
        import torch

        req = request
        name = self.scheduler_name(req.scheduler)
        steps = req.num_sampling_steps or DEFAULT_SAMPLING_STEPS[name]
        scheduler = self.build_scheduler(name, steps, req.cfg_scale)
        per_loop, paths, strategies = self._prepare(req)
        if name == "dpm-solver" and (req.loop > 1 or any(strategies)):
            raise ValueError(
                "dpm-solver cannot condition on reference frames (mask strategies, loop generation); use iddpm"
            )

        height, width = req.image_size
        latent_t, latent_h, latent_w = self.vae.get_latent_size((req.num_frames, height, width))
        if min(latent_t, latent_h, latent_w) < 1:
            raise ValueError(f"image size {req.image_size} gives an empty latent")
        c = self.model.config.in_channels

        n = len(req.prompts)
        starts = list(range(0, n, req.batch_size))
        total = len(starts) * req.loop * steps
        done = 0
        bar = None
        if progress is None and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="step", desc=f"sampling ({name})")

        def on_call() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)
            if bar is not None:
                bar.update(1)

        model = _CountingModel(self.model, on_call)
        results = []
        try:
            for start in starts:
                rows = list(range(start, min(start + req.batch_size, n)))
                batch = _Batch(
                    rows=rows,
                    texts=[per_loop[i] for i in rows],
                    refs=[self._load_references(paths[i], strategies[i], req.image_size) for i in rows],
                    strategies=[strategies[i] for i in rows],
                    generators=[torch.Generator().manual_seed(req.seed + i) for i in rows],
                )
                results.append(
                    self._sample_batch(model, scheduler, req, batch, (c, latent_t, latent_h, latent_w))
                )
        finally:
            if bar is not None:
                bar.close()
        return results

    def _load_references(self, paths: str, strategy: str | None, image_size: tuple[int, int]) -> list[torch.Tensor]:
        if not paths:
            return []
        refs = []
        for ref_id, path in enumerate(p.strip() for p in paths.split(";")):
            refs.append(self.encode_reference(path, image_size, _frames_needed(strategy or "", ref_id)))
        return refs

    def _sample_batch(
        self, model: _CountingModel, scheduler: Any, req: SampleRequest, batch: _Batch, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """All loops of one batch; returns latents [B, C, total_frames, h, w]."""
        import torch

        from models.mask_strategy import apply_mask_strategy

        b = len(batch.rows)
        gens = batch.generators
        k = req.condition_frame_length
        height, width = req.image_size

        def draw(like_shape: Sequence[int]) -> torch.Tensor:
            # Each row from its own CPU generator (independent of batch size and device).
            return torch.stack([torch.randn(tuple(like_shape), generator=g, dtype=torch.float32) for g in gens])

        def noise_fn(like: torch.Tensor) -> torch.Tensor:
            # Schedulers draw for the doubled CFG batch (IDDPM) or the batch itself; the second (null) half of
            # IDDPM's doubled state never reaches the output, so it reuses the first half's draw.
            if like.shape[0] % b:
                raise ValueError(f"noise requested for {like.shape[0]} rows in a batch of {b}")
            noise = draw(like.shape[1:])
            return noise.repeat(like.shape[0] // b, *([1] * (like.ndim - 1))).to(like.device, like.dtype)

        def full(value: float) -> torch.Tensor:
            return torch.full((b,), float(value), device=self.device, dtype=torch.float32)

        model_kwargs = {
            "height": full(height),
            "width": full(width),
            "num_frames": full(req.num_frames),
            "ar": full(height / width),  # H/W at inference: the reference's quirk (training passes W/H)
            "fps": full(req.fps),
        }
        y_null = self.null_caption(b)
        captions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        strategies = list(batch.strategies)
        clips: list[torch.Tensor] = []
        for loop_i in range(req.loop):
            z = draw(shape).to(self.device)  # [B, C, T, h, w]
            if loop_i > 0:
                for r in range(b):
                    batch.refs[r].append(clips[-1][r])
                    strategies[r] = append_loop_condition(strategies[r], loop_i, len(batch.refs[r]) - 1, k)
            masks = apply_mask_strategy(z, batch.refs, strategies, loop_i)  # writes reference frames into z
            if bool(torch.all(masks == 1)):
                masks = None  # nothing conditioned: plain sampling (no extra re-noise draws)
            texts = [batch.texts[r][loop_i] for r in range(b)]
            missing = [t for t in dict.fromkeys(texts) if t not in captions]
            if missing:
                y, mask = self.encode_text(missing)
                captions.update({t: (y[i : i + 1], mask[i : i + 1]) for i, t in enumerate(missing)})
            y = torch.cat([captions[t][0] for t in texts])
            mask = torch.cat([captions[t][1] for t in texts])
            sample = scheduler.sample(
                model, z, y, y_null, mask=mask, model_kwargs=model_kwargs, masks=masks, noise_fn=noise_fn
            )
            clips.append(sample.to(torch.float32))
        # Loop 0 whole, then each later loop without its first K frames (they repeat the previous loop's last K).
        return torch.cat([clips[0]] + [clip[:, :, k:] for clip in clips[1:]], dim=2)

    def generate(self, request: SampleRequest, progress: ProgressFn | None = None) -> list[np.ndarray]:
        """Sample every prompt; returns uint8 [T, H, W, 3] per prompt (T = ``request.total_frames``).

        ``progress(done, total)`` is called after every sampling step; without it a tqdm bar is shown when
        stderr is a terminal.
        """
        import torch

        videos: list[np.ndarray] = []
        with torch.no_grad():
            for latents in self.sample_latents(request, progress):
                videos.extend(to_uint8_video(v) for v in self.decode(latents))
        return videos


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def _per_prompt(values: list[str] | None, n: int, flag: str) -> list[str] | None:
    if values is None:
        return None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise SystemExit(f"error: {flag} takes one value or one per prompt ({n}), got {len(values)}")
    return values


DESCRIPTION = ("Sample images or videos from an STDiT2 checkpoint (text to image/video, image to video, video editing "
               "and extension, loop generation).")


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint to load and where to run it (``Sampler.from_checkpoint``'s arguments), as ``sample`` and ``app``
    take them."""
    p.add_argument("--ckpt-path", required=True, help="run folder (newest step-*), step-* folder, ema/ or HF folder")
    p.add_argument("--text-encoder", default=None, help="T5 folder (default: the one recorded by training)")
    p.add_argument("--vae", default=None, help="VAE folder (default: the one recorded by training)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opensora-dag sample", description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SampleRequest(prompts=["-"])
    add_checkpoint_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); may end with a JSON object")
    p.add_argument("--prompt-path", help="text file with one prompt per line")
    p.add_argument("--save-dir", default="samples", help="output folder (default: samples)")
    p.add_argument("--sample-name", default="sample", help="files are {save_dir}/{name}_{index}.mp4/.png/.gif")
    p.add_argument("--num-frames", type=int, default=d.num_frames)
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=list(d.image_size))
    p.add_argument("--fps", type=int, default=d.fps)
    p.add_argument("--frame-interval", type=int, default=d.frame_interval, help="output fps = fps / frame-interval")
    p.add_argument("--num-sampling-steps", type=int, default=None, help="default: iddpm 100, dpm-solver 20, rflow 30")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--scheduler", choices=sorted(DEFAULT_SAMPLING_STEPS), default=None,
                   help="default: the checkpoint's objective (iddpm or rflow)")
    p.add_argument("--reference-path", nargs="+", default=None,
                   help="per prompt (or one for all): ';'-separated image/video paths, '' for none")
    p.add_argument("--mask-strategy", nargs="+", default=None,
                   help="per prompt (or one for all): e.g. '0' (image to video), '0,0,0,-8,8' (extension)")
    p.add_argument("--loop", type=int, default=d.loop)
    p.add_argument("--condition-frame-length", type=int, default=d.condition_frame_length)
    p.add_argument("--vae-micro-batch-size", type=int, default=4)
    p.add_argument("--no-gif", action="store_true", help="skip the GIF previews")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.sample``: the arguments of ``opensora-dag sample``."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``opensora-dag sample``: returns 0 on success, 2 on a bad request."""
    prompts = list(args.prompt or [])
    if args.prompt_path:
        prompts += [line.strip() for line in Path(args.prompt_path).read_text().splitlines() if line.strip()]
    if not prompts:
        print("error: give --prompt or --prompt-path", file=sys.stderr)
        return 2
    try:
        request = SampleRequest(
            prompts=prompts,
            num_frames=args.num_frames,
            image_size=tuple(args.image_size),
            fps=args.fps,
            frame_interval=args.frame_interval,
            num_sampling_steps=args.num_sampling_steps,
            cfg_scale=args.cfg_scale,
            seed=args.seed,
            batch_size=args.batch_size,
            scheduler=args.scheduler,
            reference_paths=_per_prompt(args.reference_path, len(prompts), "--reference-path"),
            mask_strategy=_per_prompt(args.mask_strategy, len(prompts), "--mask-strategy"),
            loop=args.loop,
            condition_frame_length=args.condition_frame_length,
        )
        sampler = Sampler.from_checkpoint(
            args.ckpt_path,
            text_encoder=args.text_encoder,
            vae=args.vae,
            device=args.device,
            dtype=args.dtype,
            vae_micro_batch_size=args.vae_micro_batch_size,
        )
        name = sampler.scheduler_name(request.scheduler)  # fail before any work on a mismatched scheduler
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    ckpt = sampler.checkpoint
    where = (ckpt.step_dir or ckpt.weights_dir) if ckpt else args.ckpt_path
    steps = request.num_sampling_steps or DEFAULT_SAMPLING_STEPS[name]
    print(
        f"checkpoint {where} ({sampler.objective}); {len(prompts)} prompt(s), {request.total_frames} frame(s) "
        f"{request.image_size[0]}x{request.image_size[1]}, {name} {steps} steps, cfg {request.cfg_scale}, "
        f"seed {request.seed}, {sampler.device} {str(sampler.dtype).removeprefix('torch.')}",
        file=sys.stderr,
    )
    bar = None
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="step", desc=f"sampling ({name})")

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        videos = sampler.generate(request, progress=progress or (lambda done, total: None))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    for idx, video in enumerate(videos):
        paths = save_sample(video, args.save_dir, f"{args.sample_name}_{idx}", request.output_fps, gif=not args.no_gif)
        print("  ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
