"""benchmarks/gpu_check.py and training/throughput.py: the FLOPs/MFU arithmetic against a hand count, the peak table,
the preset reader used without PyYAML, and the CPU dry run end to end (also with every optional package missing)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_script():
    if "gpu_check_under_test" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["gpu_check_under_test"]


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs and MFU
# ---------------------------------------------------------------------------------------------------------------------


def test_forward_flops_of_a_tiny_stdit2_equal_a_hand_count():
    """STDiT2-Tiny/2 (C=48, depth 2, MLP 192, patch 1x2x2, 4 latent channels in / 8 out, 32 caption channels, L=12)
    on a 4 x 8 x 8 latent: patch grid 4 x 4 x 4, S = 16 tokens per frame, N = 64 tokens. Multiply-adds counted by hand."""
    from models.stdit2_config import STDIT2_PRESETS
    from training.throughput import stdit2_forward_flops, stdit2_train_flops, video_tokens

    cfg = STDIT2_PRESETS["STDiT2-Tiny/2"]
    per_video_token = (
        4 * 4 * 48  # patch embedding: C_in * (1*2*2) * C = 768
        + 2 * (4 * 48 * 48 + 4 * 48 * 48 + 2 * 48 * 48 + 2 * 48 * 192)  # per block 41,472: spatial, temporal, cross q/proj, MLP
        + 48 * 4 * 8  # final layer: C * 4 * C_out = 1,536
    )
    assert per_video_token == 85_248
    video = 64 * per_video_token  # 5,455,872
    caption = 12 * (32 * 48 + 48 * 48)  # y_proj on all 12 caption tokens: 46,080
    kv = 12 * 2 * (2 * 48 * 48)  # cross-attention k/v on the 12 valid tokens, 2 blocks: 110,592
    per_sample = (256 * 48 + 48 * 48) + 48 * 288 + 48 * 144 + 3 * (256 * 16 + 16 * 16) + 2 * (256 * 48 + 48 * 48)  # 77,568
    attention = 2 * (2 * 4 * 16 * 16 * 48 + 2 * 16 * 4 * 4 * 48 + 2 * 64 * 12 * 48)  # spatial + temporal + cross: 393,216
    macs = video + caption + kv + per_sample + attention
    assert macs == 6_083_328
    assert stdit2_forward_flops(cfg, (4, 8, 8)) == 2 * macs == 12_166_656
    assert stdit2_train_flops(cfg, (4, 8, 8)) == 3 * 12_166_656
    assert video_tokens(cfg, (4, 8, 8)) == 64
    # 7 valid caption tokens: k/v and cross-attention shrink, the caption projection does not
    short = 6_083_328 - 5 * 2 * (2 * 48 * 48) - 2 * (2 * 64 * 5 * 48)
    assert stdit2_forward_flops(cfg, (4, 8, 8), text_tokens=7) == 2 * short == 11_951_616
    # odd latent sizes are padded up to the patch: 4 x 7 x 9 -> 4 x 4 x 5 patches
    assert video_tokens(cfg, (4, 7, 9)) == 80


def test_flops_agree_with_torch_flop_counter():
    """An independent count: torch's FlopCounterMode over a real forward (eager attention: plain matmuls)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.attention import use_attention_backend
    from models.stdit2 import STDiT2
    from models.stdit2_config import STDIT2_PRESETS
    from training.throughput import stdit2_forward_flops, stdit2_train_flops

    cfg = STDIT2_PRESETS["STDiT2-Tiny/2"]
    model = STDiT2(cfg)
    B, T, H, W = 2, 4, 8, 8
    mask = torch.zeros(B, 12, dtype=torch.long)
    mask[:, :7] = 1
    kwargs = dict(y=torch.randn(B, 1, 12, 32), mask=mask, num_frames=torch.full((B,), 4.0), height=torch.full((B,), 64.0),
                  width=torch.full((B,), 64.0), ar=torch.ones(B), fps=torch.full((B,), 24.0))
    x, t = torch.randn(B, 4, T, H, W), torch.tensor([10, 500])
    with use_attention_backend("eager"), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x, t, **kwargs)
    assert counter.get_total_flops() == B * stdit2_forward_flops(cfg, (T, H, W), text_tokens=7)
    with use_attention_backend("eager"), FlopCounterMode(display=False) as counter:
        model.train()(x, t, **kwargs).sum().backward()
    # backward = 2 x forward, less the input gradient of the first layers, which nothing needs
    assert counter.get_total_flops() == pytest.approx(B * stdit2_train_flops(cfg, (T, H, W), text_tokens=7), rel=0.01)


