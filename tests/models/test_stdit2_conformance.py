"""Our STDiT2 against the golden tensors of the reference (Open-Sora v1.1.0), fixture A and the model calls of D."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.attention import reference_softmax_fp32
from models.conformance import main as conformance_main
from models.conformance import run_conformance
from models.stdit2 import STDiT2, STDiT2Config

SIZES = ("num_frames", "height", "width", "ar", "fps")


@pytest.fixture(autouse=True)
def _automatic_attention_backend(monkeypatch):
    """A developer's OPENSORA_ATTN_BACKEND must not change what these tests check."""
    monkeypatch.delenv("OPENSORA_ATTN_BACKEND", raising=False)


@pytest.fixture(scope="module")
def fixture_a(conformance_dir):
    d = conformance_dir / "stdit2_small_a"
    meta = json.loads((d / "meta.json").read_text())
    io = load_file(str(d / "io.safetensors"))
    sd = load_file(str(d / "state_dict.safetensors"))
    return d, meta, io, sd


@pytest.fixture(scope="module")
def model64(fixture_a):
    _, meta, _, sd = fixture_a
    model = STDiT2(STDiT2Config(**meta["config"])).to(torch.float64).eval()
    model.load_state_dict(sd)
    return model


def _hooked_forward(model, io, x_mask):
    names = ["x_embedder", "pos_embed", "t_embedder", "csize_embedder", "ar_embedder", "fl_embedder",
             "fps_embedder", "t_block", "t_block_temp", "y_embedder", "final_layer", "blocks.0", "blocks.1"]
    rec: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(_m, _i, out, n=n):
            k = sum(key.startswith(n + ".call") for key in rec)
            rec[f"{n}.call{k}"] = out
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(io["input.x"], io["input.timestep"], io["input.y"], mask=io["input.mask"], x_mask=x_mask,
                        output_fp32=False, **{k: io[f"input.{k}"] for k in SIZES})
    finally:
        for h in handles:
            h.remove()
    return out, rec


@pytest.mark.parametrize("with_x_mask", [False, True])
def test_float64_reproduces_every_output_and_intermediate(fixture_a, model64, with_x_mask):
    _, _, io, _ = fixture_a
    out, rec = _hooked_forward(model64, io, io["input.x_mask"] if with_x_mask else None)
    prefix = "xmask." if with_x_mask else ""
    ref_out = io["output.out_xmask_f64" if with_x_mask else "output.out_f64"]
    assert out.dtype == torch.float64
    assert (out - ref_out).abs().max().item() <= 1e-12
    expected = sorted(k[len(prefix) + len("inter."):] for k in io if k.startswith(f"{prefix}inter."))
    assert expected and set(expected) <= set(rec)
    for name in expected:
        ref = io[f"{prefix}inter.{name}"]
        assert rec[name].shape == ref.shape, name
        assert (rec[name] - ref).abs().max().item() <= 1e-12, name
    # the public return value is the reference's float32 cast
    with torch.no_grad():
        out32 = model64(io["input.x"], io["input.timestep"], io["input.y"], mask=io["input.mask"],
                        x_mask=io["input.x_mask"] if with_x_mask else None, **{k: io[f"input.{k}"] for k in SIZES})
    assert out32.dtype == torch.float32
    assert torch.equal(out32, io["output.out_xmask" if with_x_mask else "output.out"])


def test_float32_run_matches_reference_float32_run(fixture_a):
    _, meta, io, sd = fixture_a
    model = STDiT2(STDiT2Config(**meta["config"])).eval()
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    kw = {k: io[f"input.{k}"].float() for k in SIZES}
    for x_mask, key in ((None, "output.out_fp32run"), (io["input.x_mask"], "output.out_xmask_fp32run")):
        with torch.no_grad():
            out = model(io["input.x"].float(), io["input.timestep"], io["input.y"].float(), mask=io["input.mask"],
                        x_mask=x_mask, **kw)
        assert (out - io[key]).abs().max().item() <= 2e-5


def test_sampler_and_training_model_calls_of_fixture_d(conformance_dir, model64):
    """CFG batches (2n rows, n-row text mask and size inputs), frame masks and the training ar convention."""
    io = load_file(str(conformance_dir / "iddpm_sample_small" / "io.safetensors"))
    kw = {k: io[f"input.{k}"] for k in SIZES}
    y = torch.cat([io["input.text_embeddings"], io["t2v.y_null"]])
    with torch.no_grad():
        for run in ("t2v", "cond"):
            for k in range(5):
                p = f"{run}.trace.model_call{k}."
                out = model64(io[p + "x"], io[p + "timestep"], y, mask=io["input.text_mask"],
                              x_mask=io.get(p + "x_mask"), **kw)
                assert (out - io[p + "out"]).abs().max().item() <= 1e-6, p
        kw_train = {k: io[f"train.input.{k}"] for k in SIZES}
        for trace, x_mask in (("trace", None), ("trace_masked", io["train.input.frame_mask"])):
            out = model64(io[f"train.{trace}.x_t"], io["train.input.t"], io["train.input.y"],
                          mask=io["train.input.mask"], x_mask=x_mask, **kw_train)
            assert (out - io[f"train.{trace}.model_out"]).abs().max().item() <= 1e-6, trace


def test_run_conformance_report(fixture_a):
    d, *_ = fixture_a
    report = run_conformance(d, atol=1e-12)
    assert report.passed, report.format_table()
    names = {r.name for r in report.rows}
    assert {"output.out_f64", "output.out_xmask_f64", "inter.blocks.1.call0", "xmask.inter.t_block.call1",
            "output.out_fp32run"} <= names
    assert report.max_abs_diff < 2e-5


def test_conformance_main_passes_and_fails_on_corrupted_copy(fixture_a, tmp_path, capsys):
    d, *_ = fixture_a
    assert conformance_main([str(d)]) == 0
    assert "PASS" in capsys.readouterr().out

    bad = tmp_path / "corrupted"
    shutil.copytree(d, bad)
    os.chmod(bad, 0o755)
    for f in bad.iterdir():
        os.chmod(f, 0o644)
    sd = load_file(str(bad / "state_dict.safetensors"))
    sd["blocks.1.mlp.fc2.bias"] = sd["blocks.1.mlp.fc2.bias"] + 1e-3  # one weight perturbed
    save_file(sd, str(bad / "state_dict.safetensors"))
    assert conformance_main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "inter.blocks.1.call0" in out

    assert conformance_main([str(tmp_path)]) == 2  # not a fixture directory


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX2 dispatch is x86 only")
def test_reference_softmax_is_pytorchs_avx2_kernel_on_any_cpu(tmp_path):
    """The fixtures were made on an AVX2 machine; our float64 path must not depend on this machine's SIMD width."""
    gen = tmp_path / "gen.py"
    gen.write_text(
        "import torch, sys\n"
        "torch.manual_seed(0)\n"
        "xs = [torch.randn(400, n) * 4 for n in (3, 7, 8, 12, 24, 31, 72, 130)]\n"
        "xs.append(torch.tensor([[0., -87., -88.5, -90., -100., -103.9, -104.5, -200., -1e-8, -0.3]]))\n"
        "torch.save([(x, x.softmax(-1)) for x in xs], sys.argv[1])\n"
    )
    data = tmp_path / "softmax.pt"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    subprocess.run([sys.executable, str(gen), str(data)], check=True, env=env, timeout=120)
    for x, ref in torch.load(data):
        assert torch.equal(reference_softmax_fp32(x), ref), x.shape
