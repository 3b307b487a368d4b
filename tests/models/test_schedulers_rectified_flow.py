"""Rectified flow: timestep shift, velocity objective and Euler sampling, checked in closed form.

For x0 ~ N(MU, SIGMA^2) and x_t = (1-s) x0 + s n (s = t/T), (x0 - n, x_t) are jointly Gaussian, so the optimal
velocity v*(x_t) = E[x0 - n | x_t] and the minimum loss E[Var(x0 - n | x_t)] are known. At s = 1 the marginal is
exactly N(0, 1), so the flow's exact endpoint for a start z is MU + SIGMA z.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.schedulers.rectified_flow import RectifiedFlow

MU, SIGMA, T = 1.5, 0.5, 1000
SIZES = {"height": torch.tensor([240.0]), "width": torch.tensor([426.0]), "num_frames": torch.tensor([16.0])}
Y = torch.zeros(1, 1, 2, 3, dtype=torch.float64)


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = (t / T).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    var_x = (1 - s) ** 2 * SIGMA**2 + s**2
    centred = x - (1 - s) * MU
    return (MU + (1 - s) * SIGMA**2 / var_x * centred) - s / var_x * centred  # E[x0|x_t] - E[n|x_t]


class ExactVelocity:
    def __init__(self, delta: float = 0.0, gain: float = 1.0):
        self.delta, self.gain, self.calls = delta, gain, []

    def __call__(self, x, t, y=None, **kwargs):
        self.calls.append({"t": t.clone(), **kwargs})
        v = self.gain * exact_velocity(x, t) + self.delta
        return torch.cat([v, torch.zeros_like(v)], dim=1)  # STDiT2 layout: [velocity, unused]


# 1. Time -----------------------------------------------------------------------------------------------------------


def test_timestep_shift():
    rf = RectifiedFlow()
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0], dtype=torch.float64)
    base = {"height": torch.tensor(512.0), "width": torch.tensor(512.0), "num_frames": torch.tensor(1.0)}
    torch.testing.assert_close(rf.timestep_transform(t, base), t)  # the base size is not shifted
    shifted = rf.timestep_transform(t, SIZES)
    ratio = math.sqrt(240 * 426 / (512 * 512)) * math.sqrt(16)
    assert shifted[0] == 0 and shifted[-1] == T
    assert float(shifted[2]) == pytest.approx(ratio * 0.5 / (1 + (ratio - 1) * 0.5) * T, rel=1e-12)
    assert float(shifted[1]) > 250  # bigger videos spend longer at high noise
    v12 = RectifiedFlow(frames_rule="opensora_v1_2")
    kw = {"height": torch.tensor([512.0, 512.0]), "width": torch.tensor([512.0, 512.0]), "num_frames": torch.tensor([51.0, 1.0])}
    got = v12.timestep_transform(torch.tensor([500.0, 500.0], dtype=torch.float64), kw)
    r = math.sqrt(15.0)  # 51 frames -> 51 // 17 * 5 = 15 latent frames; an image counts 1
    assert got.tolist() == pytest.approx([r * 0.5 / (1 + (r - 1) * 0.5) * T, 500.0], rel=1e-12)


def test_logit_normal_training_timesteps():
    rf = RectifiedFlow(use_timestep_transform=False)
    t = rf.sample_timesteps(20000, generator=torch.Generator().manual_seed(0)).to(torch.float64)
    assert 0 < float(t.min()) and float(t.max()) < T
    logit = torch.log(t / (T - t))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1.0) < 0.03
    shifted = RectifiedFlow().sample_timesteps(20000, SIZES, generator=torch.Generator().manual_seed(0))
    assert float(shifted.median()) > 0.6 * T
    uniform = RectifiedFlow(sample_method="uniform", use_timestep_transform=False).sample_timesteps(20000)
    assert abs(float(uniform.mean()) - T / 2) < 10


def test_add_noise_endpoints():
    rf = RectifiedFlow()
    x0, n = torch.randn(2, 1, 1, 1, 1), torch.randn(2, 1, 1, 1, 1)
    torch.testing.assert_close(rf.add_noise(x0, n, torch.tensor([0.0, 1000.0])), torch.cat([x0[:1], n[1:]]))


# 2. Training ---------------------------------------------------------------------------------------------------------


def _train_batch(seed=0, b=4096):
    gen = torch.Generator().manual_seed(seed)
    x0 = MU + SIGMA * torch.randn((b, 2, 2, 2, 2), generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    kw = {k: v.expand(b) for k, v in SIZES.items()}
    t = RectifiedFlow().sample_timesteps(b, kw, generator=gen).to(torch.float64)
    return x0, noise, t, kw


def test_exact_velocity_minimises_the_loss():
    rf = RectifiedFlow()
    x0, noise, t, kw = _train_batch()
    best = rf.training_losses(ExactVelocity(), x0, t, kw, noise=noise)["loss"].mean()
    # The minimum is E[Var(x0 - n | x_t)], in closed form per timestep.
    s = t / T
    var_u, cov = SIGMA**2 + 1, (1 - s) * SIGMA**2 - s
    floor = (var_u - cov**2 / ((1 - s) ** 2 * SIGMA**2 + s**2)).mean()
    assert float(best) == pytest.approx(float(floor), rel=0.03)
    for model in (ExactVelocity(delta=0.1), ExactVelocity(delta=-0.1), ExactVelocity(gain=1.1), ExactVelocity(gain=0.9)):
        worse = rf.training_losses(model, x0, t, kw, noise=noise)["loss"].mean()
        assert float(worse) > float(best) * 1.003
    shifted = rf.training_losses(ExactVelocity(delta=0.1), x0, t, kw, noise=noise)["loss"].mean()
    assert float(shifted - best) == pytest.approx(0.01, rel=0.2)  # + delta^2 on average
    # The reversed sign convention (noise - x0) is far from optimal.
    flipped = rf.training_losses(ExactVelocity(gain=-1.0), x0, t, kw, noise=noise)["loss"].mean()
    assert float(flipped) > 3 * float(best)


def test_masked_training_keeps_condition_frames_clean_and_out_of_the_loss():
    rf = RectifiedFlow()
    _, _, t, kw = _train_batch(b=8)
    gen = torch.Generator().manual_seed(5)
    x0 = MU + SIGMA * torch.randn((8, 2, 3, 2, 2), generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=gen)
    frame_mask = torch.tensor([[False, True, True]] * 8)
    seen = {}

    def model(x, tt, **kwargs):
        seen["x"], seen["x_mask"] = x, kwargs["x_mask"]
        out = torch.cat([exact_velocity(x, tt), torch.zeros_like(x)], dim=1)
        out[:, :, 0] = 1e6  # garbage on the condition frame must not count
        return out

    loss = rf.training_losses(model, x0, t, kw, noise=noise, mask=frame_mask)["loss"]
    assert torch.equal(seen["x"][:, :, 0], x0[:, :, 0])
    assert torch.equal(seen["x_mask"], frame_mask)
    ref = rf.training_losses(ExactVelocity(), x0[:, :, 1:], t, kw, noise=noise[:, :, 1:])["loss"]
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


# 3. Sampling ---------------------------------------------------------------------------------------------------------


def _z(seed=1):
    """4096 standard-normal starts, standardised so that sample statistics measure the sampler, not the draw."""
    z = torch.randn((1, 4, 4, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean()) / z.std()


def _sample_error(steps: int, shift: bool) -> tuple[float, torch.Tensor]:
    rf = RectifiedFlow(num_sampling_steps=steps, use_timestep_transform=shift)
    z = _z()
    out = rf.sample(ExactVelocity(), z, Y, Y, model_kwargs=SIZES)
    return float((out - (MU + SIGMA * z)).abs().max()), out


@pytest.mark.parametrize("shift", [False, True])
def test_euler_with_exact_velocity_recovers_gaussian(shift):
    err, out = _sample_error(100, shift)
    assert abs(out.mean().item() - MU) < 0.02 * MU
    assert abs(out.std().item() - SIGMA) < 0.03 * SIGMA
    err_half, _ = _sample_error(50, shift)
    assert 1.7 < err_half / err < 2.3  # Euler is first order: the error halves with twice the steps


def test_sampling_timesteps_and_guidance():
    rf = RectifiedFlow(num_sampling_steps=4, cfg_scale=3.0, use_timestep_transform=False)
    z = _z()[:, :, :1]
    y, y_null = torch.ones(1, 1, 2, 3, dtype=torch.float64), torch.zeros(1, 1, 2, 3, dtype=torch.float64)
    ts = []

    def model(x, t, yy, **kw):
        ts.append(t.tolist())
        v = torch.where(yy[:, :1, :1, :1, None] > 0, torch.ones_like(x), 2 * torch.ones_like(x))
        return torch.cat([v, v], dim=1)

    out = rf.sample(model, z, y, y_null)
    assert ts == [[1000.0] * 2, [750.0] * 2, [500.0] * 2, [250.0] * 2]
    torch.testing.assert_close(out, z + (2 + 3.0 * (1 - 2)) * 1.0)  # guided v = -1 over a total dt of 1


def test_frame_masks_in_sampling():
    rf = RectifiedFlow(num_sampling_steps=4, use_timestep_transform=False)
    ref = _z()[:, :, :1].expand(1, 4, 3, 16, 16).clone()
    masks = torch.tensor([[0.0, 0.5, 1.0]])  # hard condition, half-edit, free
    model = ExactVelocity()
    draws = []

    def noise_fn(like):
        draws.append(torch.randn(like.shape, dtype=like.dtype, generator=torch.Generator().manual_seed(len(draws))))
        return draws[-1]

    out = rf.sample(model, ref.clone(), Y, Y, masks=masks, model_kwargs=SIZES, noise_fn=noise_fn)
    assert len(draws) == 4  # one draw per step
    x_masks = [c["x_mask"][0].tolist() for c in model.calls]  # t = 1000, 750, 500, 250
    assert x_masks == [[False, False, True], [False, False, True], [False, True, True], [False, True, True]]
    assert all(torch.equal(c["x_mask"][0], c["x_mask"][1]) for c in model.calls)  # doubled for CFG
    assert torch.equal(out[:, :, 0], ref[:, :, 0])  # ratio 0: exactly the reference
    assert not torch.equal(out[:, :, 1], ref[:, :, 1])  # ratio 0.5: re-noised at t=500, then generated
    assert not torch.equal(out[:, :, 2], ref[:, :, 2])
