"""One attention function with interchangeable backends.

Every attention in STDiT2 (spatial, temporal and cross) calls :func:`attention`; the kernel is picked here, at run
time, instead of by flags threaded through the model (the reference's ``enable_flash_attn`` switches, one of which was
silently misspelled in its training configs).

Backends:

``"sdpa"``      ``torch.nn.functional.scaled_dot_product_attention`` (default on CPU and for float32).
``"flash"``     ``flash_attn`` (CUDA, fp16/bf16, head_dim <= 256), used automatically when installed.
``"xformers"``  ``xformers.ops.memory_efficient_attention`` (CUDA), the reference's kernel for cross-attention.
``"eager"``     explicit ``softmax(q k^T * scale) v``. It mirrors the reference exactly, including its float32 softmax
                inside float64 runs, so it is the backend of the float64 conformance path (and the automatic choice
                for float64 inputs).

Choice order: the ``backend`` argument, then :func:`use_attention_backend` (a context manager), then the environment
variable ``OPENSORA_ATTN_BACKEND`` (one of the names above or ``auto``), then automatic. A backend that is asked for
explicitly but cannot run the given inputs raises instead of falling back silently.

Tensor layout is ``[B, heads, N, head_dim]`` (the SDPA layout). Variable-length batches (cross-attention to text with
its padding dropped) are passed packed, as xformers does: batch 1, the sequences concatenated along N, and a
:class:`BlockDiagonalMask` that says where each sequence starts.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

ENV_VAR = "OPENSORA_ATTN_BACKEND"
AttentionBackend = Literal["sdpa", "flash", "xformers", "eager"]
"""A kernel :func:`attention` can run; "auto" (or None) picks one per call."""
BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

_HALF = (torch.float16, torch.bfloat16)
_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("opensora_attn_backend", default=None)


@dataclass(frozen=True)
class BlockDiagonalMask:
    """Packed variable-length attention: query sequence i attends only to key/value sequence i.

    ``q_seqlens[i]`` query tokens and ``kv_seqlens[i]`` key tokens belong to sample i; the tensors hold the sequences
    back to back along the token axis (batch size 1). This is xformers' ``BlockDiagonalMask.from_seqlens`` and
    flash-attn's ``cu_seqlens`` in one neutral description.
    """

    q_seqlens: tuple[int, ...]
    kv_seqlens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.q_seqlens) != len(self.kv_seqlens):
            raise ValueError(
                f"q_seqlens ({len(self.q_seqlens)}) and kv_seqlens ({len(self.kv_seqlens)}) differ in length"
            )
        if any(n <= 0 for n in self.kv_seqlens):
            raise ValueError(f"every sequence needs at least one key token, got kv_seqlens={self.kv_seqlens}")

    @classmethod
    def from_seqlens(cls, q_seqlens: Sequence[int], kv_seqlens: Sequence[int]) -> "BlockDiagonalMask":
        return cls(tuple(int(n) for n in q_seqlens), tuple(int(n) for n in kv_seqlens))


@functools.cache
def _installed(module: str) -> bool:
    """Whether an optional kernel library imports here (checked once; a broken install warns and counts as absent)."""
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as err:  # e.g. a wheel built for another CUDA/torch version
        warnings.warn(f"{module} is installed but does not import ({err}); attention will not use it", stacklevel=2)
        return False
    return True


def available_backends() -> list[str]:
    """Backends whose libraries are importable here (whether they suit given inputs is checked per call)."""
    out = ["sdpa", "eager"]
    if _installed("flash_attn"):
        out.append("flash")
    if _installed("xformers"):
        out.append("xformers")
    return out


@contextlib.contextmanager
def use_attention_backend(name: AttentionBackend | Literal["auto"] | None) -> Iterator[None]:
    """Force one backend (or ``None``/"auto" for automatic) inside a ``with`` block; overrides the env var."""
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS} or 'auto'")
    token = _context_backend.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _context_backend.reset(token)


def _unsupported_reason(name: str, q: torch.Tensor, attn_mask: object) -> str | None:
    """Why backend ``name`` cannot run these inputs, or None when it can."""
    if name in ("sdpa", "eager"):
        return None
    if name == "flash":
        if not _installed("flash_attn"):
            return "flash_attn is not installed"
        if not q.is_cuda:
            return "flash_attn needs CUDA tensors"
        if q.dtype not in _HALF:
            return f"flash_attn needs float16/bfloat16, got {q.dtype}"
        if q.shape[-1] > 256:
            return f"flash_attn supports head_dim <= 256, got {q.shape[-1]}"
        if attn_mask is not None and not isinstance(attn_mask, BlockDiagonalMask):
            return "flash_attn takes no dense attention mask"
        return None
    if name == "xformers":
        if not _installed("xformers"):
            return "xformers is not installed"
        if not q.is_cuda:
            return "xformers memory_efficient_attention needs CUDA tensors here"
        if attn_mask is not None and not isinstance(attn_mask, BlockDiagonalMask):
            return "the xformers path takes only None or a BlockDiagonalMask"
        return None
    return f"unknown backend {name!r}"


def resolve_backend(q: torch.Tensor, attn_mask: object = None,
                    backend: AttentionBackend | Literal["auto"] | None = None) -> AttentionBackend:
    """The backend that :func:`attention` will use for these inputs."""
    requested = backend or _context_backend.get() or os.environ.get(ENV_VAR) or "auto"
    requested = requested.strip().lower()
    if requested == "auto":
        if q.dtype == torch.float64:
            # float64 exists here for conformance: mirror the reference's float32 softmax exactly.
            return "eager"
        for name in ("flash", "xformers"):
            if q.is_cuda and q.dtype in _HALF and _unsupported_reason(name, q, attn_mask) is None:
                if name == "xformers" and not isinstance(attn_mask, BlockDiagonalMask):
                    continue  # SDPA on CUDA already has memory-efficient kernels for the plain case
                return name
        return "sdpa"
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r} (from argument, context or ${ENV_VAR}); "
                         f"choose one of {BACKENDS} or 'auto'")
    reason = _unsupported_reason(requested, q, attn_mask)
    if reason is not None:
        raise RuntimeError(f"attention backend {requested!r} was requested but cannot run: {reason}")
    return requested


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | BlockDiagonalMask | None = None,
    backend: AttentionBackend | Literal["auto"] | None = None,
    *,
    scale: float | None = None,
    softmax_fp32: bool = True,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` for ``q: [B, H, Nq, D]``, ``k, v: [B, H, Nk, D]`` -> ``[B, H, Nq, D]``.

    ``attn_mask``: None; a bool (True = attend) or additive float tensor broadcastable to ``[B, H, Nq, Nk]``; or a
    :class:`BlockDiagonalMask` with packed inputs (B = 1). ``scale`` defaults to ``D ** -0.5``.

    ``softmax_fp32`` only affects the eager backend: True computes the softmax in float32 and casts back, as the
    reference's self-attention does (a precision island even in float64 runs); False computes it in the inputs'
    dtype (at least float32), as the reference's exact cross-attention does. Fused kernels keep their own internal
    float32 accumulation.
    """
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected [B, H, N, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = resolve_backend(q, attn_mask, backend)

    if isinstance(attn_mask, BlockDiagonalMask):
        if q.shape[0] != 1 or k.shape[0] != 1:
            raise ValueError("a BlockDiagonalMask needs packed inputs with batch size 1")
        if sum(attn_mask.q_seqlens) != q.shape[2] or sum(attn_mask.kv_seqlens) != k.shape[2]:
            raise ValueError(f"BlockDiagonalMask lengths {sum(attn_mask.q_seqlens)}/{sum(attn_mask.kv_seqlens)} do not "
                             f"match the packed token counts {q.shape[2]}/{k.shape[2]}")
        if name == "flash":
            return _flash_varlen(q, k, v, attn_mask, scale)
        if name == "xformers":
            return _xformers(q, k, v, attn_mask, scale)
        return _padded_block_diagonal(q, k, v, attn_mask, scale, name, softmax_fp32)

    if name == "flash":
        return _flash(q, k, v, scale)
    if name == "xformers":
        return _xformers(q, k, v, None, scale)
    if name == "eager":
        return _eager(q, k, v, attn_mask, scale, softmax_fp32)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


# ---------------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------------


def _eager(q, k, v, attn_mask, scale: float, softmax_fp32: bool) -> torch.Tensor:
    """The reference's math, operation for operation: scale q, matmul, softmax (float32 island), matmul."""
    dtype = q.dtype
    logits = (q * scale) @ k.transpose(-2, -1)  # [B, H, Nq, Nk]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    if softmax_fp32 and dtype == torch.float64 and attn_mask is None:
        probs = reference_softmax_fp32(logits.to(torch.float32))
    else:
        softmax_dtype = torch.float32 if softmax_fp32 else torch.promote_types(dtype, torch.float32)
        probs = logits.to(softmax_dtype).softmax(dim=-1)
    return probs.to(dtype) @ v


# ---------------------------------------------------------------------------------------------------------------------
# Machine-independent float32 softmax (for the float64 conformance path)
# ---------------------------------------------------------------------------------------------------------------------
# PyTorch's CPU float32 softmax sums exp(x - max) in an order set by the SIMD width of the machine (8 lanes on AVX2,
# 16 on AVX512), so its last bit depends on the CPU; that flips about 15% of the probabilities and moves a float64
# STDiT2 forward by ~5e-8. The golden tensors were produced on an AVX2 machine. This function reproduces that kernel
# bit for bit on any CPU: SLEEF's expf (u10, with fused multiply-adds), the 8-lane accumulation and lane tree of
# ATen's reduce_all, then a multiply by the reciprocal of the sum. It is slow and only used for float64 inputs.

_SLEEF_R_LN2 = 1.442695040888963407359924681001892137426645954152985934135449406931
_SLEEF_L2U = 0.693145751953125
_SLEEF_L2L = 1.428606765330187045e-06
_SLEEF_EXPF_POLY = (0.000198527617612853646278381, 0.00139304355252534151077271, 0.00833336077630519866943359,
                    0.0416664853692054748535156, 0.166666671633720397949219, 0.5)


def _fma32(a: torch.Tensor, b: torch.Tensor | float, c: torch.Tensor | float) -> torch.Tensor:
    """float32 fused multiply-add: the product of two float32 values is exact in float64, then one rounding."""
    return (a.double() * b + (c.double() if isinstance(c, torch.Tensor) else c)).to(torch.float32)


def _f32(v: float) -> float:
    """A Python float holding the float32 value nearest to v (SLEEF's constants are float32)."""
    return float(torch.tensor(v, dtype=torch.float32))


def _sleef_expf(d: torch.Tensor) -> torch.Tensor:
    """SLEEF xexpf (1.0 ULP) on float32, as vectorised by ATen: Cody-Waite reduction, degree-6 polynomial."""
    q = torch.round(d * _f32(_SLEEF_R_LN2))  # round half to even, like vrint
    s = _fma32(q, -_f32(_SLEEF_L2U), d)
    s = _fma32(q, -_f32(_SLEEF_L2L), s)
    u = torch.full_like(d, _f32(_SLEEF_EXPF_POLY[0]))
    for coef in _SLEEF_EXPF_POLY[1:]:
        u = _fma32(u, s, _f32(coef))
    u = 1.0 + _fma32(s * s, u, s)
    qi = q.to(torch.int32)
    half = qi >> 1  # scale by 2^q in two steps so that subnormal results stay exact
    one = torch.ones_like(u)
    u = u * torch.ldexp(one, half) * torch.ldexp(one, qi - half)
    return torch.where(d < -104, torch.zeros_like(u), u)


def _avx2_row_sum(e: torch.Tensor, lanes: int = 8) -> torch.Tensor:
    """ATen ``vec::reduce_all`` (+) over the last dim with 8-lane vectors, keepdim."""
    n = e.shape[-1]
    if n < lanes:  # short rows: one partial vector, summed lane by lane
        s = e[..., 0:1]
        for i in range(1, n):
            s = s + e[..., i : i + 1]
        return s
    chunks = -(-n // lanes)
    acc_in = F.pad(e, (0, chunks * lanes - n)).unflatten(-1, (chunks, lanes))  # zero lanes leave sums unchanged
    acc = acc_in[..., 0, :]
    for j in range(1, chunks):
        acc = acc + acc_in[..., j, :]
    acc = acc[..., 0:4] + acc[..., 4:8]  # 256-bit halves
    acc = acc[..., 0:2] + acc[..., 2:4]  # 64-bit pairs
    return acc[..., 0:1] + acc[..., 1:2]


def reference_softmax_fp32(x: torch.Tensor) -> torch.Tensor:
    """float32 softmax over the last dim, bit-identical to PyTorch's AVX2 CPU kernel on any machine."""
    if x.dtype != torch.float32:
        raise TypeError(f"reference_softmax_fp32 takes float32, got {x.dtype}")
    e = _sleef_expf(x - x.amax(dim=-1, keepdim=True))
    return e * (1.0 / _avx2_row_sum(e))


def _pack_index(seqlens: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sample id, position within sample) of every packed token, and the longest sequence."""
    lens = torch.tensor(seqlens, device=device)
    sample = torch.repeat_interleave(torch.arange(len(seqlens), device=device), lens)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(int(lens.sum()), device=device) - starts[sample]
    return sample, pos, max(seqlens)


def _padded_block_diagonal(q, k, v, mask: BlockDiagonalMask, scale, name, softmax_fp32) -> torch.Tensor:
    """Run a packed variable-length batch as a padded batch with a key-padding mask (exactly the same math)."""
    B, H, D = len(mask.q_seqlens), q.shape[1], q.shape[-1]
    device = q.device
    if len(set(mask.q_seqlens)) == 1:
        nq = mask.q_seqlens[0]
        qp = q[0].reshape(H, B, nq, D).transpose(0, 1)  # [B, H, Nq, D]
        q_idx = None
    else:
        q_sample, q_pos, nq = _pack_index(mask.q_seqlens, device)
        qp = q.new_zeros(B, nq, H, D)
        qp[q_sample, q_pos] = q[0].transpose(0, 1)
        qp = qp.transpose(1, 2)
        q_idx = (q_sample, q_pos)
    k_sample, k_pos, nk = _pack_index(mask.kv_seqlens, device)
    kp = k.new_zeros(B, nk, H, D)
    vp = v.new_zeros(B, nk, H, D)
    kp[k_sample, k_pos] = k[0].transpose(0, 1)
    vp[k_sample, k_pos] = v[0].transpose(0, 1)
    kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)  # [B, H, Nk, D]
    key_ok = torch.arange(nk, device=device)[None, :] < torch.tensor(mask.kv_seqlens, device=device)[:, None]
    dense = key_ok[:, None, None, :]  # [B, 1, 1, Nk]
    if name == "eager":
        out = _eager(qp, kp, vp, dense, scale, softmax_fp32)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=dense, scale=scale)
    if q_idx is None:
        return out.transpose(0, 1).reshape(1, H, B * nq, D)
    return out.transpose(1, 2)[q_idx].transpose(0, 1)[None]


def _flash(q, k, v, scale) -> torch.Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2)


def _flash_varlen(q, k, v, mask: BlockDiagonalMask, scale) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    def cu(lens: Sequence[int]) -> torch.Tensor:
        return F.pad(torch.tensor(lens, device=q.device, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))

    out = flash_attn_varlen_func(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),  # [total, H, D]
        cu(mask.q_seqlens), cu(mask.kv_seqlens), max(mask.q_seqlens), max(mask.kv_seqlens),
        softmax_scale=scale,
    )
    return out.transpose(0, 1)[None]


def _xformers(q, k, v, mask: BlockDiagonalMask | None, scale) -> torch.Tensor:
    import xformers.ops as xops

    bias = None
    if mask is not None:
        bias = xops.fmha.BlockDiagonalMask.from_seqlens(list(mask.q_seqlens), list(mask.kv_seqlens))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, scale=scale)
    return out.transpose(1, 2)
