"""STDiT2 architecture, switches, attention backends and training behaviour (tiny configs, CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from models import attention as attn_mod
from models.attention import BlockDiagonalMask, attention, resolve_backend, use_attention_backend
from models.stdit2 import STDiT2, build_stdit2
from models.stdit2_config import STDIT2_PRESETS, STDiT2Config

SIZES = ("num_frames", "height", "width", "ar", "fps")


@pytest.fixture(autouse=True)
def _automatic_attention_backend(monkeypatch):
    """A developer's OPENSORA_ATTN_BACKEND must not change what these tests check."""
    monkeypatch.delenv("OPENSORA_ATTN_BACKEND", raising=False)


def tiny(**overrides) -> STDiT2:
    torch.manual_seed(0)
    model = build_stdit2("STDiT2-Tiny/2", **overrides)
    with torch.no_grad():  # make the zero-initialised branches non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(B=2, T=3, H=8, W=12, L=12, C=32, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(B, 4, T, H, W, generator=g, dtype=dtype),
        timestep=torch.tensor([17, 683][:B] + [500] * max(0, B - 2)),
        y=torch.randn(B, 1, L, C, generator=g, dtype=dtype),
        mask=torch.tensor([[1] * 5 + [0] * (L - 5)] + [[1] * L] * (B - 1)),
        num_frames=torch.full((B,), float(T)),
        height=torch.full((B,), 8.0 * H),
        width=torch.full((B,), 8.0 * W),
        ar=torch.full((B,), H / W),
        fps=torch.full((B,), 24.0),
    )


def run(model, inp, **kw):
    args = dict(inp)
    return model(args.pop("x"), args.pop("timestep"), args.pop("y"), **args, **kw)


# --- checkpoint compatibility ------------------------------------------------------------------------------------


def test_xl_preset_names_shapes_and_parameter_count(conformance_dir):
    ref = json.loads((conformance_dir / "stdit2_xl_keys.json").read_text())
    with torch.device("meta"):  # no 3 GB allocation
        model = build_stdit2("STDiT2-XL/2")
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e["name"], e["shape"]) for e in ref["keys"]]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"] == 767_452_100
    assert sum(v.numel() for v in sd.values()) == ref["state_dict_numel"]
    assert not model.rope.freqs.requires_grad
    for name in ref["non_persistent_buffers_not_in_state_dict"]:
        assert name not in sd


def test_xl_config_from_reference_kwargs(conformance_dir):
    ref = json.loads((conformance_dir / "stdit2_xl_keys.json").read_text())
    cfg = STDiT2Config(**ref["config"])
    assert dataclasses.replace(cfg, input_size=None) == STDIT2_PRESETS["STDiT2-XL/2"]


def test_config_validation_and_builder_errors():
    with pytest.raises(ValueError, match="divisible by 3"):
        STDiT2Config(hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="even"):
        STDiT2Config(hidden_size=48, num_heads=16)  # head_dim 3
    with pytest.raises(ValueError, match="freeze"):
        STDiT2Config(freeze="everything")
    with pytest.raises(ValueError, match="unknown STDiT2 preset"):
        build_stdit2("STDiT2-XXL/2")
    with pytest.raises(ValueError, match="unknown STDiT2Config fields"):
        build_stdit2("STDiT2-Tiny/2", hiden_size=48)
    assert STDiT2Config(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)


def test_initialisation_scheme():
    model = build_stdit2("STDiT2-Tiny/2", depth=3)
    for block in model.blocks:
        for lin in (block.attn_temp.proj, block.cross_attn.proj):
            assert not lin.weight.any() and not lin.bias.any()
        assert not block.attn.qkv.bias.any()
        assert torch.equal(block.attn.q_norm.weight, torch.ones(12))
    assert not model.final_layer.linear.weight.any()
    # zero-initialised output layer: the untrained model predicts exactly zero
    with torch.no_grad():
        assert not run(model.eval(), inputs()).any()


