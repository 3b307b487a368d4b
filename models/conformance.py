"""Check our STDiT2 against golden tensors of the reference (Open-Sora v1.1.0).

A fixture directory holds ``meta.json`` (``config``, ``cases``), ``state_dict.safetensors`` and ``io.safetensors``.
Every case's tensors carry its ``prefix``: inputs ``{prefix}input.*``, outputs ``{prefix}output.*`` and
intermediates ``{prefix}inter.{module}.call{k}`` (``{prefix}xmask.inter.*`` for the run with ``x_mask``), recorded
with forward hooks on the named module. We rebuild the model in float64, load the weights, rerun every case with
and without ``x_mask`` with hooks on the same module names, and report the max abs difference of each tensor.
If the fixture has float32 runs (``output.out_fp32run``), a float32 copy of the model is compared too, with the
looser float32 tolerance.

CLI: ``opensora-dag conformance DIR [--atol 1e-5]`` (exit status 0 = everything within tolerance).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FP32_ATOL = 2e-5  # float32 run vs the reference's float32 run (README of the fixtures: observed <= 8.1e-7)
_SIZE_INPUTS = ("num_frames", "height", "width", "ar", "fps")
_INTER_RE = re.compile(r"^(?P<module>.+)\.call(?P<k>\d+)$")


@dataclass(frozen=True)
class ConformanceRow:
    case: str
    name: str
    shape: tuple[int, ...]
    max_abs_diff: float  # nan when the tensor could not be produced
    tol: float
    basis: str = ""  # where the bound comes from: "float64", "2x island 3.1e-06", "float32 run", "--atol"
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tol  # False for nan


@dataclass
class ConformanceReport:
    fixture_dir: str
    rows: list[ConformanceRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def max_abs_diff(self) -> float:
        return max((r.max_abs_diff for r in self.rows), default=math.nan)

    def failures(self) -> list[ConformanceRow]:
        return [r for r in self.rows if not r.ok]

    def row(self, name: str, case: str = "") -> ConformanceRow:
        return next(r for r in self.rows if r.name == name and r.case == case)

    def format_table(self) -> str:
        head = ("case", "tensor", "shape", "max |diff|", "tol", "bound from", "")
        body = [
            (r.case or "-", r.name, "x".join(map(str, r.shape)), f"{r.max_abs_diff:.3e}", f"{r.tol:.1e}", r.basis,
             "ok" if r.ok else f"FAIL {r.note}".strip())
            for r in self.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
        n_ok = sum(r.ok for r in self.rows)
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: {n_ok}/{len(self.rows)} tensors within tolerance, max |diff| "
                     f"{self.max_abs_diff:.3e} ({self.fixture_dir})")
        return "\n".join(lines)


def _max_diff(ours, ref) -> tuple[float, str]:
    if ours is None:
        return math.nan, "not produced"
    if tuple(ours.shape) != tuple(ref.shape):
        return math.nan, f"shape {tuple(ours.shape)}"
    d = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    return (d, "") if not math.isnan(d) else (math.nan, "nan")


def _record(model, module_names):
    """Forward hooks that store each call's output under '{module}.call{k}'; returns (store, handles)."""
    store: dict[str, object] = {}
    handles = []
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # reported as "not produced"

        def hook(_mod, _inp, out, name=name):
            k = sum(1 for key in store if key.rsplit(".call", 1)[0] == name)
            store[f"{name}.call{k}"] = out.detach()

        handles.append(module.register_forward_hook(hook))
    return store, handles


