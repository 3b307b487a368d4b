"""MaskGenerator: reference ratios, frequencies, the shape of each mask type, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from training.masks import DEFAULT_MASK_RATIOS, MASK_TYPES, MaskGenerator, validate_mask_ratios


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _only(name):
    return MaskGenerator({name: 1.0})


def test_default_ratios_are_the_reference():
    assert DEFAULT_MASK_RATIOS == {
        "mask_no": 0.75,
        "mask_quarter_random": 0.025, "mask_quarter_head": 0.025, "mask_quarter_tail": 0.025,
        "mask_quarter_head_tail": 0.05,
        "mask_image_random": 0.025, "mask_image_head": 0.025, "mask_image_tail": 0.025,
        "mask_image_head_tail": 0.05,
    }
    assert MaskGenerator().ratios == DEFAULT_MASK_RATIOS


@pytest.mark.parametrize(
    ("ratios", "message"),
    [
        ({"mask_no": 0.5}, "sum to 1"),
        ({"mask_no": 0.9, "mask_quarter_head": 0.2}, "sum to 1"),
        ({"mask_no": 1.2, "mask_image_head": -0.2}, r"in \[0, 1\]"),
        ({"no": 1.0}, "unknown mask types"),
    ],
)
def test_ratio_validation(ratios, message):
    with pytest.raises(ValueError, match=message):
        validate_mask_ratios(ratios)


def test_frequencies_follow_the_ratios():
    gen = MaskGenerator()
    g = _gen(123)
    n = 20000
    counts = dict.fromkeys(MASK_TYPES, 0)
    for _ in range(n):
        counts[gen.sample_type(g)] += 1
    for name, p in DEFAULT_MASK_RATIOS.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[name] - n * p) < 4.5 * sigma, (name, counts[name], n * p)


def test_batch_masks_shape_dtype_and_mix():
    x = torch.zeros(4000, 2, 16, 2, 2)
    masks = MaskGenerator().get_masks(x, _gen(1))
    assert masks.shape == (4000, 16) and masks.dtype == torch.bool and masks.device == x.device
    unconditioned = masks.all(dim=1).float().mean().item()
    assert abs(unconditioned - 0.75) < 0.03
    assert masks.any(dim=1).all(), "every sample keeps at least one noised frame"


def test_quarter_types():
    T = 16
    sizes = {name: set() for name in ("head", "tail", "head_tail", "random")}
    for kind in sizes:
        gen, g = _only(f"mask_quarter_{kind}"), _gen(2)
        for _ in range(300):
            name, mask = gen.get_mask(T, g)
            assert name == f"mask_quarter_{kind}"
            cond = (~mask).nonzero().flatten().tolist()
            if kind == "head":
                k = len(cond)
                assert cond == list(range(k))
            elif kind == "tail":
                k = len(cond)
                assert cond == list(range(T - k, T))
            elif kind == "head_tail":
                k = len(cond) // 2
                assert cond == list(range(k)) + list(range(T - k, T))
            else:
                k = len(cond)
                assert cond == list(range(cond[0], cond[0] + k)), "one contiguous run"
            sizes[kind].add(k)
    for kind, seen in sizes.items():
        assert seen == {1, 2, 3, 4}, (kind, seen)  # 1..T//4 condition frames


def test_image_types():
    T = 8
    want = {"head": [0], "tail": [T - 1], "head_tail": [0, T - 1]}
    for kind, cond in want.items():
        name, mask = _only(f"mask_image_{kind}").get_mask(T, _gen())
        assert name == f"mask_image_{kind}"
        assert (~mask).nonzero().flatten().tolist() == cond
    gen, g = _only("mask_image_random"), _gen(3)
    positions = set()
    for _ in range(400):
        _, mask = gen.get_mask(T, g)
        cond = (~mask).nonzero().flatten().tolist()
        assert len(cond) == 1
        positions.add(cond[0])
    assert positions == set(range(T))


def test_mask_no_and_degenerate_lengths():
    assert _only("mask_no").get_mask(16, _gen())[1].all()
    for name in MASK_TYPES:
        # an image (T = 1) is never conditioned
        applied, mask = _only(name).get_mask(1, _gen())
        assert applied == "mask_no" and mask.tolist() == [True]
    # T = 2: head_tail would condition everything, so nothing is conditioned; other types condition one frame
    assert _only("mask_quarter_head_tail").get_mask(2, _gen())[0] == "mask_no"
    assert (~_only("mask_quarter_head").get_mask(2, _gen())[1]).sum() == 1
    assert (~_only("mask_image_head_tail").get_mask(3, _gen())[1]).tolist() == [True, False, True]


def test_deterministic_with_a_seeded_generator():
    x = torch.zeros(64, 4, 12, 2, 2)
    gen = MaskGenerator()
    assert torch.equal(gen.get_masks(x, _gen(7)), gen.get_masks(x, _gen(7)))
    assert not torch.equal(gen.get_masks(x, _gen(7)), gen.get_masks(x, _gen(8)))
    masks, names = gen.sample(64, 12, _gen(7))
    assert torch.equal(masks, gen.get_masks(x, _gen(7)))
    assert all(m.all() == (n == "mask_no") for m, n in zip(masks, names))


def test_input_shape_checked():
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        MaskGenerator().get_masks(torch.zeros(2, 16, 4, 4), _gen())
