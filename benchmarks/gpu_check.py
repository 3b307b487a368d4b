"""The GPU path in one short command: STDiT2-XL/2 training throughput, memory and MFU per configuration, plus sampling.

    PYTHONPATH=. python benchmarks/gpu_check.py [--out DIR] [--quick] [--dry] [--budget-s S] [--mlflow]

On a CUDA machine it trains STDiT2-XL/2 on synthetic cached latents (what ``training.encoder_cache`` feeds a run:
SD-VAE latents, T5-XXL embeddings, 200 caption tokens with padding) at 240p x 16 frames (16 x 30 x 53 latents,
6,480 tokens per sample) for a few steps per configuration, through the project's own ``training.train``
functions: ``build_model``, ``build_booster`` (ColossalAI ``LowLevelZeroPlugin(stage=2)`` + ``HybridAdam`` in bf16,
the stage presets' production path, or its ``TorchDDPPlugin`` + AdamW) and ``train_step`` (frame masks, caption
dropout, the IDDPM loss under bf16 autocast, clipping, warmup lr, optimizer step, EMA). Plain torch DDP and FSDP2
with AdamW and bf16 run beside them as the fallback when ColossalAI is missing or broken. Attention backends: SDPA,
flash-attn and xformers (each where it imports). Then it times sampling: IDDPM 100 steps and rectified flow 30
steps, 16 x 240 x 426, batch 1, classifier-free guidance (the model sees a doubled batch).

One row per configuration: samples/s, tokens/s, model TFLOP/s, MFU (model FLOPs from the architecture, see
``training/throughput.py``, against the card's dense bf16 peak looked up from its name), peak memory
(``torch.cuda.max_memory_allocated``), time to set up (model build + boost, ColossalAI kernel builds included),
the loss at step 1 and after the last step, and whether the step-1 loss matches the fallback row (plain torch DDP
+ SDPA) on the same batch within bf16 tolerance. All rows start from the same weights: the reference init with the
zero-initialised output layers (temporal attention and cross-attention projections, final layer) drawn from
N(0, 0.02), so that the step-1 loss depends on every layer instead of being the loss of a zero prediction.

A configuration that fails (import error, CUDA OOM, a kernel that refuses the inputs) becomes a row with its error
and the run goes on; a stage-1 row that runs out of memory is retried with gradient checkpointing. Every row is
printed and written (``gpu_check.json`` and ``gpu_check.md`` under ``--out``, replaced atomically) as soon as it
finishes, so a run cut off by its time window still leaves what it measured. Rows not started within ``--budget-s``
(default 210 s, sized so that the whole run stays under 4 minutes on one H100; not yet timed on one) are recorded as
skipped.

Without CUDA the same script runs a dry mode on a tiny STDiT2 and tiny shapes in well under a minute: the fallback
rows and both samplers run for real on the CPU (float32), ZeRO-2 is recorded as skipped (it needs CUDA). CI runs it
(``tests/benchmarks/test_gpu_check.py``). ``--dry`` on a CUDA machine runs the same tiny plan on the GPU, ZeRO-2 and
the installed kernels included: a smoke test of every path in seconds, before the real run.

Needs only torch (and numpy, which torch installs normally come with) from a plain checkout; ColossalAI, flash-attn,
xformers, MLflow, Polars, pydantic and PyYAML are used when they import and reported as "not installed" otherwise
(without pydantic/PyYAML the stage presets are read by a small reader for their plain YAML subset). ``--mlflow``
logs the rows to an MLflow run (experiment ``opensora-dag-gpu-check``); with Polars the rows are also written as
``gpu_check.parquet``. Default ``--out``: ``$OPENSORA_HOME/gpu_check/<UTC time>`` (``OPENSORA_HOME`` defaults to
``./.opensora``, which git ignores).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import re
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a plain checkout works without PYTHONPATH too
    sys.path.insert(0, str(REPO))

SEED = 42
OPTIONAL_PACKAGES = {  # module -> distribution
    "colossalai": "colossalai",
    "flash_attn": "flash-attn",
    "xformers": "xformers",
    "mlflow": "mlflow",
    "polars": "polars",
    "pydantic": "pydantic",
    "yaml": "PyYAML",
}
BF16_LOSS_RTOL = 2e-2  # step-1 loss vs the fallback when either side runs bf16
FP32_LOSS_RTOL = 1e-4  # the same on the CPU (float32 everywhere)
COLUMNS = ("config", "shape", "batch", "ckpt", "status", "samples/s", "tokens/s", "TFLOP/s", "MFU", "peak mem GiB",
           "setup s", "step-1 loss", "loss@N", "step-1 vs fallback", "note")


# ---------------------------------------------------------------------------------------------------------------------
# Configuration: the stage presets through training.config, or the small reader when pydantic/PyYAML are missing
# ---------------------------------------------------------------------------------------------------------------------

_INT = re.compile(r"^[-+]?(0|[1-9][0-9_]*)$")
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+][0-9]+)?$")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _scalar(text: str) -> Any:
    """A plain YAML 1.1 scalar as PyYAML's safe loader reads it (null, bool, int, float, else str)."""
    s = text.strip()
    if s in ("", "~", "null", "Null", "NULL"):
        return None
    if s.lower() in _BOOLS and s in (s.lower(), s.capitalize(), s.upper()):
        return _BOOLS[s.lower()]
    if _INT.match(s):
        return int(s.replace("_", ""))
    if _FLOAT.match(s):
        return float(s.replace("_", ""))
    if s.lower() in (".inf", "+.inf"):
        return math.inf
    if s.lower() == "-.inf":
        return -math.inf
    if s.lower() == ".nan":
        return math.nan
    return s