def run_conformance(
    fixture_dir: str | Path,
    atol: float | None = None,
    *,
    fp32_atol: float = FP32_ATOL,
    simulate_other_cpu: int | None = None,
) -> ConformanceReport:
    """Rerun every case of a fixture directory with our STDiT2 and compare outputs and intermediates.

    Each float64 tensor gets its own bound (``models.float32_islands``): 1e-12 where only float64 arithmetic produced
    it, else twice the measured effect of a one-ulp change at every float32 island upstream. ``atol`` replaces every
    float64 bound by one number (a diagnostic). ``simulate_other_cpu=SEED`` computes *our* side with every float32
    island rounded one ulp differently (random signs from SEED), as another vector unit would.
    """
    import torch
    from safetensors.torch import load_file

    from models.checkpoint_io import load_stdit2_weights
    from models.stdit2 import STDiT2
    from models.stdit2_config import STDiT2Config

    # The fixture: config, reference weights, and every case's inputs, outputs and intermediates.
    fixture_dir = Path(fixture_dir)
    meta = json.loads((fixture_dir / "meta.json").read_text())
    io = load_file(str(fixture_dir / "io.safetensors"))
    config = STDiT2Config.from_dict(meta["config"], ignore_unknown=True)
    report = ConformanceReport(str(fixture_dir))

    def build_model64():
        model = STDiT2(config).to(torch.float64).eval()
        load_stdit2_weights(model, fixture_dir / "state_dict.safetensors")
        return model

    model32 = None  # built once, on the first case with a float32 run
    for case in meta.get("cases") or [{"prefix": ""}]:
        prefix = case.get("prefix", "")
        tensors = {k[len(prefix):]: v for k, v in io.items() if k.startswith(prefix)}  # this case's, unprefixed
        if tensors.get("input.x") is None:
            report.rows.append(ConformanceRow(prefix, "input.x", (), math.nan, math.nan, note="missing in fixture"))
            continue

        for run in _case_runs(prefix, tensors):
            # Float64: outputs and intermediates, each against its own bound.
            report.rows += _float64_rows(build_model64, tensors, run, atol, simulate_other_cpu)

            # Float32: the output of a float32 copy of the model, if the reference recorded one.
            ref32 = tensors.get(f"output.{run.out_name}_fp32run")
            if ref32 is not None:
                if model32 is None:
                    model32 = STDiT2(config).eval()
                    model32.load_state_dict({k: v.float() for k, v in build_model64().state_dict().items()})
                report.rows.append(_float32_row(model32, ref32, run, fp32_atol))
    return report


@dataclass(frozen=True)
class _Run:
    """One recorded forward pass of a case: its inputs, and how its tensors are named in the fixture."""

    case: str  # the case's prefix in the fixture ("" for a single case)
    prefix: str  # "" for the run without x_mask, "xmask." for the run with it
    out_name: str  # "out" or "out_xmask"
    args: tuple
    kwargs: dict
    x_mask: Any


def _case_runs(case: str, tensors: dict) -> list[_Run]:
    """The runs a case recorded: without ``x_mask``, then with it if the fixture has one."""
    args = (tensors.get("input.x"), tensors.get("input.timestep"), tensors.get("input.y"))
    kwargs = {k: tensors.get(f"input.{k}") for k in _SIZE_INPUTS}
    kwargs["mask"] = tensors.get("input.mask")
    runs = [_Run(case, "", "out", args, kwargs, None)]
    if tensors.get("input.x_mask") is not None:
        runs.append(_Run(case, "xmask.", "out_xmask", args, kwargs, tensors.get("input.x_mask")))
    return runs


def _forward64(model, run: _Run, modules: Sequence[str]) -> dict:
    """Our float64 outputs and the hooked intermediates of ``modules`` for one run, named as in the fixture."""
    import torch

    from models.attention import use_attention_backend

    store, handles = _record(model, modules)
    try:  # the eager backend mirrors the reference's float32 softmax, whatever OPENSORA_ATTN_BACKEND says
        with torch.no_grad(), use_attention_backend("eager"):
            out = model(*run.args, x_mask=run.x_mask, output_fp32=False, **run.kwargs)
    finally:
        for h in handles:
            h.remove()
    return {f"output.{run.out_name}_f64": out, f"output.{run.out_name}": out.to(torch.float32),
            **{f"{run.prefix}inter.{k}": v for k, v in store.items()}}


