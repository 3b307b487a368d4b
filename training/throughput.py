"""Throughput arithmetic shared by training and ``benchmarks/gpu_check.py``: tokens, model FLOPs and MFU.

Model FLOPs are counted from the architecture, not measured: 2 FLOPs per multiply-add of every matrix product
(Linear, the patch Conv3d, the attention products ``q k^T`` and ``p v``); norms, activations, softmax, RoPE and
the other elementwise work are left out, as MFU conventions do. A training step costs 3x the forward (the backward
computes gradients for inputs and for weights, 2x the forward); recomputation by gradient checkpointing is not
counted (it changes hardware FLOPs, not model FLOPs).

For STDiT2 with hidden size C, depth D, MLP width M = C * mlp_ratio, latent patch grid T' x H' x W' (S = H'W' tokens
per frame, N = T'S video tokens), L caption tokens (``model_max_length``) of which Lv are valid (not padding), the
forward multiply-adds per sample are

* per video token: patch embedding ``C_in * p * C`` (p = pt*ph*pw), per block ``10 C^2 + 2 C M`` (spatial qkv and
  proj 4C^2, temporal qkv and proj 4C^2, cross-attention q and proj 2C^2, MLP 2CM), final layer ``C * p * C_out``;
* per caption token (all L, the projection runs before padding is dropped): ``caption_channels * C + C^2``;
* per valid caption token: cross-attention k/v, ``2 C^2`` per block;
* per sample: the timestep MLP and the t_block / t_block_temp heads, the size/aspect/frames/fps embedders;
* attention per block: spatial ``2 T' S^2 C``, temporal ``2 S T'^2 C``, cross ``2 N Lv C``.

The dominant term is the usual ``6 x parameters x tokens`` (3 passes x 2 FLOPs x the per-video-token weights x N);
the rest is the attention term and the small text/sample terms. Frame-conditioned batches (``x_mask``) run the
per-sample timestep heads twice; that adds well under 0.01 % and is not counted.

MFU = achieved model FLOP/s per device / the device's dense bf16 peak, looked up from its name
(:func:`peak_bf16_tflops`); unknown devices (and CPUs) have no peak, so no MFU, unless ``OPENSORA_PEAK_TFLOPS``
gives one. Nothing here imports torch at module level.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

PEAK_ENV_VAR = "OPENSORA_PEAK_TFLOPS"
FREQ_EMBED = 256  # STDiT2's sinusoidal timestep / size embedding width

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. Each entry's words must all be
# words of the upper-cased device name ("-" and "_" split words too); the first match wins, so specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200", "NVL"), 835.0),
    (("H200",), 989.0),  # H200 SXM
    (("GH200",), 989.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    (("H800", "PCIE"), 756.0),
    (("H800",), 989.0),
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("A800",), 312.0),
    (("L40S",), 362.0),
    (("L40",), 181.0),
    (("A10",), 125.0),
    (("L4",), 121.0),
)


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak TFLOP/s of a device by its name (``torch.cuda.get_device_name()``), None when unknown.

    >>> peak_bf16_tflops("NVIDIA H100 80GB HBM3"), peak_bf16_tflops("NVIDIA H100 PCIe"), peak_bf16_tflops("cpu")
    (989.0, 756.0, None)
    """
    if not device_name:
        return None
    words = set(device_name.upper().replace("-", " ").replace("_", " ").split())
    for needles, peak in PEAK_BF16_TFLOPS:
        if all(n in words for n in needles):
            return peak
    return None


def device_peak_tflops(device: Any = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from) for a torch device: ``$OPENSORA_PEAK_TFLOPS``, else the CUDA name table."""
    override = os.environ.get(PEAK_ENV_VAR, "").strip()
    if override:
        return float(override), f"${PEAK_ENV_VAR}"
    import torch

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return None, f"no peak known for {device.type}"
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_tflops(name)
    return peak, (name if peak is not None else f"{name} (not in the peak table)")


# ---------------------------------------------------------------------------------------------------------------------
# Tokens and FLOPs of STDiT2
# ---------------------------------------------------------------------------------------------------------------------


def patch_grid(config: Any, latent_thw: tuple[int, int, int]) -> tuple[int, int, int]:
    """Patches along (T, H, W) of a latent [.., T, H, W] (the patch embedding pads each axis up to a multiple)."""
    return tuple(-(-int(n) // int(p)) for n, p in zip(latent_thw, config.patch_size))  # type: ignore[return-value]


def video_tokens(config: Any, latent_thw: tuple[int, int, int]) -> int:
    """N = T' * H' * W' video tokens of one sample."""
    return math.prod(patch_grid(config, latent_thw))