# --- numerics and switches ---------------------------------------------------------------------------------------


def test_qk_norm_legacy_order_changes_the_output():
    legacy, fixed = tiny(), tiny(qk_norm_legacy=False)
    fixed.load_state_dict(legacy.state_dict())
    inp = inputs()
    with torch.no_grad():
        a, b = run(legacy.eval(), inp), run(fixed.eval(), inp)
    assert (a - b).abs().max() > 1e-4


def test_sdpa_backend_equals_eager_in_float32():
    model = tiny().eval()
    inp = inputs()
    outs = {}
    for backend in ("sdpa", "eager"):
        with use_attention_backend(backend), torch.no_grad():
            outs[backend] = run(model, inp, x_mask=torch.tensor([[False, True, True], [True, True, False]]))
    assert (outs["sdpa"] - outs["eager"]).abs().max().item() < 1e-5
    assert outs["sdpa"].abs().max() > 1e-2


def test_non_divisible_sizes_are_padded_and_cropped():
    model = tiny().eval()
    inp = inputs(H=7, W=9)
    with torch.no_grad():
        out = run(model, inp)
    assert out.shape == (2, 8, 3, 7, 9)
    assert torch.isfinite(out).all()


def test_mask_none_uses_all_tokens_and_padding_is_ignored():
    model = tiny().eval()
    inp = inputs()
    with torch.no_grad():
        a = run(model, {**inp, "mask": None})
        full = run(model, {**inp, "mask": torch.ones(2, 12, dtype=torch.long)})
        assert torch.allclose(a, full, atol=1e-6)
        # changing the padded text tokens of sample 0 changes nothing
        y2 = inp["y"].clone()
        y2[0, :, 5:] = 100.0
        assert torch.allclose(run(model, inp), run(model, {**inp, "y": y2}), atol=1e-6)


def test_cfg_batch_tiles_text_mask_and_size_inputs():
    model = tiny().eval()
    inp = inputs()
    doubled = {k: torch.cat([v, v]) for k, v in inp.items()}
    short = {**doubled, "mask": inp["mask"], **{k: inp[k] for k in SIZES}}
    with torch.no_grad():
        assert torch.allclose(run(model, doubled), run(model, short), atol=1e-6)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bfloat16_autocast_forward_and_backward_match_float32():
    """bf16 keeps 8 bits of mantissa (~0.4 % per rounding): outputs and gradients stay within a few % of float32."""
    x_mask = torch.tensor([[False, True, True], [True, True, True]])
    grads = []
    outs = []
    for autocast in (False, True):
        model = tiny().train()
        model.y_embedder.uncond_prob = 0.0  # no random caption dropout: both runs see the same captions
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run(model, inputs(), x_mask=x_mask)
        out.square().mean().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert outs[1].dtype == torch.float32
    assert _relative_error(outs[1], outs[0]) < 0.02  # measured 0.4 %
    assert _relative_error(grads[1], grads[0]) < 0.02  # measured 0.5 %
    assert torch.nn.functional.cosine_similarity(grads[1], grads[0], dim=0) > 0.999


def test_bfloat16_weights_forward_matches_float32():
    """Weights and activations all in bf16 (no float32 master copy): within a few % of float32."""
    model = tiny().eval()
    with torch.no_grad():
        reference = run(model, inputs())
        out = run(model.to(torch.bfloat16), inputs())
    assert out.dtype == torch.float32
    assert _relative_error(out, reference) < 0.06  # measured 2.8 %: every weight and activation rounded to bf16


# --- training behaviour ------------------------------------------------------------------------------------------


