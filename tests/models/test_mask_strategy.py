"""Mask strategies against the reference's table (../shared/conformance/mask_strategy_table.json), every section."""

from __future__ import annotations

import json

import pytest
import torch

from models.mask_strategy import (
    append_loop_condition,
    apply_mask_strategy,
    edit_ratio_schedule,
    edit_ratio_to_step_index,
    extract_json_from_prompts,
    parse_mask_entries,
    parse_mask_strategy,
    split_prompt_per_loop,
)
from models.schedulers.guided import GuidedBatch, gaussian_noise
from models.schedulers.iddpm import IDDPM


@pytest.fixture(scope="module")
def table(conformance_dir):
    return json.loads((conformance_dir / "mask_strategy_table.json").read_text())


def test_table_has_the_sections_we_test(table):
    assert set(table) == {
        "process_mask_strategy",
        "apply_mask_strategy",
        "extract_json_from_prompts",
        "process_prompts_num_loop_4",
        "sampler_edit_ratio_schedule",
    }


def test_parse(table):
    for case in table["process_mask_strategy"]:
        assert parse_mask_strategy(case["input"]) == case["output"], case["input"]
    assert parse_mask_strategy(None) is None


def test_parse_rejects_bad_entries():
    with pytest.raises(ValueError):
        parse_mask_strategy("0,0,0,0,1,0,7")
    with pytest.raises(ValueError):
        parse_mask_strategy("0,,1")
    with pytest.raises(ValueError):
        parse_mask_entries("0,a")


def _marker(ref_id: int, frame: int) -> float:
    return 1000.0 * (ref_id + 1) + frame


def test_apply(table):
    c, h, w = 2, 2, 3
    for case in table["apply_mask_strategy"]:
        t = case["num_latent_frames"]
        # Each reference frame holds a unique constant, so the written frames name their source.
        refs = [
            torch.stack([torch.full((c, h, w), _marker(i, f)) for f in range(n)], dim=1)
            for i, n in enumerate(case["reference_lengths"])
        ]
        z = torch.zeros(2, c, t, h, w)  # row 1 has no strategy and must stay untouched
        masks = apply_mask_strategy(z, [refs, []], [case["strategy"], None], case["loop_i"])
        assert parse_mask_strategy(case["strategy"]) == case["parsed"]
        assert masks.dtype == torch.float32 and masks.shape == (2, t)
        assert torch.equal(masks[0], torch.tensor(case["frame_mask"], dtype=torch.float32)), case["strategy"]
        assert torch.equal(masks[1], torch.ones(t))
        assert torch.equal(z[1], torch.zeros_like(z[1]))
        for f, src in enumerate(case["frame_source"]):
            want = 0.0 if src is None else _marker(src["ref_id"], src["ref_frame"])
            assert torch.equal(z[0, :, f], torch.full((c, h, w), want)), (case["strategy"], f)


def test_apply_rejects_what_does_not_fit():
    z = torch.zeros(1, 1, 4, 1, 1)
    with pytest.raises(ValueError):
        apply_mask_strategy(z, [[torch.zeros(1, 2, 1, 1)]], ["0,0,0,0,3"], 0)  # reference too short
    with pytest.raises(ValueError):
        apply_mask_strategy(z, [[torch.zeros(1, 2, 1, 1)]], ["0,1"], 0)  # no reference 1


def test_loop_condition_string(table):
    last = table["apply_mask_strategy"][-2]
    assert append_loop_condition("0,0,0,0,1", loop_i=1, last_ref=1, condition_frame_length=4) == last["strategy"]
    assert append_loop_condition(None, 1, 0, 4) == "1,0,-4,0,4"


def test_extract_json_from_prompts(table):
    cases = table["extract_json_from_prompts"]
    texts, infos = extract_json_from_prompts([c["input"] for c in cases])
    assert texts == [c["text"] for c in cases]
    assert infos == [c["info"] for c in cases]
    with pytest.raises(ValueError):
        extract_json_from_prompts(['a {"x": 1} b {"y": 2}'])


def test_split_prompt_per_loop(table):
    for case in table["process_prompts_num_loop_4"]:
        assert split_prompt_per_loop([case["input"]], 4) == [case["output"]]
    assert split_prompt_per_loop(["|0|A|1|B"], 2, clean=str.lower) == [["a", "b"]]
    with pytest.raises(ValueError):
        split_prompt_per_loop(["|0|a|3|b"], 2)


def test_edit_ratio_schedule_table(table):
    for block in table["sampler_edit_ratio_schedule"]:
        steps = block["num_sampling_steps"]
        for entry in block["per_frame"]:
            assert edit_ratio_schedule(entry["edit_ratio"], steps) == entry
        got = edit_ratio_to_step_index(torch.tensor(block["ratios"]), steps)
        assert got.tolist() == [e["mask_t"] for e in block["per_frame"]]


@pytest.mark.parametrize("steps", [5, 100])
def test_iddpm_sampler_follows_the_edit_ratio_schedule(table, steps):
    """The sampler's x_mask, re-noising and resets, frame by frame, against the table."""
    block = next(b for b in table["sampler_edit_ratio_schedule"] if b["num_sampling_steps"] == steps)
    ratios = torch.tensor(block["ratios"], dtype=torch.float32)[None]  # [1, T]: one frame per ratio
    t = ratios.shape[1]
    d = IDDPM(num_sampling_steps=steps)
    seen = {}

    def model(x, timestep, y, x_mask, **kw):
        i = int((d.timestep_map == timestep[0]).nonzero())
        assert torch.equal(x_mask[0], x_mask[1])
        seen[i] = x_mask[0].clone()
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=torch.float32)

    ref = torch.arange(1, t + 1, dtype=torch.float64).reshape(1, 1, t, 1, 1)
    y = torch.zeros(1, 1, 1, 1)
    history = list(d.sample_steps(model, GuidedBatch(ref.clone(), y, y, masks=ratios, noise_fn=gaussian_noise(torch.Generator().manual_seed(0)))))
    for f, entry in enumerate(block["per_frame"]):
        noised = [i for i in range(steps) if bool(seen[i][f])]
        assert sorted(noised) == sorted(entry["t_indices_treated_as_noised"])
        for step in history:
            if step.t_index in entry["t_indices_reset_to_reference_after_step"]:
                assert torch.equal(step.sample[0, 0, f], ref[0, 0, f])  # pinned to the reference
            else:
                assert not torch.equal(step.sample[0, 0, f], ref[0, 0, f])  # noised or generated
        if entry["t_index_renoised"]:
            i = entry["t_index_renoised"][0]
            step = next(s for s in history if s.t_index == i)
            assert torch.equal(step.x_in[0, 0, f], ref[0, 0, f])  # still the reference when it is re-noised
            assert not torch.equal(step.sample[0, 0, f], ref[0, 0, f])  # and free afterwards
