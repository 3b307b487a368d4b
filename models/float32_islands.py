"""How far a float64 result may honestly move when float32 "islands" inside it round differently on another CPU.

The reference computes a few things in float32 even in its float64 runs (the timestep and size sinusoids, the
positional-embedding frequencies, RMSNorm, the IDDPM coefficient tables, ...). Elementwise ``+ - * /`` and ``sqrt``
are correctly rounded everywhere, but float32 transcendentals (exp, log, sin, cos, pow) and float32 reductions
(mean, sum, matmul) are not: their last bit depends on the vector unit (AVX2, AVX-512, AMX, NEON) and the summation
order. A golden tensor downstream of such an island can therefore only be reproduced to within the *propagated*
effect of a few float32 ulps there, while a tensor computed entirely in float64 reproduces to ~1e-15.

We measure that propagated effect instead of guessing it: :func:`island_effects` reruns a computation with every
float32 result of a machine-dependent op moved by one ulp (random signs with two seeds, and all up), and reports per
output tensor the largest change. :func:`island_tolerance` turns that into a bound:

    tol = max(F64_ATOL * max(1, |ref|), ISLAND_ULPS * effect)

``ISLAND_ULPS = 2`` because two conforming float32 implementations, each within one ulp of the exact value, differ by
at most two. A tensor no island reaches has effect 0 and keeps the float64 bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

F64_ATOL = 1e-12
"""Bound for a tensor computed entirely in float64 (relative to its magnitude when that exceeds 1)."""
ISLAND_ULPS = 2
"""Bound = this many times the effect of a one-ulp change at every float32 island."""
NUDGE_PATTERNS: tuple[tuple[str, int], ...] = (("random", 1), ("random", 2), ("up", 0))
"""The one-ulp patterns whose largest effect is taken (random signs catch cancellation, "up" a coherent shift)."""

_MACHINE_DEPENDENT = (
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "tanh", "sigmoid", "erf",
    "pow", "rsqrt", "softmax", "log_softmax", "mean", "sum", "var", "std", "norm",
    "matmul", "mm", "bmm", "baddbmm", "addmm", "linear", "layer_norm", "silu", "gelu",
    "scaled_dot_product_attention", "conv3d", "__pow__", "__rpow__", "__matmul__",
)
"""float32 ops whose last bit may differ between CPUs (transcendentals, reductions, matrix products)."""


def _machine_dependent_ops() -> frozenset:
    ops = set()
    for name in _MACHINE_DEPENDENT:
        for namespace in (torch, torch.Tensor, F):
            op = getattr(namespace, name, None)
            if op is not None:
                ops.add(op)
    return frozenset(ops)


class _Float32Nudge(TorchFunctionMode):
    """Moves every float32 result of a machine-dependent op by one ulp (``random`` signs, or all ``up``)."""

    def __init__(self, pattern: str, seed: int) -> None:
        super().__init__()
        if pattern not in ("random", "up"):
            raise ValueError(f"unknown nudge pattern {pattern!r}")
        self.pattern = pattern
        self.generator = torch.Generator().manual_seed(seed)
        self.ops = _machine_dependent_ops()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.ops and isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            magnitude = out.detach().abs()
            ulp = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude
            if self.pattern == "up":
                return out + ulp
            signs = torch.randint(0, 2, out.shape, generator=self.generator).to(out.device, out.dtype) * 2 - 1
            return out + signs * ulp
        return out


@contextmanager
def nudged_float32_islands(pattern: str = "random", seed: int = 0) -> Iterator[None]:
    """Inside this block every float32 island rounds one ulp differently: a simulated other CPU."""
    with _Float32Nudge(pattern, seed):
        yield


def island_effects(
    compute: Callable[[], Mapping[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Run ``compute`` plainly and under each nudge pattern; return its plain outputs and, per output, the largest
    max-abs change a one-ulp nudge caused. ``compute`` must build everything it uses (models, tables) itself, so
    islands computed at construction time are nudged too."""
    clean = {name: t.detach() for name, t in compute().items()}
    effect = dict.fromkeys(clean, 0.0)
    for pattern, seed in NUDGE_PATTERNS:
        with nudged_float32_islands(pattern, seed):
            nudged = compute()
        for name, t in clean.items():
            diff = (nudged[name].detach().double() - t.double()).abs().max().item() if t.numel() else 0.0
            effect[name] = max(effect[name], diff)
    return clean, effect


def float32_ulp(x: float) -> float:
    """The spacing of float32 values at |x|."""
    a = torch.tensor(abs(x), dtype=torch.float32)
    return (torch.nextafter(a, torch.tensor(float("inf"))) - a).item()


def island_tolerance(effect: float, ref: torch.Tensor) -> float:
    """The bound for one golden tensor: float64 exactness where no island reaches it, else ISLAND_ULPS x effect.
    A float32 golden tensor (a cast of the float64 result) may also differ by the one ulp the cast can flip."""
    scale = max(1.0, ref.detach().abs().max().item()) if ref.numel() else 1.0
    floor = F64_ATOL * scale if ref.dtype == torch.float64 else float32_ulp(scale)
    return max(floor, ISLAND_ULPS * effect)
