"""STDiT2: the spatial-temporal diffusion transformer of Open-Sora 1.1, written from its documented behaviour.

Checkpoint-compatible with the official v1.1 weights (same state-dict names and shapes) and numerically equal to the
reference: in float64 it reproduces the golden tensors to ~1e-15 because it keeps the reference's float32 islands
(timestep sinusoid, self-attention softmax, RMSNorm, positional grid) instead of "fixing" them.

Reads top to bottom: helpers -> embedders -> attention -> block -> final layer -> model. The config and the
presets are plain data in :mod:`models.stdit2_config`.

Shapes: B batch, T/H/W latent frames/height/width after patching, S = H*W tokens per frame, N = T*S tokens,
C hidden size, L text tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.attention import BlockDiagonalMask, attention
from models.stdit2_config import STDiT2Config, stdit2_config

IMG_FPS = 120  # the fps the reference feeds for single images


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN-single modulation, PixArt style (shift added after scaling)."""
    return x * (1 + scale) + shift


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """The blocks' LayerNorm: no affine weights, eps 1e-6."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def select_frames(x_mask: torch.Tensor | None, a: torch.Tensor, a0: torch.Tensor | None) -> torch.Tensor:
    """Per-frame choice between the t-version ``a`` and the t0-version ``a0`` of modulation vectors.

    a, a0: [B, K, C] -> [B, K, T, 1, C] with x_mask [B, T] (True = noised frame: ``a``), or [B, K, 1, 1, C] without.
    Selecting the vectors and then applying them gives bit-identical results to the reference, which applies both
    and selects the results.
    """
    a = a[:, :, None, None, :]
    if x_mask is None:
        return a
    return torch.where(x_mask[:, None, :, None, None], a, a0[:, :, None, None, :])


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: drop a residual branch with probability p and rescale the survivors."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _as_batch(v: Any, name: str, device: torch.device) -> torch.Tensor:
    if v is None:
        raise ValueError(f"STDiT2.forward needs {name} (with num_frames, height, width, ar and fps)")
    return torch.as_tensor(v, device=device).reshape(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------------------------------


class PatchEmbed3D(nn.Module):
    """Video to tokens: Conv3d with kernel = stride = patch, zero-padding T/H/W at the end to a multiple of it."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, T, H, W = x.shape
        pad = ((-W) % pw, (-H) % ph, (-T) % pt)
        if any(pad):
            x = F.pad(x, (0, pad[0], 0, pad[1], 0, pad[2]))
        x = self.proj(x)  # [B, C, T', H', W']
        return x.flatten(2).transpose(1, 2)  # [B, N, C], tokens in (t, h, w) order


class PositionEmbedding2D(nn.Module):
    """2-D sin-cos table for any H'xW', PixArt-style resolution scaling; shared by every frame.

    The frequencies are a non-persistent buffer computed in float32, so they follow the model's dtype exactly as the
    reference's do (its released weights were trained with these values). The grid is always float32 (reference).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _sincos(self, pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * self.inv_freq[None, :]  # [P, C/4], promoted to the buffer's dtype if wider
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)  # [P, C/2]

    def forward(
        self, x: torch.Tensor, h: int, w: int, scale: float = 1.0, base_size: int | None = None
    ) -> torch.Tensor:
        grid_h = torch.arange(h, device=x.device, dtype=torch.float32) / scale
        grid_w = torch.arange(w, device=x.device, dtype=torch.float32) / scale
        if base_size is not None:
            grid_h *= base_size / h
            grid_w *= base_size / w
        emb_w, emb_h = self._sincos(grid_w), self._sincos(grid_h)  # [W, C/2], [H, C/2]
        # token (r, c): first half of the channels from the column (width) coordinate, then the row
        emb = torch.cat([emb_w[None, :, :].expand(h, w, -1), emb_h[:, None, :].expand(h, w, -1)], dim=-1)
        return emb.reshape(1, h * w, -1).to(x.dtype)  # [1, S, C]


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000) -> torch.Tensor:
    """[cos(t f), sin(t f)] in float32 (a precision island the reference keeps even in float64 runs)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # [B, dim] float32


