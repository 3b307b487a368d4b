"""Prompt adherence scorer: colours, shapes, motion and titles measured on hand-drawn videos and generator output.

The hand-made videos are drawn here with numpy / OpenCV, not with the code under test; the generator's own
renderer (curation/samples.py) supplies title cards and truthfully captioned shots.
"""

from __future__ import annotations

import numpy as np
import pytest

from curation.samples import PALETTE, Shot, render_frame, write_synthetic_video
from models.scorers.adherence import AdherenceResult, derangement, score_prompts, score_video, shuffled_control
from models.scorers.adherence_frames import shape_features, shape_membership
from models.scorers.adherence_prompt import ObjectSpec, parse_prompt

H, W = 72, 120  # small frames keep the whole module to a few seconds
DARK = (30, 30, 34)
RED, YELLOW, BLUE, GREEN = (220, 30, 30), (240, 220, 40), (30, 60, 200), (40, 160, 60)


def draw_video(num_frames: int, background, shapes, h: int = H, w: int = W) -> np.ndarray:
    """shapes: (kind, colour, size, (x0, y0), (vx, vy)) drawn at (x0 + vx t, y0 + vy t), wrapping horizontally."""
    import cv2

    frames = []
    for t in range(num_frames):
        frame = np.empty((h, w, 3), np.uint8)
        frame[:] = background
        for kind, colour, size, (x0, y0), (vx, vy) in shapes:
            x, y = int(round(x0 + vx * t + size)) % (w + 2 * size) - size, int(round(y0 + vy * t))
            if kind == "circle":
                cv2.circle(frame, (x, y), size, colour, -1, cv2.LINE_AA)
            elif kind == "square":
                cv2.rectangle(frame, (x - size, y - size), (x + size, y + size), colour, -1)
            else:
                raise ValueError(kind)
        frames.append(frame)
    return np.stack(frames)


def red_circle_right() -> np.ndarray:
    return draw_video(12, DARK, [("circle", RED, 9, (30, 36), (5, 0))])


def still_yellow_square() -> np.ndarray:
    return draw_video(8, DARK, [("square", YELLOW, 10, (70, 30), (0, 0))])


def render_shot(shot: Shot, num_frames: int, w: int = 160, h: int = 96) -> np.ndarray:
    return np.stack([render_frame(shot, i, w, h) for i in range(num_frames)])


@pytest.fixture(scope="module")
def ocr():
    from models.scorers.adherence import default_ocr

    return default_ocr()


class NoOcr:
    """Stands in where a prompt has a title but the test is not about OCR: reads nothing, and counts its calls."""

    calls = 0

    def score(self, frame):
        from models.scorers.ocr import OcrResult

        NoOcr.calls += 1
        return OcrResult(0, 0.0, (), 0)


# -- parsing ------------------------------------------------------------------------------------------------------


def test_parses_the_generator_captions():
    moving = parse_prompt(Shot("moving", 1, PALETTE[1], speed=5.0).caption())
    assert moving.objects == (
        ObjectSpec("red", "circle", "object", "moving"),
        ObjectSpec("yellow", "square", "object", "moving"),
        ObjectSpec("orange", None, "background"),
    )
    assert moving.title is None and moving.scene_motion is None

    static = parse_prompt(Shot("static", 1, PALETTE[0]).caption())  # "a still image of dark blue stripes and ..."
    assert static.objects == (
        ObjectSpec("dark blue", "stripes", "object", "still"),
        ObjectSpec("grey", "circle", "object", "still"),  # "disc"
    )

    text = parse_prompt(Shot("text", 1, PALETTE[5], text="OPEN SORA 2024").caption())
    assert text.title == "OPEN SORA 2024"
    assert text.objects == (ObjectSpec("white", "letters", "object", "still"), ObjectSpec("black", None, "background"))
    assert text.colours == ("white", "black")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red circle moving right", [("red", "circle", "moving", "right")]),
        ("a blue square standing still", [("blue", "square", "still", None)]),
        ("a circle moves from left to right", [(None, "circle", "moving", "right")]),
        ("a small green triangle moving to the left", [("green", "triangle", "moving", "left")]),
        ("a gray disc that is not moving", [("grey", "circle", "still", None)]),
        ("a dark blue ball rising", [("dark blue", "circle", "moving", "up")]),
        (
            "a red circle moving right and a blue square standing still",
            [("red", "circle", "moving", "right"), ("blue", "square", "still", None)],
        ),
        # a phrase after one object does not spill onto the next
        (
            "a red circle moving down next to a yellow square",
            [("red", "circle", "moving", "down"), ("yellow", "square", None, None)],
        ),
    ],
)
def test_parses_objects_and_motion(prompt, expected):
    spec = parse_prompt(prompt)
    assert [(o.colour, o.shape, o.motion, o.direction) for o in spec.objects] == expected