def stdit2_forward_flops(config: Any, latent_thw: tuple[int, int, int], text_tokens: float | None = None) -> float:
    """Model FLOPs of one STDiT2 forward for one sample (module docstring); ``text_tokens`` = valid caption tokens
    (default: all ``model_max_length``). ``config`` is an ``STDiT2Config`` (or anything with its fields)."""
    C, D = int(config.hidden_size), int(config.depth)
    M = int(C * config.mlp_ratio)
    p = math.prod(int(x) for x in config.patch_size)
    c_in = int(config.in_channels)
    c_out = c_in * 2 if getattr(config, "pred_sigma", True) else c_in
    L = int(config.model_max_length)
    Lv = float(L if text_tokens is None else text_tokens)
    T, H, W = patch_grid(config, latent_thw)
    S = H * W
    N = T * S
    c3 = C // 3

    per_video_token = c_in * p * C + D * (10 * C * C + 2 * C * M) + C * p * c_out
    per_caption_token = int(config.caption_channels) * C + C * C
    per_valid_caption_token = D * 2 * C * C
    per_sample = (
        (FREQ_EMBED * C + C * C)  # t_embedder
        + C * 6 * C + C * 3 * C  # t_block, t_block_temp
        + 3 * (FREQ_EMBED * c3 + c3 * c3)  # csize (height, width) and ar embedders, C/3 wide
        + 2 * (FREQ_EMBED * C + C * C)  # fl and fps embedders
    )
    attention = D * (2 * T * S * S * C + 2 * S * T * T * C + 2 * N * Lv * C)
    macs = N * per_video_token + L * per_caption_token + Lv * per_valid_caption_token + per_sample + attention
    return 2.0 * macs


def stdit2_train_flops(config: Any, latent_thw: tuple[int, int, int], text_tokens: float | None = None) -> float:
    """Model FLOPs of one training step for one sample: forward + backward = 3 x forward."""
    return 3.0 * stdit2_forward_flops(config, latent_thw, text_tokens)


def mfu(flops_per_s: float, peak_tflops: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over ``num_devices`` devices against their bf16 peak."""
    if not peak_tflops or peak_tflops <= 0:
        return None
    return flops_per_s / (peak_tflops * 1e12 * num_devices)


# ---------------------------------------------------------------------------------------------------------------------
# A running window for the training loop
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ThroughputWindow:
    """Samples, video tokens and model FLOPs since the last report; ``report`` turns them into rates and restarts.

    Counts are over all ranks (add each rank's batch times the world size); MFU divides by the world size.
    """

    peak_tflops: float | None = None
    num_devices: int = 1
    samples: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.monotonic()

    def add(self, config: Any, latent_shape: tuple[int, ...], text_tokens: float | None = None, replicas: int = 1) -> None:
        """One batch of latents ``[B, C, T, H, W]`` (``text_tokens``: mean valid caption tokens per sample)."""
        batch, thw = int(latent_shape[0]), tuple(int(n) for n in latent_shape[2:5])
        self.samples += batch * replicas
        self.tokens += batch * video_tokens(config, thw) * replicas  # type: ignore[arg-type]
        self.flops += batch * stdit2_train_flops(config, thw, text_tokens) * replicas  # type: ignore[arg-type]

    def report(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        flops_per_s = self.flops / elapsed
        out = {"samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed, "model_tflops_per_s": flops_per_s / 1e12}
        util = mfu(flops_per_s, self.peak_tflops, self.num_devices)
        if util is not None:
            out["mfu"] = util
        self.samples = self.tokens = self.flops = 0.0
        self.started = time.monotonic()
        return out
