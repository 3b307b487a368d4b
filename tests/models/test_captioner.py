"""The VLM captioner: loads a save_pretrained folder offline, generates greedily in batches, never downloads.

The models are tiny and random (built by ``build_tiny_vlm``), so their words are noise; the tests prove the path
real checkpoints take: Auto classes from a local folder, chat template, image tokens, left-padded batches,
new tokens only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.scorers import WeightsUnavailable
from models.scorers.captioner import (
    REFERENCE_PROMPT,
    REFERENCE_PROMPT_3_FRAMES,
    VLMCaptioner,
    frame_points,
    resize_like_reference,
    select_frames,
)
from models.scorers.tiny_vlm import build_tiny_vlm


def frames(seed: int, n: int, h: int, w: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-llava-next", family="llava")


@pytest.fixture(scope="module")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-qwen2-vl", family="qwen2_vl")


def test_missing_model_folder_raises_weights_unavailable(tmp_path):
    with pytest.raises(WeightsUnavailable, match="nothing is downloaded"):
        VLMCaptioner(tmp_path / "llava-v1.6-mistral-7b-hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailable, match="no config.json"):
        VLMCaptioner(tmp_path / "empty")


def test_reference_settings_are_the_defaults(tiny_llava):
    captioner = VLMCaptioner(tiny_llava)
    assert (captioner.max_new_tokens, captioner.num_frames, captioner.image_size, captioner.batch_size) == (300, 1, 336, 16)
    assert captioner.prompt == REFERENCE_PROMPT
    assert REFERENCE_PROMPT in captioner._prompt_text and captioner._prompt_text.startswith("[INST] <image>\n")
    assert REFERENCE_PROMPT.startswith("A video is given by providing the middle frame.")
    assert "Do not describe each frame individually." in REFERENCE_PROMPT_3_FRAMES
    assert captioner.name == "tiny-llava-next" and captioner.device == "cpu"


def test_tiny_llava_next_loads_from_its_folder_and_captions_a_batch(tiny_llava):
    from transformers import LlavaNextForConditionalGeneration

    captioner = VLMCaptioner(tiny_llava, max_new_tokens=6, batch_size=2)
    assert isinstance(captioner.model, LlavaNextForConditionalGeneration)
    clip_a, clip_b = frames(0, 1, 48, 80), frames(1, 3, 60, 40)  # different sizes, so prompts differ in length
    captions = captioner.caption([clip_a, clip_b])
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert all(len(c.split()) <= 6 for c in captions)  # only the new tokens: the prompt is not echoed
    assert "Describe" not in " ".join(captions)
    # Left padding makes a batch equal to one clip at a time, and greedy decoding makes it repeatable.
    assert captions == [captioner.caption([clip_a])[0], captioner.caption([clip_b])[0]]


def test_tiny_qwen2_vl_loads_and_captions_a_batch(tiny_qwen2_vl):
    from transformers import Qwen2VLForConditionalGeneration

    captioner = VLMCaptioner(tiny_qwen2_vl, prompt="Describe this video.", max_new_tokens=5)
    assert isinstance(captioner.model, Qwen2VLForConditionalGeneration)
    captions = captioner.caption([frames(2, 1, 40, 64), frames(3, 1, 64, 40)])
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)


def test_caption_clips_uses_the_model_when_no_sidecar(tiny_llava, tmp_path):
    from curation.captions import caption_clips

    captioner = VLMCaptioner(tiny_llava, max_new_tokens=4)
    clips = [{"id": f"v_{k}", "video_path": "v.mp4", "start_s": k, "end_s": k + 1.0} for k in range(2)]
    kept = {"v_0": frames(4, 3, 32, 48), "v_1": frames(5, 3, 32, 48)}
    rows = caption_clips(clips, tmp_path, captioner, lambda row: kept[row["id"]])
    assert [r.source for r in rows] == ["model:tiny-llava-next"] * 2
    assert all(r.text for r in rows)


def test_frame_selection_and_resize_follow_the_reference():
    from PIL import Image

    assert frame_points(1) == (0.5,) and frame_points(3) == (0.1, 0.5, 0.9)
    kept = list(range(10))
    assert select_frames(kept, 1) == [5] and select_frames(kept, 3) == [1, 5, 9]
    assert select_frames([7], 3) == [7]
    with pytest.raises(ValueError):
        select_frames([], 1)
    assert resize_like_reference(Image.new("RGB", (1280, 720)), 336).size == (597, 336)
    assert resize_like_reference(Image.new("RGB", (320, 240)), 336).size == (320, 240)  # small frames untouched