def test_backward_reaches_every_trainable_parameter():
    model = tiny().train()
    out = run(model, inputs(), x_mask=torch.tensor([[False, True, True], [True, False, True]]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert model.rope.freqs.grad is None


def test_gradient_checkpointing_gives_identical_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny(grad_checkpointing=ckpt, class_dropout_prob=0.0).train()
        out = run(model, inputs(), x_mask=torch.tensor([[False, True, True], [True, True, True]]))
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_caption_dropout_uses_the_null_caption():
    model = tiny(class_dropout_prob=0.0).eval()
    inp = inputs()
    null = model.y_embedder.y_embedding.detach()[None, None].expand(2, 1, -1, -1)
    with torch.no_grad():
        forced = run(model, inp, force_drop_ids=torch.tensor([1, 0]))
        manual = run(model, {**inp, "y": torch.cat([null[:1], inp["y"][1:]])})
        plain = run(model, inp)
    assert torch.allclose(forced, manual, atol=1e-6)
    assert torch.allclose(forced[1], plain[1], atol=1e-6)
    assert not torch.allclose(forced[0], plain[0], atol=1e-4)
    # training with p=1 drops everything; eval never drops
    always = tiny(class_dropout_prob=1.0)
    always.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(run(always.train(), inp), run(model, inp, force_drop_ids=torch.ones(2)), atol=1e-6)
        assert torch.allclose(run(always.eval(), inp), plain, atol=1e-6)


def test_freeze_options():
    temporal = build_stdit2("STDiT2-Tiny/2", freeze="not_temporal")
    trainable = {n for n, p in temporal.named_parameters() if p.requires_grad}
    assert trainable and all("attn_temp" in n for n in trainable)
    text = build_stdit2("STDiT2-Tiny/2", freeze="text")
    assert not any(p.requires_grad for n, p in text.named_parameters() if "cross_attn" in n)


# --- attention dispatch ------------------------------------------------------------------------------------------


def test_block_diagonal_mask_equals_per_sample_attention():
    g = torch.Generator().manual_seed(0)
    lens, nq, H, D = [3, 7, 1], 5, 2, 8
    q = torch.randn(1, H, nq * len(lens), D, generator=g)
    k = torch.randn(1, H, sum(lens), D, generator=g)
    v = torch.randn(1, H, sum(lens), D, generator=g)
    mask = BlockDiagonalMask.from_seqlens([nq] * len(lens), lens)
    for backend in ("sdpa", "eager"):
        out = attention(q, k, v, attn_mask=mask, backend=backend)
        start = 0
        for i, n in enumerate(lens):
            ref = torch.softmax(q[:, :, i * nq:(i + 1) * nq] @ k[:, :, start:start + n].transpose(-1, -2) / D**0.5,
                                -1) @ v[:, :, start:start + n]
            assert torch.allclose(out[:, :, i * nq:(i + 1) * nq], ref, atol=1e-5), backend
            start += n
    # unequal query lengths go through the same function
    mask2 = BlockDiagonalMask.from_seqlens([2, 4, 9], lens)
    out = attention(q, k, v, attn_mask=mask2, backend="sdpa")
    ref = torch.softmax(q[:, :, 2:6] @ k[:, :, 3:10].transpose(-1, -2) / D**0.5, -1) @ v[:, :, 3:10]
    assert torch.allclose(out[:, :, 2:6], ref, atol=1e-5)
    with pytest.raises(ValueError, match="at least one key"):
        BlockDiagonalMask.from_seqlens([5], [0])


def test_backend_resolution(monkeypatch):
    q32, q64 = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    assert resolve_backend(q32) == "sdpa"
    assert resolve_backend(q64) == "eager"  # the exact conformance path
    monkeypatch.setenv(attn_mod.ENV_VAR, "eager")
    assert resolve_backend(q32) == "eager"
    with use_attention_backend("sdpa"):
        assert resolve_backend(q32) == "sdpa"  # context beats env
    assert resolve_backend(q32, backend="sdpa") == "sdpa"  # argument beats env
    monkeypatch.setenv(attn_mod.ENV_VAR, "flash")
    with pytest.raises(RuntimeError, match="flash"):  # forced but impossible on CPU float32: no silent fallback
        resolve_backend(q32)
    monkeypatch.setenv(attn_mod.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend(q32)
