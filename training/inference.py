"""The Sampler: a trained STDiT2 with its text encoder and VAE, sampling text to image and video, reference-frame
conditioning and loop generation.

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

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.mask_strategy import append_loop_condition
from training.sample_io import (
    DEFAULT_SAMPLING_STEPS,
    SCHEDULERS_BY_OBJECTIVE,
    ResolvedCheckpoint,
    SampleRequest,
    choose_scheduler,
    encoder_path,
    load_reference_video,
    prompt_conditions,
    reference_frames_needed,
    resolve_checkpoint,
    sampling_scheduler,
    to_uint8_video,
)

if TYPE_CHECKING:
    import torch

    from models.stdit2 import STDiT2
    from models.text_encoder import T5TextEncoder
    from models.vae import VideoAutoencoderKL

__all__ = ["ProgressFn", "Sampler"]

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)`` after every model evaluation (one per sampling step)."""

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
            t5_path = encoder_path(text_encoder, recorded.get("text_encoder"), "text encoder", "--text-encoder")
            text_encoder = T5TextEncoder(t5_path, model_max_length=config.model_max_length, device=device)
        else:
            text_encoder.to(device)
        if not isinstance(vae, VideoAutoencoderKL):
            vae_path = encoder_path(vae, recorded.get("vae"), "VAE", "--vae")
            vae = VideoAutoencoderKL(vae_path, micro_batch_size=vae_micro_batch_size)
        vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(model, text_encoder, vae, objective, device=device, dtype=dtype, checkpoint=ckpt)

    # -- schedulers --

    def scheduler_name(self, requested: str | None) -> str:
        """The scheduler to use: ``requested`` if it fits the checkpoint's objective, else a clear error."""
        return choose_scheduler(self.objective, requested)

    def build_scheduler(self, name: str, num_sampling_steps: int, cfg_scale: float) -> Any:
        return sampling_scheduler(name, num_sampling_steps, cfg_scale, cfg_channel=self.cfg_channel,
                                  learn_sigma=self.model.config.pred_sigma,
                                  rflow_timestep_shift=self.rflow_timestep_shift)

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

    def sample_latents(
        self, request: SampleRequest, progress: ProgressFn | None = None
    ) -> list[torch.Tensor]:
        """Sample without decoding: per batch, latents [B, C, total_frames, h, w] (float32)."""
        import torch

        req = request
        name = self.scheduler_name(req.scheduler)
        steps = req.num_sampling_steps or DEFAULT_SAMPLING_STEPS[name]
        scheduler = self.build_scheduler(name, steps, req.cfg_scale)
        per_loop, paths, strategies = prompt_conditions(req)
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
            refs.append(self.encode_reference(path, image_size, reference_frames_needed(strategy or "", ref_id)))
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
