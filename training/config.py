"""Training configuration: typed, validated, loaded from YAML presets plus overrides (never executed as code).

A preset (``training/presets/train_<name>.yaml``) fixes model size, buckets, optimizer and scheduler; the CLI and
the Dagster asset override single fields with dotted ``key=value`` pairs (``optim.lr=1e-4``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PRESET_DIR = Path(__file__).parent / "presets"
TRAIN_PRESETS = ("demo-cpu", "stage1", "stage2", "stage3")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(_Strict):
    preset: str = Field("STDiT2-XL/2", description="STDiT2 preset name (models.stdit2_config.STDIT2_PRESETS).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="STDiT2Config fields to change.")
    from_pretrained: str | None = Field(None, description="Weights to start from: file, sharded dir or HF dir.")
    grad_checkpointing: bool = False
    qk_norm_legacy: bool = Field(True, description="True = v1.1 order (RoPE before QK-norm), needed for v1.1 weights.")

    @model_validator(mode="after")
    def _buildable(self) -> ModelSection:
        """The preset with the overrides must make an STDiT2Config (known fields, a consistent size)."""
        from models.stdit2_config import stdit2_config

        try:
            stdit2_config(self.preset, **self.overrides)
        except TypeError as err:  # a value of the wrong type, e.g. hidden_size="lots"
            raise ValueError(f"model.overrides {self.overrides}: {err}") from err
        return self


class EncodersSection(_Strict):
    text_encoder: str | None = Field(None, description="Local T5 folder (production: DeepFloyd/t5-v1_1-xxl).")
    vae: str | None = Field(None, description="Local diffusers AutoencoderKL folder (production: stabilityai/sd-vae-ft-ema).")
    model_max_length: int = 200
    vae_micro_batch_size: int = 4
    build_tiny_if_missing: bool = Field(False, description="Demo only: build tiny random encoders when paths are unset.")
    memo_mb: int = Field(0, ge=0, description="Training loop: keep up to this many MB per rank of frame posteriors "
                                              "and caption embeddings in memory (models/memo.py), for small "
                                              "datasets trained for many epochs; 0 = off.")


class DataSection(_Strict):
    bucket_preset: str = "stage1"
    num_workers: int = 0
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out share, chosen by a hash of the clip id.")
    mask_ratios: dict[str, float] | None = Field(None, description="Frame-mask ratios; None = the reference's.")
    encoder_cache: str | None = Field(
        None, description="Folder built by `opensora-dag encoder-cache`: train on cached latents/embeddings."
    )

    @field_validator("bucket_preset")
    @classmethod
    def _known_bucket_preset(cls, v: str) -> str:
        """A shipped preset's name, or a file path (read where the training runs, so not looked for here): a bare
        word that names no preset is a typo."""
        from training.bucket_presets import BUCKET_PRESETS, shipped_preset

        if shipped_preset(v) is None and not (Path(v).suffix or "/" in v or "\\" in v):
            raise ValueError(f"unknown bucket preset {v!r}: not one of {', '.join(BUCKET_PRESETS)} and not a file path")
        return v

    @field_validator("mask_ratios")
    @classmethod
    def _valid_mask_ratios(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            from training.masks import validate_mask_ratios

            validate_mask_ratios(v)
        return v


class OptimSection(_Strict):
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Decay the lr linearly to zero over this "
                                                                   "fraction of the run's steps, at its end "
                                                                   "(0 = constant after warmup).")


class TrainConfig(_Strict):
    name: str = "run"
    model: ModelSection = Field(default_factory=ModelSection)
    encoders: EncodersSection = Field(default_factory=EncodersSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    objective: Literal["iddpm", "rflow"] = "iddpm"
    rflow_timestep_shift: bool = Field(True, description="rflow: shift timesteps by resolution/length (v1.2; base 512x512).")
    steps: int = Field(1000, ge=1)
    ckpt_every: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    val_every: int = Field(0, ge=0, description="Validate every N steps (0 = only at start and end).")
    val_timesteps: int = Field(5, ge=1, description="Evenly spaced timesteps at which validation is scored.")
    val_max_samples: int = 64
    seed: int = 42
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    plugin: Literal["auto", "ddp", "zero2"] = Field("auto", description="auto: ZeRO-2 on CUDA, TorchDDP on CPU.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("name must be a non-empty word without slashes or spaces")
        return v


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Set dotted keys (``optim.lr=1e-4``); values are parsed as YAML scalars/lists."""
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if isinstance(value, str) else value
    return data


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value")
    key, value = item.split("=", 1)
    return key.strip(), value


def load_train_config(preset: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """A preset name (``demo-cpu``, ``stage1``..``stage3``) or a YAML path, validated into ``TrainConfig``."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"train_{str(preset).replace('-', '_')}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown training preset {preset!r}; choose from {', '.join(TRAIN_PRESETS)} or a YAML path")
    data = yaml.safe_load(path.read_text()) or {}
    return TrainConfig.model_validate(apply_overrides(data, overrides or []))


def add_override_argument(parser) -> None:
    """``--set KEY=VALUE`` (repeatable, into ``args.overrides``): the overrides :func:`load_train_config` applies."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. optim.lr=1e-4 (repeatable; VALUE is read as YAML)")
