"""Upright frames: a phone video's display-matrix rotation is applied wherever frames are decoded.

Phones store portrait video as landscape frames plus a rotation in the stream's display matrix. FFmpeg's CLI turns
the frames upright; PyAV hands them out as stored. The test videos hold upright content 64 wide x 112 tall with a
red block in its top-left corner and a blue one in its top-right (two markers, so a transposed or mirrored frame
fails too), stored turned by the inverse of the rotation the display matrix then declares.
"""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from curation.clip_plan import CutConfig
from curation.cutting import cut_clips
from curation.kept_frames import KeepFramesSpec, kept_frame_indices, load_kept_frames
from curation.probe import probe_video
from curation.shots import Scene
from curation.video_io import iter_av_frames, iter_frames, probe_stream, read_frames, upright_yuv420p

UP_W, UP_H = 64, 112  # upright content: portrait
FPS = 12
FRAMES = 24
RED = (230, 20, 20)
BLUE = (20, 20, 230)
GREY = (128, 128, 128)


def upright_content(width: int = UP_W, height: int = UP_H) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    image[:] = GREY
    image[:16, :16] = RED
    image[:16, -16:] = BLUE
    return image


def write_video(path: Path, rotation: int, content: np.ndarray | None = None) -> Path:
    """``content`` (upright) stored turned clockwise by ``rotation`` with a display matrix that turns it back."""
    import av

    content = upright_content() if content is None else content
    stored = np.ascontiguousarray(np.rot90(content, -(rotation // 90)))
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        stream.options = {"crf": "12"}
        if rotation:
            stream.set_display_rotation(rotation)  # counter-clockwise, as VideoFrame.rotation reads it
        for _ in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def assert_upright(frame: np.ndarray, fmt: str = "rgb") -> None:
    """Portrait, red block top-left, blue block top-right, grey bottom corners (``fmt`` rgb or bgr)."""
    h, w = frame.shape[:2]
    assert h > w, f"frame is {w}x{h}: not portrait"
    if fmt == "bgr":
        frame = frame[..., ::-1]
    m = max(2, min(h, w) // 16)  # a margin inside each 16 px block of the 64 px wide content, scaled with it
    b = max(m + 1, min(h, w) // 4 - m)

    def mean(region: np.ndarray) -> np.ndarray:
        return region.reshape(-1, 3).mean(axis=0)

    def near(region: np.ndarray, colour) -> bool:
        return bool(np.abs(mean(region) - np.asarray(colour)).max() < 40)

    assert near(frame[m:b, m:b], RED), f"top-left is {mean(frame[m:b, m:b])}, not red"
    assert near(frame[m:b, w - b : w - m], BLUE), f"top-right is {mean(frame[m:b, w - b : w - m])}, not blue"
    assert near(frame[h - b : h - m, m:b], GREY)
    assert near(frame[h - b : h - m, w - b : w - m], GREY)


@pytest.fixture(scope="module", params=[90, 180, 270])
def rotated(request, tmp_path_factory) -> tuple[Path, int]:
    rotation = request.param
    return write_video(tmp_path_factory.mktemp(f"rot{rotation}") / f"rot{rotation}.mp4", rotation), rotation


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("plain") / "plain.mp4", 0)


def test_the_test_video_carries_its_rotation(rotated):
    """The premise: PyAV reads the display matrix back from the decoded frames, and the frames are stored turned."""
    path, rotation = rotated
    _, _, frame, _ = next(iter_av_frames(path))
    assert frame.rotation % 360 == rotation
    stored_w, stored_h = (UP_H, UP_W) if rotation in (90, 270) else (UP_W, UP_H)
    assert (frame.width, frame.height) == (stored_w, stored_h)


def test_reader_yields_upright_frames(rotated):
    path, rotation = rotated
    frames = list(iter_frames(path))
    assert len(frames) == FRAMES
    for _i, _t, frame in frames:
        assert frame.shape == (UP_H, UP_W, 3)
        assert_upright(frame)
    for _i, _t, frame in iter_frames(path, size=(32, 56), format="bgr24", stop=2):
        assert frame.shape == (56, 32, 3)  # size is the upright (width, height)
        assert_upright(frame, "bgr")
    gray = next(iter_frames(path, format="gray"))[2]
    assert gray.shape == (UP_H, UP_W)
    for frame in read_frames(path, [5, 0, 5]):
        assert_upright(frame)
    assert read_frames(path, [3], size=(32, 56))[0].shape == (56, 32, 3)


def test_reader_agrees_with_ffmpeg_autorotate(rotated):
    """FFmpeg's CLI applies the display matrix by default: its first frame is ours."""
    import imageio_ffmpeg

    path, _rotation = rotated
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-frames:v", "1",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]  # fmt: skip
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    theirs = np.frombuffer(raw, np.uint8).reshape(UP_H, UP_W, 3)
    assert_upright(theirs)
    ours = next(iter_frames(path))[2]
    assert np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).mean() < 2.0


def test_stream_info_and_probe_report_upright_sizes(rotated):
    path, rotation = rotated
    info = probe_stream(path)
    assert (info.width, info.height, info.rotation) == (UP_W, UP_H, rotation)
    assert info.stored_size == ((UP_H, UP_W) if rotation in (90, 270) else (UP_W, UP_H))
    assert next(iter_av_frames(path))[3] == info
    probed = probe_video(path)
    assert (probed.width, probed.height, probed.rotation) == (UP_W, UP_H, rotation)
    assert probed.aspect_ratio == pytest.approx(UP_H / UP_W)
    assert probed.resolution == UP_W * UP_H
    assert "rotation" not in probed.to_row()  # raw_videos keeps its columns: the sizes are upright already


@pytest.mark.parametrize("short_side", [None, 32])
def test_cut_clips_are_upright(rotated, tmp_path, short_side):
    path, _rotation = rotated
    scenes = [Scene("rot", 0, 0, FRAMES, 0.0, FRAMES / FPS, float(FPS))]
    cfg = CutConfig(min_seconds=None, target_fps=None, short_side=short_side)
    (clip,) = cut_clips(path, "rot", scenes, tmp_path, cfg).clips
    want_w, want_h = (UP_W, UP_H) if short_side is None else (32, 56)
    assert (clip.width, clip.height) == (want_w, want_h)
    assert clip.aspect_ratio == pytest.approx(want_h / want_w) and clip.resolution == want_w * want_h
    info = probe_stream(clip.path)
    assert (info.width, info.height, info.rotation) == (want_w, want_h, 0)  # the file itself is upright
    decoded = [f for _i, _t, f in iter_frames(clip.path)]
    assert len(decoded) == clip.num_frames == FRAMES
    for frame in decoded:
        assert_upright(frame)
    for purpose in ("aesthetic", "flow", "ocr", "match"):
        kept = load_kept_frames(clip.frames_dir, purpose)
        assert kept and len(kept) == len(kept_frame_indices(clip.frames_dir, purpose))
        for frame in kept:
            assert frame.shape == (want_h, want_w, 3)
            assert_upright(frame)


def test_upright_yuv420p_turns_each_plane():
    import av

    content = upright_content()
    for rotation in (90, 180, 270):
        stored = np.ascontiguousarray(np.rot90(content, -(rotation // 90)))
        frame = av.VideoFrame.from_ndarray(stored, format="rgb24").reformat(format="yuv420p")
        turned = upright_yuv420p(frame, rotation)
        assert (turned.width, turned.height, turned.format.name) == (UP_W, UP_H, "yuv420p")
        assert_upright(turned.to_ndarray(format="rgb24"))
    frame = av.VideoFrame.from_ndarray(content, format="rgb24").reformat(format="yuv420p")
    assert upright_yuv420p(frame, 0) is frame


def test_non_rotated_video_is_unchanged(plain, tmp_path):
    """No display matrix: every frame is bit for bit what PyAV decodes and swscale converts, as before."""
    import av
    from av.video.reformatter import VideoReformatter

    info = probe_stream(plain)
    assert (info.width, info.height, info.rotation) == (UP_W, UP_H, 0)
    with av.open(str(plain)) as container:
        reformatter = VideoReformatter()
        direct = [reformatter.reformat(f, format="rgb24").to_ndarray() for f in container.decode(video=0)]
    ours = [f for _i, _t, f in iter_frames(plain)]
    assert len(ours) == len(direct) == FRAMES
    assert all(np.array_equal(a, b) for a, b in zip(ours, direct))
    assert all(np.array_equal(a, direct[i]) for a, i in zip(read_frames(plain, [3, 0]), [3, 0]))
    assert_upright(ours[0])
    scenes = [Scene("plain", 0, 0, FRAMES, 0.0, FRAMES / FPS, float(FPS))]
    cfg = CutConfig(min_seconds=None, target_fps=None)
    (clip,) = cut_clips(plain, "plain", scenes, tmp_path, cfg, KeepFramesSpec(enabled=False)).clips
    assert (clip.width, clip.height) == (UP_W, UP_H)
    assert_upright(read_frames(clip.path, [0])[0])


def test_rotation_of_a_landscape_phone_video(tmp_path):
    """A landscape clip filmed upside down (180): same size, content turned."""
    content = np.ascontiguousarray(np.rot90(upright_content(), 1))  # 112 x 64 landscape: markers on the left side
    path = write_video(tmp_path / "flip.mp4", 180, content)
    frame = next(iter_frames(path))[2]
    assert frame.shape == content.shape
    assert np.abs(frame.astype(np.int16) - content.astype(np.int16)).mean() < 4.0
    assert probe_stream(path).rotation == 180
    assert Fraction(probe_stream(path).fps) == FPS