def test_mfu_and_the_throughput_window(monkeypatch):
    from models.stdit2_config import STDIT2_PRESETS
    from training import throughput
    from training.throughput import ThroughputWindow, mfu

    assert mfu(494.5e12, 989.0) == pytest.approx(0.5)
    assert mfu(494.5e12, 989.0, num_devices=2) == pytest.approx(0.25)
    assert mfu(1e12, None) is None
    clock = itertools.chain([100.0, 102.0, 102.0], itertools.repeat(200.0))
    monkeypatch.setattr(throughput.time, "monotonic", lambda: next(clock))
    cfg = STDIT2_PRESETS["STDiT2-Tiny/2"]
    window = ThroughputWindow(peak_tflops=1e-4, num_devices=2)
    window.add(cfg, (3, 4, 4, 8, 8), text_tokens=12, replicas=2)  # 3 samples on each of 2 ranks, 2 s
    got = window.report()
    assert got["samples_per_s"] == 3.0
    assert got["tokens_per_s"] == 3 * 64.0
    assert got["model_tflops_per_s"] == pytest.approx(6 * 3 * 12_166_656 / 2 / 1e12)
    assert got["mfu"] == pytest.approx(got["model_tflops_per_s"] / (2 * 1e-4))
    assert window.samples == 0 and "mfu" not in ThroughputWindow(peak_tflops=None).report()


def test_peak_table_by_device_name(monkeypatch):
    from training.throughput import PEAK_ENV_VAR, device_peak_tflops, peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA GH200 480GB") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert peak_bf16_tflops("NVIDIA L40S") == 362.0
    assert peak_bf16_tflops("NVIDIA A10") == 125.0
    assert peak_bf16_tflops("NVIDIA L4") == 121.0
    for unknown in ("Tesla T4", "NVIDIA GeForce RTX 3090", "cpu", "", None):
        assert peak_bf16_tflops(unknown) is None
    monkeypatch.delenv(PEAK_ENV_VAR, raising=False)
    assert device_peak_tflops("cpu")[0] is None
    monkeypatch.setenv(PEAK_ENV_VAR, "123.5")
    assert device_peak_tflops("cpu") == (123.5, f"${PEAK_ENV_VAR}")


# ---------------------------------------------------------------------------------------------------------------------
# The preset reader used where PyYAML / pydantic are missing
# ---------------------------------------------------------------------------------------------------------------------