def _float64_rows(build_model64, tensors: dict, run: _Run, atol: float | None,
                  simulate_other_cpu: int | None) -> list[ConformanceRow]:
    """One row per reference float64 output and intermediate of ``run``, each with its own bound."""
    from models.float32_islands import island_effects, nudged_float32_islands

    inter_names = sorted(k for k in tensors if k.startswith(f"{run.prefix}inter."))
    modules = sorted({
        m.group("module")
        for n in inter_names
        if (m := _INTER_RE.match(n[len(run.prefix) + len("inter."):]))
    })

    def compute():
        return _forward64(build_model64(), run, modules)

    ours, effect = island_effects(compute)
    if simulate_other_cpu is not None:
        with nudged_float32_islands("random", seed=simulate_other_cpu):
            ours = compute()
    rows = []
    for name in [f"output.{run.out_name}_f64", f"output.{run.out_name}", *inter_names]:
        ref = tensors.get(name)
        if ref is None:
            continue
        d, note = _max_diff(ours.get(name), ref)
        tol, basis = _tolerance(name, ref, effect, atol)
        rows.append(ConformanceRow(run.case, name, tuple(ref.shape), d, tol, basis, note))
    return rows


def _tolerance(name: str, ref, effect: dict, atol: float | None) -> tuple[float, str]:
    """The bound of one float64 tensor and where it comes from (see :func:`run_conformance`)."""
    from models.float32_islands import ISLAND_ULPS, island_tolerance

    if atol is not None:
        return atol, "--atol"
    if name not in effect:
        return island_tolerance(0.0, ref), "float64"
    basis = "float64" if effect[name] == 0 else f"{ISLAND_ULPS}x island {effect[name]:.1e}"
    return island_tolerance(effect[name], ref), basis


def _float32_row(model32, ref32, run: _Run, fp32_atol: float) -> ConformanceRow:
    """The float32 model's output of ``run`` against the reference's float32 run."""
    import torch

    from models.attention import use_attention_backend

    f32 = [a.float() if a is not None and a.is_floating_point() else a for a in run.args]
    kw32 = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in run.kwargs.items()}
    with torch.no_grad(), use_attention_backend("sdpa"):
        out32 = model32(*f32, x_mask=run.x_mask, **kw32)
    d, note = _max_diff(out32, ref32)
    return ConformanceRow(run.case, f"output.{run.out_name}_fp32run", tuple(ref32.shape), d, fp32_atol,
                          "float32 run", note)


DESCRIPTION = "Compare our STDiT2 with golden reference tensors (a fixture directory such as stdit2_small_a)."


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.conformance``: the arguments of ``opensora-dag conformance``."""
    parser = argparse.ArgumentParser(prog="opensora-dag conformance", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="fixture directory (meta.json, state_dict.safetensors, "
                                                              "io.safetensors)")
    parser.add_argument("--atol", type=float, default=None,
                        help="one bound for every float64 tensor instead of the per-tensor bounds (a diagnostic)")
    parser.add_argument("--simulate-other-cpu", type=int, default=None, metavar="SEED",
                        help="compute our side with every float32 island rounded one ulp differently (random signs)")


def run(args: argparse.Namespace) -> int:
    """``opensora-dag conformance DIR``: 0 when every tensor is within its bound, 1 when one is not, 2 on a bad DIR."""
    missing = [n for n in ("meta.json", "state_dict.safetensors", "io.safetensors") if not (args.dir / n).is_file()]
    if missing:
        print(f"error: {args.dir} is not a fixture directory (missing {', '.join(missing)})", file=sys.stderr)
        return 2
    report = run_conformance(args.dir, atol=args.atol, simulate_other_cpu=args.simulate_other_cpu)
    print(report.format_table())
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