def test_parses_titles_quoted_or_uppercase():
    assert parse_prompt('a title card with the words "hello dagster"').title == "hello dagster"
    assert parse_prompt("a title 'BUCKETS' on black").title == "BUCKETS"
    assert parse_prompt("a card reading VIDEO DATA in white").title == "VIDEO DATA"
    assert parse_prompt("A red circle").title is None  # a sentence's capital "A" is not a title
    assert parse_prompt("A RED CIRCLE").title is None  # an all-caps prompt is shouting, not a title
    assert parse_prompt("A RED CIRCLE").objects == (ObjectSpec("red", "circle"),)


def test_unknown_words_are_ignored_and_nothing_measurable_is_empty():
    spec = parse_prompt("a cat sitting on a red sofa in the afternoon sun")
    assert spec.objects == (ObjectSpec("red", None),) and not spec.is_empty
    assert parse_prompt("two dogs running along a sandy beach").scene_motion == "moving"
    for prompt in ("a drone shot of snowy mountains at sunset", "", "zxq blorp"):
        assert parse_prompt(prompt).is_empty


def test_every_evaluation_prompt_parses():
    from training.prompt_sets import load_prompt_set

    specs = [parse_prompt(p) for p in load_prompt_set("v1").prompts]
    assert not any(s.is_empty for s in specs[:4])  # the synthetic-world prompts all name something measurable
    assert specs[1].title == "OPEN SORA 2024"


# -- hand-made videos ---------------------------------------------------------------------------------------------


def test_red_circle_moving_right_matches_its_prompt_and_not_another():
    video = red_circle_right()
    good = score_video(video, "a red circle moving right")
    assert isinstance(good, AdherenceResult)
    assert good.score > 0.8, good.as_dict()
    assert set(good.scores) == {"colour", "shape", "motion"}
    assert good.criteria["colour"].reason.startswith("red: blob in 12/12 frames")
    assert "right" in good.criteria["motion"].reason

    bad = score_video(video, "a blue square standing still")
    assert bad.score < 0.3, bad.as_dict()
    assert bad.criteria["colour"].reason.startswith("blue: no blob")
    assert bad.criteria["motion"].reason == "blue square: nothing to track (not found in any frame)"

    # Right colour and shape, wrong direction / wrong shape: only that criterion drops.
    left = score_video(video, "a red circle moving left")
    assert left.scores["colour"] == 1.0 and left.scores["shape"] > 0.8 and left.scores["motion"] < 0.1
    square = score_video(video, "a red square moving right")
    assert square.scores["shape"] < 0.2 and square.scores["motion"] > 0.8


def test_still_yellow_square_is_still_and_not_moving():
    video = still_yellow_square()
    good = score_video(video, "a yellow square standing still")
    assert good.score > 0.8, good.as_dict()
    moving = score_video(video, "a yellow square moving")
    assert moving.scores["motion"] < 0.2, moving.as_dict()
    assert moving.scores["colour"] == 1.0 and moving.scores["shape"] > 0.8
    assert score_video(video, "a yellow circle standing still").scores["shape"] < 0.2


def test_shape_without_colour_uses_the_largest_blob_apart_from_the_background():
    video = draw_video(10, (200, 200, 200), [("circle", GREEN, 12, (20, 36), (0, -2))])
    result = score_video(video, "a circle moving up")
    assert result.scores["shape"] > 0.8 and result.scores["motion"] > 0.8, result.as_dict()
    assert score_video(video, "a square moving down").score < 0.2


def test_wrap_around_is_not_read_as_a_jump_backwards():
    # 14 px/frame across a 120 px frame for 24 frames: the circle leaves on the right and re-enters on the left
    # twice; the jumps are dropped and the rest of the track still says "right".
    video = draw_video(24, DARK, [("circle", RED, 8, (10, 30), (14, 0))])
    result = score_video(video, "a red circle moving to the right")
    assert result.scores["motion"] > 0.8, result.as_dict()
    assert "jumps dropped" in result.criteria["motion"].reason