def test_simple_yaml_reader_reads_every_preset_as_pyyaml_does():
    import yaml

    script = load_script()
    files = sorted((REPO / "training" / "presets").glob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        assert script.read_simple_yaml(path.read_text()) == yaml.safe_load(path.read_text()), path.name
    text = 'a: 1  # c\nb: "x # not a comment"\nc:\n  d: {e: [1, 2.5, null], "256": 1.0e-5}\n  f: yes\nempty:\ng: 1e-8\n'
    assert script.read_simple_yaml(text) == yaml.safe_load(text)


@pytest.mark.parametrize("preset", ["stage1", "stage2", "stage3", "demo-cpu"])
def test_fallback_config_matches_train_config(preset):
    from training.config import load_train_config

    script = load_script()
    overrides = {"plugin": "zero2", "model.grad_checkpointing": True}
    want = load_train_config(preset, dict(overrides)).model_dump()
    got = script.fallback_stage_config(preset, overrides)

    def compare(ns, ref, where):
        for key, value in vars(ns).items():
            if hasattr(value, "__dict__") and not isinstance(value, type):
                compare(value, ref[key], f"{where}{key}.")
            elif key in ref:
                assert (tuple(value) if isinstance(value, list) else value) == ref[key], f"{where}{key}"

    compare(got, want, "")
    for section in ("model", "encoders", "data", "optim"):
        used = {"model": ("preset", "overrides", "grad_checkpointing", "qk_norm_legacy", "from_pretrained"),
                "encoders": ("model_max_length",), "data": ("mask_ratios", "bucket_preset"),
                "optim": ("lr", "weight_decay", "betas", "eps", "grad_clip", "ema_decay", "warmup_steps",
                          "decay_fraction")}[section]
        assert all(hasattr(getattr(got, section), name) for name in used), section


# ---------------------------------------------------------------------------------------------------------------------
# The dry run, end to end
# ---------------------------------------------------------------------------------------------------------------------


def run_dry(tmp_path: Path, *prelude: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    code = "; ".join([*prelude, "import runpy, sys", f"sys.argv = ['gpu_check.py', '--out', {str(out)!r}]",
                      f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_prints_and_writes_the_table(tmp_path):
    proc, report = run_dry(tmp_path)
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| config"))
    for column in ("samples/s", "tokens/s", "MFU", "peak mem GiB", "step-1 loss", "step-1 vs fallback"):
        assert column in header
    assert report["mode"].startswith("dry run")
    rows = {r["config"]: r for r in report["rows"]}
    assert set(rows) >= {"torch-ddp/sdpa", "zero2/sdpa", "fsdp2/sdpa", "colossal-ddp/sdpa", "sample/iddpm-5", "sample/rflow-3"}
    assert rows["zero2/sdpa"]["status"] == "skipped" and "needs CUDA" in rows["zero2/sdpa"]["note"]
    for name in ("torch-ddp/sdpa", "fsdp2/sdpa", "colossal-ddp/sdpa", "torch-ddp/sdpa stage2", "sample/iddpm-5", "sample/rflow-3"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0 and row["tflops_per_s"] > 0 and row["peak_mem_gib"] > 0
        assert row["mfu"] is None  # no peak for a CPU
    assert rows["torch-ddp/sdpa stage2"]["grad_ckpt"] is True
    assert rows["sample/iddpm-5"]["model_calls"] == 5 and rows["sample/rflow-3"]["model_calls"] == 3
    for name in ("fsdp2/sdpa", "colossal-ddp/sdpa"):  # same weights, same batch, float32: the same step-1 loss
        assert rows[name]["step1_match"] is True, rows[name]
    assert rows["torch-ddp/sdpa"]["loss_step1"] != rows["torch-ddp/sdpa"]["loss_last"]
    assert rows["torch-ddp/flash"]["status"] == "skipped"
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| torch-ddp/sdpa | 4x64x64 | 2 |" in md and "fallback (torch DDP/FSDP2 + AdamW): OK" in md
    assert report["environment"]["packages"]["colossalai"] != "not installed"


def test_dry_run_needs_only_torch(tmp_path):
    """With every optional package unimportable (None in sys.modules), the fallback rows still run."""
    blocked = ["pydantic", "yaml", "polars", "pandas", "pyarrow", "mlflow", "colossalai", "dagster", "dagster_pipes",
               "transformers", "diffusers", "duckdb", "flash_attn", "xformers", "safetensors"]
    proc, report = run_dry(tmp_path, "import sys", f"sys.modules.update(dict.fromkeys({blocked!r}))")
    packages = report["environment"]["packages"]
    assert all(packages[name] == "not installed" for name in ("colossalai", "mlflow", "polars", "pydantic", "yaml"))
    assert report["environment"]["config_source"].startswith("fallback reader")
    rows = {r["config"]: r for r in report["rows"]}
    assert rows["torch-ddp/sdpa"]["status"] == "ok" and rows["fsdp2/sdpa"]["status"] == "ok"
    assert rows["fsdp2/sdpa"]["step1_match"] is True
    assert rows["sample/iddpm-5"]["status"] == "ok" and rows["sample/rflow-3"]["status"] == "ok"
    assert rows["zero2/sdpa"]["status"] == "skipped" and "colossalai not installed" in rows["zero2/sdpa"]["note"]
    assert rows["colossal-ddp/sdpa"]["status"] == "skipped"
    assert not (tmp_path / "out" / "gpu_check.parquet").exists()
