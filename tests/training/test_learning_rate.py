"""The learning-rate schedule: warmup, constant, and the optional linear decay to zero at the end of the run."""

from __future__ import annotations

import pytest

from training.config import TrainConfig
from training.steps import learning_rate


def config(**optim) -> TrainConfig:
    return TrainConfig.model_validate({"steps": 100, "optim": {"lr": 1e-3, **optim}})


def test_constant_after_warmup_without_decay():
    cfg = config(warmup_steps=10)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9) == learning_rate(cfg, 99) == pytest.approx(1e-3)


def test_decay_reaches_zero_after_the_last_step():
    cfg = config(warmup_steps=10, decay_fraction=0.2)  # the last 20 of 100 steps
    assert learning_rate(cfg, 79) == pytest.approx(1e-3)  # 21 steps left: before the decay
    assert learning_rate(cfg, 80) == pytest.approx(1e-3)  # first decayed step: 20/20
    assert learning_rate(cfg, 90) == pytest.approx(5e-4)
    assert learning_rate(cfg, 99) == pytest.approx(5e-5)  # the last step still learns a little
    assert learning_rate(cfg, 100) == 0.0
    lrs = [learning_rate(cfg, s) for s in range(80, 100)]
    assert lrs == sorted(lrs, reverse=True)


def test_schedule_lengths_out_of_range_are_refused():
    with pytest.raises(ValueError):
        config(decay_fraction=-0.1)
    with pytest.raises(ValueError):
        config(decay_fraction=1.5)
    with pytest.raises(ValueError):
        config(warmup_steps=-5)