class TimestepEmbedder(nn.Module):
    """Scalar -> 256-d sinusoid -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))  # [B, C]


class SizeEmbedder(TimestepEmbedder):
    """Embeds each column of s [b, d] (height, width, aspect, frames, fps) and concatenates: [B, d * D].

    Inputs with fewer rows than the batch are tiled (the CFG batch is 2n with n-sized size inputs).
    """

    def forward(self, s: torch.Tensor, bs: int) -> torch.Tensor:  # type: ignore[override]
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != bs:
            if bs % s.shape[0]:
                raise ValueError(f"size input batch {s.shape[0]} does not divide the model batch {bs}")
            s = s.repeat(bs // s.shape[0], 1)
        b, d = s.shape
        dtype = self.mlp[0].weight.dtype
        emb = self.mlp(timestep_embedding(s.reshape(b * d), self.frequency_embedding_size).to(dtype))  # [b*d, D]
        return emb.reshape(b, -1)  # [B, d*D]


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (the names of timm's Mlp, as in the checkpoints)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects T5 embeddings to C; in training, replaces whole captions by the learned null caption (for CFG)."""

    def __init__(self, caption_channels: int, hidden_size: int, uncond_prob: float, token_num: int) -> None:
        super().__init__()
        self.uncond_prob = uncond_prob
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        # caption: [B, 1, L, caption_channels]
        if train and caption.shape[2:] != self.y_embedding.shape:
            raise ValueError(f"training captions must be [B, 1, {self.y_embedding.shape[0]}, "
                             f"{self.y_embedding.shape[1]}], got {list(caption.shape)}")
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            else:
                drop = force_drop_ids.to(caption.device) == 1
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)  # [B, 1, L, C]


class RotaryEmbedding(nn.Module):
    """Interleaved RoPE over head_dim for the temporal attention (frequencies stored, frozen, as in the checkpoints)."""

    def __init__(self, dim: int, theta: float = 10000) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.freqs = nn.Parameter(self.default_freqs(), requires_grad=False)  # [dim/2]

    def default_freqs(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2)[: self.dim // 2].float() / self.dim))

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles for positions 0..seq_len-1, each [seq_len, dim], pairs sharing a frequency."""
        pos = torch.arange(seq_len, device=self.freqs.device, dtype=self.freqs.dtype)
        angles = (pos[:, None] * self.freqs[None, :]).detach().repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (x0, x1) of x [..., N, D] by the position angle: rotate_half maps (x0, x1) -> (-x1, x0)."""
    cos, sin = rope
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over head_dim, computed in float32 and cast back before the weight (a reference precision island)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Attention layers
# ---------------------------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional per-head RMSNorm on q/k and optional RoPE (temporal attention)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, qk_norm_legacy: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm_legacy = qk_norm_legacy
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        if rope is not None and self.qk_norm_legacy:
            q, k = apply_rope(q, rope), apply_rope(k, rope)  # v1.1 order: RoPE, then norm
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None and not self.qk_norm_legacy:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        # RMSNorm/RoPE may promote under autocast (float32 weights); the kernels want one dtype
        q, k = q.to(v.dtype), k.to(v.dtype)
        x = attention(q, k, v, softmax_fp32=True)  # [B, heads, N, head_dim]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Image tokens of sample b attend to the valid text tokens of sample b only (packed, block-diagonal)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: BlockDiagonalMask) -> torch.Tensor:
        # x: [B, N, C]; cond: [1, sum(L_b), C] (padding dropped); mask: q lengths [N]*B, kv lengths L_b
        B, N, C = x.shape
        q = self.q_linear(x).view(1, B * N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim).unbind(2)
        x = attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, softmax_fp32=False)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


# ---------------------------------------------------------------------------------------------------------------------
# Block and final layer
# ---------------------------------------------------------------------------------------------------------------------


