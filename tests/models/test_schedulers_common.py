"""What the three schedulers share: construction by name, cheap import, one sample() contract, low precision."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from models.schedulers import SCHEDULERS, build_scheduler


def test_import_does_not_pull_torch():
    code = "import sys, models.schedulers, models.mask_strategy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_build_by_name():
    assert set(SCHEDULERS) == {"iddpm", "dpm-solver", "rflow"}
    from models.schedulers import IDDPM, DPMSolver, RectifiedFlow

    assert isinstance(build_scheduler("iddpm", num_sampling_steps=10), IDDPM)
    assert isinstance(build_scheduler("dpm-solver"), DPMSolver)
    assert isinstance(build_scheduler("rflow"), RectifiedFlow)
    with pytest.raises(ValueError):
        build_scheduler("ddim")


class TinyModel(torch.nn.Module):
    """A stand-in with STDiT2's call signature and output layout ([B, 2C, T, H, W]) in the weights' dtype."""

    def __init__(self, c: int, dtype: torch.dtype):
        super().__init__()
        self.proj = torch.nn.Conv3d(c, 2 * c, 1, dtype=dtype)
        self.calls = []

    def forward(self, x, timestep, y, mask=None, x_mask=None, num_frames=None, height=None, width=None, ar=None, fps=None):
        self.calls.append((x.shape[0], timestep.dtype, None if x_mask is None else tuple(x_mask.shape)))
        scale = 1 + y.to(x.dtype).mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1, 1)
        out = self.proj(x.to(self.proj.weight.dtype)).float() * scale.float()
        eps, v = out.chunk(2, dim=1)
        return torch.cat([eps, torch.tanh(v)], dim=1)  # the learned-range variance input lives in [-1, 1]


@pytest.mark.parametrize("name", ["iddpm", "dpm-solver", "rflow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_contract(name, dtype):
    torch.manual_seed(0)
    n, c, t = 2, 4, 3
    sched = build_scheduler(name, num_sampling_steps=4, cfg_scale=7.0)
    model = TinyModel(c, dtype)
    z = torch.randn(n, c, t, 4, 6, dtype=dtype)
    y, y_null = torch.randn(n, 1, 5, 8), torch.zeros(n, 1, 5, 8)
    kwargs = {k: torch.full((n,), v) for k, v in dict(height=32.0, width=48.0, num_frames=3.0, ar=32 / 48, fps=24.0).items()}
    masks = None if name == "dpm-solver" else torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.5, 1.0]])
    out = sched.sample(
        model, z, y, y_null, mask=torch.ones(n, 5, dtype=torch.int64), model_kwargs=kwargs, masks=masks,
        generator=torch.Generator().manual_seed(1),
    )
    assert out.shape == z.shape and torch.isfinite(out.float()).all()
    assert len(model.calls) == 4 and all(b == 2 * n for b, _, _ in model.calls)  # one doubled-batch call per step
    assert all(td in (torch.int64, torch.float32) for _, td, _ in model.calls)
    if masks is not None:
        assert all(xm == (2 * n, t) for _, _, xm in model.calls)