def _quoted(text: str, i: int) -> tuple[str, int]:
    quote, out = text[i], []
    i += 1
    while i < len(text):
        c = text[i]
        if quote == "'" and c == "'" and text[i + 1 : i + 2] == "'":
            out.append("'")
            i += 2
            continue
        if quote == '"' and c == "\\" and i + 1 < len(text):
            out.append({"n": "\n", "t": "\t"}.get(text[i + 1], text[i + 1]))
            i += 2
            continue
        if c == quote:
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise ValueError(f"unterminated string in {text!r}")


def _flow(text: str, i: int, stops: str) -> tuple[Any, int]:
    """A flow value (``{..}``, ``[..]``, quoted or plain scalar) starting at ``text[i]``; plain ones end at ``stops``."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] in "{[":
        closing, is_map = ("}", True) if text[i] == "{" else ("]", False)
        items: Any = {} if is_map else []
        i += 1
        while True:
            while i < len(text) and text[i] in " ,":
                i += 1
            if i >= len(text):
                raise ValueError(f"unterminated flow collection in {text!r}")
            if text[i] == closing:
                return items, i + 1
            if is_map:
                key, i = _flow(text, i, ":,}")
                if i >= len(text) or text[i] != ":":
                    raise ValueError(f"expected ':' in {text!r}")
                items[key], i = _flow(text, i + 1, ",}")
            else:
                value, i = _flow(text, i, ",]")
                items.append(value)
    if i < len(text) and text[i] in "\"'":
        return _quoted(text, i)
    start = i
    while i < len(text) and text[i] not in stops:
        i += 1
    return _scalar(text[start:i]), i


def _strip_comment(line: str) -> str:
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def read_simple_yaml(text: str) -> dict[str, Any]:
    """The YAML subset of ``training/presets``: block mappings by indentation, flow ``{}``/``[]``, scalars, comments.

    Used only when PyYAML is missing; ``tests/benchmarks/test_gpu_check.py`` checks it against ``yaml.safe_load`` on
    every preset.
    """
    root: dict[str, Any] = {}
    stack: list[tuple[int, dict]] = [(-1, root)]
    bare: list[tuple[dict, Any]] = []
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        body = line.strip()
        if body.startswith("- "):
            raise ValueError("block sequences are not supported by this reader")
        key, i = _flow(body, 0, ":")
        if i >= len(body) or body[i] != ":":
            raise ValueError(f"expected 'key: value', got {raw!r}")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        rest = body[i + 1 :].strip()
        if not rest:
            parent[key] = {}
            bare.append((parent, key))
            stack.append((indent, parent[key]))
        else:
            parent[key], end = _flow(rest, 0, "")
            if rest[end:].strip():
                raise ValueError(f"trailing text in {raw!r}")
    for parent, key in bare:  # "key:" with nothing under it is null
        if parent[key] == {}:
            parent[key] = None
    return root


# TrainConfig's defaults (training/config.py) for the fields a preset may leave out; used only by the fallback reader.
_FALLBACK_DEFAULTS: dict[str, Any] = {
    "objective": "iddpm", "rflow_timestep_shift": True, "seed": 42, "precision": "bf16", "plugin": "auto", "steps": 1000,
    "model": {"preset": "STDiT2-XL/2", "overrides": {}, "from_pretrained": None, "grad_checkpointing": False, "qk_norm_legacy": True},
    "encoders": {"model_max_length": 200},
    "data": {"bucket_preset": "stage1", "mask_ratios": None},
    "optim": {"lr": 2e-5, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "grad_clip": 1.0, "ema_decay": 0.9999,
              "warmup_steps": 0, "decay_fraction": 0.0},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "overrides" else value
    return out


def load_stage_config(preset: str, overrides: dict[str, Any]) -> tuple[Any, str]:
    """(config, how it was read): ``training.config.load_train_config``, or the fallback reader without pydantic/PyYAML."""
    try:
        from training.config import load_train_config

        return load_train_config(preset, dict(overrides)), "training.config"
    except ImportError as err:
        return fallback_stage_config(preset, overrides), f"fallback reader ({err.name or err} not installed)"


def fallback_stage_config(preset: str, overrides: dict[str, Any]) -> SimpleNamespace:
    """A stage preset read by :func:`read_simple_yaml` over TrainConfig's defaults, as nested namespaces."""
    path = REPO / "training" / "presets" / f"train_{preset.replace('-', '_')}.yaml"
    data = _merge(_FALLBACK_DEFAULTS, read_simple_yaml(path.read_text()))
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    sections = {k: SimpleNamespace(**v) if isinstance(v, dict) and k in ("model", "encoders", "data", "optim") else v for k, v in data.items()}
    return SimpleNamespace(**sections)