class STDiT2Block(nn.Module):
    """Spatial attention -> temporal attention (RoPE) -> cross-attention -> MLP, with adaLN-single modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, drop_path: float, qk_norm: bool,
                 qk_norm_legacy: bool) -> None:
        super().__init__()
        self.drop_rate = drop_path
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, qk_norm_legacy)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.attn_temp = SelfAttention(hidden_size, num_heads, qk_norm, qk_norm_legacy)
        self.scale_shift_table_temporal = nn.Parameter(torch.randn(3, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: torch.Tensor,  # [B, N, C]
        y: torch.Tensor,  # [1, sum(L_b), C]
        t_spc: torch.Tensor,  # [B, 6C]
        t_tmp: torch.Tensor,  # [B, 3C]
        cross_mask: BlockDiagonalMask,
        x_mask: torch.Tensor | None,  # [B, T] bool, True = noised frame
        t0_spc: torch.Tensor | None,
        t0_tmp: torch.Tensor | None,
        T: int,
        S: int,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        B, N, C = x.shape
        mod = self.scale_shift_table[None] + t_spc.reshape(B, 6, -1)  # [B, 6, C]
        mod0 = None if x_mask is None else self.scale_shift_table[None] + t0_spc.reshape(B, 6, -1)
        mod_t = self.scale_shift_table_temporal[None] + t_tmp.reshape(B, 3, -1)  # [B, 3, C]
        mod_t0 = None if x_mask is None else self.scale_shift_table_temporal[None] + t0_tmp.reshape(B, 3, -1)
        # each [B, T or 1, 1, C], broadcasting over the S tokens of a frame
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = select_frames(x_mask, mod, mod0).unbind(1)
        shift_tmp, scale_tmp, gate_tmp = select_frames(x_mask, mod_t, mod_t0).unbind(1)

        x = x.view(B, T, S, C)
        # 1. spatial self-attention over the S tokens of each frame
        h = modulate(layer_norm(x), shift_msa, scale_msa)
        h = self.attn(h.reshape(B * T, S, C)).view(B, T, S, C)
        x = x + drop_path(gate_msa * h, self.drop_rate, self.training)
        # 2. temporal self-attention over the T tokens at each spatial position
        h = modulate(layer_norm(x), shift_tmp, scale_tmp)
        h = h.permute(0, 2, 1, 3).reshape(B * S, T, C)
        h = self.attn_temp(h, rope=rope).view(B, S, T, C).permute(0, 2, 1, 3)
        x = x + drop_path(gate_tmp * h, self.drop_rate, self.training)
        # 3. cross-attention to the caption: no norm, no modulation
        x = x + self.cross_attn(x.reshape(B, N, C), y, cross_mask).view(B, T, S, C)
        # 4. MLP
        h = modulate(layer_norm(x), shift_mlp, scale_mlp)
        x = x + drop_path(gate_mlp * self.mlp(h), self.drop_rate, self.training)
        return x.reshape(B, N, C)


class FinalLayer(nn.Module):
    """LayerNorm, modulation by the plain timestep embedding, Linear to patch * out_channels."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, x_mask: torch.Tensor | None = None,
                t0: torch.Tensor | None = None, T: int | None = None, S: int | None = None) -> torch.Tensor:
        B, N, C = x.shape
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # [B, 1, C] each
        h = modulate(layer_norm(x), shift, scale)
        if x_mask is not None:
            # Two reference quirks kept for weight compatibility: t0 here is t0 + data_info, and the condition
            # frames are modulated a second time on top of the already modulated activations.
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            h0 = modulate(layer_norm(h), shift0, scale0)
            h = torch.where(x_mask[:, :, None, None], h.view(B, T, S, C), h0.view(B, T, S, C)).view(B, N, C)
        return self.linear(h)  # [B, N, pt*ph*pw*C_out]


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