@pytest.mark.parametrize("radius", [5, 7, 12, 30])  # radius 4 is the limit: its circle scores 0.7
def test_raster_circles_and_squares_measure_as_themselves(radius):
    import cv2

    def measure(draw):
        mask = np.zeros((80, 80), np.uint8)
        draw(mask)
        return shape_features(mask.astype(bool))

    for line in (cv2.LINE_8, cv2.LINE_AA):
        circle = measure(lambda m: cv2.circle(m, (40, 40), radius, 1, -1, line))
        assert shape_membership("circle", circle) > 0.8 and shape_membership("square", circle) == 0.0
    for angle in (0, 20, 45):  # a turned square is still a square (minimum-area rectangle, enclosing circle)
        box = cv2.boxPoints(((40, 40), (2 * radius, 2 * radius), angle)).astype(np.int32)
        square = measure(lambda m: cv2.fillPoly(m, [box], 1))
        assert shape_membership("square", square) > 0.8 and shape_membership("circle", square) == 0.0
    bar = measure(lambda m: cv2.rectangle(m, (10, 40 - radius // 3), (70, 40 + radius // 3), 1, -1))
    assert shape_membership("rectangle", bar) > 0.9 and shape_membership("square", bar) == 0.0
    triangle = measure(lambda m: cv2.fillPoly(m, [np.array([[10, 70], [70, 70], [40, 18]], np.int32)], 1))
    assert shape_membership("triangle", triangle) > 0.9 and shape_membership("circle", triangle) == 0.0


def test_scene_motion_without_an_object():
    moving, still = red_circle_right(), still_yellow_square()
    assert score_video(moving, "two dogs running along a sandy beach").score > 0.8
    assert score_video(still, "two dogs running along a sandy beach").score < 0.2
    assert score_video(still, "a motionless scene").score > 0.8


def test_prompt_naming_nothing_measurable_scores_none_with_a_reason():
    for prompt in ("a drone shot of snowy mountains at sunset", ""):
        result = score_video(red_circle_right(), prompt)
        assert result.score is None and result.criteria == {}
        assert "nothing measurable" in result.reason
    results, mean = score_prompts([red_circle_right(), red_circle_right()], ["a red circle", "snowy mountains"])
    assert results[1].score is None and mean == results[0].score  # the mean skips prompts that cannot be scored


def test_rejects_what_is_not_a_video():
    with pytest.raises(ValueError, match="uint8 RGB"):
        score_video(np.zeros((4, 8, 8, 3), np.float32), "a red circle")
    with pytest.raises(ValueError, match="uint8 RGB"):
        score_video(np.zeros((8, 8, 3), np.uint8), "a red circle")
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        score_prompts([red_circle_right()] * 2, ["a red circle"])


def test_shuffled_control_is_clearly_below_the_matched_score():
    videos = [
        red_circle_right(),
        still_yellow_square(),
        draw_video(12, DARK, [("square", BLUE, 9, (60, 14), (0, 4))]),
        draw_video(12, (230, 220, 200), [("circle", GREEN, 11, (60, 36), (0, 0))]),
    ]
    prompts = [
        "a red circle moving right",
        "a yellow square standing still",
        "a blue square moving down",
        "a still green circle on a cream background",
    ]
    matched, matched_mean = score_prompts(videos, prompts)
    assert all(r.score > 0.8 for r in matched), [r.as_dict() for r in matched]
    control, control_mean = shuffled_control(videos, prompts, seed=0)
    perm = derangement(prompts, seed=0)
    assert all(j != i for i, j in enumerate(perm))
    assert [r.prompt for r in control] == [prompts[j] for j in perm]
    assert control_mean < 0.35 and matched_mean - control_mean > 0.5, (matched_mean, control_mean)
    assert derangement(prompts, seed=0) == perm  # seeded: the same control every run
    with pytest.raises(ValueError, match="at least 2"):
        shuffled_control(videos[:1], prompts[:1])


# -- titles (OCR) -------------------------------------------------------------------------------------------------


def test_title_card_from_the_generator_is_read(ocr):
    video = render_shot(Shot("text", 4, PALETTE[5], text="HELLO DAGSTER"), 4, w=320, h=192)
    result = score_video(video, 'a title card with the words "HELLO DAGSTER"', ocr=ocr)
    assert result.scores["title"] == 1.0, result.as_dict()
    assert "2/2 words" in result.criteria["title"].reason and "HELLO" in result.criteria["title"].reason
    wrong = score_video(video, 'a title card with the words "VIDEO DATA"', ocr=ocr)
    assert wrong.scores["title"] == 0.0


# -- generator output: truthful captions agree, swapped captions do not ------------------------------------------


@pytest.fixture(scope="module")
def generator_shots():
    """Shots of every kind from curation/samples.py with their truthful captions (rendered, no codec)."""
    shots = [
        Shot("moving", 24, PALETTE[1], speed=4.0),  # orange background
        Shot("static", 8, PALETTE[0]),  # dark blue stripes
        Shot("moving", 24, PALETTE[2], speed=3.0),  # green background
        Shot("static", 8, PALETTE[4]),  # cream stripes
        Shot("text", 4, PALETTE[5], text="VIDEO DATA"),
    ]
    return [render_shot(s, s.num_frames) for s in shots], [s.caption() for s in shots]


def test_generator_shots_agree_with_their_truthful_captions(generator_shots, ocr):
    videos, captions = generator_shots
    results, mean = score_prompts(videos, captions, ocr=ocr)
    for result in results:
        assert result.score >= 0.9, result.as_dict()
    assert results[-1].scores["title"] == 1.0
    assert mean >= 0.95


def test_generator_shots_disagree_with_swapped_captions(generator_shots):
    videos, captions = generator_shots
    # Each shot against the caption of a shot of another kind or colour; the title is never on these videos.
    swaps = {0: 1, 1: 4, 2: 3, 3: 0, 4: 2}
    NoOcr.calls = 0
    for i, j in swaps.items():
        result = score_video(videos[i], captions[j], ocr=NoOcr())
        assert result.score <= 0.35, (i, j, result.as_dict())
    assert NoOcr.calls == 1  # only the title caption asked for OCR
    # Same kind, other background colour: only the background colour is wrong.
    result = score_video(videos[0], captions[2])
    assert result.scores["colour"] == pytest.approx(2 / 3) and result.scores["shape"] == 1.0


def test_encoded_generator_video_still_agrees(tmp_path):
    """Through H.264 (chroma subsampling, compression) the moving shot keeps its caption and refuses another's."""
    import av

    shot = Shot("moving", 20, PALETTE[3], speed=4.0)  # purple background
    video = write_synthetic_video(tmp_path / "moving.mp4", [shot], width=160, height=96, fps=24)
    with av.open(str(video.path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert score_video(frames, shot.caption()).score >= 0.9
    assert score_video(frames, Shot("static", 1, PALETTE[3]).caption()).score <= 0.35


def test_pixel_noise_does_not_change_the_verdict(generator_shots):
    """Gaussian noise (sigma 20 grey levels, more than a trained model's grain) on generator shots."""
    videos, captions = generator_shots
    rng = np.random.default_rng(0)
    for k in (0, 1, 3):
        noisy = np.clip(videos[k] + rng.normal(0, 20, videos[k].shape), 0, 255).astype(np.uint8)
        assert score_video(noisy, captions[k]).score >= 0.9
        assert score_video(noisy, captions[(k + 1) % 4]).score <= 0.35


def block_speckle(seed: int, num_frames: int = 8, block: int = 8, h: int = 96, w: int = 160) -> np.ndarray:
    """What an untrained model decodes to through the demo's 8x box-filter VAE: every 8x8 block an independent
    colour, here drawn from the scorer's own vocabulary (the generator's palette, red, yellow, grey, white, black)
    so that every named colour is somewhere in every frame."""
    colours = np.array([*PALETTE, RED, YELLOW, (128, 128, 128), (255, 255, 255), (20, 20, 20)], np.uint8)
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(colours), size=(num_frames, h // block, w // block))
    return np.repeat(np.repeat(colours[picks], block, axis=1), block, axis=2)


def test_block_speckle_is_not_a_circle_a_square_or_stripes():
    """The step-0 control: speckle contains every colour in blobs of one or two blocks; none of them is an object
    the size the generator draws, so colour and shape adherence stay low for every kind of prompt."""
    prompts = [
        "a red circle and a yellow square moving slowly across a plain orange background",
        "a still image of purple stripes and a grey disc, with no motion",
    ]
    for seed in range(3):
        video = block_speckle(seed)
        for prompt in prompts:
            result = score_video(video, prompt, ocr=NoOcr())
            assert result.scores["colour"] <= 0.35, result.as_dict()
            assert result.scores["shape"] <= 0.25, result.as_dict()