def bucket_batch_size(bucket_preset: str, resolution: str, frames: int) -> int | None:
    """Per-GPU batch size of ``bucket_config[resolution][frames]`` in a bucket preset (None where it holds none)."""
    try:
        from training.bucket_presets import load_bucket_preset

        config = load_bucket_preset(bucket_preset).bucket_config
    except ImportError:
        path = REPO / "training" / "presets" / f"buckets_{bucket_preset.replace('-', '_')}.yaml"
        config = read_simple_yaml(path.read_text())["bucket_config"]
    entry = config.get(resolution, {}).get(frames)
    return None if entry is None else entry[1]


# ---------------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------------


def package_status(module: str) -> str:
    """Version when the module imports, "not installed", or "broken: <error>"."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] != module:
            return f"broken: {err}"[:300]
        return "not installed"
    except Exception as err:  # noqa: BLE001 - a broken install is a finding, not a crash
        return f"broken: {type(err).__name__}: {err}"[:300]
    version = getattr(mod, "__version__", None)
    if version is None:
        with contextlib.suppress(Exception):
            from importlib.metadata import version as dist_version

            version = dist_version(OPTIONAL_PACKAGES.get(module, module))
    return str(version or "installed")


def environment(device) -> dict[str, Any]:
    import torch

    from training.throughput import device_peak_tflops

    env: dict[str, Any] = {
        "started_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    else:
        env.update(device_name=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    peak, source = device_peak_tflops(device)
    env.update(peak_bf16_tflops=peak, peak_source=source)
    env["packages"] = {module: package_status(module) for module in OPTIONAL_PACKAGES}
    from models.attention import available_backends

    env["attention_backends"] = available_backends()
    from training.tracking import git_commit

    env["git_commit"] = git_commit()
    return env


# ---------------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One configuration to measure."""

    name: str
    kind: str = "train"  # "train" or "sample"
    plugin: str = "torch-ddp"  # zero2 | colossal-ddp | torch-ddp | fsdp2
    backend: str = "sdpa"  # sdpa | flash | xformers
    stage: str = "stage1"
    frames: int = 16
    height: int = 240
    width: int = 426
    batch: int = 1
    grad_ckpt: bool | None = None  # None: the preset's
    reference: bool = False  # the fallback row that step-1 losses are compared against
    oom_retry: bool = False  # on CUDA OOM, retry with gradient checkpointing
    sampler: str = ""  # kind "sample": iddpm | rflow
    sampling_steps: int = 0
    note: str = ""

    @property
    def shape(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


def gpu_plan(quick: bool, extra_shapes: bool = True) -> list[Item]:
    def bs(stage: str, res: str, frames: int) -> int:
        return bucket_batch_size(stage, res, frames) or 1

    b1 = bs("stage1", "240p", 16)
    main = dict(stage="stage1", frames=16, height=240, width=426, batch=b1)
    best = "flash" if _importable("flash_attn") else "sdpa"
    items = [
        Item("torch-ddp/sdpa", plugin="torch-ddp", backend="sdpa", reference=True, note="fallback: plain torch DDP + AdamW, bf16 autocast", **main),
        Item("zero2/sdpa", plugin="zero2", backend="sdpa", oom_retry=True, note="stage preset: ZeRO-2 + HybridAdam, bf16", **main),
        Item("zero2/flash", plugin="zero2", backend="flash", oom_retry=True, **main),
    ]
    if not quick:
        items.append(Item("zero2/xformers", plugin="zero2", backend="xformers", oom_retry=True, **main))
    items += [
        Item("sample/iddpm-100", kind="sample", sampler="iddpm", sampling_steps=100, backend=best, batch=1, frames=16, height=240, width=426),
        Item("sample/rflow-30", kind="sample", sampler="rflow", sampling_steps=30, backend=best, batch=1, frames=16, height=240, width=426),
    ]
    if quick:
        return items
    items += [
        Item("fsdp2/sdpa", plugin="fsdp2", backend="sdpa", note="fallback: torch FSDP2 + AdamW, bf16 params; no EMA", **main),
        Item("colossal-ddp/sdpa", plugin="colossal-ddp", backend="sdpa", note="ColossalAI TorchDDPPlugin + AdamW, bf16 autocast", **main),
        Item("torch-ddp/flash", plugin="torch-ddp", backend="flash", **main),
        Item("torch-ddp/xformers", plugin="torch-ddp", backend="xformers", **main),
        Item(f"zero2/{best} stage2", plugin="zero2", backend=best, stage="stage2", frames=16, height=240, width=426,
             batch=bs("stage2", "240p", 16), note="stage2 preset: its 240p x 16 batch, gradient checkpointing"),
    ]
    if extra_shapes:
        items += [
            Item(f"zero2/{best}", plugin="zero2", backend=best, stage="stage1", frames=32, height=240, width=426,
                 batch=bs("stage1", "240p", 32), oom_retry=True),
            Item(f"zero2/{best} stage2", plugin="zero2", backend=best, stage="stage2", frames=16, height=480, width=854,
                 batch=bs("stage2", "480p", 16)),
        ]
    return items


def dry_plan(quick: bool) -> list[Item]:
    main = dict(stage="stage1", frames=4, height=64, width=64, batch=2)
    items = [
        Item("torch-ddp/sdpa", plugin="torch-ddp", backend="sdpa", reference=True, note="fallback: plain torch DDP + AdamW", **main),
        Item("zero2/sdpa", plugin="zero2", backend="sdpa", **main),
        Item("sample/iddpm-5", kind="sample", sampler="iddpm", sampling_steps=5, backend="sdpa", batch=1, frames=4, height=64, width=96),
        Item("sample/rflow-3", kind="sample", sampler="rflow", sampling_steps=3, backend="sdpa", batch=1, frames=4, height=64, width=96),
    ]
    if quick:
        return items
    return items + [
        Item("fsdp2/sdpa", plugin="fsdp2", backend="sdpa", note="fallback: torch FSDP2 + AdamW; no EMA", **main),
        Item("colossal-ddp/sdpa", plugin="colossal-ddp", backend="sdpa", note="ColossalAI TorchDDPPlugin + AdamW", **main),
        Item("torch-ddp/flash", plugin="torch-ddp", backend="flash", **main),
        Item("torch-ddp/xformers", plugin="torch-ddp", backend="xformers", **main),
        Item("torch-ddp/sdpa stage2", plugin="torch-ddp", backend="sdpa", stage="stage2", frames=8, height=64, width=96, batch=1,
             note="stage2 preset: gradient checkpointing"),
    ]


DRY_MODEL = {"model.preset": "STDiT2-Tiny/2", "encoders.model_max_length": 12}
DRY_CAPTION_CHANNELS = 32


def _importable(module: str) -> bool:
    return not package_status(module).startswith(("not installed", "broken"))


# ---------------------------------------------------------------------------------------------------------------------
# Rows: printed and written as they finish
# ---------------------------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def row_cells(row: dict[str, Any]) -> list[str]:
    status = row["status"] if row["status"] != "error" else "ERROR"
    note = row.get("error") or row.get("note") or ""
    mfu = row.get("mfu")
    match = row.get("step1_match")
    match_text = "" if match is None else f"{_fmt(match)} ({row['step1_rel_diff']:.1e})"
    ckpt = row.get("grad_ckpt")
    return [row["config"], row["shape"], _fmt(row.get("batch")), "" if ckpt is None else ("yes" if ckpt else "no"), status,
            _fmt(row.get("samples_per_s")), _fmt(row.get("tokens_per_s")), _fmt(row.get("tflops_per_s")),
            "" if mfu is None else f"{100 * mfu:.1f} %", _fmt(row.get("peak_mem_gib")), _fmt(row.get("setup_s"), 2),
            _fmt(row.get("loss_step1"), 5), _fmt(row.get("loss_last"), 5), match_text, note.replace("|", "/").replace("\n", " ")[:160]]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    def __init__(self, out: Path, env: dict[str, Any], mode: str) -> None:
        self.out, self.env, self.mode = out, env, mode
        self.rows: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print("| " + " | ".join(row_cells(row)) + " |", flush=True)
        self.write()

    def _atomic(self, name: str, text: str) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.out / name)

    def write(self) -> None:
        self._atomic("gpu_check.json", json.dumps({"mode": self.mode, "environment": self.env, "rows": self.rows}, indent=2, default=str))
        env = self.env
        head = [f"# GPU check ({self.mode})", "",
                f"{env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, "
                f"peak bf16 {env.get('peak_bf16_tflops')} TFLOP/s ({env.get('peak_source')}); started {env.get('started_utc')}", "",
                "packages: " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()), "",
                f"config: {env.get('config_source', '')}", ""]
        self._atomic("gpu_check.md", "\n".join(head) + "\n" + markdown_table(self.rows) + "\n\n" + verdict(self.rows).replace("\n", "  \n") + "\n")
        if _polars_ok():
            with contextlib.suppress(Exception):
                import polars as pl

                flat = [{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in self.rows]
                if flat:
                    pl.DataFrame(flat, infer_schema_length=None).write_parquet(self.out / "gpu_check.parquet")


_POLARS: bool | None = None


def _polars_ok() -> bool:
    global _POLARS
    if _POLARS is None:
        _POLARS = _importable("polars")
    return _POLARS


# ---------------------------------------------------------------------------------------------------------------------
# Running one configuration
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: Any
    dist: Any
    dry: bool
    caption_channels: int
    warmup: int
    steps: int
    deadline: float
    packages: dict[str, str]
    ref_state: dict[str, Any] | None = None
    batches: dict[tuple, list] = field(default_factory=dict)
    reference_loss: dict[tuple, float] = field(default_factory=dict)
    config_source: str = ""
    stage: str = ""  # "setup" or "steps" while a row runs
    broken: dict[str, str] = field(default_factory=dict)  # plugin -> the row whose setup failed, and why

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _sync(ctx: Context) -> None:
    import torch

    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


def _free(ctx: Context) -> None:
    import torch

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def _peak_mem(ctx: Context) -> tuple[float, str]:
    import torch

    if ctx.cuda:
        return torch.cuda.max_memory_allocated(ctx.device) / 2**30, "torch.cuda.max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS"


@contextlib.contextmanager
def attention_backend(name: str):
    """Force one backend in this thread (context) and in autograd's threads (the env var, read by recomputation)."""
    from models.attention import ENV_VAR, use_attention_backend

    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        with use_attention_backend(name):
            yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before


def _config_for(ctx: Context, item: Item, grad_ckpt: bool | None = None):
    overrides: dict[str, Any] = dict(DRY_MODEL) if ctx.dry else {}
    if grad_ckpt is not None:
        overrides["model.grad_checkpointing"] = grad_ckpt
    plugin = {"zero2": "zero2", "colossal-ddp": "ddp"}.get(item.plugin)
    if plugin:
        overrides["plugin"] = plugin
    cfg, source = load_stage_config(item.stage, overrides)
    ctx.config_source = source
    return cfg


def _build(ctx: Context, cfg):
    """A fresh STDiT2 on the device through ``training.build.build_model``, loaded with the shared start weights."""
    import torch

    from training.build import build_model

    if ctx.ref_state is None:
        torch.manual_seed(SEED)  # the start weights do not depend on what ran before
    with torch.device(ctx.device):
        model, model_config = build_model(cfg, ctx.caption_channels)
    if ctx.ref_state is None:  # first build: these are the start weights of every row
        gen = torch.Generator(device=ctx.device).manual_seed(SEED)
        with torch.no_grad():
            layers = [layer for block in model.blocks for layer in (block.attn_temp.proj, block.cross_attn.proj)]
            for layer in layers + [model.final_layer.linear]:
                layer.weight.normal_(0.0, 0.02, generator=gen)
        ctx.ref_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    else:
        model.load_state_dict(ctx.ref_state)
    return model, model_config


def _latent_thw(item: Item) -> tuple[int, int, int]:
    return (item.frames, item.height // 8, item.width // 8)  # SD VAE: 8x spatial, no temporal compression


def _batches(ctx: Context, item: Item, model_config, count: int) -> list[dict[str, Any]]:
    """Encoded batches as ``cached_batch_to_device`` returns them, the same for every row of this shape and batch."""
    import torch

    key = (item.shape, item.batch, count)
    if key in ctx.batches:
        return ctx.batches[key]
    ctx.batches.clear()  # one shape's batches at a time on the device
    gen = torch.Generator().manual_seed(SEED)
    L, T, H, W = model_config.model_max_length, *_latent_thw(item)
    out = []
    for _ in range(count):
        B = item.batch
        lengths = torch.randint(max(1, L // 4), L + 1, (B,), generator=gen)

        def full(value: float) -> torch.Tensor:
            return torch.full((B,), float(value), dtype=torch.float32, device=ctx.device)

        out.append({
            "x": torch.randn(B, model_config.in_channels, T, H, W, generator=gen).to(ctx.device),
            "y": (0.2 * torch.randn(B, 1, L, model_config.caption_channels, generator=gen)).to(ctx.device),
            "mask": (torch.arange(L)[None, :] < lengths[:, None]).long().to(ctx.device),
            "model_kwargs": {"num_frames": full(item.frames), "height": full(item.height), "width": full(item.width),
                             "ar": full(item.width / item.height), "fps": full(24.0 / 3)},
        })
    ctx.batches[key] = out
    return out


class _PlainBooster:
    """What ``train_step`` needs from a ColossalAI booster, for plain torch DDP / FSDP2."""

    def backward(self, loss, optimizer) -> None:
        loss.backward()


def _boost(ctx: Context, item: Item, cfg, model):
    """(model, optimizer, booster, use_zero) for the item's plugin."""
    import torch

    if item.plugin in ("zero2", "colossal-ddp"):
        from training.build import build_booster

        booster, model, optimizer, use_zero = build_booster(cfg, ctx.dist, model)
        return model, optimizer, booster, use_zero
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    adamw = dict(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if item.plugin == "torch-ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.cuda else None
        model = DistributedDataParallel(model, device_ids=ids)
        return model, torch.optim.AdamW(params(model), **adamw), _PlainBooster(), False
    if item.plugin == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if ctx.cuda and cfg.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model, torch.optim.AdamW(params(model), **adamw), _PlainBooster(), False
    raise ValueError(f"unknown plugin {item.plugin!r}")


def _skip_reason(ctx: Context, item: Item) -> str | None:
    needs = {"flash": "flash_attn", "xformers": "xformers"}.get(item.backend)
    if needs and ctx.packages.get(needs, "").startswith(("not installed", "broken")):
        return f"skipped: {needs} {ctx.packages[needs]}"
    if needs and not ctx.cuda:
        return f"skipped: {item.backend} needs CUDA"
    if item.plugin in ("zero2", "colossal-ddp") and ctx.packages.get("colossalai", "").startswith(("not installed", "broken")):
        return f"skipped: colossalai {ctx.packages['colossalai']}"
    if item.plugin == "zero2" and not ctx.cuda:
        return "skipped: needs CUDA (LowLevelZeroPlugin)"
    if item.kind == "train" and item.plugin in ctx.broken:
        return f"skipped: {ctx.broken[item.plugin]}"
    if time.monotonic() > ctx.deadline:
        return "skipped: time budget (--budget-s) spent"
    return None


def _base_row(item: Item) -> dict[str, Any]:
    return {"config": item.name, "kind": item.kind, "plugin": item.plugin, "backend": item.backend, "stage": item.stage,
            "shape": item.shape, "batch": item.batch, "grad_ckpt": item.grad_ckpt, "note": item.note, "status": "ok"}


def run_train(ctx: Context, item: Item) -> dict[str, Any]:
    from training.masks import MaskGenerator
    from training.throughput import device_peak_tflops, mfu, stdit2_train_flops, video_tokens
    from training.build import build_scheduler, unwrap
    from training.steps import step_generator, train_step

    row = _base_row(item)
    cfg = _config_for(ctx, item, item.grad_ckpt)
    row["grad_ckpt"] = bool(cfg.model.grad_checkpointing)
    row["precision"] = cfg.precision if ctx.cuda else "fp32"
    row["optimizer"] = "HybridAdam" if item.plugin == "zero2" else "AdamW"
    _free(ctx)
    ctx.stage = "setup"
    t0 = time.perf_counter()
    model, model_config = _build(ctx, cfg)
    # the EMA as training.train keeps it (fp32); update_ema is not DTensor-aware, so FSDP2 rows run without one
    ema = None if item.plugin == "fsdp2" else copy.deepcopy(model).float().requires_grad_(False).eval()
    model, optimizer, booster, use_zero = _boost(ctx, item, cfg, model)
    scheduler = build_scheduler(cfg.objective, cfg.rflow_timestep_shift)
    masks = MaskGenerator(cfg.data.mask_ratios)
    model.train()
    batches = _batches(ctx, item, model_config, ctx.warmup + ctx.steps)
    _sync(ctx)
    row["setup_s"] = time.perf_counter() - t0
    ctx.stage = "steps"

    losses: list[float] = []
    flops = 0.0
    with attention_backend(item.backend):
        for i, enc in enumerate(batches):
            if i == ctx.warmup:
                _sync(ctx)
                t_start = time.perf_counter()
            gen = step_generator(SEED, i, 0, ctx.device)
            loss, _, _ = train_step(cfg, ctx.dist, model, booster, optimizer, scheduler, masks, enc, gen, i,
                                    model_config.class_dropout_prob, use_zero, ema)
            losses.append(float(loss.detach()))
            if i >= ctx.warmup:
                text = float(enc["mask"].sum()) / item.batch
                flops += item.batch * stdit2_train_flops(model_config, _latent_thw(item), text)
    _sync(ctx)
    elapsed = time.perf_counter() - t_start
    peak, kind = _peak_mem(ctx)
    peak_tflops, _ = device_peak_tflops(ctx.device)
    tokens = video_tokens(model_config, _latent_thw(item))
    row.update(
        steps=ctx.steps, warmup=ctx.warmup, step_s=elapsed / ctx.steps,
        samples_per_s=item.batch * ctx.steps / elapsed, tokens_per_sample=tokens,
        tokens_per_s=item.batch * tokens * ctx.steps / elapsed, tflops_per_s=flops / elapsed / 1e12,
        mfu=mfu(flops / elapsed, peak_tflops), peak_mem_gib=peak, peak_mem_kind=kind,
        loss_step1=losses[0], loss_last=losses[-1], losses=losses,
        params=sum(p.numel() for p in unwrap(model).parameters()),
    )
    if not all(math.isfinite(v) for v in losses):
        row.update(status="error", error=f"non-finite loss: {losses}")
    key = (item.shape, item.batch)
    if item.reference and row["status"] == "ok":
        ctx.reference_loss[key] = losses[0]
    if key in ctx.reference_loss and not item.reference:
        ref = ctx.reference_loss[key]
        rel = abs(losses[0] - ref) / max(abs(ref), 1e-6)
        rtol = BF16_LOSS_RTOL if ctx.cuda else FP32_LOSS_RTOL
        row.update(step1_ref=ref, step1_rel_diff=rel, step1_rtol=rtol, step1_match=rel <= rtol)
    del model, optimizer, booster, ema, batches
    return row


def run_sample(ctx: Context, item: Item) -> dict[str, Any]:
    import torch

    from models.schedulers import build_scheduler as build_sampler
    from training.throughput import device_peak_tflops, mfu, stdit2_forward_flops, video_tokens

    row = _base_row(item)
    cfg = _config_for(ctx, item, False)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    row.update(precision=str(dtype).replace("torch.", ""), grad_ckpt=False)
    _free(ctx)
    t0 = time.perf_counter()
    model, model_config = _build(ctx, cfg)
    model = model.to(dtype).eval().requires_grad_(False)
    scheduler = build_sampler(item.sampler, num_sampling_steps=item.sampling_steps, cfg_scale=7.0)
    gen = torch.Generator().manual_seed(SEED)
    n, L = item.batch, model_config.model_max_length
    z = torch.randn(n, model_config.in_channels, *_latent_thw(item), generator=gen).to(ctx.device)
    y = (0.2 * torch.randn(n, 1, L, model_config.caption_channels, generator=gen)).to(ctx.device)
    mask = torch.ones(n, L, dtype=torch.long, device=ctx.device)
    y_null = model.y_embedder.y_embedding.to(torch.float32)[None, None].expand(n, 1, -1, -1)
    full = lambda v: torch.full((n,), float(v), device=ctx.device)  # noqa: E731
    kwargs = {"height": full(item.height), "width": full(item.width), "num_frames": full(item.frames),
              "ar": full(item.height / item.width), "fps": full(24)}
    calls = [0]

    def counted(*args, **kw):
        calls[0] += 1
        return model(*args, **kw)

    _sync(ctx)
    row["setup_s"] = time.perf_counter() - t0
    with attention_backend(item.backend), torch.no_grad():
        _sync(ctx)
        start = time.perf_counter()
        out = scheduler.sample(counted, z, y, y_null, mask=mask, model_kwargs=kwargs, generator=torch.Generator(device=ctx.device).manual_seed(SEED))
        _sync(ctx)
        elapsed = time.perf_counter() - start
    peak, kind = _peak_mem(ctx)
    peak_tflops, _ = device_peak_tflops(ctx.device)
    flops = calls[0] * 2 * n * stdit2_forward_flops(model_config, _latent_thw(item))  # guidance: a doubled batch per call
    tokens = video_tokens(model_config, _latent_thw(item))
    row.update(
        sampler=item.sampler, sampling_steps=item.sampling_steps, model_calls=calls[0], total_s=elapsed,
        s_per_step=elapsed / max(calls[0], 1), samples_per_s=n / elapsed, tokens_per_sample=tokens,
        tokens_per_s=2 * n * tokens * calls[0] / elapsed, tflops_per_s=flops / elapsed / 1e12,
        mfu=mfu(flops / elapsed, peak_tflops), peak_mem_gib=peak, peak_mem_kind=kind,
        note=f"{calls[0]} steps in {elapsed:.2f} s ({1e3 * elapsed / max(calls[0], 1):.1f} ms/step), cfg 7.0, {row['precision']}",
    )
    if not bool(torch.isfinite(out).all()):
        row.update(status="error", error="non-finite sample")
    del model, out
    return row


def _error_row(item: Item, err: BaseException) -> dict[str, Any]:
    row = _base_row(item)
    text = f"{type(err).__name__}: {err}".strip()
    oom = "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError"
    first_line = text.splitlines()[0][:400] if text else type(err).__name__
    row.update(status="error", error=("CUDA OOM: " if oom else "") + first_line, oom=oom, traceback=traceback.format_exc(limit=8)[-3000:])
    return row


def run_item(ctx: Context, item: Item) -> dict[str, Any]:
    reason = _skip_reason(ctx, item)
    if reason:
        row = _base_row(item)
        row.update(status="skipped", note=reason)
        return row
    ctx.stage = ""
    try:
        return run_train(ctx, item) if item.kind == "train" else run_sample(ctx, item)
    except Exception as err:  # noqa: BLE001 - every failure is a row
        row = _error_row(item, err)
        if item.kind == "train" and ctx.stage == "setup" and not row["oom"]:
            # e.g. a ColossalAI kernel that cannot be built: the plugin's other rows would only repeat it
            ctx.broken[item.plugin] = f"{item.plugin} failed to set up in {item.name}"
        return row
    finally:
        _free(ctx)


# ---------------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------------


def init_world(cuda: bool, colossalai_ok: bool):
    """A world of one process: the project's ``setup_distributed`` (ColossalAI) or plain torch.distributed."""
    import torch

    from training.distributed import Dist, free_port, setup_distributed

    if colossalai_ok:
        return setup_distributed()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ["LOCAL_RANK"]), device)


def log_to_mlflow(report: Report) -> str:
    try:
        from training.tracking import RunTracker, default_tracking_uri
    except ImportError as err:
        return f"MLflow not used: {err}"
    if not _importable("mlflow"):
        return "MLflow not installed: rows not logged"
    tracker = RunTracker(default_tracking_uri(), run_name=f"gpu-check-{report.mode}", enabled=True, experiment="opensora-dag-gpu-check")
    tracker.start(system_metrics=False)
    tracker.log_params({k: v for k, v in report.env.items() if k != "packages"} | {"packages": report.env.get("packages", {})})
    for row in report.rows:
        metrics = {f"{row['config']} {row['shape']}/{k}": row[k] for k in
                   ("samples_per_s", "tokens_per_s", "tflops_per_s", "mfu", "peak_mem_gib", "loss_step1", "loss_last", "total_s")
                   if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)}
        tracker.log_metrics(metrics, step=0)
    for name in ("gpu_check.json", "gpu_check.md"):
        tracker.log_artifact(report.out / name)
    tracker.end()
    return f"MLflow run {tracker.run_id} ({tracker.tracking_uri})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_check.json / .md (default: $OPENSORA_HOME/gpu_check/<UTC time>)")
    parser.add_argument("--quick", action="store_true", help="only the fallback, ZeRO-2 (SDPA, flash) and the two samplers")
    parser.add_argument("--dry", action="store_true", help="the dry mode (tiny model and shapes) on whatever device there is: "
                        "on a GPU, a smoke test of every path in seconds")
    parser.add_argument("--budget-s", type=float, default=210.0, help="start no configuration after this many seconds")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 5, --quick 3, dry 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2, dry 1); step 1 is the first of them")
    parser.add_argument("--no-extra-shapes", action="store_true", help="only 240p x 16 frames")
    parser.add_argument("--mlflow", action="store_true", help="also log the rows to MLflow (when installed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    import torch

    cuda = torch.cuda.is_available()
    dry = args.dry or not cuda  # --dry on a CUDA machine: every path on the tiny model, on the GPU, in seconds
    mode = "GPU" if not dry else ("dry run (CUDA, tiny model)" if cuda else "dry run (CPU, tiny model)")
    if not cuda:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # STDiT2 blocks return reshaped views: harmless here
    packages = {m: package_status(m) for m in OPTIONAL_PACKAGES}
    dist = init_world(cuda, not packages["colossalai"].startswith(("not installed", "broken")))
    env = environment(dist.device)
    out = Path(args.out) if args.out else Path(os.environ.get("OPENSORA_HOME", ".opensora")) / "gpu_check" / _dt.datetime.now(
        _dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    steps = args.steps or (2 if dry else 3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 2)
    ctx = Context(device=dist.device, dist=dist, dry=dry, caption_channels=DRY_CAPTION_CHANNELS if dry else 4096,
                  warmup=max(1, warmup), steps=max(1, steps), deadline=began + args.budget_s, packages=packages)
    plan = dry_plan(args.quick) if dry else gpu_plan(args.quick, extra_shapes=not args.no_extra_shapes)
    _, ctx.config_source = load_stage_config("stage1", {})
    env["config_source"] = ctx.config_source
    env["model"] = "STDiT2-Tiny/2 (dry run)" if dry else "STDiT2-XL/2"
    report = Report(out, env, mode)

    print(f"GPU check, {mode}: {env['device_name']} | torch {env['torch']} (CUDA {env['cuda_runtime']}) | "
          f"peak bf16 {env['peak_bf16_tflops']} TFLOP/s ({env['peak_source']})")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()) + f" | config via {ctx.config_source}")
    print(f"{ctx.warmup} warm-up + {ctx.steps} timed steps per configuration; peak memory = "
          f"{'torch.cuda.max_memory_allocated per row' if cuda else 'process max RSS so far'}; "
          f"writing {out}/gpu_check.json and .md as rows finish")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    queue = list(plan)
    while queue:
        item = queue.pop(0)
        row = run_item(ctx, item)
        report.add(row)
        if row.get("oom") and item.oom_retry and not item.grad_ckpt:
            queue.insert(0, dataclasses.replace(item, name=f"{item.name} +ckpt", grad_ckpt=True, oom_retry=False,
                                                note="retry of an OOM row with gradient checkpointing"))
    if args.mlflow:
        print(log_to_mlflow(report))
    print(f"\n{markdown_table(report.rows)}\n")
    print(verdict(report.rows))
    print(f"done in {time.monotonic() - began:.1f} s; rows in {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def verdict(rows: list[dict[str, Any]]) -> str:
    """One line per path: the production path (ZeRO-2) and the fallback, ok or not, with the best samples/s."""
    lines = []
    for label, plugins in (("production path (ZeRO-2 + HybridAdam)", ("zero2",)), ("fallback (torch DDP/FSDP2 + AdamW)", ("torch-ddp", "fsdp2"))):
        mine = [r for r in rows if r["plugin"] in plugins and r["kind"] == "train"]
        ok = [r for r in mine if r["status"] == "ok"]
        if not mine or all(r["status"] == "skipped" for r in mine):
            lines.append(f"{label}: not run ({mine[0]['note'] if mine else 'no rows'})")
        elif ok:
            best = max(ok, key=lambda r: r.get("samples_per_s") or 0)
            bad = [r["config"] for r in ok if r.get("step1_match") is False]
            lines.append(f"{label}: OK, best {best['config']} {best['shape']} {best['samples_per_s']:.3g} samples/s"
                         + (f"; step-1 loss differs from the fallback in {', '.join(bad)}" if bad else ""))
        else:
            lines.append(f"{label}: FAILED ({mine[0].get('error') or mine[0].get('note')})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