class STDiT2(nn.Module):
    """Open-Sora 1.1 STDiT2: latent video [B, C_in, T, H, W] + caption -> [eps, variance interpolation]."""

    def __init__(self, config: STDiT2Config) -> None:
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.grad_checkpointing = config.grad_checkpointing

        # Registration order = the checkpoint's key order.
        self.pos_embed = PositionEmbedding2D(C)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.t_block_temp = nn.Sequential(nn.SiLU(), nn.Linear(C, 3 * C))
        self.y_embedder = CaptionEmbedder(config.caption_channels, C, config.class_dropout_prob,
                                          config.model_max_length)
        self.rope = RotaryEmbedding(config.head_dim)
        drop_rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            STDiT2Block(C, config.num_heads, config.mlp_ratio, drop_rates[i], config.qk_norm, config.qk_norm_legacy)
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(C, math.prod(config.patch_size), self.out_channels)
        self.csize_embedder = SizeEmbedder(C // 3)
        self.ar_embedder = SizeEmbedder(C // 3)
        self.fl_embedder = SizeEmbedder(C)
        self.fps_embedder = SizeEmbedder(C)

        self.initialize_weights()
        self._apply_freeze(config.freeze)

    def initialize_weights(self) -> None:
        """The reference's init scheme (so that training from scratch starts where it did)."""
        C = self.config.hidden_size
        # 1. Every Linear: Xavier-uniform weight, zero bias.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # 2. Patch embedding like a Linear over the flattened kernel; its bias keeps PyTorch's Conv default.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        fan_in = w[0].numel()
        nn.init.uniform_(self.x_embedder.proj.bias, -(fan_in**-0.5), fan_in**-0.5)
        # 3. Timestep MLP, modulation heads and caption projection: N(0, 0.02).
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1], self.t_block_temp[1],
                    self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        # 4. Tables and the null caption: N(0, 1) / sqrt(width).
        for block in self.blocks:
            nn.init.normal_(block.scale_shift_table, std=C**-0.5)
            nn.init.normal_(block.scale_shift_table_temporal, std=C**-0.5)
        nn.init.normal_(self.final_layer.scale_shift_table, std=C**-0.5)
        y_emb = self.y_embedder.y_embedding
        y_emb.copy_(torch.randn_like(y_emb) * y_emb.shape[1] ** -0.5)
        # 5. RMSNorm weights one, RoPE frequencies standard.
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        with torch.no_grad():
            self.rope.freqs.copy_(self.rope.default_freqs())
        # 6. Zero-init: temporal attention output, cross-attention output, final layer (new branches start as no-ops).
        for block in self.blocks:
            for lin in (block.attn_temp.proj, block.cross_attn.proj):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _apply_freeze(self, freeze: str | None) -> None:
        if freeze == "not_temporal":
            for name, p in self.named_parameters():
                p.requires_grad_("attn_temp" in name)
        elif freeze == "text":
            for name, p in self.named_parameters():
                if "cross_attn" in name:
                    p.requires_grad_(False)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def get_dynamic_size(self, x: torch.Tensor) -> tuple[int, int, int]:
        _, _, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        return -(-T // pt), -(-H // ph), -(-W // pw)

    def unpatchify(self, x: torch.Tensor, T: int, H: int, W: int, Tx: int, Hx: int, Wx: int) -> torch.Tensor:
        """[B, N, pt*ph*pw*C_out] -> [B, C_out, Tx, Hx, Wx], channels (pt, ph, pw, C_out) with C_out fastest."""
        pt, ph, pw = self.patch_size
        B = x.shape[0]
        x = x.view(B, T, H, W, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, self.out_channels, T * pt, H * ph, W * pw)
        return x[:, :, :Tx, :Hx, :Wx]

    def _embed_caption(
        self, y: torch.Tensor, mask: torch.Tensor | None, force_drop_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[int]]:
        """Project the caption and pack every sample's kept (non-padding) tokens into one sequence.

        y: [B, 1, L, caption_channels]; mask: [B or B/k, L] (None keeps all L tokens). Returns [1, sum(L_b), C] and
        the per-sample lengths L_b, from which forward builds the cross-attention's block-diagonal mask.
        """
        y = self.y_embedder(y, self.training, force_drop_ids)  # [B, 1, L, C]
        C = y.shape[-1]
        if mask is None:
            return y.squeeze(1).reshape(1, -1, C), [y.shape[2]] * y.shape[0]
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape[0] != y.shape[0]:
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        keep = mask.to(y.device) != 0  # [B, L]
        return y.squeeze(1)[keep].view(1, -1, C), keep.sum(dim=1).tolist()

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        num_frames: torch.Tensor | None = None,
        height: torch.Tensor | None = None,
        width: torch.Tensor | None = None,
        ar: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        *,
        force_drop_ids: torch.Tensor | None = None,
        output_fp32: bool = True,
    ) -> torch.Tensor:
        """
        x: [B, C_in, T, H, W] latent; timestep: [B]; y: [B, 1, L, caption_channels]; mask: [B or B/k, L] text mask;
        x_mask: [B, T] bool (True = noised frame, False = clean condition frame using timestep 0);
        num_frames, height, width (pixels), ar, fps: [B or B/k] (tiled to B).
        force_drop_ids: [B] (1 = use the null caption), also outside training. output_fp32: cast the result to
        float32 as the reference does (False keeps the model dtype, for float64 checks).
        Returns [B, C_out, T, H, W].
        """
        B = x.shape[0]
        dtype = self.x_embedder.proj.weight.dtype
        x = x.to(dtype)
        timestep = torch.as_tensor(timestep, device=x.device).to(dtype)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        y = y.to(dtype)
        height, width = _as_batch(height, "height", x.device), _as_batch(width, "width", x.device)
        ar, num_frames = _as_batch(ar, "ar", x.device), _as_batch(num_frames, "num_frames", x.device)
        fps = _as_batch(fps, "fps", x.device)

        # 1. Size conditioning: data_info (spatial branch) and fl (temporal branch)
        csize = self.csize_embedder(torch.stack([height, width], dim=1), B)  # [B, 2C/3]
        data_info = torch.cat([csize, self.ar_embedder(ar[:, None], B)], dim=1)  # [B, C]
        fl = self.fl_embedder(num_frames[:, None], B) + self.fps_embedder(fps[:, None], B)  # [B, C]

        # 2. Patch tokens + spatial positional embedding (scale from sample 0's pixel size, PixArt style)
        _, _, Tx, Hx, Wx = x.shape
        T, H, W = self.get_dynamic_size(x)
        S = H * W
        rs = (height[0].item() * width[0].item()) ** 0.5
        pos_emb = self.pos_embed(x, H, W, scale=rs / self.config.input_sq_size, base_size=round(S**0.5))  # [1, S, C]
        x = self.x_embedder(x)  # [B, N, C]
        C = x.shape[-1]
        x = (x.view(B, T, S, C) + pos_emb[:, None]).view(B, T * S, C)

        # 3. Timestep conditioning (and the timestep-0 version for condition frames)
        t = self.t_embedder(timestep, dtype=x.dtype)  # [B, C]
        t_spc, t_tmp = self.t_block(t + data_info), self.t_block_temp(t + fl)  # [B, 6C], [B, 3C]
        t0_spc = t0_spc_mod = t0_tmp_mod = None
        if x_mask is not None:
            x_mask = x_mask.to(device=x.device, dtype=torch.bool)
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype=x.dtype)
            t0_spc = t0 + data_info
            t0_spc_mod, t0_tmp_mod = self.t_block(t0_spc), self.t_block_temp(t0 + fl)

        # 4. Caption: project, then drop padding tokens (kept per sample as a block-diagonal mask)
        y, y_lens = self._embed_caption(y, mask, force_drop_ids)  # [1, sum(L_b), C]
        cross_mask = BlockDiagonalMask.from_seqlens([T * S] * B, y_lens)

        # 5. Blocks
        rope = self.rope(T)
        for block in self.blocks:
            args = (x, y, t_spc, t_tmp, cross_mask, x_mask, t0_spc_mod, t0_tmp_mod, T, S, rope)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)

        # 6. Final layer and unpatchify
        x = self.final_layer(x, t, x_mask, t0_spc, T, S)  # [B, N, pt*ph*pw*C_out]
        x = self.unpatchify(x, T, H, W, Tx, Hx, Wx)  # [B, C_out, Tx, Hx, Wx]
        return x.to(torch.float32) if output_fp32 else x


def build_stdit2(name_or_config: str | STDiT2Config | Mapping[str, Any], **overrides: Any) -> STDiT2:
    """Build from a preset name (``models.stdit2_config.STDIT2_PRESETS``), a config, or a dict of config fields,
    with field overrides."""
    return STDiT2(stdit2_config(name_or_config, **overrides))
