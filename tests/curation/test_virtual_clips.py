"""Virtual clips: frame-exact ranges of a source, decoded by seeking, equal to the clip file the cutter would write.

The sources here stamp each frame's index into the picture (a 12-bit barcode of big black/white blocks that survives
H.264), so a test reads back *which* source frame a decoded frame is, not only what it looks like.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from curation.clip_plan import CutConfig
from curation.cutting import cut_clips, keep_virtual_frames
from curation.kept_frames import load_kept_frames
from curation.shots import Scene
from curation.video_io import read_frames
from curation.virtual_clips import (
    clip_source_frames,
    frame_index,
    read_clip_frames,
    read_source_frames,
)

W, H = 192, 112
BITS = 12
CELL = 16  # barcode cell size in pixels: two rows of six cells


def stamped(i: int, width: int = W, height: int = H) -> np.ndarray:
    """Frame ``i``: a grey ramp that moves with ``i`` and the index as a barcode in the top rows."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = ((np.arange(width)[None, :, None] + 3 * i) % 200 + 30).astype(np.uint8)
    for bit in range(BITS):
        row, col = divmod(bit, 6)
        image[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = 255 if (i >> bit) & 1 else 0
    return image


def barcode(frame: np.ndarray, width: int = W) -> int:
    """The index stamped into ``frame`` (read at the frame's own scale)."""
    cell = frame.shape[1] * CELL // width
    value = 0
    for bit in range(BITS):
        row, col = divmod(bit, 6)
        block = frame[row * cell + cell // 4:(row + 1) * cell - cell // 4, col * cell + cell // 4:(col + 1) * cell - cell // 4]
        value |= int(block.mean() > 127) << bit
    return value


def write_stamped(path: Path, frames: int, fps: Fraction | int = 24, gop: int = 12, pts_step: list[int] | None = None,
                  bframes: bool = True) -> Path:
    """An H.264 mp4 of stamped frames with a keyframe every ``gop`` frames (so reads must seek) and B-frames.
    ``pts_step`` (in 1/fps/4 units per frame, cycled) makes the timestamps irregular: a variable-rate source."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "10", "g": str(gop), "keyint_min": str(gop), "bf": "2" if bframes else "0"}
        stream.codec_context.time_base = Fraction(1, int(fps) * 4)
        t = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(stamped(i), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, int(fps) * 4)
            t += pts_step[i % len(pts_step)] if pts_step else 4
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_stamped(tmp_path_factory.mktemp("virtual") / "stamped.mp4", 150)


def test_the_index_knows_every_frame_and_its_keyframes(source):
    index = frame_index(source)
    assert index.num_frames == 150 and index.seekable
    assert index.keyframes[0] == 0 and len(index.keyframes) >= 150 // 12
    assert index.time(24) == 1  # one second in at 24 fps


def test_seeking_reads_the_same_frames_as_decoding_from_the_start(source):
    wanted = [149, 3, 70, 71, 40, 3, 130]  # any order, repeats, across several keyframes
    seeked = read_source_frames(source, wanted)
    counted = read_frames(source, wanted)
    assert [barcode(f) for f in seeked] == wanted
    for a, b in zip(seeked, counted):
        np.testing.assert_array_equal(a, b)


def test_a_virtual_clip_equals_its_exported_file_with_exact_first_and_last_frames(source, tmp_path):
    scenes = [Scene("vid", 0, 0, 50, 0.0, 50 / 24, 24.0), Scene("vid", 1, 50, 150, 50 / 24, 150 / 24, 24.0)]
    cfg = CutConfig(min_seconds=1.0, short_side=None)
    virtual = keep_virtual_frames(source, "vid", scenes, tmp_path / "frames", cfg)
    exported = cut_clips(source, "vid", scenes, tmp_path / "clips", cfg, frames_root=tmp_path / "cut-frames")
    assert [c.num_frames for c in virtual.clips] == [c.num_frames for c in exported.clips] == [63, 125]
    for v, e in zip(virtual.clips, exported.clips):
        assert v.virtual and not e.virtual and v.id != e.id
        assert (v.start_frame, v.end_frame, v.width, v.height, v.fps) == (e.start_frame, e.end_frame, e.width, e.height, e.fps)
        row = v.to_row()
        frames = read_clip_frames(row)
        from_file = read_frames(e.path, range(e.num_frames))
        assert len(frames) == len(from_file) == v.num_frames
        # exactly the right source frames at both ends: 30 fps output over 24 fps source frames
        mapping = clip_source_frames(frame_index(source), v.start_frame, v.end_frame, v.num_frames, Fraction(30))
        assert barcode(frames[0]) == v.start_frame == mapping[0]
        assert barcode(frames[-1]) == v.end_frame - 1 == mapping[-1]
        assert [barcode(f) for f in frames] == [barcode(f) for f in from_file] == mapping
        diff = np.abs(np.stack(frames).astype(np.int16) - np.stack(from_file).astype(np.int16))
        assert diff.mean() < 2.0  # one H.264 generation (crf 18) apart
        # kept scorer frames: the same pixels the cutter saved
        for purpose in ("aesthetic", "flow", "ocr", "match"):
            for a, b in zip(load_kept_frames(v.frames_dir, purpose), load_kept_frames(e.frames_dir, purpose)):
                np.testing.assert_array_equal(a, b)


def test_a_clip_deep_in_the_source_decodes_only_from_the_keyframe_before_it(source, monkeypatch):
    import curation.virtual_clips as vc

    decoded = []
    real = vc.open_video

    class Counting:  # the container, with every decoded frame noted
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def decode(self, *args, **kw):
            for frame in self.container.decode(*args, **kw):
                decoded.append(frame.pts)
                yield frame

    def counting(path, **kwargs):
        container, stream = real(path, **kwargs)
        return Counting(container), stream

    monkeypatch.setattr(vc, "open_video", counting)
    frames = read_source_frames(source, [130, 131])
    assert [barcode(f) for f in frames] == [130, 131]
    assert 0 < len(decoded) <= 12 + 4  # one GOP and the decoder's lookahead, not 131 frames


def test_variable_frame_rate_sources_map_by_timestamp(tmp_path):
    # frames alternate 1/24 s and 2/24 s on screen: counting at a nominal rate would drift
    path = write_stamped(tmp_path / "vfr.mp4", 60, pts_step=[4, 8])
    index = frame_index(path)
    rate = Fraction(24)
    mapping = clip_source_frames(index, 10, 40, 45, rate)
    # output k at k/24 s: source frames sit at t = 0, 1, 3, 4, 6, ... (in 1/24 s) from frame 10
    times = [index.time(j) - index.time(10) for j in range(10, 40)]
    for k, j in enumerate(mapping):
        assert times[j - 10] <= Fraction(k) / rate
        assert j == 39 or times[j + 1 - 10] > Fraction(k) / rate
    frames = read_source_frames(path, sorted(set(mapping)))
    assert [barcode(f) for f in frames] == sorted(set(mapping))


def test_a_range_past_the_source_is_dropped_with_the_reason(source, tmp_path):
    scenes = [Scene("vid", 0, 100, 200, 100 / 24, 200 / 24, 24.0)]
    result = keep_virtual_frames(source, "vid", scenes, tmp_path / "frames", CutConfig(max_seconds=None))
    assert not result.clips
    assert "source ended at frame 150" in result.dropped[0].reason


def test_kept_frames_are_reused_not_rewritten(source, tmp_path):
    scenes = [Scene("vid", 0, 0, 72, 0.0, 3.0, 24.0)]
    first = keep_virtual_frames(source, "vid", scenes, tmp_path / "frames", CutConfig())
    manifest = Path(first.clips[0].frames_dir) / "kept.json"
    stamp = manifest.stat().st_mtime_ns
    again = keep_virtual_frames(source, "vid", scenes, tmp_path / "frames", CutConfig())
    assert again.clips == first.clips and manifest.stat().st_mtime_ns == stamp


def test_a_rotated_phone_video_gives_upright_virtual_clips_kept_frames_and_exported_files(tmp_path):
    from curation.export import ExportJob, export_source
    from tests.curation.test_rotation import FRAMES, FPS, UP_H, UP_W, assert_upright, write_video

    path = write_video(tmp_path / "phone.mp4", 90)
    scenes = [Scene("phone", 0, 0, FRAMES, 0.0, FRAMES / FPS, float(FPS))]
    result = keep_virtual_frames(path, "phone", scenes, tmp_path / "frames", CutConfig(min_seconds=None))
    (clip,) = result.clips
    assert (clip.width, clip.height) == (UP_W, UP_H) and clip.height > clip.width  # the table's size is upright
    for purpose in ("aesthetic", "flow", "ocr", "match"):
        for frame in load_kept_frames(clip.frames_dir, purpose):
            assert_upright(frame)
    for frame in read_clip_frames(clip.to_row(), [0, clip.num_frames - 1]):
        assert_upright(frame)
    row = {**clip.to_row(), "video_id": "phone"}
    ((_, file, frames),) = export_source(ExportJob(clip_dir=str(tmp_path / "export")), [row])
    exported = read_frames(file, [0, frames - 1])
    assert frames == clip.num_frames and exported[0].shape == (UP_H, UP_W, 3)
    for frame in exported:
        assert_upright(frame)
