"""STDiT2's configuration and presets: plain data, no torch, so a training config can be checked before any
process starts (``training.config``) and the model file stays the model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class STDiT2Config:
    """Constructor arguments of STDiT2; the names are the reference's, so its configs and HF config.json load as-is."""

    input_size: tuple[int | None, ...] | None = None
    """Informational latent size (T, H, W); forward sizes are dynamic and never read this."""
    input_sq_size: int = 32
    """Reference square side in pixels for the positional-embedding scale (512 for the released v1.1 models)."""
    in_channels: int = 4
    """Latent channels (SD VAE: 4)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch of the Conv3d patch embedding."""
    hidden_size: int = 1152
    """C. Must be divisible by 3 (size embedders are C/3 wide), by 4 (2-D sin-cos) and by num_heads."""
    depth: int = 28
    """Number of STDiT2 blocks."""
    num_heads: int = 16
    """Attention heads; head_dim = hidden_size / num_heads must be even (RoPE rotates pairs)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / C."""
    class_dropout_prob: float = 0.1
    """Probability of replacing a caption with the learned null caption in training (classifier-free guidance)."""
    pred_sigma: bool = True
    """Predict the variance interpolation too: out_channels = 2 * in_channels."""
    drop_path: float = 0.0
    """Stochastic depth, increasing linearly from 0 at the first block to this value at the last."""
    no_temporal_pos_emb: bool = False
    """Accepted for compatibility; STDiT2 has no temporal table (RoPE gives the temporal positions)."""
    caption_channels: int = 4096
    """Text-embedding width (T5-XXL d_model = 4096)."""
    model_max_length: int = 120
    """Text tokens L; the shape of the null caption y_embedding is [L, caption_channels]."""
    freeze: str | None = None
    """None, "not_temporal" (train only temporal attention) or "text" (freeze cross-attention)."""
    qk_norm: bool = False
    """RMSNorm on q and k per head (True for the released v1.1 models)."""
    enable_flash_attn: bool = False
    """Accepted for compatibility and ignored: see models.attention (OPENSORA_ATTN_BACKEND) for kernel choice."""
    enable_layernorm_kernel: bool = False
    """Accepted for compatibility and ignored: the LayerNorms have no weights, so the kernel changes nothing stored."""
    qk_norm_legacy: bool = True
    """True: RoPE before QK-norm, as v1.1 (needed for its weights). False: norm then RoPE (the corrected order)."""
    grad_checkpointing: bool = False
    """Recompute each block in backward instead of storing its activations."""

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.input_size is not None:
            self.input_size = tuple(self.input_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        C = self.hidden_size
        if C % 3 != 0 or C % 4 != 0:
            raise ValueError(f"hidden_size must be divisible by 3 and 4, got {C}")
        if C % self.num_heads != 0 or (C // self.num_heads) % 2 != 0:
            raise ValueError(f"hidden_size / num_heads must be an even integer, got {C} / {self.num_heads}")
        if self.freeze not in (None, "not_temporal", "text"):
            raise ValueError(f"freeze must be None, 'not_temporal' or 'text', got {self.freeze!r}")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        if self.input_size is not None:
            d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, ignore_unknown: bool = False) -> "STDiT2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and not ignore_unknown:
            raise ValueError(f"unknown STDiT2Config fields: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

STDIT2_PRESETS: dict[str, STDiT2Config] = {
    # The released v1.1 model as used for inference (configs/opensora-v1-1/inference/sample.py): 767,452,100 params.
    "STDiT2-XL/2": STDiT2Config(input_sq_size=512, hidden_size=1152, depth=28, num_heads=16, patch_size=(1, 2, 2),
                                caption_channels=4096, model_max_length=200, qk_norm=True),
    # DiT-B-sized variant for single-GPU experiments.
    "STDiT2-B/2": STDiT2Config(input_sq_size=512, hidden_size=768, depth=12, num_heads=12, patch_size=(1, 2, 2),
                               caption_channels=4096, model_max_length=200, qk_norm=True),
    # Small model for the CPU demo (~5M params with T5-XXL-width captions; override caption_channels for tiny T5s).
    "STDiT2-S/2": STDiT2Config(input_sq_size=512, hidden_size=192, depth=4, num_heads=4, patch_size=(1, 2, 2),
                               caption_channels=4096, model_max_length=200, qk_norm=True),
    # The golden-fixture size (conformance stdit2_small_a): unit tests.
    "STDiT2-Tiny/2": STDiT2Config(input_sq_size=32, hidden_size=48, depth=2, num_heads=4, patch_size=(1, 2, 2),
                                  caption_channels=32, model_max_length=12, qk_norm=True),
}


def stdit2_config(name_or_config: str | STDiT2Config | Mapping[str, Any], **overrides: Any) -> STDiT2Config:
    """A preset name, a config, or a dict of config fields, with field overrides, as a checked config."""
    if isinstance(name_or_config, str):
        if name_or_config not in STDIT2_PRESETS:
            raise ValueError(f"unknown STDiT2 preset {name_or_config!r}; choose one of {sorted(STDIT2_PRESETS)}")
        config = STDIT2_PRESETS[name_or_config]
    elif isinstance(name_or_config, STDiT2Config):
        config = name_or_config
    else:
        config = STDiT2Config.from_dict(name_or_config)
    names = {f.name for f in dataclasses.fields(STDiT2Config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown STDiT2Config fields in overrides: {unknown}")
    return dataclasses.replace(config, **overrides)
