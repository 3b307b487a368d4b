"""STDiT2 forward+backward: our model vs a straightforward eager implementation of the same math.

The baseline below is written the way the reference computes: explicit softmax attention (float32 softmax), every
modulation and gate computed for both the timestep and the timestep-0 branch and then selected per frame,
cross-attention through a dense block-diagonal mask over the packed batch, positional and RoPE tables rebuilt
inside each call. It loads the same weights as our model and the script checks that both give the same output
before timing them.

CPU (always): a small config, training-style inputs (with a frame mask), median of a few fwd+bwd steps.
GPU (when CUDA is present): attention backends of our model (flash-attn, xformers, SDPA, eager) in bf16 autocast,
tokens/s and peak memory, plus the eager baseline.

    .venv/bin/python benchmarks/bench_stdit2.py [--steps 3] [--shape image|video] [--threads N]
        [--gpu-preset STDiT2-B/2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attention import available_backends, use_attention_backend  # noqa: E402
from models.stdit2 import STDiT2  # noqa: E402
from models.stdit2_config import STDIT2_PRESETS, STDiT2Config  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# Baseline: the same math, written plainly (weights from the same state dict)
# ---------------------------------------------------------------------------------------------------------------------


def _sinusoid(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp_embed(p, name, s, dtype):
    h = F.linear(_sinusoid(s).to(dtype), p[f"{name}.mlp.0.weight"], p[f"{name}.mlp.0.bias"])
    return F.linear(F.silu(h), p[f"{name}.mlp.2.weight"], p[f"{name}.mlp.2.bias"])


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _rms(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _rope(x):
    n, d = x.shape[-2], x.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device).float() / d))
    ang = (torch.arange(n, device=x.device).float()[:, None] * freqs[None]).repeat_interleave(2, -1).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rot = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return x * ang.cos() + rot * ang.sin()


def _self_attn(p, pre, x, heads, rope):
    B, N, C = x.shape
    qkv = F.linear(x, p[f"{pre}.qkv.weight"], p[f"{pre}.qkv.bias"]).view(B, N, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if rope:
        q, k = _rope(q), _rope(k)
    q, k = _rms(q, p[f"{pre}.q_norm.weight"]), _rms(k, p[f"{pre}.k_norm.weight"])
    attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    attn = attn.float().softmax(-1).to(q.dtype)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, p[f"{pre}.proj.weight"], p[f"{pre}.proj.bias"])


def _cross_attn(p, pre, x, y, y_lens, heads):
    B, N, C = x.shape
    q = F.linear(x, p[f"{pre}.q_linear.weight"], p[f"{pre}.q_linear.bias"]).view(B * N, heads, C // heads)
    kv = F.linear(y, p[f"{pre}.kv_linear.weight"], p[f"{pre}.kv_linear.bias"]).view(-1, 2, heads, C // heads)
    k, v = kv.unbind(1)
    q_id = torch.arange(B, device=x.device).repeat_interleave(N)
    k_id = torch.repeat_interleave(torch.arange(B, device=x.device), torch.tensor(y_lens, device=x.device))
    allowed = q_id[:, None] == k_id[None, :]  # dense block-diagonal mask [B*N, sum(L)]
    attn = (q.transpose(0, 1) * (C // heads) ** -0.5) @ k.permute(1, 2, 0)
    attn = attn.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = (attn @ v.transpose(0, 1)).transpose(0, 1).reshape(B, N, C)
    return F.linear(out, p[f"{pre}.proj.weight"], p[f"{pre}.proj.bias"])


def _select(x_mask, a, b, T, S):
    B, N, C = a.shape
    return torch.where(x_mask[:, :, None, None], a.view(B, T, S, C), b.view(B, T, S, C)).view(B, N, C)


def baseline_forward(p, cfg: STDiT2Config, x, timestep, y, mask, x_mask, num_frames, height, width, ar, fps):
    B, _, Tx, Hx, Wx = x.shape
    C, heads = cfg.hidden_size, cfg.num_heads
    pt, ph, pw = cfg.patch_size
    dtype = p["x_embedder.proj.weight"].dtype
    T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)
    S, N = H * W, T * H * W
    # size conditioning
    csize = torch.cat([_mlp_embed(p, "csize_embedder", height, dtype), _mlp_embed(p, "csize_embedder", width, dtype)],
                      1)
    data_info = torch.cat([csize, _mlp_embed(p, "ar_embedder", ar, dtype)], 1)
    fl = _mlp_embed(p, "fl_embedder", num_frames, dtype) + _mlp_embed(p, "fps_embedder", fps, dtype)
    # patches + positional table
    x = F.conv3d(x.to(dtype), p["x_embedder.proj.weight"], p["x_embedder.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    scale = (height[0].item() * width[0].item()) ** 0.5 / cfg.input_sq_size
    base = round(S**0.5)
    inv = 1.0 / (10000 ** (torch.arange(0, C // 2, 2, device=x.device).float() / (C // 2)))
    gh = torch.arange(H, device=x.device) / scale * (base / H)
    gw = torch.arange(W, device=x.device) / scale * (base / W)
    rows, cols = torch.meshgrid(gh, gw, indexing="ij")
    emb = [torch.cat([torch.sin(g.reshape(-1)[:, None] * inv), torch.cos(g.reshape(-1)[:, None] * inv)], -1)
           for g in (cols, rows)]
    x = (x.view(B, T, S, C) + torch.cat(emb, -1).to(dtype)).view(B, N, C)
    # timestep branches
    t = _mlp_embed(p, "t_embedder", timestep, dtype)
    t0 = _mlp_embed(p, "t_embedder", torch.zeros_like(timestep), dtype)
    lin = lambda name, v: F.linear(F.silu(v), p[f"{name}.1.weight"], p[f"{name}.1.bias"])  # noqa: E731
    t_spc, t_tmp = lin("t_block", t + data_info), lin("t_block_temp", t + fl)
    t0_spc, t0_tmp = lin("t_block", t0 + data_info), lin("t_block_temp", t0 + fl)
    # caption
    yp = F.linear(y.to(dtype), p["y_embedder.y_proj.fc1.weight"], p["y_embedder.y_proj.fc1.bias"])
    yp = F.linear(F.gelu(yp, approximate="tanh"), p["y_embedder.y_proj.fc2.weight"], p["y_embedder.y_proj.fc2.bias"])
    y_lens = mask.sum(1).tolist()
    yp = yp.squeeze(1)[mask != 0]
    for i in range(cfg.depth):
        pre = f"blocks.{i}"
        m = (p[f"{pre}.scale_shift_table"][None] + t_spc.view(B, 6, C)).chunk(6, 1)
        m0 = (p[f"{pre}.scale_shift_table"][None] + t0_spc.view(B, 6, C)).chunk(6, 1)
        mt = (p[f"{pre}.scale_shift_table_temporal"][None] + t_tmp.view(B, 3, C)).chunk(3, 1)
        mt0 = (p[f"{pre}.scale_shift_table_temporal"][None] + t0_tmp.view(B, 3, C)).chunk(3, 1)
        # spatial
        h = _select(x_mask, _ln(x) * (1 + m[1]) + m[0], _ln(x) * (1 + m0[1]) + m0[0], T, S)
        h = _self_attn(p, f"{pre}.attn", h.reshape(B * T, S, C), heads, False).reshape(B, N, C)
        x = x + _select(x_mask, m[2] * h, m0[2] * h, T, S)
        # temporal
        h = _select(x_mask, _ln(x) * (1 + mt[1]) + mt[0], _ln(x) * (1 + mt0[1]) + mt0[0], T, S)
        h = h.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
        h = _self_attn(p, f"{pre}.attn_temp", h, heads, True).view(B, S, T, C).transpose(1, 2).reshape(B, N, C)
        x = x + _select(x_mask, mt[2] * h, mt0[2] * h, T, S)
        # cross
        x = x + _cross_attn(p, f"{pre}.cross_attn", x, yp, y_lens, heads)
        # mlp
        h = _select(x_mask, _ln(x) * (1 + m[4]) + m[3], _ln(x) * (1 + m0[4]) + m0[3], T, S)
        h = F.linear(h, p[f"{pre}.mlp.fc1.weight"], p[f"{pre}.mlp.fc1.bias"])
        h = F.linear(F.gelu(h, approximate="tanh"), p[f"{pre}.mlp.fc2.weight"], p[f"{pre}.mlp.fc2.bias"])
        x = x + _select(x_mask, m[5] * h, m0[5] * h, T, S)
    sh, sc = (p["final_layer.scale_shift_table"][None] + t[:, None]).chunk(2, 1)
    sh0, sc0 = (p["final_layer.scale_shift_table"][None] + (t0 + data_info)[:, None]).chunk(2, 1)
    h = _ln(x) * (1 + sc) + sh
    h = _select(x_mask, h, _ln(h) * (1 + sc0) + sh0, T, S)
    out = F.linear(h, p["final_layer.linear.weight"], p["final_layer.linear.bias"])
    co = cfg.out_channels
    out = out.view(B, T, H, W, pt, ph, pw, co).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, co, T * pt, H * ph, W * pw)
    return out[:, :, :Tx, :Hx, :Wx].float()


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def make_inputs(cfg: STDiT2Config, B, T, H, W, L, device):
    g = torch.Generator().manual_seed(0)
    lens = [max(1, L // (i + 2)) for i in range(B)]
    inp = dict(
        x=torch.randn(B, cfg.in_channels, T, H, W, generator=g),
        timestep=torch.randint(0, 1000, (B,), generator=g),
        y=torch.randn(B, 1, L, cfg.caption_channels, generator=g),
        mask=torch.tensor([[1] * n + [0] * (L - n) for n in lens]),
        x_mask=torch.rand(B, T, generator=g) > 0.25,
        num_frames=torch.full((B,), float(T)),
        height=torch.full((B,), 8.0 * H),
        width=torch.full((B,), 8.0 * W),
        ar=torch.full((B,), H / W),
        fps=torch.full((B,), 24.0),
    )
    return {k: v.to(device) for k, v in inp.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(variants, steps, device, warmup=1) -> list[tuple[float, float]]:
    """Median wall-clock and process-CPU seconds of one forward+backward for each (fn, params) variant.

    The variants alternate step by step, so that drifting load on a shared host hits them alike.
    """
    walls = [[] for _ in variants]
    cpus = [[] for _ in variants]
    for i in range(warmup + steps):
        for j, (fn, params) in enumerate(variants):
            for q in params:
                q.grad = None
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fn().square().mean().backward()
            _sync(device)
            if i >= warmup:
                walls[j].append(time.perf_counter() - w0)
                cpus[j].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(walls, cpus)]


def run_ours(model, inp):
    a = dict(inp)
    return model(a.pop("x"), a.pop("timestep"), a.pop("y"), **a)


def run_baseline(p, cfg, inp):
    return baseline_forward(p, cfg, inp["x"], inp["timestep"], inp["y"], inp["mask"], inp["x_mask"],
                            inp["num_frames"], inp["height"], inp["width"], inp["ar"], inp["fps"])


def build_pair(cfg: STDiT2Config, device, dtype=torch.float32):
    torch.manual_seed(0)
    model = STDiT2(cfg).to(device=device, dtype=dtype).train()
    with torch.no_grad():  # the zero-initialised layers would make the comparison trivial
        for q in model.parameters():
            if q.requires_grad:
                q.add_(torch.randn_like(q) * 0.02)
    base = {k: v.detach().clone().requires_grad_(v.is_floating_point() and k != "rope.freqs")
            for k, v in model.state_dict().items()}
    return model, base


CPU_SHAPES = {
    # name: (hidden, heads, depth, B, T, H, W) -- latent sizes; tokens = B*T*(H/2)*(W/2)
    "image": (96, 2, 2, 1, 2, 64, 64),  # 1024 tokens per frame: attention is a large share of the work
    "video": (192, 4, 2, 2, 4, 32, 32),  # 256 tokens per frame, 4 frames: the linears dominate
}


def cpu_section(steps: int, shape: str) -> str:
    device = torch.device("cpu")
    C, heads, depth, B, T, H, W = CPU_SHAPES[shape]
    L = 32
    cfg = STDiT2Config(hidden_size=C, depth=depth, num_heads=heads, caption_channels=256, model_max_length=L,
                       input_sq_size=512, qk_norm=True, class_dropout_prob=0.0)
    model, base = build_pair(cfg, device)
    inp = make_inputs(cfg, B, T, H, W, L, device)
    with torch.no_grad():
        diff = (run_ours(model.eval(), inp) - run_baseline(base, cfg, inp)).abs().max().item()
    model.train()
    (w_ours, c_ours), (w_base, c_base) = time_fwd_bwd(
        [(lambda: run_ours(model, inp), list(model.parameters())),
         (lambda: run_baseline(base, cfg, inp), list(base.values()))], steps, device)
    tokens = B * T * (H // 2) * (W // 2)
    print(f"CPU ({torch.get_num_threads()} threads), shape '{shape}': hidden {C}, depth {depth}, heads {heads}, "
          f"x {B}x{cfg.in_channels}x{T}x{H}x{W} ({tokens} tokens, {(H // 2) * (W // 2)} per frame), text {L}, "
          f"with x_mask, median of {steps}")
    print(f"  outputs agree: max |ours - baseline| = {diff:.2e}")
    print(f"  ours (SDPA)      fwd+bwd wall {w_ours * 1e3:8.1f} ms  cpu {c_ours * 1e3:8.1f} ms  "
          f"{tokens / w_ours:8.0f} tokens/s")
    print(f"  eager baseline   fwd+bwd wall {w_base * 1e3:8.1f} ms  cpu {c_base * 1e3:8.1f} ms  "
          f"{tokens / w_base:8.0f} tokens/s")
    print(f"  speed-up {w_base / w_ours:.2f}x wall, {c_base / c_ours:.2f}x cpu time")
    return (f"| STDiT2 fwd+bwd, CPU, '{shape}' C={C} depth={depth}, {tokens} tokens | ours {w_ours * 1e3:.0f} ms | "
            f"eager baseline {w_base * 1e3:.0f} ms | {w_base / w_ours:.2f}x wall ({c_base / c_ours:.2f}x cpu) |")


def gpu_section(steps: int, preset: str) -> list[str]:
    device = torch.device("cuda")
    cfg = STDIT2_PRESETS[preset]
    B, T, H, W, L = 2, 16, 32, 32, cfg.model_max_length
    model, base = build_pair(cfg, device)
    inp = make_inputs(cfg, B, T, H, W, L, device)
    tokens = B * T * (H // 2) * (W // 2)
    lines = []
    print(f"GPU {torch.cuda.get_device_name()}, {preset}, bf16 autocast, x {B}x4x{T}x{H}x{W} ({tokens} tokens)")
    results = {}
    for backend in ["flash", "xformers", "sdpa", "eager"]:
        if backend not in available_backends():
            print(f"  {backend:9s} not installed")
            continue
        torch.cuda.reset_peak_memory_stats()
        with use_attention_backend(backend if backend != "flash" else None), torch.autocast("cuda", torch.bfloat16):
            # "flash" runs through automatic selection: flash for self-attention, flash varlen for cross-attention
            [(t, _)] = time_fwd_bwd([(lambda: run_ours(model, inp), list(model.parameters()))], steps, device)
        mem = torch.cuda.max_memory_allocated() / 2**30
        results[backend] = t
        print(f"  ours/{backend:9s} fwd+bwd {t * 1e3:8.1f} ms  {tokens / t:10.0f} tokens/s  peak {mem:6.2f} GiB")
        lines.append(f"| STDiT2 fwd+bwd, {torch.cuda.get_device_name()}, {preset}, {tokens} tokens | ours/{backend} "
                     f"{t * 1e3:.0f} ms | {tokens / t:.0f} tokens/s | peak {mem:.2f} GiB |")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", torch.bfloat16):
        [(t, _)] = time_fwd_bwd([(lambda: run_baseline(base, cfg, inp), list(base.values()))], steps, device)
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(f"  eager baseline  fwd+bwd {t * 1e3:8.1f} ms  {tokens / t:10.0f} tokens/s  peak {mem:6.2f} GiB")
    best = min(results.values()) if results else float("nan")
    lines.append(f"| STDiT2 fwd+bwd, {torch.cuda.get_device_name()}, {preset} | eager baseline {t * 1e3:.0f} ms | "
                 f"best ours {best * 1e3:.0f} ms | {t / best:.2f}x |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed fwd+bwd steps per variant (after 1 warm-up)")
    parser.add_argument("--shape", choices=sorted(CPU_SHAPES), default="image", help="CPU problem shape")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is steadier on a busy shared host)")
    parser.add_argument("--gpu-preset", default="STDiT2-B/2", help="preset for the GPU section")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = [cpu_section(args.steps, args.shape)]
    if torch.cuda.is_available():
        summary += gpu_section(args.steps, args.gpu_preset)
    print()
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
